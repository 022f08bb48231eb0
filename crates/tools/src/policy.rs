//! The operator's policy for `system.run`, and the command checker.
//!
//! In [`PolicyMode::Allowlist`] a command is never given to a shell. It is
//! split into argv with `shell-words` (POSIX quoting rules) and executed
//! directly, so pipes, redirections, `;`, `$(...)`, globs and variables mean
//! nothing. The checker still refuses every character a model might use
//! expecting shell behaviour, so the model is told plainly instead of getting
//! a surprising literal argument:
//!
//! - `;` `&` `|` `` ` `` `<` `>` `$(` `${` anywhere **outside single quotes**.
//!   Inside single quotes (`grep -E 'a|b'`) they are plain characters in
//!   every shell and in our argv, so allowing them there is sound. Inside
//!   double quotes they are refused (a shell would expand `$(` there).
//! - control characters (newline, CR, NUL, escape, ...) anywhere, even
//!   quoted; a tab is accepted as a word separator;
//! - Unicode look-alikes (fullwidth `；｜＆＞＜`, zero-width and
//!   bidirectional controls) anywhere;
//! - `#` starting a comment (text after it would be silently dropped).
//!
//! Then argv\[0\] must be a bare ASCII name (no `/`, unchanged by NFKC) on the
//! allowlist, must not be a wrapper or interpreter (`env`, `sh`, `python3`,
//! `xargs`, `sudo`, ...) unless the operator also named it in
//! `allow_wrappers`, and must not carry an option that makes an allowed
//! program run another one (`find -exec`, `sort --compress-program`, ...;
//! GNU long-option abbreviations included).
//!
//! ## Arguments stay inside the workspace
//!
//! [`CommandPolicy::check_in`] also confines the arguments (argv\[1..\]) of
//! an allowed program to the workspace, unless the operator set
//! `allow_paths_outside_workspace`. Each argument gives one or more
//! *candidates*: the argument itself, the text after each `=`
//! (`--file=/etc/x`, `if=/etc/x`), and, for a short-option argument
//! (`-f/etc/x`, `-nfx`), every suffix after the dash, since any of them may
//! be an attached option value. A candidate
//!
//! - starting with `~` is refused (no shell expands it, and the model surely
//!   meant a home directory);
//! - that is a path, i.e. absolute, containing `/`, or exactly `..`, is
//!   refused if it has a `..` component or is longer than `PATH_MAX`;
//!   otherwise it is joined to the working directory, its deepest existing
//!   ancestor is canonicalized (following symlinks) and must lie inside the
//!   canonical workspace (an absolute path into the workspace is fine);
//! - that is a plain word (`-la`, `hello`, `*.txt`, `notes.txt`) can only
//!   name an entry of the working directory, so it is refused only when that
//!   entry is a symlink that leads outside the workspace or nowhere.
//!
//! The rule looks at text, not at what a program does with it: `echo /etc`
//! is refused too. Options that make a program read files the arguments do
//! not name are refused as well: following symlinks while recursing
//! (`find -L`, `-follow`, `grep -R`, `ls -L`, `du -L`, `rg -L`) and reading
//! file names from a file (`--files0-from` of `wc`, `sort`, `du`, `find`).
//!
//! Known limits: as for the file tools, the check and the use are two steps
//! (a racing process could swap a directory for a symlink in between), and
//! hard links or bind mounts inside the workspace are not detected.

mod paths;

use std::path::Path;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

/// How `system.run` treats commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// Refuse every command.
    Deny,
    /// Run only allowlisted programs, without a shell (the default).
    #[default]
    Allowlist,
    /// Run anything through `/bin/sh -c`: the operator opted in.
    Full,
}

/// Where `system.run` executes a command that the policy allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunSandbox {
    /// A subprocess on the host, under rlimits (the default).
    #[default]
    Subprocess,
    /// A fresh container under `[sandbox.docker]` (see `container::DockerRunner`).
    Docker,
}

/// The operator's configuration for `system.run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandPolicy {
    pub mode: PolicyMode,
    /// Programs (bare names) allowed in allowlist mode.
    pub allowlist: Vec<String>,
    /// Wrappers and interpreters the operator allows anyway (they must also be
    /// on the allowlist). Naming a program here also lifts its dangerous-option
    /// check (e.g. `find` with `-exec`).
    pub allow_wrappers: Vec<String>,
    /// Default timeout of one command.
    pub timeout_secs: u64,
    /// Largest timeout a call may ask for.
    pub max_timeout_secs: u64,
    /// Characters of output given back to the model.
    pub output_limit: usize,
    /// Lets allowlisted programs take arguments that point outside the
    /// workspace (`cat /etc/passwd`, `ls ~`, `cat ../x`). Off by default:
    /// such arguments could read secrets such as the config file's API key.
    pub allow_paths_outside_workspace: bool,
    /// Where allowed commands run: `"subprocess"` or `"docker"`.
    pub sandbox: RunSandbox,
}

impl Default for CommandPolicy {
    fn default() -> Self {
        Self {
            mode: PolicyMode::default(),
            allowlist: DEFAULT_ALLOWLIST.iter().map(|s| (*s).to_owned()).collect(),
            allow_wrappers: Vec::new(),
            timeout_secs: 30,
            max_timeout_secs: 300,
            output_limit: 10_000,
            allow_paths_outside_workspace: false,
            sandbox: RunSandbox::Subprocess,
        }
    }
}

/// Programs allowed by default: read-only inspection tools.
pub const DEFAULT_ALLOWLIST: &[&str] = &[
    "ls", "cat", "head", "tail", "wc", "grep", "find", "echo", "pwd", "date", "uname",
];

/// The shell used in [`PolicyMode::Full`].
pub const FULL_MODE_SHELL: &str = "/bin/sh";

/// Why a command was refused. The text is shown to the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    /// The policy is `deny`.
    #[error("commands are disabled by the operator (policy mode: deny)")]
    DenyMode,
    /// Nothing to run.
    #[error("empty command")]
    Empty,
    /// A control character (newline, NUL, ...).
    #[error(
        "the command contains a control character ({0}); only one command line without control characters is accepted"
    )]
    ControlCharacter(String),
    /// A shell operator outside single quotes.
    #[error(
        "the command contains {0:?}, a shell operator; commands are run without a shell, so pipes, lists, redirections, command substitution and variables are not available (run one program at a time; quote a literal argument with single quotes)"
    )]
    ShellOperator(String),
    /// A Unicode character that looks like a shell operator or hides text.
    #[error(
        "the command contains the Unicode character {0}, which looks like a shell operator or is invisible; use plain ASCII for operators and program names"
    )]
    LookAlike(String),
    /// A `#` comment.
    #[error("the command contains a comment (`#` at the start of a word); remove it")]
    Comment,
    /// Unbalanced quotes.
    #[error("the command cannot be parsed: unbalanced quotes")]
    Unparseable,
    /// argv\[0\] contains `/`.
    #[error(
        "{0:?} is a path; programs are run by bare name from the allowlist only (a path may name a different file than the allowlisted program, e.g. one written into the workspace), so write just the name"
    )]
    ProgramPath(String),
    /// argv\[0\] is not plain ASCII or changes under NFKC normalization.
    #[error("program name {0:?} is not plain ASCII")]
    ProgramNotAscii(String),
    /// argv\[0\] is not on the allowlist.
    #[error("{program:?} is not on the allowlist; allowed programs: {allowed}")]
    NotAllowed { program: String, allowed: String },
    /// argv\[0\] runs other programs or code.
    #[error(
        "{0:?} is a wrapper or interpreter that can run arbitrary commands, so it is refused even if allowlisted (the operator can name it in allow_wrappers)"
    )]
    Wrapper(String),
    /// An option that makes an allowed program run or write something, or
    /// read files outside the workspace.
    #[error("{program} option {arg:?} is refused: {why}")]
    DangerousOption {
        program: String,
        arg: String,
        why: String,
    },
    /// An argument names a path outside the workspace (see the module docs).
    #[error(
        "argument {arg:?} {why}; system.run may only touch files inside the workspace (use paths relative to the working directory, without `..`)"
    )]
    OutsideWorkspace { arg: String, why: String },
    /// The workspace or working directory cannot be resolved, so arguments
    /// cannot be checked.
    #[error("the working directory cannot be checked: {0}")]
    WorkingDirectory(String),
}

impl CommandPolicy {
    /// This policy with `program` added to the allowlist (for a call a
    /// human approved; wrappers stay refused unless in `allow_wrappers`).
    pub fn allowing(&self, program: &str) -> CommandPolicy {
        let mut p = self.clone();
        p.allowlist.push(program.to_owned());
        p
    }

    /// Checks `command` and returns the argv to execute.
    ///
    /// - `Deny`: always [`PolicyViolation::DenyMode`].
    /// - `Allowlist`: the rules in the module docs; argv\[0\] is a bare name.
    /// - `Full`: `["/bin/sh", "-c", command]` (refusing only an empty command
    ///   and NUL bytes, which cannot be passed to a program).
    ///
    /// This is the syntax check alone: it does not look at the file system,
    /// so arguments are not confined. `system.run` uses [`Self::check_in`].
    pub fn check(&self, command: &str) -> Result<Vec<String>, PolicyViolation> {
        match self.mode {
            PolicyMode::Deny => Err(PolicyViolation::DenyMode),
            PolicyMode::Full => {
                if command.trim().is_empty() {
                    return Err(PolicyViolation::Empty);
                }
                if command.contains('\0') {
                    return Err(PolicyViolation::ControlCharacter("NUL".to_owned()));
                }
                Ok(vec![
                    FULL_MODE_SHELL.to_owned(),
                    "-c".to_owned(),
                    command.to_owned(),
                ])
            }
            PolicyMode::Allowlist => self.check_allowlist(command),
        }
    }

    /// [`Self::check`], then, in `Allowlist` mode and unless
    /// `allow_paths_outside_workspace` is set, confines the arguments to
    /// `workspace` (see the module docs). `cwd` is the working directory the
    /// program will run in (absolute, or relative to `workspace`); it must be
    /// inside the workspace. Looks at the file system (`lstat`, `realpath`).
    pub fn check_in(
        &self,
        command: &str,
        workspace: &Path,
        cwd: &Path,
    ) -> Result<Vec<String>, PolicyViolation> {
        let argv = self.check(command)?;
        match self.mode {
            PolicyMode::Deny | PolicyMode::Full => return Ok(argv),
            PolicyMode::Allowlist => {}
        }
        if self.allow_paths_outside_workspace {
            return Ok(argv);
        }
        if let Some((program, args)) = argv.split_first() {
            paths::check_arguments(program, args, workspace, cwd)?;
        }
        Ok(argv)
    }

    fn check_allowlist(&self, command: &str) -> Result<Vec<String>, PolicyViolation> {
        check_raw(command)?;
        let argv = shell_words::split(command).map_err(|_| PolicyViolation::Unparseable)?;
        let Some(program) = argv.first() else {
            return Err(PolicyViolation::Empty);
        };
        if program.is_empty() {
            return Err(PolicyViolation::Empty);
        }
        if program.contains('/') {
            return Err(PolicyViolation::ProgramPath(program.clone()));
        }
        let normalized: String = program.nfkc().collect();
        if !program.is_ascii() || normalized != *program {
            return Err(PolicyViolation::ProgramNotAscii(program.clone()));
        }
        if !self.allowlist.iter().any(|a| a == program) {
            return Err(PolicyViolation::NotAllowed {
                program: program.clone(),
                allowed: self.allowlist.join(", "),
            });
        }
        let waived = self.allow_wrappers.iter().any(|a| a == program);
        if !waived {
            if is_wrapper(program) {
                return Err(PolicyViolation::Wrapper(program.clone()));
            }
            check_options(program, &argv[1..])?;
        }
        Ok(argv)
    }
}

/// Character-level checks on the raw command text (see the module docs).
///
/// The quoting state mirrors `shell_words::split` exactly, so "inside single
/// quotes" means the same thing to the checker and to the parser. Even a
/// mismatch could only turn into a literal character in one argument, since
/// no shell ever sees the command.
fn check_raw(command: &str) -> Result<(), PolicyViolation> {
    if command.trim().is_empty() {
        return Err(PolicyViolation::Empty);
    }
    for c in command.chars() {
        if let Some(name) = control_name(c) {
            return Err(PolicyViolation::ControlCharacter(name));
        }
        if is_look_alike(c) {
            return Err(PolicyViolation::LookAlike(format!(
                "U+{:04X} {c:?}",
                u32::from(c)
            )));
        }
    }
    let chars: Vec<char> = command.chars().collect();
    let mut state = Quote::Delimiter;
    for (i, &c) in chars.iter().enumerate() {
        let next = chars.get(i + 1).copied();
        // Only single quotes make an operator literal; a backslash does not
        // (simpler to explain, and `\;` is rare in honest commands).
        if !matches!(state, Quote::Single) {
            match c {
                ';' | '&' | '|' | '`' | '<' | '>' => {
                    return Err(PolicyViolation::ShellOperator(c.to_string()));
                }
                '$' if matches!(next, Some('(' | '{')) => {
                    let op: String = ['$', next.unwrap_or('(')].iter().collect();
                    return Err(PolicyViolation::ShellOperator(op));
                }
                _ => {}
            }
        }
        state = match (state, c) {
            (Quote::Delimiter, '\'') | (Quote::Unquoted, '\'') => Quote::Single,
            (Quote::Delimiter, '"') | (Quote::Unquoted, '"') => Quote::Double,
            (Quote::Delimiter, '\\') => Quote::Backslash,
            (Quote::Unquoted, '\\') => Quote::UnquotedBackslash,
            (Quote::Delimiter, ' ' | '\t') => Quote::Delimiter,
            (Quote::Delimiter, '#') => return Err(PolicyViolation::Comment),
            (Quote::Unquoted, ' ' | '\t') => Quote::Delimiter,
            (Quote::Delimiter | Quote::Unquoted, _) => Quote::Unquoted,
            (Quote::Backslash | Quote::UnquotedBackslash, _) => Quote::Unquoted,
            (Quote::Single, '\'') => Quote::Unquoted,
            (Quote::Single, _) => Quote::Single,
            (Quote::Double, '"') => Quote::Unquoted,
            (Quote::Double, '\\') => Quote::DoubleBackslash,
            (Quote::Double | Quote::DoubleBackslash, _) => Quote::Double,
        };
    }
    Ok(())
}

/// Quoting states of `shell_words::split` (comments are refused instead).
#[derive(Debug, Clone, Copy)]
enum Quote {
    Delimiter,
    Backslash,
    Unquoted,
    UnquotedBackslash,
    Single,
    Double,
    DoubleBackslash,
}

/// A printable name for a control character; tab is allowed as a separator.
fn control_name(c: char) -> Option<String> {
    match c {
        '\t' => None,
        '\n' => Some("newline".to_owned()),
        '\r' => Some("carriage return".to_owned()),
        '\0' => Some("NUL".to_owned()),
        c if c.is_control() => Some(format!("U+{:04X}", u32::from(c))),
        _ => None,
    }
}

/// Characters refused anywhere: look-alikes of shell operators and
/// invisible or direction-changing characters that hide what a command is.
fn is_look_alike(c: char) -> bool {
    matches!(
        c,
        // fullwidth / small forms of ; & | < > ` $ ( ) { }
        '\u{FF1B}' | '\u{FF06}' | '\u{FF5C}' | '\u{FF1C}' | '\u{FF1E}' | '\u{FF40}'
        | '\u{FF04}' | '\u{FF08}' | '\u{FF09}' | '\u{FF5B}' | '\u{FF5D}'
        | '\u{FE54}' | '\u{FE60}' | '\u{FE64}' | '\u{FE65}' | '\u{FE69}'
        | '\u{037E}' // Greek question mark, looks like ';'
        | '\u{2223}' | '\u{01C0}' | '\u{2502}' | '\u{FFE8}' // vertical bars
        | '\u{2039}' | '\u{203A}' | '\u{2329}' | '\u{232A}' | '\u{3008}' | '\u{3009}'
        // zero-width, joiners, word joiner, BOM, soft hyphen
        | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{00AD}'
        // bidirectional embeddings, overrides and isolates
        | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        // line and paragraph separators, other unusual spaces
        | '\u{2028}' | '\u{2029}' | '\u{00A0}' | '\u{2000}'..='\u{200A}' | '\u{3000}'
        | '\u{180E}'
    )
}

/// Wrappers and interpreters: programs whose purpose (or a common option)
/// is to run another program or arbitrary code.
const WRAPPERS: &[&str] = &[
    // privilege, environment and scheduling wrappers
    "env",
    "sudo",
    "su",
    "doas",
    "pkexec",
    "runuser",
    "chroot",
    "nsenter",
    "unshare",
    "setsid",
    "nohup",
    "timeout",
    "nice",
    "ionice",
    "chrt",
    "taskset",
    "stdbuf",
    "setpriv",
    "prlimit",
    "flock",
    "time",
    "watch",
    "script",
    "strace",
    "ltrace",
    "gdb",
    "xargs",
    "parallel",
    "busybox",
    "toybox",
    "exec",
    "eval",
    "command",
    "builtin",
    "run-parts",
    "systemd-run",
    "at",
    "batch",
    "crontab",
    "start-stop-daemon",
    // shells
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "mksh",
    "pdksh",
    "csh",
    "tcsh",
    "fish",
    "yash",
    "rbash",
    "ash",
    "elvish",
    "nu",
    "xonsh",
    "pwsh",
    "powershell",
    // interpreters, and text tools with a command language (awk system(),
    // sed `e`, editors and pagers with `!`)
    "awk",
    "gawk",
    "mawk",
    "nawk",
    "sed",
    "gsed",
    "ed",
    "ex",
    "vi",
    "vim",
    "nvim",
    "view",
    "emacs",
    "less",
    "more",
    "man",
    "expect",
    "osascript",
    "jshell",
    "java",
    "groovy",
    "scala",
    "kotlin",
    "R",
    "Rscript",
    "julia",
    "dotnet",
    "swift",
    "guile",
    "racket",
    "sbcl",
    "clisp",
    "ocaml",
    "ghci",
    "runghc",
    "erl",
    "escript",
    "elixir",
    "iex",
    "deno",
    "bun",
    "nodejs",
    "npx",
    "npm",
    "pnpm",
    "yarn",
    "pipx",
    "uv",
    "uvx",
    // programs that run commands through an option, a script or a build file
    "cargo",
    "go",
    "make",
    "gmake",
    "cmake",
    "ninja",
    "gcc",
    "cc",
    "clang",
    "tcc",
    "git",
    "ssh",
    "scp",
    "sftp",
    "rsync",
    "tar",
    "zip",
    "dpkg",
    "apt",
    "apt-get",
    "docker",
    "podman",
    "kubectl",
    "sqlite3",
    "psql",
    "mysql",
    "mail",
    "mutt",
];

/// Interpreter families matched with a version suffix (`python3.12`, `perl5.36`).
const INTERPRETER_PREFIXES: &[&str] = &[
    "python", "pypy", "perl", "ruby", "irb", "php", "lua", "luajit", "node", "tclsh", "wish", "pip",
];

/// Whether `program` (argv\[0\], ASCII) is a wrapper or interpreter.
pub fn is_wrapper(program: &str) -> bool {
    let lower = program.to_ascii_lowercase();
    if WRAPPERS.iter().any(|w| w.eq_ignore_ascii_case(&lower)) {
        return true;
    }
    INTERPRETER_PREFIXES.iter().any(|prefix| {
        lower.strip_prefix(prefix).is_some_and(|rest| {
            rest.chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == 'w')
        })
    })
}

/// Refuses options that make an allowed program execute, delete or write.
fn check_options(program: &str, args: &[String]) -> Result<(), PolicyViolation> {
    let refuse = |arg: &str, why: &str| PolicyViolation::DangerousOption {
        program: program.to_owned(),
        arg: arg.to_owned(),
        why: why.to_owned(),
    };
    match program {
        "find" => {
            // find predicates are single-dash words; find does not accept
            // abbreviations, but refuse every prefix-extension anyway.
            for arg in args {
                let word = arg.trim_start_matches('-');
                if !arg.starts_with('-') || word.is_empty() {
                    continue;
                }
                let bad = ["exec", "ok", "delete", "fprint", "fls"]
                    .iter()
                    .any(|p| word.starts_with(p));
                if bad {
                    return Err(refuse(
                        arg,
                        "find may not run commands (-exec, -execdir, -ok, -okdir), delete files (-delete) or write files (-fprint, -fprint0, -fprintf, -fls)",
                    ));
                }
            }
            Ok(())
        }
        _ => {
            let Some(dangerous) = long_options_of(program) else {
                return Ok(());
            };
            for arg in args {
                if arg == "--" {
                    break;
                }
                let Some(name) = arg.strip_prefix("--") else {
                    if let Some((short, why)) = short_options_of(program)
                        .iter()
                        .find(|(s, _)| is_short_bundle_with(arg, *s))
                    {
                        return Err(refuse(arg, &format!("-{short} {why}")));
                    }
                    continue;
                };
                let name = name.split_once('=').map_or(name, |(n, _)| n);
                if name.is_empty() {
                    continue;
                }
                // GNU getopt_long accepts any unambiguous prefix, so a prefix
                // of a dangerous option is refused too.
                if let Some((full, why)) = dangerous.iter().find(|(full, _)| full.starts_with(name))
                {
                    let why = if name == *full {
                        format!("--{full} {why}")
                    } else {
                        format!("--{name} abbreviates --{full}, which {why}")
                    };
                    return Err(refuse(arg, &why));
                }
            }
            Ok(())
        }
    }
}

/// Long options (without `--`) that make a program run another program or
/// write files, for programs an operator may plausibly allowlist.
fn long_options_of(program: &str) -> Option<&'static [(&'static str, &'static str)]> {
    Some(match program {
        "sort" => &[
            ("compress-program", "runs a program"),
            ("output", "writes a file"),
        ],
        "rg" => &[
            ("pre", "runs a program on every file"),
            ("pre-glob", "runs a program on matching files"),
            ("search-zip", "runs decompression programs"),
        ],
        "diff" => &[("diff-program", "runs a program")],
        "uniq" | "split" | "csplit" => &[("output", "writes a file")],
        "date" => &[("set", "sets the system clock")],
        "tail" | "head" | "cat" | "ls" | "wc" | "grep" | "echo" | "pwd" | "uname" => &[],
        _ => return None,
    })
}

/// Short options that make a program run another program or write files.
fn short_options_of(program: &str) -> &'static [(char, &'static str)] {
    match program {
        "sort" => &[('o', "writes a file")],
        "rg" => &[('z', "runs decompression programs")],
        "date" => &[('s', "sets the system clock")],
        _ => &[],
    }
}

/// Whether `arg` is a short-option bundle (`-xo`) containing `short`.
fn is_short_bundle_with(arg: &str, short: char) -> bool {
    arg.strip_prefix('-')
        .is_some_and(|bundle| !bundle.starts_with('-') && bundle.contains(short))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> CommandPolicy {
        CommandPolicy::default()
    }

    #[test]
    fn defaults_are_secure() {
        let p = CommandPolicy::default();
        assert_eq!(p.mode, PolicyMode::Allowlist);
        assert!(p.allow_wrappers.is_empty());
        assert_eq!(p.allowlist.len(), DEFAULT_ALLOWLIST.len());
        assert_eq!(p.timeout_secs, 30);
        assert_eq!(p.max_timeout_secs, 300);
        assert_eq!(p.output_limit, 10_000);
        assert!(!p.allow_paths_outside_workspace);
    }

    #[test]
    fn single_quotes_make_operators_literal() {
        assert_eq!(
            allow().check("grep -E 'a|b;c' .").unwrap(),
            ["grep", "-E", "a|b;c", "."]
        );
        assert!(allow().check("grep -E \"a|b\" .").is_err());
        assert!(allow().check("grep -E a\\|b .").is_err());
        // A quote inside double quotes does not open single quotes.
        assert!(allow().check("echo \"it's\" ; id").is_err());
        assert!(allow().check("echo it\\'s ; id").is_err());
    }

    #[test]
    fn dollar_alone_is_a_literal() {
        assert_eq!(allow().check("echo $HOME").unwrap(), ["echo", "$HOME"]);
        assert!(allow().check("echo $(id)").is_err());
        assert!(allow().check("echo ${HOME}").is_err());
    }

    #[test]
    fn comments_are_refused_but_hash_inside_words_is_fine() {
        assert_eq!(allow().check("echo a#b").unwrap(), ["echo", "a#b"]);
        assert_eq!(allow().check("echo '#x'").unwrap(), ["echo", "#x"]);
        assert_eq!(allow().check("ls # x"), Err(PolicyViolation::Comment));
    }

    #[test]
    fn wrapper_names_cover_versions() {
        for w in [
            "python",
            "python3",
            "python3.12",
            "perl5.36",
            "ruby3.2",
            "Bash",
            "SH",
        ] {
            assert!(is_wrapper(w), "{w}");
        }
        for ok in ["ls", "pythonic", "grep", "perlish"] {
            assert!(!is_wrapper(ok), "{ok}");
        }
    }

    #[test]
    fn abbreviated_long_options_are_refused() {
        let mut p = allow();
        p.allowlist.push("sort".to_owned());
        for cmd in [
            "sort --compress-program=sh x",
            "sort --compress-prog=sh x",
            "sort --compress sh x",
            "sort --out=/etc/x x",
            "sort -o /etc/x x",
            "sort -ro /etc/x x",
        ] {
            assert!(
                matches!(p.check(cmd), Err(PolicyViolation::DangerousOption { .. })),
                "{cmd}"
            );
        }
        assert!(p.check("sort -r x").is_ok());
        assert!(p.check("sort -- --compress-program").is_ok());
    }

    #[test]
    fn allow_wrappers_needs_the_allowlist_too() {
        let mut p = allow();
        p.allow_wrappers.push("xargs".to_owned());
        assert!(matches!(
            p.check("xargs echo"),
            Err(PolicyViolation::NotAllowed { .. })
        ));
        p.allowlist.push("xargs".to_owned());
        assert!(p.check("xargs echo").is_ok());
    }

    #[test]
    fn full_mode_wraps_in_sh() {
        let p = CommandPolicy {
            mode: PolicyMode::Full,
            ..CommandPolicy::default()
        };
        assert_eq!(p.check("a | b").unwrap(), ["/bin/sh", "-c", "a | b"]);
        assert!(p.check("  ").is_err());
    }

    #[test]
    fn config_rejects_unknown_fields_and_fills_defaults() {
        let p: CommandPolicy = serde_json::from_str(r#"{"mode":"full"}"#).unwrap();
        assert_eq!(p.mode, PolicyMode::Full);
        assert_eq!(p.timeout_secs, 30);
        assert!(serde_json::from_str::<CommandPolicy>(r#"{"mdoe":"full"}"#).is_err());
        assert!(serde_json::from_str::<CommandPolicy>(r#"{"mode":"Full"}"#).is_err());
    }
}
