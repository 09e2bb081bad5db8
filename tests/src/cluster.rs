//! Three-node JetStream clusters of real `nats-server` processes, for tests
//! of replication and failover.
//!
//! [`Cluster::start`] runs three servers named `n1`, `n2` and `n3` (node
//! indexes 0, 1 and 2) on loopback, each with a temporary store of its own,
//! routed to one another in the cluster [`CLUSTER_NAME`]. It returns once
//! every node has a route to every other one and follows a JetStream meta
//! leader. [`Cluster::kill9`] takes a node down with SIGKILL and
//! [`Cluster::restart`] brings it back with the same name, ports and store;
//! [`Cluster::stream_leader`] and [`Cluster::wait_stream_current`] ask
//! JetStream itself how a stream's replicas stand. [`Cluster::start_with`]
//! starts nodes with arguments of the caller's (configuration files, TLS,
//! users), for tests of real deployment files.
//!
//! Ports. The client and monitoring ports are chosen by the servers
//! (`-p -1`, `-m -1`) and read from their logs. The route ports cannot be:
//! a JetStream server refuses to start without configured routes
//! ("JetStream cluster requires configured routes"), so each node must be
//! told the route ports of the others before any of them runs. They are
//! reserved by binding port 0 on loopback and released just before the
//! servers bind them; if another process takes one in between, that server
//! reports it in its log and the whole start is tried again on fresh ports.
//! Every route port is still read back from the log and checked. A restart
//! binds the ports its node had.
//!
//! Readiness is read, never slept for: a node is up when its log says so
//! (server name, ports, `Server is ready`); the cluster is formed when the
//! monitoring endpoint of every running node reports routes to all the
//! others (`/routez`), a meta leader among the running nodes (`/jsz`), and
//! health (`/healthz`: JetStream current with the meta leader, and every
//! stream and consumer it holds current).
//!
//! Every process is killed when the [`Cluster`] is dropped, before its
//! temporary directory is removed.

#![warn(missing_docs)]

use std::{
    collections::VecDeque,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use nix::{sys::signal, unistd::Pid};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

/// The cluster name of the nodes [`Cluster::start`] runs.
pub const CLUSTER_NAME: &str = "handoff-test";

/// Nodes of [`Cluster::start`].
const NODES: usize = 3;
/// Starts tried when a reserved route port was taken in between.
const START_ATTEMPTS: usize = 3;
/// Restarts tried when one of the node's ports was taken while it was
/// down, and the pause between them.
const RESTART_ATTEMPTS: usize = 20;
const RESTART_PAUSE: Duration = Duration::from_millis(500);
/// Time allowed for a server to log that it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time allowed for the cluster to form, elect, or catch up: JetStream's
/// election timer alone runs 4 to 9 s after a leader is lost.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two looks at a state that is not there yet.
const POLL: Duration = Duration::from_millis(100);
/// Time allowed for one request (HTTP to a monitoring port, or JetStream).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Log lines kept per node, for error messages.
const LOG_TAIL: usize = 30;

/// Why a cluster could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The `nats-server` executable could not be run.
    #[error("cannot run nats-server ({source}); ./dev installs 2.12 or newer into target/tools")]
    Spawn {
        /// Why.
        source: std::io::Error,
    },
    /// A port the node was to bind was taken by another process.
    #[error("{node}: a port it was to bind is taken; its log ends with:\n{log}")]
    PortTaken {
        /// The node (its server name, else its index).
        node: String,
        /// The end of its log.
        log: String,
    },
    /// A node exited, did not become ready, or came up unlike it should.
    #[error("{node}: {reason}; its log ends with:\n{log}")]
    Node {
        /// The node (its server name, else its index).
        node: String,
        /// What went wrong.
        reason: String,
        /// The end of its log.
        log: String,
    },
    /// A state the cluster should reach was not reached in time.
    #[error("{what}: not within {timeout:?}; last seen: {last}")]
    Timeout {
        /// The state waited for.
        what: String,
        /// How long it was waited for.
        timeout: Duration,
        /// What was seen at the last look.
        last: String,
    },
    /// The cluster was asked about a node it does not have, or asked to
    /// start a node that runs.
    #[error("{0}")]
    Usage(String),
    /// The temporary directory could not be made.
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
}

/// What [`Cluster::start_with`] tells the function that makes each node's
/// command line.
#[derive(Debug, Clone, Copy)]
pub struct NodePlan<'a> {
    /// The node's index, from 0.
    pub index: usize,
    /// The route port of every node (this one's at `index`): each is
    /// reserved for its node, which must listen for routes on it.
    pub route_ports: &'a [u16],
    /// An empty directory of this node's own (its store, its files),
    /// removed with the cluster.
    pub dir: &'a Path,
}

impl NodePlan<'_> {
    /// This node's route port.
    pub fn route_port(&self) -> u16 {
        self.route_ports[self.index]
    }

    /// `nats://127.0.0.1:<port>` for the route port of every other node.
    pub fn routes(&self) -> Vec<String> {
        self.route_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != self.index)
            .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
            .collect()
    }
}

/// The command line of a node of [`Cluster::start`]: server `n<index+1>`,
/// clients and monitoring on random loopback ports, JetStream in its own
/// directory, routes to every other node.
pub fn default_args(plan: &NodePlan<'_>) -> Vec<String> {
    let store = plan.dir.join("jetstream");
    [
        "-a",
        "127.0.0.1",
        "-p",
        "-1",
        "-m",
        "-1",
        "-js",
        "-sd",
        &store.display().to_string(),
        "-n",
        &format!("n{}", plan.index + 1),
        "--cluster_name",
        CLUSTER_NAME,
        "--cluster",
        &format!("nats://127.0.0.1:{}", plan.route_port()),
        "--routes",
        &plan.routes().join(","),
    ]
    .map(String::from)
    .to_vec()
}

/// How the helper's own NATS clients connect (user, TLS...).
type Connect = Arc<dyn Fn() -> async_nats::ConnectOptions + Send + Sync>;

/// A JetStream cluster of `nats-server` processes on loopback.
pub struct Cluster {
    nodes: Vec<Node>,
    bin: PathBuf,
    connect: Connect,
    // Last: removed after the processes are killed.
    _dir: TempDir,
}

/// One node: how it is started and what it bound.
struct Node {
    /// Its server name, read from its log.
    name: String,
    /// Its command line, less the `-p <port>` a restart adds.
    args: Vec<String>,
    client_port: u16,
    route_port: u16,
    /// Its monitoring endpoint (a restart may bind another).
    monitor: SocketAddr,
    /// `None` while killed.
    child: Option<Child>,
    log: Log,
}

impl Cluster {
    /// Starts [`Cluster::try_start`]'s three nodes; panics (the test fails)
    /// if they cannot start or form a cluster.
    pub async fn start() -> Cluster {
        match Cluster::try_start().await {
            Ok(cluster) => cluster,
            Err(e) => panic!("three-node nats-server cluster: {e}"),
        }
    }

    /// Starts three nodes with [`default_args`] and waits until they form
    /// a cluster with a JetStream meta leader.
    pub async fn try_start() -> Result<Cluster, ClusterError> {
        Cluster::start_with(NODES, default_args).await
    }

    /// Starts `nodes` servers with the command lines `args` makes (see
    /// [`NodePlan`]) and waits until they form a cluster with a JetStream
    /// meta leader. Each node must listen for routes on its reserved port,
    /// enable monitoring (its port may be -1), and take its client port
    /// from its arguments (`-1` for a random one; a restart adds
    /// `-p <port>` to keep the port it had).
    pub async fn start_with(
        nodes: usize,
        mut args: impl FnMut(&NodePlan<'_>) -> Vec<String>,
    ) -> Result<Cluster, ClusterError> {
        crate::init_logs();
        let bin = PathBuf::from("nats-server");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::Builder::new().prefix("nats-cluster-").tempdir()?;
            let route_ports = reserve_ports(nodes)?;
            let mut planned = Vec::with_capacity(nodes);
            for index in 0..nodes {
                let node_dir = dir.path().join(format!("node-{}", index + 1));
                std::fs::create_dir_all(&node_dir)?;
                let plan = NodePlan {
                    index,
                    route_ports: &route_ports,
                    dir: &node_dir,
                };
                planned.push((args(&plan), Log::default()));
            }
            let started = futures::future::join_all(
                planned
                    .iter()
                    .enumerate()
                    .map(|(i, (args, log))| spawn(&bin, args, format!("node {i}"), log)),
            )
            .await;
            let mut running = Vec::with_capacity(nodes);
            let mut failure = None;
            for (i, (result, (args, log))) in started.into_iter().zip(planned).enumerate() {
                match result.and_then(|s| s.expecting_route_port(route_ports[i], &log)) {
                    Ok(s) => running.push(Node {
                        name: s.name,
                        args,
                        client_port: s.client_port,
                        route_port: s.route_port,
                        monitor: s.monitor,
                        child: Some(s.child),
                        log,
                    }),
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            match failure {
                // The started nodes are killed as `running` drops.
                Some(ClusterError::PortTaken { .. }) if attempt < START_ATTEMPTS => continue,
                Some(e) => return Err(e),
                None => {}
            }
            let cluster = Cluster {
                nodes: running,
                bin,
                connect: Arc::new(async_nats::ConnectOptions::new),
                _dir: dir,
            };
            cluster.wait_formed().await?;
            return Ok(cluster);
        }
    }

    /// Makes the helper's own NATS clients (in [`Cluster::client`],
    /// [`Cluster::stream_leader`]...) connect with these options, for nodes
    /// that require a user or TLS.
    pub fn with_connect_options(
        mut self,
        options: impl Fn() -> async_nats::ConnectOptions + Send + Sync + 'static,
    ) -> Cluster {
        self.connect = Arc::new(options);
        self
    }

    /// How many nodes the cluster has, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s server name (`n<i+1>` for [`Cluster::start`]).
    pub fn name(&self, i: usize) -> &str {
        &self.node(i).name
    }

    /// The index of the node whose server name is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// `nats://127.0.0.1:<client port>` of node `i` (the same after a
    /// restart).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.node(i).client_port)
    }

    /// The client URL of every node, running or not.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// [`Cluster::urls`] comma-separated, as a `nats_url` lists them.
    pub fn urls_joined(&self) -> String {
        self.urls().join(",")
    }

    /// Node `i`'s route port.
    pub fn route_port(&self, i: usize) -> u16 {
        self.node(i).route_port
    }

    /// Node `i`'s monitoring endpoint (HTTP), as it last started.
    pub fn monitor_addr(&self, i: usize) -> SocketAddr {
        self.node(i).monitor
    }

    /// Node `i`'s process id, `None` while it is killed.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.node(i).child.as_ref().and_then(Child::id)
    }

    /// Whether node `i` runs (it was not killed, or was restarted).
    pub fn is_running(&self, i: usize) -> bool {
        self.node(i).child.is_some()
    }

    /// The last lines node `i` logged, for messages.
    pub fn log_tail(&self, i: usize) -> String {
        self.node(i).log.tail()
    }

    /// `GET path` (e.g. `/jsz?accounts=true&streams=true`) from node
    /// `i`'s monitoring endpoint, as JSON.
    pub async fn monitor(&self, i: usize, path: &str) -> Result<serde_json::Value, ClusterError> {
        json(self.node(i).monitor, path)
            .await
            .map_err(|reason| ClusterError::Node {
                node: self.node(i).name.clone(),
                reason,
                log: self.node(i).log.tail(),
            })
    }

    /// Kills node `i` with SIGKILL (no shutdown of any kind) and waits
    /// until it has exited. A node already killed is left as it is.
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.node_mut(i).child.take() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
    }

    /// Starts killed node `i` again with its name, client and route ports
    /// and store, routed to the others as before, and waits until it is
    /// back in the cluster: routes to every running node, and JetStream
    /// current with the meta leader and in every stream and consumer it
    /// holds (`/healthz`), as on every other running node.
    pub async fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i);
        if node.child.is_some() {
            return Err(ClusterError::Usage(format!(
                "{} runs: kill9 it before restarting it",
                node.name
            )));
        }
        let mut args = node.args.clone();
        // The last -p wins: the port it had.
        args.extend(["-p".to_string(), node.client_port.to_string()]);
        let log = node.log.clone();
        log.push(format!("---- restarted by the test helper: {args:?}"));
        // While the node was down, one of its ports may have become the
        // local end of a short-lived connection (a monitoring poll, a
        // client's reconnect attempt): it is free again soon, so try again.
        let mut attempt = 1;
        let started = loop {
            let result = spawn(&self.bin, &args, node.name.clone(), &log)
                .await
                .and_then(|s| s.expecting_route_port(node.route_port, &log));
            match result {
                Err(ClusterError::PortTaken { .. }) if attempt < RESTART_ATTEMPTS => {
                    log.push(format!(
                        "---- a port was taken; restart attempt {} in {RESTART_PAUSE:?}",
                        attempt + 1
                    ));
                    attempt += 1;
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
                other => break other?,
            }
        };
        if started.name != node.name || started.client_port != node.client_port {
            return Err(ClusterError::Node {
                node: node.name.clone(),
                reason: format!(
                    "came back as {} on client port {}, not {} on {}",
                    started.name, started.client_port, node.name, node.client_port
                ),
                log: log.tail(),
            });
        }
        let node = self.node_mut(i);
        node.monitor = started.monitor;
        node.child = Some(started.child);
        self.wait_formed().await
    }

    /// A NATS client connected to the running nodes (with the options of
    /// [`Cluster::with_connect_options`]).
    pub async fn client(&self) -> Result<async_nats::Client, ClusterError> {
        self.try_client()
            .await
            .map_err(|last| ClusterError::Timeout {
                what: "a NATS connection to a running node".to_string(),
                timeout: REQUEST_TIMEOUT,
                last,
            })
    }

    /// The index of the node that leads JetStream's meta group, once the
    /// running nodes agree it is one of them.
    pub async fn meta_leader(&self) -> Result<usize, ClusterError> {
        self.poll("a JetStream meta leader among the running nodes", || {
            self.meta_leader_now()
        })
        .await
    }

    /// The index of the node that leads stream `stream`, as JetStream
    /// answers `$JS.API.STREAM.INFO`: waited for while the stream has no
    /// leader, or names one that does not run (after a [`Cluster::kill9`],
    /// until a new leader is elected).
    pub async fn stream_leader(&self, stream: &str) -> Result<usize, ClusterError> {
        self.poll(&format!("a running leader of stream {stream}"), || async {
            let info = self.stream_info(stream).await?;
            let leader = info
                .cluster
                .and_then(|c| c.leader)
                .ok_or_else(|| "no leader".to_string())?;
            self.running_index(&leader)
                .ok_or_else(|| format!("leader {leader} does not run"))
        })
        .await
    }

    /// Waits until stream `stream` has a running leader and every one of
    /// its other replicas is current and online, as many as the stream is
    /// configured for, and every replica's own copy (as its node's `/jsz`
    /// tells) ends at the leader's last sequence; returns the leader's
    /// view of its replicas. After [`Cluster::restart`] this is the
    /// restarted node caught up. Call it while nothing is being published
    /// to the stream, or it may never hold.
    ///
    /// The leader's `current` alone is not enough: a follower it reports
    /// current may not have applied the last message yet.
    pub async fn wait_stream_current(
        &self,
        stream: &str,
    ) -> Result<jetstream::stream::ClusterInfo, ClusterError> {
        self.poll(
            &format!("every replica of stream {stream} current"),
            || async {
                let info = self.stream_info(stream).await?;
                let wanted = info.config.num_replicas.max(1);
                let last = info.state.last_sequence;
                let cluster = info
                    .cluster
                    .ok_or_else(|| "no cluster information".to_string())?;
                let leader = cluster.leader.clone().unwrap_or_default();
                let behind: Vec<String> = cluster
                    .replicas
                    .iter()
                    .filter(|p| !p.current || p.offline)
                    .map(|p| format!("{} (current {}, offline {})", p.name, p.current, p.offline))
                    .collect();
                if self.running_index(&leader).is_none() {
                    return Err(format!("leader {leader:?} does not run"));
                }
                if cluster.replicas.len() + 1 != wanted {
                    return Err(format!(
                        "{} replicas besides the leader, {} wanted",
                        cluster.replicas.len(),
                        wanted - 1
                    ));
                }
                if !behind.is_empty() {
                    return Err(format!("not current: {}", behind.join(", ")));
                }
                for peer in cluster.replicas.iter().map(|p| p.name.as_str()) {
                    let i = self
                        .running_index(peer)
                        .ok_or_else(|| format!("replica {peer} does not run"))?;
                    let jsz = json(self.node(i).monitor, "/jsz?accounts=true&streams=true").await?;
                    let held = stream_detail(&jsz, stream)
                        .and_then(|s| s["state"]["last_seq"].as_u64())
                        .unwrap_or_default();
                    if held != last {
                        return Err(format!(
                            "{peer} holds up to sequence {held}, the leader {leader} up to {last}"
                        ));
                    }
                }
                Ok(cluster)
            },
        )
        .await
    }

    /// Waits until every running node has a route to every other running
    /// node, they all name one running meta leader that sees every other
    /// running node as a current peer, and each is healthy (`/healthz`:
    /// JetStream current, and every stream and consumer it holds).
    pub async fn wait_formed(&self) -> Result<(), ClusterError> {
        self.poll("the cluster formed, with a meta leader", || async {
            let running = self.running();
            for &i in &running {
                let node = self.node(i);
                let routez = json(node.monitor, "/routez").await?;
                let routes = routez["num_routes"].as_u64().unwrap_or_default();
                if routes + 1 < running.len() as u64 {
                    return Err(format!(
                        "{} has {routes} routes of {}",
                        node.name,
                        running.len() - 1
                    ));
                }
                let (status, body) = http_get(node.monitor, "/healthz").await?;
                if status != 200 {
                    return Err(format!("{}: /healthz {status} {}", node.name, body.trim()));
                }
            }
            // The leader places a new stream only on peers it sees as
            // current: right after forming it may still see one offline
            // ("no suitable peers for placement, peer offline").
            let leader = self.meta_leader_now().await?;
            let jsz = json(self.node(leader).monitor, "/jsz").await?;
            let replicas = jsz["meta_cluster"]["replicas"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let current = replicas
                .iter()
                .filter(|r| r["current"].as_bool() == Some(true))
                .filter(|r| r["offline"].as_bool() != Some(true))
                .count();
            if current + 1 < running.len() {
                return Err(format!(
                    "the meta leader sees {current} of {} peers current",
                    running.len() - 1
                ));
            }
            Ok(())
        })
        .await
    }

    fn node(&self, i: usize) -> &Node {
        match self.nodes.get(i) {
            Some(node) => node,
            None => panic!("the cluster has {} nodes, not {}", self.nodes.len(), i + 1),
        }
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        let len = self.nodes.len();
        match self.nodes.get_mut(i) {
            Some(node) => node,
            None => panic!("the cluster has {len} nodes, not {}", i + 1),
        }
    }

    /// The indexes of the running nodes.
    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect()
    }

    fn running_index(&self, name: &str) -> Option<usize> {
        self.index_of(name).filter(|&i| self.is_running(i))
    }

    /// The meta leader as the running nodes name it now, with no waiting.
    async fn meta_leader_now(&self) -> Result<usize, String> {
        let mut named = Vec::new();
        for i in self.running() {
            let jsz = json(self.node(i).monitor, "/jsz").await?;
            named.push(
                jsz["meta_cluster"]["leader"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        match named.first() {
            Some(first) if named.iter().all(|l| l == first) => self
                .running_index(first)
                .ok_or_else(|| format!("meta leader {first:?} does not run")),
            _ => Err(format!("the running nodes name meta leaders {named:?}")),
        }
    }

    async fn try_client(&self) -> Result<async_nats::Client, String> {
        let urls: Vec<String> = self.running().into_iter().map(|i| self.url(i)).collect();
        if urls.is_empty() {
            return Err("no node runs".to_string());
        }
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            (self.connect)()
                .connection_timeout(REQUEST_TIMEOUT)
                .connect(urls),
        )
        .await
        .map_err(|_| "no connection".to_string())?
        .map_err(|e| e.to_string())
    }

    /// `$JS.API.STREAM.INFO.<stream>` as some node answers it.
    async fn stream_info(&self, stream: &str) -> Result<jetstream::stream::Info, String> {
        let client = self.try_client().await?;
        let mut js = jetstream::new(client);
        js.set_timeout(REQUEST_TIMEOUT);
        js.get_stream(stream)
            .await
            .map(|s| s.cached_info().clone())
            .map_err(|e| e.to_string())
    }

    /// Looks with `look` until it succeeds, for at most [`SETTLE_TIMEOUT`].
    async fn poll<T, F, Fut>(&self, what: &str, mut look: F) -> Result<T, ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let last = match look().await {
                Ok(value) => return Ok(value),
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    what: what.to_string(),
                    timeout: SETTLE_TIMEOUT,
                    last,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // kill_on_drop would too; said here, before the directory goes.
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// The last lines a node logged (shared with the task that reads them).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<VecDeque<String>>>);

impl Log {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == LOG_TAIL {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn tail(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A server that logged that it is ready, and what it bound.
struct Started {
    child: Child,
    name: String,
    client_port: u16,
    route_port: u16,
    monitor: SocketAddr,
}

impl Started {
    fn expecting_route_port(self, port: u16, log: &Log) -> Result<Started, ClusterError> {
        if self.route_port == port {
            Ok(self)
        } else {
            Err(ClusterError::Node {
                node: self.name.clone(),
                reason: format!(
                    "listens for routes on port {}, not on its reserved {port}",
                    self.route_port
                ),
                log: log.tail(),
            })
        }
    }
}

/// What a server's log told so far.
#[derive(Default)]
struct Seen {
    name: Option<String>,
    client_port: Option<u16>,
    route_port: Option<u16>,
    monitor: Option<SocketAddr>,
    ready: bool,
}

impl Seen {
    fn read(&mut self, line: &str) {
        // "[pid] date time [INF] <message>": what is read is all [INF].
        let Some((_, message)) = line.split_once(" [INF] ") else {
            return;
        };
        let message = message.trim();
        if let Some(name) = message.strip_prefix("Name:") {
            self.name = Some(name.trim().to_string());
        } else if let Some(addr) = message.strip_prefix("Listening for client connections on ") {
            self.client_port = port_of(addr);
        } else if let Some(addr) = message.strip_prefix("Listening for route connections on ") {
            self.route_port = port_of(addr);
        } else if let Some((_, addr)) = message.split_once(" monitor on ") {
            // "Starting http monitor on 127.0.0.1:8222" (or https)
            self.monitor = port_of(addr).map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        } else if message == "Server is ready" {
            self.ready = true;
        }
    }

    /// Everything the helper needs: the route port is logged after
    /// `Server is ready`.
    fn complete(&self) -> Option<(String, u16, u16, SocketAddr)> {
        match (
            &self.name,
            self.client_port,
            self.route_port,
            self.monitor,
            self.ready,
        ) {
            (Some(name), Some(client), Some(route), Some(monitor), true) => {
                Some((name.clone(), client, route, monitor))
            }
            _ => None,
        }
    }
}

/// The port of `host:port` (`127.0.0.1:4222`, `[::]:4222`).
fn port_of(addr: &str) -> Option<u16> {
    addr.trim().rsplit_once(':')?.1.parse().ok()
}

/// Runs `nats-server` with `args` and reads its log until it is ready
/// (`label` names it in errors until its name is read).
async fn spawn(
    bin: &Path,
    args: &[String],
    label: String,
    log: &Log,
) -> Result<Started, ClusterError> {
    let mut child = Command::new(bin)
        .args(args)
        // No console (at its fixed default address): tests run side by side.
        .env("HANDOFF_CONSOLE_LISTEN", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ClusterError::Spawn { source })?;
    let Some(stderr) = child.stderr.take() else {
        return Err(ClusterError::Node {
            node: label,
            reason: "no log pipe".to_string(),
            log: String::new(),
        });
    };
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Seen::default();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.read(&line);
            log.push(line);
            if let Some(complete) = seen.complete() {
                return Some(complete);
            }
        }
        None
    };
    let complete = tokio::time::timeout(READY_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    let node = seen.name.clone().unwrap_or(label);
    let Some((name, client_port, route_port, monitor)) = complete else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let tail = log.tail();
        return Err(if tail.contains("address already in use") {
            ClusterError::PortTaken { node, log: tail }
        } else {
            ClusterError::Node {
                node,
                reason: format!(
                    "did not log its name, ports (client, route, monitoring) and readiness within {READY_TIMEOUT:?}"
                ),
                log: tail,
            }
        });
    };
    // Keep reading, so the server never blocks on a full pipe.
    let log = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(target: "nats_server", node = %node, "{line}");
            log.push(line);
        }
    });
    Ok(Started {
        child,
        name,
        client_port,
        route_port,
        monitor,
    })
}

/// `n` distinct free loopback ports, released for the servers to bind.
fn reserve_ports(n: usize) -> std::io::Result<Vec<u16>> {
    // All bound at once, so they differ.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// `GET path` from a monitoring endpoint: its status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        // HTTP/1.0: the body comes whole (no chunks), then the server closes.
        socket
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        socket.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{addr}{path}: no answer"))?
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: not HTTP: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The entry of stream `stream` in a `/jsz?accounts=true&streams=true`
/// answer, in whichever account holds it.
fn stream_detail<'a>(jsz: &'a serde_json::Value, stream: &str) -> Option<&'a serde_json::Value> {
    jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|account| account["stream_detail"].as_array())
        .flatten()
        .find(|detail| detail["name"] == stream)
}

/// `GET path` from a monitoring endpoint, as JSON, if it answers 200.
async fn json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    match http_get(addr, path).await? {
        (200, body) => serde_json::from_str(&body).map_err(|e| format!("{addr}{path}: {e}")),
        (status, body) => Err(format!("{addr}{path}: {status} {}", body.trim())),
    }
}
