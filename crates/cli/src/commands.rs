//! The subcommands.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use openpista_gateway::Gateway;
use openpista_proto::wire::Decision;
use openpista_proto::{AgentEvent, SessionId, ToolOutcome};
use openpista_tools::ToolContext;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{EXAMPLE, Env, Loaded};
use crate::{
    AuditArgs, Command, RemoteArgs, RunArgs, SessionsCommand, SkillsCommand, ToolsCommand, daemon,
    wiring,
};

pub async fn dispatch(command: Command, loaded: Loaded, env: Env) -> Result<ExitCode> {
    match command {
        Command::Init { force } => init(&loaded, force),
        Command::Run(args) => run(&loaded, &env, args).await,
        Command::Repl { session, remote } => repl(&loaded, &env, session, &remote).await,
        Command::Start { stdin } => daemon::start(&loaded, &env, stdin).await,
        Command::Status { remote } => daemon::status(&loaded, &remote).await,
        Command::Models { json } => models(&loaded, json),
        Command::Sessions(cmd) => sessions(&loaded, cmd).await,
        Command::Doctor => crate::doctor::run(&loaded, &env).await,
        Command::Tools(cmd) => tools(&loaded, &env, cmd).await,
        Command::Skills(cmd) => skills(&loaded, &env, cmd).await,
        Command::Audit(args) => audit(&loaded, args).await,
        Command::Cron(cmd) => crate::cron::cron(&loaded, &env, cmd).await,
        Command::Telegram(cmd) => crate::telegram::telegram(&loaded, &env, cmd).await,
    }
}

/// Lists or verifies the audit trail. `--verify` exits 1 when the chain is
/// broken; it cannot see a chain rewritten together with its head, so the
/// head hash is printed for recording elsewhere.
async fn audit(loaded: &Loaded, args: AuditArgs) -> Result<ExitCode> {
    let store = wiring::store(loaded).await?;
    if args.verify {
        let report = store.verify_audit().await?;
        return Ok(match report.first_bad {
            None => {
                println!(
                    "audit trail intact: {} rows, head {}",
                    report.rows, report.head_hash
                );
                ExitCode::SUCCESS
            }
            Some((seq, reason)) => {
                println!("audit trail BROKEN at seq {seq}: {reason}");
                eprintln!("error: the audit trail fails verification at seq {seq}");
                ExitCode::from(1)
            }
        });
    }
    let rows = store
        .audit(args.limit as usize, args.session.as_ref())
        .await?;
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "seq": r.seq, "at": r.at.to_rfc3339(), "session_id": r.session_id,
                    "actor": r.actor, "action": r.action, "detail": r.detail,
                    "prev_hash": r.prev_hash, "hash": r.hash,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("no audit rows yet");
    } else {
        for r in rows {
            println!(
                "{:>6}  {}  {}  {:<6} {:<14} {}",
                r.seq,
                r.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                r.session_id.as_ref().map(|s| s.as_str()).unwrap_or("-"),
                r.actor,
                r.action,
                r.detail
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init(loaded: &Loaded, force: bool) -> Result<ExitCode> {
    let p = &loaded.paths;
    for dir in [&p.data_dir, &p.models_dir, &p.workspace] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::create_dir_all(p.workspace.join("skills"))?;
    if p.config_file.exists() && !force {
        println!(
            "config already exists at {} (use --force to overwrite)",
            p.config_file.display()
        );
    } else {
        if let Some(parent) = p.config_file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p.config_file, EXAMPLE)
            .with_context(|| format!("writing {}", p.config_file.display()))?;
        println!("wrote {}", p.config_file.display());
    }
    println!("workspace: {}", p.workspace.display());
    println!("models:    {}", p.models_dir.display());
    println!("database:  {}", p.database.display());
    openpista_gateway::load_or_create_token(&p.token_file)?;
    println!(
        "token:     {} (for `openpista start`)",
        p.token_file.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_session(id: &str) -> Result<SessionId> {
    Ok(SessionId::parse(id)?)
}

/// The in-process gateway, or the daemon when `--remote` is given.
async fn backend(loaded: &Loaded, env: &Env, remote: &RemoteArgs) -> Result<Backend> {
    Ok(match remote.remote {
        Some(addr) => Backend::Remote(daemon::connect(loaded, remote, addr).await?),
        None => {
            let agent = wiring::agent(loaded, env).await?;
            Backend::Local(Gateway::new(agent, &loaded.config.gateway))
        }
    })
}

async fn run(loaded: &Loaded, env: &Env, args: RunArgs) -> Result<ExitCode> {
    // Check the session before loading a model: a typo should fail fast.
    if args.remote.remote.is_none()
        && let Some(id) = &args.session
        && wiring::store(loaded)
            .await?
            .get_session(id)
            .await?
            .is_none()
    {
        anyhow::bail!("no session {id}");
    }
    let backend = backend(loaded, env, &args.remote).await?;
    let outcome = turn(&backend, args.session.as_ref(), &args.text, args.json).await;
    backend.close().await;
    let (ok, session) = outcome?;
    if !args.json
        && let Some(id) = session.or(args.session)
    {
        eprintln!("[session {id}]");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs one turn, printing as it streams. Ctrl-C cancels the turn. Returns
/// whether it ended with `final`, and the session it ran in.
async fn turn(
    backend: &Backend,
    session: Option<&SessionId>,
    text: &str,
    json: bool,
) -> Result<(bool, Option<SessionId>)> {
    let mut events = backend.send(session, text).await?;
    let mut current = session.cloned();
    let mut cancel_asked = false;
    let mut ok = false;
    let mut stdout = std::io::stdout();
    let mut at_line_start = true;
    // SIGTERM is handled like Ctrl-C: the turn is cancelled, so a running
    // tool's process group is killed instead of outliving this command.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            ev = events.next() => {
                let ev = match ev {
                    None => break,
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => {
                        if !at_line_start {
                            println!();
                            at_line_start = true;
                        }
                        eprintln!("error: {e:#}");
                        break;
                    }
                };
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                }
                match &ev {
                    AgentEvent::Accepted { session_id, .. } => {
                        current = Some(session_id.clone());
                        if cancel_asked {
                            backend.cancel(session_id).await;
                        }
                    }
                    AgentEvent::Final { .. } => ok = true,
                    AgentEvent::Error { message, .. } if !json => eprintln!("\nerror: {message}"),
                    AgentEvent::ApprovalRequired { id, tool, args } => {
                        if !at_line_start {
                            println!();
                            at_line_start = true;
                        }
                        let decision = ask_approval(tool, args).await;
                        if let Err(e) = backend.approve(id, decision).await {
                            eprintln!("error: answering the approval: {e:#}");
                        }
                    }
                    _ => {}
                }
                if !json {
                    render(&ev, &mut stdout, &mut at_line_start)?;
                }
            }
            _ = async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            } => {
                cancel_asked = true;
                if let Some(id) = &current {
                    backend.cancel(id).await;
                }
            }
        }
    }
    if !json && !at_line_start {
        println!();
    }
    Ok((ok, current))
}

fn render(ev: &AgentEvent, out: &mut std::io::Stdout, at_line_start: &mut bool) -> Result<()> {
    match ev {
        AgentEvent::TextDelta { text } => {
            write!(out, "{text}")?;
            out.flush()?;
            *at_line_start = text.ends_with('\n');
        }
        AgentEvent::ToolStarted { name, args, .. } => {
            if !*at_line_start {
                println!();
                *at_line_start = true;
            }
            eprintln!("-> {name} {}", truncate(args, 200));
        }
        AgentEvent::ToolFinished {
            name,
            outcome,
            duration_ms,
            output,
            ..
        } => {
            let first = output.lines().next().unwrap_or_default();
            eprintln!(
                "<- {name} {} ({duration_ms} ms){}",
                outcome.as_str(),
                if *outcome == ToolOutcome::Ok {
                    String::new()
                } else {
                    format!(": {}", truncate(first, 200))
                }
            );
        }
        AgentEvent::Accepted { .. }
        | AgentEvent::Final { .. }
        | AgentEvent::Error { .. }
        | AgentEvent::ApprovalRequired { .. } => {}
    }
    Ok(())
}

/// Asks on stderr whether `tool` may run with `args` and reads the answer
/// from stdin: `y` approves, `always` approves it for the session, anything
/// else denies. Under CI (`CI` set) or when stdin is not a terminal (a
/// pipe, a file, nothing) nobody is asked and the call is denied; so is it
/// when the terminal closes (EOF).
async fn ask_approval(tool: &str, args: &str) -> Decision {
    use std::io::IsTerminal as _;
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
    let why = if ci {
        Some("CI is set")
    } else if !std::io::stdin().is_terminal() {
        Some("stdin is not a terminal")
    } else {
        None
    };
    if let Some(why) = why {
        eprintln!(
            "denied: {tool} needs approval and {why}, so nobody is asked; \
             allow it in the config ([approvals.tools] \"{tool}\" = \"allow\") to run it here"
        );
        return Decision::Deny;
    }
    eprint!("approve {tool} {}? [y/N/always] ", truncate(args, 500));
    let _ = std::io::stderr().flush();
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|n| (n, line))
    })
    .await;
    match line {
        Ok(Ok((n, line))) if n > 0 => match line.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => Decision::Approve,
            "a" | "always" => Decision::Always,
            _ => {
                eprintln!("denied");
                Decision::Deny
            }
        },
        _ => {
            eprintln!(
                "\ndenied: {tool} needs approval and the terminal closed without an answer; \
                 allow it in the config ([approvals.tools] \"{tool}\" = \"allow\") to run it without asking"
            );
            Decision::Deny
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

async fn repl(
    loaded: &Loaded,
    env: &Env,
    session: Option<SessionId>,
    remote: &RemoteArgs,
) -> Result<ExitCode> {
    use rustyline::error::ReadlineError;
    let backend = backend(loaded, env, remote).await?;
    let mut current = match session {
        Some(id) => {
            backend.check_session(&id).await?;
            Some(id)
        }
        None => backend.new_session().await?,
    };
    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let history = loaded.paths.data_dir.join("repl_history.txt");
    let _ = rl.load_history(&history);
    let place = remote
        .remote
        .map(|addr| format!(" at {addr}"))
        .unwrap_or_default();
    eprintln!(
        "openpista repl{place}, {} (/help for commands, /quit to leave)",
        describe(current.as_ref())
    );
    loop {
        let line = tokio::task::block_in_place(|| rl.readline("> "));
        let line = match line {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => bail!("reading input: {e}"),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line);
        match line
            .split_once(' ')
            .map_or((line, ""), |(c, r)| (c, r.trim()))
        {
            ("/quit" | "/exit", _) => break,
            ("/help", _) => eprintln!(
                "/new             start a new session\n/sessions        list recent sessions\n/session ID      switch to a session\n/quit            leave"
            ),
            ("/new", _) => {
                current = backend.new_session().await?;
                eprintln!("new {}", describe(current.as_ref()));
            }
            ("/sessions", _) => match backend.sessions(20).await {
                Ok(list) => {
                    for s in list {
                        eprintln!(
                            "{}{} {} {} messages  {}",
                            if Some(&s.id) == current.as_ref() {
                                "*"
                            } else {
                                " "
                            },
                            s.id,
                            s.updated_at,
                            s.message_count,
                            s.title.unwrap_or_default()
                        );
                    }
                }
                Err(e) => eprintln!("error: {e:#}"),
            },
            ("/session", id) => match parse_session(id) {
                Ok(id) => match backend.check_session(&id).await {
                    Ok(()) => {
                        eprintln!("switched to session {id}");
                        current = Some(id);
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                },
                Err(e) => eprintln!("error: {e}"),
            },
            (cmd, _) if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}; /help lists them")
            }
            _ => match turn(&backend, current.as_ref(), line, false).await {
                Ok((_, session)) => current = session.or(current),
                Err(e) => eprintln!("error: {e:#}"),
            },
        }
    }
    let _ = rl.save_history(&history);
    backend.close().await;
    Ok(ExitCode::SUCCESS)
}

/// "session ID", or what happens when there is none yet.
fn describe(session: Option<&SessionId>) -> String {
    match session {
        Some(id) => format!("session {id}"),
        None => "session (created by your first message)".to_owned(),
    }
}

fn models(loaded: &Loaded, json: bool) -> Result<ExitCode> {
    let dir = &loaded.paths.models_dir;
    let list = openpista_llm::catalog::list(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!(
            "no .gguf models in {}\n{}",
            dir.display(),
            openpista_llm::local::FETCH_HINT.replace("MODELS_DIR", &dir.display().to_string())
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:>10} {:<12} {:>8} {:<8}",
        "NAME", "SIZE", "ARCH", "CONTEXT", "QUANT"
    );
    for m in list {
        match &m.error {
            Some(e) => println!("{:<40} {:>10} error: {e}", m.name, human_size(m.size_bytes)),
            None => println!(
                "{:<40} {:>10} {:<12} {:>8} {:<8}",
                m.name,
                human_size(m.size_bytes),
                m.architecture.as_deref().unwrap_or("?"),
                m.context_length
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into()),
                m.quantization.as_deref().unwrap_or("?"),
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human_size(bytes: u64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MB {
        format!("{:.1} GiB", bytes as f64 / (1024.0 * MB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MB)
    }
}

async fn sessions(loaded: &Loaded, cmd: SessionsCommand) -> Result<ExitCode> {
    use openpista_proto::wire::SessionAction;
    let store = wiring::store(loaded).await?;
    match cmd {
        SessionsCommand::List {
            limit,
            json,
            remote,
        } => return crate::sessions::list(loaded, &remote, limit, json).await,
        SessionsCommand::Kill { id, remote } => {
            return crate::sessions::control(loaded, &remote, &id, SessionAction::Kill).await;
        }
        SessionsCommand::Suspend { id, remote } => {
            return crate::sessions::control(loaded, &remote, &id, SessionAction::Suspend).await;
        }
        SessionsCommand::Resume { id, remote } => {
            return crate::sessions::control(loaded, &remote, &id, SessionAction::Resume).await;
        }
        SessionsCommand::Show { id, limit, json } => {
            if store.get_session(&id).await?.is_none() {
                eprintln!("error: no session {id}");
                return Ok(ExitCode::from(1));
            }
            let messages = store.recent_messages(&id, limit as usize).await?;
            if json {
                let rows: Vec<_> = messages.iter().map(|m| &m.message).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for m in messages {
                    let msg = &m.message;
                    println!("[{}] {}", msg.role.as_str(), msg.content);
                    for c in &msg.tool_calls {
                        println!("    call {} {} {}", c.id, c.name, c.arguments);
                    }
                }
            }
        }
        SessionsCommand::Rm { id } => {
            if store.delete_session(&id).await? {
                println!("deleted {id}");
            } else {
                eprintln!("error: no session {id}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tools(loaded: &Loaded, env: &Env, cmd: ToolsCommand) -> Result<ExitCode> {
    let registry = wiring::tools(loaded, env, wiring::skills(loaded, env))?;
    match cmd {
        ToolsCommand::List { json } => {
            let defs = registry.definitions();
            if json {
                println!("{}", serde_json::to_string_pretty(&defs)?);
            } else {
                for d in defs {
                    println!("{:<14} {}", d.name, d.description);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ToolsCommand::Call { name, args } => Ok(call_tool(&registry, loaded, &name, &args).await),
    }
}

/// Calls one tool through the registry, prints the result and a status
/// line, and returns 0 for `ok`, 1 otherwise.
async fn call_tool(
    registry: &openpista_tools::ToolRegistry,
    loaded: &Loaded,
    name: &str,
    args: &str,
) -> ExitCode {
    let ctx = ToolContext {
        workspace: loaded.paths.workspace.clone(),
        cancel: CancellationToken::new(),
        session_id: None,
        approved: false,
    };
    let result = registry.call(name, args, &ctx).await;
    println!("{}", result.content);
    eprintln!(
        "[{} in {} ms{}]",
        result.outcome.as_str(),
        result.duration.as_millis(),
        result
            .exit_code
            .map(|c| format!(", exit code {c}"))
            .unwrap_or_default()
    );
    if result.outcome == ToolOutcome::Ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn skills(loaded: &Loaded, env: &Env, cmd: SkillsCommand) -> Result<ExitCode> {
    let catalog = wiring::skills(loaded, env);
    let set = catalog.current();
    match cmd {
        SkillsCommand::List { json } => {
            if json {
                let skills: Vec<_> = set
                    .skills
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.meta.name,
                            "description": s.meta.description,
                            "mode": s.meta.mode.map(|m| m.as_str()),
                            "dir": s.dir,
                        })
                    })
                    .collect();
                let errors: Vec<_> = set
                    .errors
                    .iter()
                    .map(|e| serde_json::json!({"path": e.path, "error": e.message}))
                    .collect();
                let out = serde_json::json!({"skills": skills, "errors": errors});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                if set.skills.is_empty() {
                    println!("no skills found");
                }
                for s in &set.skills {
                    println!(
                        "{:<24} {:<10} {}",
                        s.meta.name,
                        s.meta.mode.map_or("-", |m| m.as_str()),
                        s.meta.description.replace('\n', " ")
                    );
                }
                for e in &set.errors {
                    println!("invalid: {e}");
                }
                let roots: Vec<String> = catalog
                    .roots()
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect();
                eprintln!("[searched {}]", roots.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        SkillsCommand::Show { name } => {
            let Some(skill) = set.get(&name) else {
                eprintln!("error: no skill {name:?} (see `openpista skills list`)");
                return Ok(ExitCode::from(1));
            };
            let m = &skill.meta;
            println!("name:        {}", m.name);
            println!("description: {}", m.description);
            println!("folder:      {}", skill.dir.display());
            if let Some(mode) = m.mode {
                println!("mode:        {}", mode.as_str());
            }
            if let Some(entry) = &m.entry {
                println!("entry:       {entry}");
            }
            if let Some(image) = &m.image {
                println!("image:       {image}");
            }
            if let Some(t) = m.timeout {
                println!("timeout:     {t} s");
            }
            if let Some(n) = m.network {
                println!("network:     {n}");
            }
            if let Some(args) = &m.args {
                println!("args:        {args}");
            }
            println!("\n{}", skill.body);
            Ok(ExitCode::SUCCESS)
        }
        SkillsCommand::Run { name, args } => {
            let args: serde_json::Value =
                serde_json::from_str(&args).context("--args is not valid JSON")?;
            let registry = wiring::tools(loaded, env, catalog)?;
            let call = serde_json::json!({"name": name, "args": args}).to_string();
            Ok(call_tool(&registry, loaded, "skill.run", &call).await)
        }
    }
}
