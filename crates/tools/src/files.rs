//! Workspace-confined file tools: `file.read`, `file.write`, `file.list`.
//!
//! Every path goes through [`confine`]: relative paths are taken from the
//! workspace, absolute paths must lie inside it, `..` is refused outright,
//! and the deepest existing ancestor of the path is canonicalized and must
//! still be inside the canonical workspace, so a symlink in the workspace
//! that points elsewhere cannot be followed out of it (a dangling symlink is
//! refused too, since writing through it would create its target).
//!
//! Known limit: the check and the use are two steps; a process racing to
//! swap a directory for a symlink in between could escape. Within openpista
//! the tools of one turn run one after another.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use openpista_proto::ToolDefinition;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Tool, ToolContext, ToolError, ToolOutput};

/// Size limits of the file tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileLimits {
    /// Bytes returned by one `file.read` (more is read with `offset`).
    pub max_read_bytes: u64,
    /// Bytes accepted by one `file.write`.
    pub max_write_bytes: u64,
    /// Entries returned by one `file.list`.
    pub max_list_entries: usize,
}

impl Default for FileLimits {
    fn default() -> Self {
        Self {
            max_read_bytes: 256 * 1024,
            max_write_bytes: 1024 * 1024,
            max_list_entries: 500,
        }
    }
}

/// A path resolved inside the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    /// The canonical workspace.
    pub root: PathBuf,
    /// The resolved path: its existing part canonical, under `root`.
    pub path: PathBuf,
}

impl Confined {
    /// The path relative to the workspace, for messages (`.` for the root).
    pub fn display(&self) -> String {
        relative(&self.root, &self.path)
    }
}

/// Resolves `requested` inside `workspace`, refusing every way out (see the
/// module docs). The path need not exist.
pub fn confine(workspace: &Path, requested: &str) -> Result<Confined, ToolError> {
    let root = fs::canonicalize(workspace).map_err(|e| {
        ToolError::Failed(format!(
            "the workspace {} is not usable: {e}",
            workspace.display()
        ))
    })?;
    if requested.is_empty() {
        return Err(ToolError::Denied("empty path".to_owned()));
    }
    if requested.contains('\0') {
        return Err(ToolError::Denied("the path contains a NUL byte".to_owned()));
    }
    let req = Path::new(requested);
    let outside = || {
        ToolError::Denied(format!(
            "{requested:?} is outside the workspace; use a path relative to the workspace"
        ))
    };
    let rel = if req.is_absolute() {
        req.strip_prefix(&root)
            .or_else(|_| req.strip_prefix(workspace))
            .map_err(|_| outside())?
    } else {
        req
    };
    let mut joined = root.clone();
    for comp in rel.components() {
        match comp {
            Component::Normal(c) => joined.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ToolError::Denied(format!(
                    "{requested:?} contains `..`; parent-directory components are not allowed"
                )));
            }
            Component::RootDir | Component::Prefix(_) => return Err(outside()),
        }
    }

    // Walk up to the deepest path that exists (a dangling symlink exists).
    let mut existing = joined.as_path();
    let mut tail: Vec<OsString> = Vec::new();
    loop {
        match fs::symlink_metadata(existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                    return Err(outside());
                };
                tail.push(name.to_owned());
                existing = parent;
            }
            Err(e) => {
                return Err(ToolError::Failed(format!(
                    "cannot access {requested:?}: {e}"
                )));
            }
        }
    }
    let canonical = fs::canonicalize(existing).map_err(|e| {
        ToolError::Denied(format!(
            "{requested:?} goes through a symlink that cannot be resolved ({e})"
        ))
    })?;
    if !canonical.starts_with(&root) {
        return Err(ToolError::Denied(format!(
            "{requested:?} leads outside the workspace through a symlink"
        )));
    }
    let mut path = canonical;
    path.extend(tail.iter().rev());
    Ok(Confined { root, path })
}

fn relative(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(r) if r.as_os_str().is_empty() => ".".to_owned(),
        Ok(r) => r.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ToolError::Failed(format!("file task failed: {e}")))?
}

/// `file.read`: reads a text file of the workspace, in byte windows.
#[derive(Debug, Clone, Default)]
pub struct FileRead {
    limits: FileLimits,
}

impl FileRead {
    pub fn new(limits: FileLimits) -> Self {
        Self { limits }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    path: String,
    #[serde(default)]
    offset: u64,
    limit: Option<u64>,
}

#[async_trait]
impl Tool for FileRead {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "file.read".to_owned(),
            description: format!(
                "Read a text file in the workspace. Returns at most {} bytes per call; \
                 use offset (bytes) to continue.",
                self.limits.max_read_bytes
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "Path relative to the workspace."},
                    "offset": {"type": "integer", "minimum": 0, "description": "First byte to read (default 0)."},
                    "limit": {"type": "integer", "minimum": 1, "description": "Bytes to read (default and maximum: the read limit)."}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let args: ReadArgs = crate::parse_args("file.read", args)?;
        let target = confine(&ctx.workspace, &args.path)?;
        let max = self.limits.max_read_bytes;
        blocking(move || read_window(&target, args.offset, args.limit.unwrap_or(max).min(max)))
            .await
    }
}

fn read_window(target: &Confined, offset: u64, limit: u64) -> Result<ToolOutput, ToolError> {
    let shown = target.display();
    let fail = |e: std::io::Error| ToolError::Failed(format!("cannot read {shown}: {e}"));
    let meta = fs::metadata(&target.path).map_err(fail)?;
    if !meta.is_file() {
        return Err(ToolError::Failed(format!("{shown} is not a regular file")));
    }
    let size = meta.len();
    if offset >= size && size > 0 {
        return Ok(ToolOutput::ok(format!(
            "[offset {offset} is at or past the end of {shown}, which has {size} bytes]"
        )));
    }
    let mut file = fs::File::open(&target.path).map_err(fail)?;
    file.seek(SeekFrom::Start(offset)).map_err(fail)?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).map_err(fail)?;
    // Do not cut a character in half at the end of the window.
    let mut end = bytes.len();
    if offset + (end as u64) < size
        && let Err(e) = std::str::from_utf8(&bytes)
        && e.error_len().is_none()
    {
        end = e.valid_up_to();
    }
    let next = offset + end as u64;
    let mut content = String::from_utf8_lossy(&bytes[..end]).into_owned();
    if size == 0 {
        content.push_str("[empty file]");
    }
    if next < size {
        content.push_str(&format!(
            "\n[... file truncated: showed bytes {offset}..{next} of {size}; call file.read with offset={next} to continue ...]"
        ));
    }
    Ok(ToolOutput::ok(content))
}

/// `file.write`: writes (or appends to) a file of the workspace, creating
/// parent directories inside it.
#[derive(Debug, Clone, Default)]
pub struct FileWrite {
    limits: FileLimits,
}

impl FileWrite {
    pub fn new(limits: FileLimits) -> Self {
        Self { limits }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    path: String,
    content: String,
    #[serde(default)]
    append: bool,
}

#[async_trait]
impl Tool for FileWrite {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "file.write".to_owned(),
            description: format!(
                "Write a text file in the workspace (replacing it, or appending with append=true). \
                 Parent directories are created. At most {} bytes per call.",
                self.limits.max_write_bytes
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "Path relative to the workspace."},
                    "content": {"type": "string", "description": "The text to write."},
                    "append": {"type": "boolean", "description": "Append instead of replacing (default false)."}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let args: WriteArgs = crate::parse_args("file.write", args)?;
        let len = args.content.len() as u64;
        if len > self.limits.max_write_bytes {
            return Err(ToolError::InvalidArguments {
                tool: "file.write".to_owned(),
                reason: format!(
                    "content is {len} bytes; at most {} bytes may be written per call (append the rest with append=true)",
                    self.limits.max_write_bytes
                ),
            });
        }
        let target = confine(&ctx.workspace, &args.path)?;
        blocking(move || write_file(&target, args.content.as_bytes(), args.append)).await
    }
}

pub(crate) fn write_file(
    target: &Confined,
    content: &[u8],
    append: bool,
) -> Result<ToolOutput, ToolError> {
    let shown = target.display();
    let fail = |e: std::io::Error| ToolError::Failed(format!("cannot write {shown}: {e}"));
    if target.path == target.root {
        return Err(ToolError::Failed(
            "cannot write the workspace directory itself".to_owned(),
        ));
    }
    if let Ok(meta) = fs::metadata(&target.path)
        && !meta.is_file()
    {
        return Err(ToolError::Failed(format!(
            "{shown} exists and is not a regular file"
        )));
    }
    if let Some(parent) = target.path.parent() {
        fs::create_dir_all(parent).map_err(fail)?;
    }
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&target.path)
        .map_err(fail)?;
    file.write_all(content).map_err(fail)?;
    let verb = if append { "appended" } else { "wrote" };
    Ok(ToolOutput::ok(format!(
        "{verb} {} bytes to {shown}",
        content.len()
    )))
}

/// `file.list`: lists a directory of the workspace (optionally recursively;
/// symlinks are shown, never followed).
#[derive(Debug, Clone, Default)]
pub struct FileList {
    limits: FileLimits,
}

impl FileList {
    pub fn new(limits: FileLimits) -> Self {
        Self { limits }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default = "dot")]
    path: String,
    #[serde(default)]
    recursive: bool,
}

fn dot() -> String {
    ".".to_owned()
}

#[async_trait]
impl Tool for FileList {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "file.list".to_owned(),
            description: format!(
                "List a directory of the workspace (paths relative to the workspace; \
                 directories end with '/', symlinks with '@'). At most {} entries.",
                self.limits.max_list_entries
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "Directory relative to the workspace (default \".\")."},
                    "recursive": {"type": "boolean", "description": "List subdirectories too (default false)."}
                },
                "additionalProperties": false
            }),
        }
    }

    async fn call(
        &self,
        args: serde_json::Value,
        ctx: &ToolContext,
    ) -> Result<ToolOutput, ToolError> {
        let args: ListArgs = crate::parse_args("file.list", args)?;
        let target = confine(&ctx.workspace, &args.path)?;
        let max = self.limits.max_list_entries;
        blocking(move || list_dir(&target, args.recursive, max)).await
    }
}

fn list_dir(target: &Confined, recursive: bool, max: usize) -> Result<ToolOutput, ToolError> {
    let shown = target.display();
    let meta = fs::metadata(&target.path)
        .map_err(|e| ToolError::Failed(format!("cannot list {shown}: {e}")))?;
    if !meta.is_dir() {
        return Err(ToolError::Failed(format!("{shown} is not a directory")));
    }
    let mut lines: Vec<String> = Vec::new();
    let mut more = false;
    // Depth-first in sorted order: a directory's entries follow it.
    let mut stack = vec![sorted_entries(&target.root, &target.path)?.into_iter()];
    while let Some(top) = stack.last_mut() {
        let Some((path, ft)) = top.next() else {
            stack.pop();
            continue;
        };
        if lines.len() >= max {
            more = true;
            break;
        }
        let rel = relative(&target.root, &path);
        if ft.is_symlink() {
            lines.push(format!("{rel}@"));
        } else if ft.is_dir() {
            lines.push(format!("{rel}/"));
            if recursive {
                stack.push(sorted_entries(&target.root, &path)?.into_iter());
            }
        } else {
            let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            lines.push(format!("{rel} ({size} bytes)"));
        }
    }
    let mut content = if lines.is_empty() {
        format!("[{shown} is empty]")
    } else {
        lines.join("\n")
    };
    if more {
        content.push_str(&format!(
            "\n[... listing stopped at {max} entries; list a subdirectory to see more ...]"
        ));
    }
    Ok(ToolOutput::ok(content))
}

/// The entries of `dir`, sorted by name, with their (unfollowed) types.
fn sorted_entries(root: &Path, dir: &Path) -> Result<Vec<(PathBuf, fs::FileType)>, ToolError> {
    let reader = fs::read_dir(dir)
        .map_err(|e| ToolError::Failed(format!("cannot list {}: {e}", relative(root, dir))))?;
    let mut entries: Vec<(PathBuf, fs::FileType)> = reader
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.path(), e.file_type().ok()?)))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// The three file tools with the same limits.
pub fn file_tools(limits: FileLimits) -> [Arc<dyn Tool>; 3] {
    [
        Arc::new(FileRead::new(limits)),
        Arc::new(FileWrite::new(limits)),
        Arc::new(FileList::new(limits)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_inside() {
        let ws = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(ws.path()).unwrap();
        let c = confine(ws.path(), "a/b.txt").unwrap();
        assert_eq!(c.path, root.join("a/b.txt"));
        assert_eq!(c.display(), "a/b.txt");
        assert_eq!(confine(ws.path(), ".").unwrap().display(), ".");
        assert_eq!(confine(ws.path(), "./x").unwrap().path, root.join("x"));
    }

    #[test]
    fn absolute_paths_inside_are_accepted() {
        let ws = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(ws.path()).unwrap();
        let inside = root.join("x.txt");
        let c = confine(ws.path(), &inside.display().to_string()).unwrap();
        assert_eq!(c.path, inside);
        assert!(confine(ws.path(), "/etc/passwd").is_err());
    }

    #[test]
    fn parent_components_are_refused_even_when_harmless() {
        let ws = tempfile::tempdir().unwrap();
        fs::create_dir(ws.path().join("a")).unwrap();
        let err = confine(ws.path(), "a/../b").unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        assert!(confine(ws.path(), "").is_err());
        assert!(confine(ws.path(), "a\0b").is_err());
    }

    #[test]
    fn dangling_symlink_is_refused() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("new"), ws.path().join("dangling")).unwrap();
        let err = confine(ws.path(), "dangling").unwrap_err();
        assert!(matches!(err, ToolError::Denied(_)), "{err}");
    }

    #[test]
    fn symlink_inside_the_workspace_is_followed() {
        let ws = tempfile::tempdir().unwrap();
        fs::create_dir(ws.path().join("real")).unwrap();
        std::os::unix::fs::symlink(ws.path().join("real"), ws.path().join("alias")).unwrap();
        let c = confine(ws.path(), "alias/f").unwrap();
        assert_eq!(c.display(), "real/f");
    }
}
