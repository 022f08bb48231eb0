//! Confinement of `system.run` arguments to the workspace (the rule is
//! described in the docs of [`crate::policy`]).

use std::fs;
use std::path::{Component, Path, PathBuf};

use super::{PolicyViolation, is_short_bundle_with};

/// Longest path Linux accepts (`PATH_MAX`, counting the NUL); a longer path
/// candidate is refused rather than resolved.
const PATH_MAX: usize = 4096;

/// Longest file name (`NAME_MAX`); a longer plain word cannot name an entry.
const NAME_MAX: usize = 255;

/// Checks every argument of `program` against the workspace.
pub(super) fn check_arguments(
    program: &str,
    args: &[String],
    workspace: &Path,
    cwd: &Path,
) -> Result<(), PolicyViolation> {
    check_escaping_options(program, args)?;
    let root = fs::canonicalize(workspace).map_err(|e| {
        PolicyViolation::WorkingDirectory(format!(
            "the workspace {} cannot be resolved ({e})",
            workspace.display()
        ))
    })?;
    let cwd = root.join(cwd);
    let cwd_outside = || {
        PolicyViolation::WorkingDirectory(format!("{} is not inside the workspace", cwd.display()))
    };
    if cwd.components().any(|c| c == Component::ParentDir) {
        return Err(cwd_outside());
    }
    let cwd = match resolve(&cwd) {
        Ok(resolved) if resolved.starts_with(&root) => resolved,
        _ => return Err(cwd_outside()),
    };
    for arg in args {
        for candidate in candidates(arg) {
            if let Err(why) = check_candidate(candidate, &root, &cwd) {
                let why = if candidate == arg {
                    why.text().to_owned()
                } else {
                    format!("contains {candidate:?}, which {}", why.text())
                };
                return Err(PolicyViolation::OutsideWorkspace {
                    arg: arg.clone(),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// Why a candidate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Home,
    Parent,
    TooLong,
    Outside,
    Symlink,
    Unresolvable,
}

impl Why {
    fn text(self) -> &'static str {
        match self {
            Why::Home => {
                "starts with `~`, a home directory, which is outside the workspace (and no shell expands it)"
            }
            Why::Parent => "contains a `..` component",
            Why::TooLong => "is too long to be checked as a path",
            Why::Outside => "points outside the workspace",
            Why::Symlink => "leads outside the workspace through a symlink",
            Why::Unresolvable => "goes through a symlink that cannot be resolved",
        }
    }
}

/// The texts of `arg` that a program may take as a path: the argument, the
/// text after each `=`, and for a short-option argument every suffix after
/// the dash (an attached option value).
fn candidates(arg: &str) -> Vec<&str> {
    let mut out = vec![arg];
    out.extend(arg.match_indices('=').map(|(i, _)| &arg[i + 1..]));
    if arg.starts_with('-') && !arg.starts_with("--") {
        out.extend(arg.char_indices().skip(1).map(|(i, _)| &arg[i..]));
    }
    out
}

fn check_candidate(text: &str, root: &Path, cwd: &Path) -> Result<(), Why> {
    if text.is_empty() {
        return Ok(());
    }
    if text.starts_with('~') {
        return Err(Why::Home);
    }
    let path = Path::new(text);
    let is_path = path.is_absolute() || text.contains('/') || text == "..";
    let full = if is_path {
        if text.len() >= PATH_MAX {
            return Err(Why::TooLong);
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(Why::Parent);
        }
        cwd.join(path)
    } else {
        // A plain word names an entry of `cwd`, which is inside the
        // workspace: only a symlink can lead out.
        if text.len() > NAME_MAX {
            return Ok(());
        }
        let entry = cwd.join(text);
        match fs::symlink_metadata(&entry) {
            Ok(meta) if meta.file_type().is_symlink() => entry,
            _ => return Ok(()),
        }
    };
    let resolved = resolve(&full)?;
    if resolved.starts_with(root) {
        Ok(())
    } else if full.starts_with(root) {
        Err(Why::Symlink)
    } else {
        Err(Why::Outside)
    }
}

/// `path` (absolute, without `..`) with its deepest existing ancestor
/// canonicalized, following symlinks, and the rest appended. The walk goes
/// down from `/` and stops at the first component that cannot be looked up.
fn resolve(path: &Path) -> Result<PathBuf, Why> {
    let mut existing = PathBuf::new();
    let mut rest = path.components();
    for comp in rest.by_ref() {
        let next = existing.join(comp);
        if fs::symlink_metadata(&next).is_err() {
            let mut resolved = fs::canonicalize(&existing).map_err(|_| Why::Unresolvable)?;
            resolved.push(comp);
            resolved.extend(rest);
            return Ok(resolved);
        }
        existing = next;
    }
    fs::canonicalize(&existing).map_err(|_| Why::Unresolvable)
}

/// Refuses options that make a program read files its arguments do not name:
/// following symlinks while recursing, or reading file names from a file.
fn check_escaping_options(program: &str, args: &[String]) -> Result<(), PolicyViolation> {
    let refuse = |arg: &str, what: &str| PolicyViolation::DangerousOption {
        program: program.to_owned(),
        arg: arg.to_owned(),
        why: format!("it {what}, which can reach files outside the workspace"),
    };
    const FOLLOWS: &str = "follows symlinks";
    const FILES_FROM: &str = "reads the names of the files to open from a file";
    if program == "find" {
        for arg in args {
            if arg == "-L" {
                return Err(refuse(arg, FOLLOWS));
            }
            let Some(word) = arg.strip_prefix('-') else {
                continue;
            };
            if word.starts_with("follow") {
                return Err(refuse(arg, FOLLOWS));
            }
            if word.starts_with("files0-from") {
                return Err(refuse(arg, FILES_FROM));
            }
        }
        return Ok(());
    }
    let (shorts, longs): (&[char], &[(&str, &str)]) = match program {
        "grep" | "egrep" | "fgrep" => (&['R'], &[("dereference-recursive", FOLLOWS)]),
        "rg" => (&['L'], &[("follow", FOLLOWS)]),
        "ls" => (&['L'], &[("dereference", FOLLOWS)]),
        "du" => (
            &['L'],
            &[("dereference", FOLLOWS), ("files0-from", FILES_FROM)],
        ),
        "wc" | "sort" => (&[], &[("files0-from", FILES_FROM)]),
        _ => return Ok(()),
    };
    for arg in args {
        if arg == "--" {
            break;
        }
        if let Some(name) = arg.strip_prefix("--") {
            let name = name.split_once('=').map_or(name, |(n, _)| n);
            // GNU long options may be abbreviated to any prefix.
            if let Some((_, what)) = longs
                .iter()
                .find(|(full, _)| !name.is_empty() && full.starts_with(name))
            {
                return Err(refuse(arg, what));
            }
        } else if shorts.iter().any(|s| is_short_bundle_with(arg, *s)) {
            return Err(refuse(arg, FOLLOWS));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn candidates_cover_option_values() {
        assert_eq!(candidates("notes.txt"), ["notes.txt"]);
        assert_eq!(candidates("--file=/etc/x"), ["--file=/etc/x", "/etc/x"]);
        assert_eq!(candidates("-f/x"), ["-f/x", "f/x", "/x", "x"]);
        assert_eq!(candidates("-"), ["-"]);
    }

    #[test]
    fn words_paths_and_symlinks() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(ws.path()).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("in")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).unwrap();
        let ok = |t: &str| check_candidate(t, &root, &root);
        for fine in [
            "-la",
            "hello world",
            "*.txt",
            ".",
            "sub",
            "sub/new/deeper",
            "in/x",
            "in",
        ] {
            assert_eq!(ok(fine), Ok(()), "{fine}");
        }
        assert_eq!(ok(&root.join("sub").display().to_string()), Ok(()));
        assert_eq!(ok("/etc/passwd"), Err(Why::Outside));
        assert_eq!(ok("/"), Err(Why::Outside));
        assert_eq!(ok("~"), Err(Why::Home));
        assert_eq!(ok(".."), Err(Why::Parent));
        assert_eq!(ok("sub/../sub"), Err(Why::Parent));
        assert_eq!(ok("out"), Err(Why::Symlink));
        assert_eq!(ok("out/new"), Err(Why::Symlink));
        assert_eq!(ok("./out"), Err(Why::Symlink));
        assert_eq!(ok("dangling"), Err(Why::Unresolvable));
        assert_eq!(
            ok(&format!("a/{}", "b".repeat(PATH_MAX))),
            Err(Why::TooLong)
        );
        // Too long to name an entry, so harmless.
        assert_eq!(ok(&"w".repeat(NAME_MAX + 1)), Ok(()));
    }

    #[test]
    fn attached_values_and_cwd_are_checked() {
        let ws = tempfile::tempdir().unwrap();
        let check = |args: &[&str], cwd: &str| {
            check_arguments("grep", &strings(args), ws.path(), Path::new(cwd))
        };
        assert!(check(&["-r", "x", "."], ".").is_ok());
        let err = check(&["-nf/etc/passwd", "x"], ".")
            .unwrap_err()
            .to_string();
        assert!(err.contains("contains \"/etc/passwd\""), "{err}");
        assert!(check(&["x", "/"], ".").is_err());
        assert!(matches!(
            check(&["x"], ".."),
            Err(PolicyViolation::WorkingDirectory(_))
        ));
        assert!(matches!(
            check(&["x"], "/tmp"),
            Err(PolicyViolation::WorkingDirectory(_))
        ));
    }

    #[test]
    fn options_that_follow_symlinks_or_read_name_lists_are_refused() {
        let refused = |program: &str, args: &[&str]| {
            matches!(
                check_escaping_options(program, &strings(args)),
                Err(PolicyViolation::DangerousOption { .. })
            )
        };
        assert!(refused("find", &["-L", "."]));
        assert!(refused("find", &[".", "-follow"]));
        assert!(refused("find", &["-files0-from", "list"]));
        assert!(refused("grep", &["-rR", "x"]));
        assert!(refused("grep", &["--dereference-rec", "x"]));
        assert!(refused("ls", &["-laL"]));
        assert!(refused("wc", &["--files0-from=list"]));
        assert!(refused("wc", &["--files0=list"]));
        assert!(!refused("grep", &["-r", "x", "."]));
        assert!(!refused("ls", &["--dereference-command-line", "x"]));
        assert!(!refused("ls", &["--", "-L"]));
        assert!(!refused("cat", &["-L"]));
    }
}
