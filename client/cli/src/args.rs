//! The command line, as clap parses it.

use super::*;

/// handoffctl: start and inspect runs and barriers, follow events, manage
/// contracts, list agents and dead letters of a handoff broker.
#[derive(Parser, Debug)]
#[command(name = "handoffctl", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Broker address (`http://host:port` or `host:port`).
    #[arg(
        long,
        global = true,
        env = "HANDOFF_ADDR",
        default_value = "http://127.0.0.1:7233",
        value_name = "ADDR"
    )]
    pub(crate) addr: String,

    /// API token, sent as `authorization: Bearer <token>` on every call.
    #[arg(
        long,
        global = true,
        env = "HANDOFF_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,

    /// PEM file of the CA that issued the broker's certificate: speak TLS
    /// (a bare `host:port` then means `https://`).
    #[arg(long, global = true, env = "HANDOFF_CA", value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,

    /// PEM file of a client certificate for mTLS (with --key).
    #[arg(
        long,
        global = true,
        env = "HANDOFF_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    pub(crate) cert: Option<PathBuf>,

    /// PEM file of the private key of --cert.
    #[arg(
        long,
        global = true,
        env = "HANDOFF_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    pub(crate) key: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Start, show or cancel a run.
    #[command(subcommand)]
    Run(RunCommand),
    /// Find runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Show barriers (fan-in joins of parallel branches).
    #[command(subcommand)]
    Barrier(BarrierCommand),
    /// Show a run's shared state.
    #[command(subcommand)]
    State(StateCommand),
    /// Follow events live, one line each, until Ctrl-C.
    Tail(TailArgs),
    /// Registered agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Contracts: register, list and show message types and their rules.
    #[command(subcommand)]
    Contracts(ContractsCommand),
    /// Live instances (Subscribe sessions) of agents, on every replica.
    Instances(InstancesArgs),
    /// Handoffs that ran out of attempts without a fallback; `redrive`
    /// hands one again.
    DeadLetters(DeadLettersArgs),
    /// Show one handoff.
    #[command(subcommand)]
    Handoff(HandoffCommand),
    /// Principals (people and services) and their grants (admin).
    #[command(subcommand)]
    Principals(PrincipalsCommand),
    /// API tokens: create, list, revoke (admin).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The key that signs delivery leases (admin).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand, Debug)]
pub(crate) enum PrincipalsCommand {
    /// Store a principal with its grants, replacing the ones it had.
    Set {
        /// The principal's name (a client certificate names it by CN or
        /// by a `handoff://principal/<name>` URI SAN).
        name: String,
        /// A grant: `send_as AGENT`, `receive_as AGENT`, `own OWNER`,
        /// `read` or `admin`; patterns take `*`; a leading `!` denies.
        /// Repeat for several.
        #[arg(long = "grant", value_name = "GRANT")]
        grants: Vec<String>,
    },
    /// List principals and their grants.
    List,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TokensCommand {
    /// Issue a token for a principal (stored first with `principals set`,
    /// or here with --grant); prints the bearer token once.
    Create {
        /// The principal the token authenticates.
        #[arg(long)]
        principal: String,
        /// Grants to store for the principal first (as `principals set`).
        #[arg(long = "grant", value_name = "GRANT")]
        grants: Vec<String>,
        /// What the token is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token: it authenticates nobody from now on.
    Revoke {
        /// The token's id (from `tokens list`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeysCommand {
    /// Add a new signing key; deliveries signed with the old ones stay
    /// valid until their leases end.
    Rotate,
}

#[derive(Subcommand, Debug)]
pub(crate) enum RunCommand {
    /// Start a run; prints its id, then a one-line summary on stderr.
    Start(StartArgs),
    /// Show a run: status, pinned context and timeline.
    Show {
        /// The run's id.
        id: String,
    },
    /// Cancel a running run (needs `own` on its owner): it ends
    /// CANCELLED, its pending handoffs are dropped, and the instances
    /// working on it are told.
    Cancel {
        /// The run's id.
        id: String,
        /// Why (recorded as the run's failure).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Start a new run from a revision of a run's state, with a first
    /// handoff (needs `own` on the run's owner); prints the new run's id.
    Fork {
        /// The run to fork.
        id: String,
        /// The state revision the new run starts from (0: no state).
        #[arg(long, value_name = "N", default_value_t = 0)]
        at_revision: u64,
        /// The agent the first handoff goes to.
        #[arg(long, value_name = "AGENT")]
        to: String,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Answer a run's waiting input request (needs `own` on its owner);
    /// with no request id, list the waiting ones.
    Answer {
        /// The run.
        id: String,
        /// The request's id.
        request: Option<String>,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Write a run's record, timeline and every state revision as one JSON
    /// document (protobuf's JSON mapping), to keep what the broker purges
    /// `retention` after the run ends.
    Export {
        /// The run's id.
        id: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum StateCommand {
    /// Show a run's state at its latest revision or at `--rev N`, and the
    /// handoff that made it.
    Show {
        /// The run's id.
        run: String,
        /// The revision (default: the latest).
        #[arg(long)]
        rev: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum BarrierCommand {
    /// Show a barrier: state, mode, target, times, fail-fast, timeout, its
    /// release, the late branches, and every branch in key order with its
    /// status, source agent, handoff and warnings.
    Show(BarrierShowArgs),
}

#[derive(Args, Debug)]
pub(crate) struct BarrierShowArgs {
    /// The barrier: `RUN/BARRIER`, or `BARRIER` with `--run RUN`.
    #[arg(value_name = "RUN/BARRIER")]
    pub(crate) barrier: String,
    /// The run the barrier belongs to.
    #[arg(long = "run", value_name = "ID")]
    pub(crate) run_id: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct StartArgs {
    /// Who is told when the run completes, fails or times out.
    #[arg(long)]
    pub(crate) owner: String,
    /// Run id (default: generated by the broker). Starting again with the
    /// same id and owner answers the existing run.
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// Time budget of the whole run, e.g. `90s`, `10m`, `1h 30m`
    /// (default: the broker's `default_run_timeout`).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) timeout: Option<Duration>,
    /// No deadline at all.
    #[arg(long, conflicts_with = "timeout")]
    pub(crate) no_timeout: bool,
    /// Sequential hops allowed (default: the broker's `default_max_depth`).
    #[arg(long, value_name = "N")]
    pub(crate) max_depth: Option<u32>,
    /// The original ask, pinned to every delivery of the run.
    #[arg(long, value_name = "TEXT")]
    pub(crate) ask: Option<String>,
    /// Another pinned field, `key=value`; repeatable.
    #[arg(long = "pin", value_parser = parse_pin, value_name = "KEY=VALUE")]
    pub(crate) pins: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub(crate) struct TailArgs {
    /// Only events of this run.
    #[arg(long = "run", value_name = "ID")]
    pub(crate) run_id: Option<String>,
    /// Only events concerning this agent (as target or source).
    #[arg(long, value_name = "NAME")]
    pub(crate) agent: Option<String>,
    /// Only events of runs owned by this owner.
    #[arg(long, value_name = "NAME")]
    pub(crate) owner: Option<String>,
    /// Only events of this kind (`run_started`, `acked`, ...); repeatable.
    #[arg(long = "kind", value_parser = parse_kind, value_name = "KIND")]
    pub(crate) kinds: Vec<pb::EventKind>,
    /// Replay stored events from this stream sequence before following
    /// live ones (default: only new events).
    #[arg(long, value_name = "N")]
    pub(crate) from_seq: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AgentsCommand {
    /// List the registered agents: name, lease, attempts, fallback, description.
    List,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ContractsCommand {
    /// Register a contract version; prints its version, whether it was
    /// created or already registered (unchanged), and its fingerprint.
    #[command(disable_version_flag = true)]
    Register(RegisterContractArgs),
    /// List registered contract versions: type, version, compatibility,
    /// rules, registration time.
    List {
        /// Only versions of this message type.
        #[arg(long, value_name = "TYPE")]
        message_type: Option<String>,
    },
    /// Show a contract version: compatibility, fingerprint, rules and the
    /// message's fields.
    #[command(disable_version_flag = true)]
    Show {
        /// Full name of the message type (`acme.research.v1.Subtask`).
        message_type: String,
        /// The version (default: the latest).
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
    /// Change the compatibility mode the contract's next versions are
    /// checked under (admin); the change is recorded as an event with the
    /// reason.
    SetCompatibility {
        /// Full name of the message type (`acme.research.v1.Subtask`).
        message_type: String,
        /// The new mode: none, backward, forward or full.
        #[arg(long, value_parser = parse_compatibility, value_name = "MODE")]
        mode: pb::Compatibility,
        /// Why the mode changes (recorded with the change).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct RegisterContractArgs {
    /// Full name of the message type (`acme.research.v1.Subtask`).
    #[arg(long, value_name = "TYPE")]
    pub(crate) message_type: String,
    /// An encoded `google.protobuf.FileDescriptorSet` defining the type
    /// and its imports (`protoc --include_imports --descriptor_set_out`).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "proto",
        conflicts_with = "proto"
    )]
    pub(crate) descriptor_set: Option<PathBuf>,
    /// A `.proto` file defining the type, compiled here.
    #[arg(long, value_name = "FILE")]
    pub(crate) proto: Option<PathBuf>,
    /// Import path for `--proto`; repeatable (default: the file's
    /// directory).
    #[arg(
        short = 'I',
        long = "include",
        value_name = "DIR",
        conflicts_with = "descriptor_set"
    )]
    pub(crate) includes: Vec<PathBuf>,
    /// The version to register (default: the next one, or the latest when
    /// identical).
    #[arg(long, value_name = "N")]
    pub(crate) version: Option<u32>,
    /// The contract's compatibility mode, set by version 1 (default:
    /// backward); a later version is checked under the contract's mode and
    /// may only repeat it (change it with `contracts set-compatibility`).
    #[arg(long, value_parser = parse_compatibility, value_name = "MODE")]
    pub(crate) compatibility: Option<pb::Compatibility>,
    /// A field path that must be present (`ask.text`); repeatable.
    #[arg(long = "require", value_name = "PATH")]
    pub(crate) required: Vec<String>,
    /// Budget of BPE tokens over the payload's string values.
    #[arg(long, value_name = "N")]
    pub(crate) max_tokens: Option<u64>,
    /// Budget of the encoded payload in bytes.
    #[arg(long, value_name = "N")]
    pub(crate) max_bytes: Option<u64>,
    /// Lowest confidence accepted, in [0, 1].
    #[arg(long, value_parser = parse_confidence, value_name = "X")]
    pub(crate) min_confidence: Option<f64>,
    /// Oldest tool result accepted, e.g. `10m`, `1h`.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) max_tool_result_age: Option<Duration>,
    /// A top-level field a handoff must carry over from the payload it
    /// consumes (repeatable): dropping it is refused (DROPPED_FIELD).
    #[arg(long = "carry", value_name = "FIELD")]
    pub(crate) carry: Vec<String>,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct DeadLettersArgs {
    #[command(subcommand)]
    pub(crate) command: Option<DeadLettersCommand>,
    /// Only dead letters of this agent (default: every agent).
    #[arg(long, value_name = "NAME")]
    pub(crate) agent: Option<String>,
    /// At most this many, oldest first (default: the broker's, 100).
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DeadLettersCommand {
    /// Hand a dead letter again, once (needs `own` on its run's owner); a
    /// run it failed goes back to running.
    Redrive {
        /// The letter's SEQ (from `dead-letters`).
        sequence: u64,
        /// Hand it to this agent instead (it must accept its contract).
        #[arg(long, value_name = "AGENT")]
        to: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum HandoffCommand {
    /// A handoff: its run, source, target, depth, where its delivery
    /// stands, and the events about it.
    Show {
        /// The handoff's id.
        id: String,
        /// Its run (default: found by the broker).
        #[arg(long, value_name = "ID")]
        run: Option<String>,
    },
}

/// A payload given on the command line: a registered contract's message
/// type and its JSON (protobuf's JSON mapping).
#[derive(Args, Debug)]
pub(crate) struct PayloadArgs {
    /// The payload's message type (a registered contract); for `run
    /// answer`, default: the type the request asks for.
    #[arg(long = "type", value_name = "MESSAGE_TYPE")]
    pub(crate) message_type: Option<String>,
    /// The payload as JSON.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    pub(crate) json: String,
}

#[derive(Subcommand, Debug)]
pub(crate) enum RunsCommand {
    /// Runs, newest first, that match every filter given (the runs you may
    /// read).
    List(RunsListArgs),
}

#[derive(Args, Debug)]
pub(crate) struct RunsListArgs {
    /// Only runs of this owner.
    #[arg(long)]
    pub(crate) owner: Option<String>,
    /// Only runs in this status (running, completed, failed, timed_out,
    /// cancelled); repeat for several.
    #[arg(long = "status", value_name = "STATUS", value_parser = status_arg)]
    pub(crate) statuses: Vec<i32>,
    /// Only runs of this pipeline.
    #[arg(long)]
    pub(crate) pipeline: Option<String>,
    /// Only runs in which a handoff to this agent was accepted.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Only runs started at or after this time: RFC 3339, or a duration
    /// meaning that long ago (`1h`).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub(crate) since: Option<prost_types::Timestamp>,
    /// Only runs started before this time (as --since).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub(crate) until: Option<prost_types::Timestamp>,
    /// Only runs with dead letters.
    #[arg(long)]
    pub(crate) dead_letters: bool,
    /// Only runs whose judge found drift.
    #[arg(long)]
    pub(crate) drift: bool,
    /// At most this many runs (up to 500 per page; more are read page by
    /// page).
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: usize,
}

/// A run status by its word.
fn status_arg(word: &str) -> Result<i32, String> {
    handoffctl::display::parse_status(word)
        .map(|s| s as i32)
        .ok_or_else(|| "not one of running, completed, failed, timed_out, cancelled".to_string())
}

/// A time given as RFC 3339, or as a duration meaning that long ago.
fn time_arg(value: &str) -> Result<prost_types::Timestamp, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(value) {
        return Ok(at.into());
    }
    let ago = humantime::parse_duration(value)
        .map_err(|_| "neither an RFC 3339 time nor a duration".to_string())?;
    std::time::SystemTime::now()
        .checked_sub(ago)
        .map(Into::into)
        .ok_or_else(|| "too long ago".to_string())
}

#[derive(Args, Debug)]
pub(crate) struct InstancesArgs {
    /// Only this agent's instances.
    #[arg(long)]
    pub(crate) agent: Option<String>,
}
