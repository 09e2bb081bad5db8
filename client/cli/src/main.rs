//! `handoffctl`: the operator's command line for a `handoffd` broker.
//!
//! It starts runs, shows a run with its timeline or a barrier with its
//! branches, follows events live, registers and shows contracts, lists
//! agents and dead letters, all through the `handoff-client` SDK over the
//! broker's gRPC API. Output is plain text meant for people; the first
//! line of `run start` is the bare run id so scripts can capture it. Errors
//! go to stderr as `handoffctl: <error>` with exit code 1; bad usage exits
//! with 2.

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use futures::StreamExt as _;
use handoff_client::{
    parse_grant, pb, Client, ConnectOptions, ContractSpec, RunConfig, WatchFilter,
};
use handoffctl::display;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

mod args;
mod contracts;
mod operate;

use args::*;
use contracts::*;

/// A failure to report as `handoffctl: <message>`.
#[derive(Debug)]
struct Failure(String);

impl From<handoff_client::Error> for Failure {
    fn from(e: handoff_client::Error) -> Self {
        Failure(e.to_string())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure(format!("writing output: {e}"))
    }
}

type Outcome = Result<(), Failure>;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = check_usage(&cli) {
        e.exit();
    }
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("handoffctl: {message}");
            ExitCode::from(1)
        }
    }
}

/// Usage errors that clap cannot see (they depend on several arguments),
/// reported like clap's own: on stderr with the usage, exit code 2.
fn check_usage(cli: &Cli) -> Result<(), clap::Error> {
    if let Command::Barrier(BarrierCommand::Show(args)) = &cli.command {
        if let Err(message) = barrier_ref(args) {
            let mut cmd = Cli::command();
            cmd.build();
            let kind = clap::error::ErrorKind::ValueValidation;
            return Err(
                match cmd
                    .find_subcommand_mut("barrier")
                    .and_then(|c| c.find_subcommand_mut("show"))
                {
                    Some(show) => show.error(kind, message),
                    None => Cli::command().error(kind, message),
                },
            );
        }
    }
    Ok(())
}

/// The connection options the global flags ask for.
fn connect_options(cli: &Cli) -> Result<ConnectOptions, Failure> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| Failure(format!("{flag} {}: {e}", path.display())))
    };
    let mut options = ConnectOptions::new().connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &cli.ca {
        options = options.tls(read("--ca", ca)?);
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        options = options.identity(read("--cert", cert)?, read("--key", key)?);
    }
    if let Some(token) = &cli.token {
        options = options.token(token.as_str());
    }
    Ok(options)
}

async fn dispatch(cli: Cli) -> Outcome {
    let client = connect_options(&cli)?.connect(&cli.addr).await?;
    let result = match cli.command {
        Command::Run(RunCommand::Start(args)) => run_start(&client, args).await,
        Command::Run(RunCommand::Show { id }) => run_show(&client, &id).await,
        Command::Run(RunCommand::Cancel { id, reason }) => {
            operate::run_cancel(&client, &id, &reason).await
        }
        Command::Run(RunCommand::Fork {
            id,
            at_revision,
            to,
            payload,
        }) => operate::run_fork(&client, &id, at_revision, &to, payload).await,
        Command::Run(RunCommand::Answer {
            id,
            request,
            payload,
        }) => operate::run_answer(&client, &id, request.as_deref(), payload).await,
        Command::Runs(RunsCommand::List(args)) => operate::runs_list(&client, args).await,
        Command::Handoff(HandoffCommand::Show { id, run }) => {
            operate::handoff_show(&client, &id, run.as_deref()).await
        }
        Command::DeadLetters(DeadLettersArgs {
            command: Some(DeadLettersCommand::Redrive { sequence, to }),
            ..
        }) => operate::dead_letter_redrive(&client, sequence, to.as_deref()).await,
        Command::Run(RunCommand::Export { id, out: file }) => {
            run_export(&client, &id, file.as_deref()).await
        }
        Command::State(StateCommand::Show { run, rev }) => {
            let resp = client.get_state(&run, rev.unwrap_or(0)).await?;
            out(&display::state_table(&resp))
        }
        Command::Barrier(BarrierCommand::Show(args)) => barrier_show(&client, &args).await,
        Command::Tail(args) => tail(&client, args).await,
        Command::Agents(AgentsCommand::List) => agents_list(&client).await,
        Command::Instances(args) => instances(&client, args).await,
        Command::Contracts(ContractsCommand::Register(args)) => {
            contracts_register(&client, args).await
        }
        Command::Contracts(ContractsCommand::List { message_type }) => {
            contracts_list(&client, message_type.as_deref()).await
        }
        Command::Contracts(ContractsCommand::Show {
            message_type,
            version,
        }) => contracts_show(&client, &message_type, version.unwrap_or(0)).await,
        Command::Contracts(ContractsCommand::SetCompatibility {
            message_type,
            mode,
            reason,
        }) => contracts_set_compatibility(&client, &message_type, mode, &reason).await,
        Command::DeadLetters(args) => dead_letters(&client, args).await,
        Command::Principals(PrincipalsCommand::Set { name, grants }) => {
            principals_set(&client, &name, &grants).await
        }
        Command::Principals(PrincipalsCommand::List) => principals_list(&client).await,
        Command::Tokens(TokensCommand::Create {
            principal,
            grants,
            description,
        }) => tokens_create(&client, &principal, &grants, &description).await,
        Command::Tokens(TokensCommand::List) => tokens_list(&client).await,
        Command::Tokens(TokensCommand::Revoke { id }) => {
            let token = client.revoke_token(&id).await?;
            out(&format!(
                "revoked token {} of {}\n",
                token.id, token.principal
            ))
        }
        Command::Keys(KeysCommand::Rotate) => {
            let id = client.rotate_signing_key().await?;
            out(&format!(
                "signing key {id} in use; earlier keys still verify\n"
            ))
        }
    };
    match result {
        // The reader went away (`handoffctl tail | head`): not an error.
        Err(Failure(_)) if stdout_closed() => Ok(()),
        other => other,
    }
}

async fn run_start(client: &Client, args: StartArgs) -> Outcome {
    let mut config = RunConfig::new(args.owner);
    if let Some(id) = args.id {
        config = config.id(id);
    }
    if args.no_timeout {
        config = config.no_timeout();
    }
    if let Some(timeout) = args.timeout {
        config = config.timeout(timeout);
    }
    if let Some(depth) = args.max_depth {
        config = config.max_depth(depth);
    }
    if let Some(ask) = args.ask {
        config = config.ask(ask);
    }
    for (key, value) in args.pins {
        config = config.pin(key, value);
    }
    let run = client.start_run(config).await?;
    out(&format!("{}\n", run.id))?;
    let deadline = run
        .deadline
        .map(|t| format!("deadline={}", display::timestamp(Some(t))))
        .unwrap_or_else(|| "no deadline".to_string());
    let pinned = run.pinned.as_ref().map_or(0, |p| p.fields.len());
    eprintln!(
        "run {} owner={} status={} max_depth={} {deadline} pinned_fields={pinned}",
        run.id,
        run.owner,
        display::status(run.status),
        run.max_depth
    );
    Ok(())
}

async fn run_show(client: &Client, id: &str) -> Outcome {
    let resp = client.get_run(id).await?;
    let run = resp
        .run
        .ok_or_else(|| Failure(format!("the broker answered without run {id:?}")))?;
    let mut text = display::run_table(&run, &resp.timeline);
    if run.status == pb::RunStatus::Completed as i32 {
        match &run.result {
            Some(result) => text.push_str(&format!(
                "result: {} ({} bytes) from handoff {}\n",
                result.type_url,
                result.value.len(),
                run.result_handoff_id
            )),
            None => text.push_str("result: none\n"),
        }
    }
    out(&text)
}

async fn run_export(client: &Client, id: &str, file: Option<&std::path::Path>) -> Outcome {
    let document = handoffctl::export::export(client, id)
        .await
        .map_err(|e| match e {
            handoffctl::export::ExportError::Broker(e) => Failure::from(e),
            other => Failure(other.to_string()),
        })?;
    let mut text = serde_json::to_string_pretty(&document)
        .map_err(|e| Failure(format!("writing the export: {e}")))?;
    text.push('\n');
    match file {
        Some(path) => std::fs::write(path, text)
            .map_err(|e| Failure(format!("writing {}: {e}", path.display()))),
        None => out(&text),
    }
}

async fn barrier_show(client: &Client, args: &BarrierShowArgs) -> Outcome {
    let (run_id, barrier_id) = barrier_ref(args).map_err(Failure)?;
    let barrier = client.get_barrier(&run_id, &barrier_id).await?;
    out(&display::barrier_table(&barrier))
}

/// The run and barrier named by `barrier show`'s arguments.
fn barrier_ref(args: &BarrierShowArgs) -> Result<(String, String), String> {
    let (run_id, barrier_id) = match (args.barrier.split_once('/'), &args.run_id) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{:?} names its run and so does --run: give the run once",
                args.barrier
            ))
        }
        (Some((run_id, barrier_id)), None) => (run_id, barrier_id),
        (None, Some(run_id)) => (run_id.as_str(), args.barrier.as_str()),
        (None, None) => {
            return Err(format!(
                "no run: write RUN/{0} or {0} --run RUN",
                args.barrier
            ))
        }
    };
    check_name("run id", run_id)?;
    check_name("barrier id", barrier_id)?;
    Ok((run_id.to_string(), barrier_id.to_string()))
}

/// Checks a broker name: `[A-Za-z0-9_-]{1,128}`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a name: 1 to 128 of A-Z a-z 0-9 _ -"
        ))
    }
}

async fn tail(client: &Client, args: TailArgs) -> Outcome {
    let mut filter = WatchFilter::all();
    if let Some(run_id) = args.run_id {
        filter = filter.run(run_id);
    }
    if let Some(agent) = args.agent {
        filter = filter.agent(agent);
    }
    if let Some(owner) = args.owner {
        filter = filter.owner(owner);
    }
    if !args.kinds.is_empty() {
        filter = filter.kinds(args.kinds);
    }
    if let Some(seq) = args.from_seq {
        filter = filter.from_sequence(seq);
    }
    let mut events = client.watch(filter).await?;
    if io::stdout().is_terminal() {
        out(&format!(
            "{:>6}  {:<12}  {:<18}  {:<24}  {:<8}  detail\n",
            "seq", "time", "event", "agents", "handoff"
        ))?;
    }
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut last_seq = None;
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = &mut stop => return Ok(()),
        };
        match next {
            Some(Ok(event)) => {
                // Below the event's own sequence in a watch of one run,
                // whose events come in causal order.
                last_seq = Some(match event.resume_sequence {
                    0 => event.sequence.saturating_add(1),
                    resume => resume,
                });
                out(&format!("{}\n", display::event_line(&event)))?;
            }
            Some(Err(e)) => {
                let resume = last_seq
                    .map(|s| format!(" (resume with --from-seq {s})"))
                    .unwrap_or_default();
                return Err(Failure(format!("event stream failed: {e}{resume}")));
            }
            None => return Err(Failure("the broker ended the event stream".to_string())),
        }
    }
}

fn grants_of(texts: &[String]) -> Result<Vec<pb::Grant>, Failure> {
    texts
        .iter()
        .map(|t| parse_grant(t).map_err(|e| Failure(format!("--grant {t:?}: {}", e.message()))))
        .collect()
}

fn grant_text(g: &pb::Grant) -> String {
    let action = match pb::GrantAction::try_from(g.action) {
        Ok(pb::GrantAction::SendAs) => "send_as",
        Ok(pb::GrantAction::ReceiveAs) => "receive_as",
        Ok(pb::GrantAction::Own) => "own",
        Ok(pb::GrantAction::Read) => "read",
        Ok(pb::GrantAction::Admin) => "admin",
        _ => "?",
    };
    let deny = if g.deny { "!" } else { "" };
    if g.pattern.is_empty() {
        format!("{deny}{action}")
    } else {
        format!("{deny}{action} {}", g.pattern)
    }
}

async fn principals_set(client: &Client, name: &str, grants: &[String]) -> Outcome {
    let updated = client.put_principal(name, grants_of(grants)?).await?;
    let verb = if updated { "updated" } else { "stored" };
    out(&format!(
        "principal {name} {verb} with {} grants\n",
        grants.len()
    ))
}

async fn principals_list(client: &Client) -> Outcome {
    let rows = client
        .list_principals()
        .await?
        .iter()
        .map(|p| {
            let grants: Vec<String> = p.grants.iter().map(grant_text).collect();
            vec![p.name.clone(), or_dash(&grants.join(", "))]
        })
        .collect();
    out(&table(&["PRINCIPAL", "GRANTS"], rows))
}

async fn tokens_create(
    client: &Client,
    principal: &str,
    grants: &[String],
    description: &str,
) -> Outcome {
    if !grants.is_empty() {
        client.put_principal(principal, grants_of(grants)?).await?;
    }
    let created = client.create_token(principal, description).await?;
    eprintln!(
        "token {} for {principal}: keep it secret, it is not shown again",
        created.token.id
    );
    out(&format!("{}\n", created.secret))
}

async fn tokens_list(client: &Client) -> Outcome {
    let rows = client
        .list_tokens()
        .await?
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.principal.clone(),
                display::timestamp(t.created_at),
                t.revoked_at
                    .map(|r| display::timestamp(Some(r)))
                    .unwrap_or_else(|| "-".to_string()),
                or_dash(&t.description),
            ]
        })
        .collect();
    out(&table(
        &["ID", "PRINCIPAL", "CREATED", "REVOKED", "DESCRIPTION"],
        rows,
    ))
}

async fn agents_list(client: &Client) -> Outcome {
    let (agents, status) = tokio::try_join!(client.list_agents(), client.agent_status())?;
    let mut rows: Vec<(String, Vec<String>)> = agents
        .iter()
        .map(|a| {
            let now = status.iter().find(|s| s.name == a.name);
            let count = |f: fn(&pb::AgentStatus) -> u64| {
                now.map_or_else(|| "-".to_string(), |s| f(s).to_string())
            };
            let oldest = now
                .and_then(|s| s.oldest_pending_age)
                .and_then(|d| Duration::try_from(d).ok())
                .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
                .unwrap_or_else(|| "-".to_string());
            let row = vec![
                a.name.clone(),
                a.lease
                    .and_then(|d| Duration::try_from(d).ok())
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "default".to_string()),
                a.max_attempts.to_string(),
                or_dash(&a.fallback_agent),
                count(|s| u64::from(s.instances)),
                count(|s| s.pending),
                count(|s| s.in_flight),
                oldest,
                if now.is_some_and(|s| s.unattended) {
                    "unattended".to_string()
                } else {
                    "-".to_string()
                },
                or_dash(&a.description),
            ];
            (a.name.clone(), row)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    out(&table(
        &[
            "NAME",
            "LEASE",
            "MAX_ATTEMPTS",
            "FALLBACK",
            "INSTANCES",
            "PENDING",
            "IN_FLIGHT",
            "OLDEST_PENDING",
            "NOTE",
            "DESCRIPTION",
        ],
        rows.into_iter().map(|(_, r)| r).collect(),
    ))
}

async fn instances(client: &Client, args: InstancesArgs) -> Outcome {
    let found = client.list_instances(args.agent.as_deref()).await?;
    let rows = found
        .iter()
        .map(|i| {
            vec![
                i.agent.clone(),
                i.instance.clone(),
                i.replica.clone(),
                display::timestamp(i.connected_since),
                format!("{}/{}", i.in_flight, i.max_in_flight),
                i.last_settled_at
                    .map(|t| display::timestamp(Some(t)))
                    .unwrap_or_else(|| "-".to_string()),
                display::timestamp(i.seen_at),
            ]
        })
        .collect();
    out(&table(
        &[
            "AGENT",
            "INSTANCE",
            "REPLICA",
            "CONNECTED",
            "IN_FLIGHT",
            "LAST_SETTLED",
            "SEEN",
        ],
        rows,
    ))
}

async fn dead_letters(client: &Client, args: DeadLettersArgs) -> Outcome {
    let letters = client
        .dead_letters(args.agent.as_deref().unwrap_or(""), args.limit.unwrap_or(0))
        .await?;
    let rows = letters
        .iter()
        .map(|d| {
            let env = d.handoff.clone().unwrap_or_default();
            vec![
                d.sequence.to_string(),
                display::timestamp(d.at),
                d.agent.clone(),
                or_dash(&env.run_id),
                or_dash(&env.id),
                d.attempts.to_string(),
                or_dash(&d.reason),
            ]
        })
        .collect();
    out(&table(
        &["SEQ", "AT", "AGENT", "RUN", "HANDOFF", "ATTEMPTS", "REASON"],
        rows,
    ))
}

/// Writes to stdout (flushing), reporting a closed pipe as an error the
/// caller recognises with [`stdout_closed`].
fn out(text: &str) -> Outcome {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            Err(Failure("stdout closed".to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Columns padded to their widest cell; the last one is left ragged.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    if rows.is_empty() {
        return "(none)\n".to_string();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let pad = w.saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    // No SIGTERM handler: Ctrl-C alone; if even that fails, run until killed.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e}; write e.g. 90s, 10m or 1h 30m"))?;
    if d.is_zero() {
        return Err("must be greater than zero".to_string());
    }
    Ok(d)
}

fn parse_pin(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err("expected key=value with a non-empty key".to_string()),
    }
}

fn parse_compatibility(s: &str) -> Result<pb::Compatibility, String> {
    match s.to_ascii_lowercase().as_str() {
        "none" => Ok(pb::Compatibility::None),
        "backward" => Ok(pb::Compatibility::Backward),
        "forward" => Ok(pb::Compatibility::Forward),
        "full" => Ok(pb::Compatibility::Full),
        _ => Err("expected none, backward, forward or full".to_string()),
    }
}

fn parse_confidence(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if (0.0..=1.0).contains(&c) => Ok(c),
        Ok(_) => Err("must be in [0, 1]".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_kind(s: &str) -> Result<pb::EventKind, String> {
    pb::EventKind::from_token(s).ok_or_else(|| {
        let valid: Vec<&str> = handoff_proto::ALL_EVENT_KINDS
            .iter()
            .map(|k| k.token())
            .collect();
        format!("unknown event kind; valid kinds: {}", valid.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_pin("a=b=c"), Ok(("a".to_string(), "b=c".to_string())));
        assert!(parse_pin("=x").is_err());
        assert!(parse_pin("novalue").is_err());
        assert_eq!(parse_kind("RUN_FAILED"), Ok(pb::EventKind::RunFailed));
        assert!(parse_kind("nope").is_err_and(|e| e.contains("run_completed")));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_compatibility("FULL"), Ok(pb::Compatibility::Full));
        assert!(parse_compatibility("sideways").is_err());
        assert_eq!(parse_confidence("0.5"), Ok(0.5));
        assert!(parse_confidence("1.5").is_err());
        assert!(parse_confidence("x").is_err());
    }

    #[test]
    fn operate_commands_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied()).map(|c| c.command);
        match parse(&[
            "handoffctl",
            "runs",
            "list",
            "--status",
            "failed",
            "--status",
            "CANCELLED",
            "--since",
            "1h",
            "--agent",
            "writer",
        ]) {
            Ok(Command::Runs(RunsCommand::List(a))) => {
                assert_eq!(
                    a.statuses,
                    [
                        pb::RunStatus::Failed as i32,
                        pb::RunStatus::Cancelled as i32
                    ]
                );
                assert!(a.since.is_some() && a.until.is_none());
                assert_eq!(a.limit, 50);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["handoffctl", "runs", "list", "--status", "paused"]).is_err());
        assert!(parse(&["handoffctl", "runs", "list", "--since", "yesterday"]).is_err());
        match parse(&[
            "handoffctl",
            "dead-letters",
            "redrive",
            "7",
            "--to",
            "fixed",
        ]) {
            Ok(Command::DeadLetters(DeadLettersArgs {
                command: Some(DeadLettersCommand::Redrive { sequence: 7, to }),
                ..
            })) => assert_eq!(to.as_deref(), Some("fixed")),
            other => panic!("{other:?}"),
        }
        match parse(&["handoffctl", "dead-letters", "--agent", "worker"]) {
            Ok(Command::DeadLetters(DeadLettersArgs {
                command: None,
                agent: Some(agent),
                ..
            })) => assert_eq!(agent, "worker"),
            other => panic!("{other:?}"),
        }
        match parse(&["handoffctl", "run", "answer", "r1", "q1", "--json", "{}"]) {
            Ok(Command::Run(RunCommand::Answer {
                request: Some(q),
                payload,
                ..
            })) => assert_eq!((q.as_str(), payload.message_type), ("q1", None)),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["handoffctl", "run", "fork", "r1", "--at-revision", "3"]).is_err());
    }

    #[test]
    fn register_needs_exactly_one_source() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(
                [
                    "handoffctl",
                    "contracts",
                    "register",
                    "--message-type",
                    "a.B",
                ]
                .iter()
                .chain(args),
            )
        };
        assert!(parse(&[]).is_err());
        assert!(parse(&["--descriptor-set", "x.bin", "--proto", "x.proto"]).is_err());
        assert!(parse(&["--descriptor-set", "x.bin", "-I", "dir"]).is_err());
        assert!(parse(&["--proto", "x.proto", "-I", "a", "-I", "b"]).is_ok());
        assert!(parse(&[
            "--descriptor-set",
            "x.bin",
            "--require",
            "a",
            "--require",
            "b.c"
        ])
        .is_ok());
    }

    #[test]
    fn fields_of_a_demo_contract() {
        let pool = DescriptorPool::decode(handoff_proto::DEMO_FILE_DESCRIPTOR_SET);
        let message = pool
            .ok()
            .and_then(|p| p.get_message_by_name("handoff.demo.v1.WorkerResult"));
        let Some(message) = message else {
            panic!("the demo descriptor set lacks WorkerResult");
        };
        let text = fields_text(&message);
        assert!(text.contains("3       summary    string"), "{text}");
        assert!(
            text.contains("4       citations  repeated handoff.demo.v1.Citation"),
            "{text}"
        );
    }

    #[test]
    fn compiles_a_proto_file() {
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("no temp dir") };
        let file = dir.path().join("t.proto");
        let written = std::fs::write(
            &file,
            "syntax = \"proto3\";\npackage t.v1;\nimport \"google/protobuf/timestamp.proto\";\nmessage M { optional string a = 1; map<string, int64> b = 2; google.protobuf.Timestamp at = 3; }\n",
        );
        assert!(written.is_ok());
        let bytes = match compile_proto(&file, &[]) {
            Ok(b) => b,
            Err(Failure(e)) => panic!("{e}"),
        };
        let pool = DescriptorPool::decode(bytes.as_slice()).ok();
        let m = pool.and_then(|p| p.get_message_by_name("t.v1.M"));
        let Some(m) = m else {
            panic!("t.v1.M not compiled")
        };
        let text = fields_text(&m);
        assert!(text.contains("optional string"), "{text}");
        assert!(text.contains("map<string, int64>"), "{text}");
        assert!(text.contains("google.protobuf.Timestamp"), "{text}");
        assert!(compile_proto(&dir.path().join("missing.proto"), &[]).is_err());
    }

    #[test]
    fn barrier_references() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(["handoffctl", "barrier", "show"].iter().chain(args))
                .map_err(|e| e.to_string())?;
            match cli.command {
                Command::Barrier(BarrierCommand::Show(args)) => barrier_ref(&args),
                other => Err(format!("parsed as {other:?}")),
            }
        };
        let ok = |run: &str, barrier: &str| Ok((run.to_string(), barrier.to_string()));
        assert_eq!(parse(&["r1/join-1"]), ok("r1", "join-1"));
        assert_eq!(parse(&["join-1", "--run", "r1"]), ok("r1", "join-1"));
        assert_eq!(parse(&["--run", "r1", "join-1"]), ok("r1", "join-1"));
        for bad in [
            &["join-1"][..],
            &["r1/join-1", "--run", "r1"],
            &["/join-1"],
            &["r1/"],
            &["r1/a/b"],
            &["r 1/join"],
            &["join.1", "--run", "r1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&[]).is_err());
        let cli = Cli::try_parse_from(["handoffctl", "barrier", "show", "join-1"]);
        let usage: Result<(), String> = cli.map_err(|e| e.to_string()).and_then(|cli| {
            check_usage(&cli).map_err(|e| e.to_string())?;
            Err("accepted a barrier without its run".to_string())
        });
        let message = usage.err().unwrap_or_default();
        assert!(message.contains("no run"), "{message}");
        assert!(message.contains("handoffctl barrier show"), "{message}");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "B"], vec![vec!["long-name".into(), "x".into()]]);
        assert_eq!(t, "A          B\nlong-name  x\n");
    }
}
