//! A cached [`SkillSet`] that reloads itself when its files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::{SKILL_FILE, SkillSet, discover};

/// The skills under some roots, parsed once and reloaded when a `SKILL.md`
/// under the roots is added, removed or changed.
///
/// Each access compares a cheap fingerprint (path, modification time and
/// length of every `SKILL.md` and folder under the roots) with the one the
/// cache was built from; there is no watcher thread.
#[derive(Debug)]
pub struct SkillCatalog {
    roots: Vec<PathBuf>,
    cache: Mutex<Cached>,
}

#[derive(Debug)]
struct Cached {
    fingerprint: Vec<Stamp>,
    set: Arc<SkillSet>,
}

type Stamp = (PathBuf, Option<SystemTime>, u64);

/// Same depth limit as [`discover`].
const MAX_DEPTH: usize = 8;

impl SkillCatalog {
    /// Loads the skills under `roots` (later roots override earlier ones).
    pub fn new(roots: Vec<PathBuf>) -> Self {
        let fingerprint = fingerprint(&roots);
        let set = Arc::new(discover(&roots));
        Self {
            roots,
            cache: Mutex::new(Cached { fingerprint, set }),
        }
    }

    /// The folders searched, in order.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The current skills, reloaded first if a file changed.
    pub fn current(&self) -> Arc<SkillSet> {
        let now = fingerprint(&self.roots);
        // A poisoned lock only means another reader panicked; the cache is still usable.
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.fingerprint != now {
            tracing::debug!(roots = ?self.roots, "skills changed; reloading");
            cache.set = Arc::new(discover(&self.roots));
            cache.fingerprint = now;
        }
        cache.set.clone()
    }
}

fn fingerprint(roots: &[PathBuf]) -> Vec<Stamp> {
    let mut out = Vec::new();
    for root in roots {
        walk(root, 0, &mut out);
    }
    out
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<Stamp>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    out.push((dir.to_path_buf(), meta.modified().ok(), meta.len()));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(ft) = entry.file_type() else { continue };
        let path = entry.path();
        if ft.is_dir() {
            walk(&path, depth + 1, out);
        } else if ft.is_file()
            && entry.file_name() == SKILL_FILE
            && let Ok(meta) = entry.metadata()
        {
            out.push((path, meta.modified().ok(), meta.len()));
        }
    }
}
