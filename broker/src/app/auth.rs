//! Who calls, and whether they may: authentication of a caller from its
//! credentials, the grants each use case requires, the principals and API
//! tokens an admin manages, the keys that sign delivery tokens, and the
//! live check that ends an open stream once its credentials stop allowing
//! it.
//!
//! With no auth configured (a broker on loopback for development) every
//! caller is [`Caller::local`] and may do anything. With auth, a call
//! carries a bearer token (an API token issued by [`create_token`], or the
//! bootstrap admin token from `auth_token_file`) or a client certificate
//! that names a principal; the principal's grants decide (see
//! [`crate::rules::grants`]). Whether a caller may act in or read a given
//! run is [`crate::app::access`]'s to say.
//!
//! Refusals are cheap and bounded: a call without valid credentials is
//! counted (`handoff_unauthenticated_total{reason,peer}`) and logged at
//! debug level, never stored; a refused authenticated principal is counted
//! and published as an `access_denied` event on `handoff.v1.events._`, at
//! most [`DENIAL_EVENTS`] per principal per [`DENIAL_WINDOW`] (the rest
//! are counted in `handoff_access_denied_unrecorded_total`).
//!
//! Every replica keeps its caches (verified tokens, principals, signing
//! keys, whether the bootstrap token is disabled) current by watching the
//! buckets they come from; each change bumps [`Auth::changes`], which
//! wakes the live checks of open streams.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use handoff_proto::pb;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::{oneshot, watch};

use crate::{
    app::{now, Broker},
    error::{BrokerError, Reason},
    rules::{
        grants::{self, Action},
        lease, names,
    },
};

/// How long a verified bearer token or certificate principal is trusted
/// before the store is asked again. Every replica also drops its cache as
/// soon as its watch of the tokens and principals buckets sees a change,
/// so this bounds only a replica whose watch is broken.
const AUTH_CACHE: Duration = Duration::from_secs(1);

/// How often a live check re-authenticates an open stream when nothing
/// woke it earlier (a change seen by the watches wakes it at once).
const RECHECK: Duration = Duration::from_secs(1);

/// Signing keys kept after a rotation: the newest signs, all verify, so a
/// lease signed before a rotation stays valid.
const KEPT_KEYS: usize = 3;

/// The prefix of the API tokens this broker issues.
const TOKEN_PREFIX: &str = "hot_";

/// The id under which the bootstrap token's revocation is stored in the
/// tokens bucket (no issued token has this id: theirs are hex).
pub const BOOTSTRAP_ID: &str = "bootstrap";

/// `access_denied` events stored per principal within [`DENIAL_WINDOW`].
pub const DENIAL_EVENTS: u32 = 10;

/// The window of [`DENIAL_EVENTS`].
pub const DENIAL_WINDOW: Duration = Duration::from_secs(10);

/// Principals whose denials are being rate-limited at once (past this the
/// table starts over, which can only let a few more events through).
const DENIAL_TABLE: usize = 10_000;

/// How this broker authenticates callers, and its caches.
pub struct Auth {
    enabled: bool,
    bootstrap: Option<String>,
    bootstrap_disabled: AtomicBool,
    /// Verified credentials (`t:<token>` or `c:<principal>`): the caller
    /// and when.
    verified: DashMap<String, (Caller, Instant)>,
    keys: RwLock<Option<pb::SigningKeys>>,
    changes: watch::Sender<u64>,
    denials: DashMap<String, (Instant, u32)>,
}

impl Auth {
    /// No authentication: every caller may do anything.
    pub fn disabled() -> Auth {
        Auth {
            enabled: false,
            bootstrap: None,
            bootstrap_disabled: AtomicBool::new(false),
            verified: DashMap::new(),
            keys: RwLock::new(None),
            changes: watch::channel(0).0,
            denials: DashMap::new(),
        }
    }

    /// Whether callers are authenticated (else every caller may do
    /// anything).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Every call must be authenticated; `bootstrap` is the admin token
    /// read from `auth_token_file`, if any.
    pub fn required(bootstrap: Option<String>) -> Auth {
        Auth {
            enabled: true,
            bootstrap: bootstrap.filter(|t| !t.is_empty()),
            ..Auth::disabled()
        }
    }

    /// Forgets every verified credential and wakes the live checks: a
    /// token, principal or the bootstrap token changed (here, or on
    /// another replica as its bucket's watch tells).
    pub fn changed(&self) {
        // The count first: a read made before it is then not cached after
        // the clear (see `remember`).
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.verified.clear();
    }

    /// How many changes were seen so far (see [`Auth::changed`]).
    fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// A credential verified less than [`AUTH_CACHE`] ago (and since the
    /// last change).
    fn cached(&self, key: &str) -> Option<Caller> {
        let hit = self.verified.get(key)?;
        (hit.1.elapsed() < AUTH_CACHE).then(|| hit.0.clone())
    }

    /// Caches a verified credential read while the change count was
    /// `seen`, unless a change came meanwhile (what was read may predate
    /// it).
    fn remember(&self, key: String, caller: &Caller, seen: u64) {
        if self.generation() == seen {
            self.verified.insert(key, (caller.clone(), Instant::now()));
        }
    }

    /// Takes a stored bootstrap token record (its revocation) into account.
    pub fn bootstrap_record(&self, token: Option<&pb::ApiToken>) {
        let disabled = token.is_some_and(|t| t.revoked_at.is_some());
        if self.bootstrap_disabled.swap(disabled, Ordering::SeqCst) != disabled {
            self.changed();
        }
    }

    /// Replaces the cached signing keys (a rotation seen by the watch of
    /// the keys bucket): a key rotated out stops verifying here at once.
    pub fn keys_record(&self, keys: pb::SigningKeys) {
        if let Ok(mut slot) = self.keys.write() {
            *slot = Some(keys);
        }
    }
}

/// What a call presents.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The bearer token of the `authorization` metadata.
    pub bearer: Option<String>,
    /// The principal named by the verified client certificate.
    pub certificate: Option<String>,
    /// The peer's address, for counting refusals.
    pub peer: Option<IpAddr>,
}

/// Who calls.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal's name (`local` without auth).
    pub principal: String,
    grants: Vec<pb::Grant>,
    unrestricted: bool,
    bootstrap: bool,
}

impl Caller {
    /// The caller of a broker without auth: may do anything.
    pub fn local() -> Caller {
        Caller {
            principal: "local".to_string(),
            grants: Vec::new(),
            unrestricted: true,
            bootstrap: false,
        }
    }

    /// A caller with these grants.
    pub fn with_grants(principal: impl Into<String>, grants: Vec<pb::Grant>) -> Caller {
        Caller {
            principal: principal.into(),
            grants,
            unrestricted: false,
            bootstrap: false,
        }
    }

    /// Whether this caller may `action` on `name`.
    pub fn may(&self, action: Action, name: &str) -> bool {
        self.unrestricted || grants::allowed(&self.grants, action, name)
    }
}

/// Authenticates a call. A refusal is counted (by reason and peer) and
/// logged at debug level; nothing is stored.
pub async fn authenticate(broker: &Broker, creds: &Credentials) -> Result<Caller, BrokerError> {
    let auth = broker.auth();
    if !auth.enabled {
        return Ok(Caller::local());
    }
    match who(broker, creds).await {
        Ok(caller) => Ok(caller),
        Err(e) if e.class() == crate::error::Class::Unauthenticated => {
            let peer = creds.peer.map(|p| p.to_string());
            broker.metrics().denied(e.reason().as_str());
            broker
                .metrics()
                .unauthenticated(e.reason().as_str(), peer.as_deref().unwrap_or("unknown"));
            tracing::debug!(peer = ?creds.peer, reason = %e.reason(), "call without valid credentials refused");
            Err(e)
        }
        Err(e) => Err(e),
    }
}

async fn who(broker: &Broker, creds: &Credentials) -> Result<Caller, BrokerError> {
    let auth = broker.auth();
    if let Some(token) = &creds.bearer {
        if let Some(boot) = &auth.bootstrap {
            if bool::from(token.as_bytes().ct_eq(boot.as_bytes())) {
                if auth.bootstrap_disabled.load(Ordering::SeqCst) {
                    return Err(BrokerError::denied(
                        Reason::TokenRevoked,
                        "the bootstrap token was disabled; use an admin API token",
                        vec![("token_id", BOOTSTRAP_ID.to_string())],
                    ));
                }
                return Ok(bootstrap_admin());
            }
        }
        return api_token(broker, token).await;
    }
    if let Some(name) = &creds.certificate {
        return certificate(broker, name).await;
    }
    Err(BrokerError::denied(
        Reason::MissingCredentials,
        "this broker requires a bearer token (authorization: Bearer ...) or a client certificate",
        Vec::new(),
    ))
}

/// The principal a verified client certificate names: its name must be a
/// valid principal name, and registered.
async fn certificate(broker: &Broker, name: &str) -> Result<Caller, BrokerError> {
    if names::problem(name).is_some() {
        return Err(BrokerError::denied(
            Reason::BadCredentials,
            "the client certificate names no valid principal ([A-Za-z0-9_-]{1,128})",
            Vec::new(),
        ));
    }
    let key = format!("c:{name}");
    if let Some(caller) = broker.auth().cached(&key) {
        return Ok(caller);
    }
    let seen = broker.auth().generation();
    match broker.store().principal(name).await? {
        Some(p) => {
            let caller = Caller::with_grants(p.name, p.grants);
            broker.auth().remember(key, &caller, seen);
            Ok(caller)
        }
        None => Err(BrokerError::denied(
            Reason::BadCredentials,
            format!("the client certificate names principal {name:?}, which is not registered"),
            vec![("principal", name.to_string())],
        )),
    }
}

/// The principal of the bootstrap token: every grant.
fn bootstrap_admin() -> Caller {
    let all = grants::ACTIONS
        .iter()
        .map(|&action| pb::Grant {
            action: action as i32,
            pattern: "*".to_string(),
            deny: false,
        })
        .collect();
    Caller {
        bootstrap: true,
        ..Caller::with_grants("admin", all)
    }
}

fn bad_token() -> BrokerError {
    BrokerError::denied(
        Reason::BadCredentials,
        "the bearer token is not one this broker issued",
        Vec::new(),
    )
}

/// `hot_<id>_<secret>`: checked against the stored digest of the secret,
/// cached for [`AUTH_CACHE`] (and until a change is seen).
async fn api_token(broker: &Broker, token: &str) -> Result<Caller, BrokerError> {
    let key = format!("t:{token}");
    if let Some(caller) = broker.auth().cached(&key) {
        return Ok(caller);
    }
    let (id, secret) = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .ok_or_else(bad_token)?;
    if names::problem(id).is_some() || id == BOOTSTRAP_ID {
        return Err(bad_token());
    }
    let seen = broker.auth().generation();
    let (stored, _) = broker.store().token(id).await?.ok_or_else(bad_token)?;
    let digest = Sha256::digest(secret.as_bytes());
    if !bool::from(digest.as_slice().ct_eq(&stored.secret_sha256)) {
        return Err(bad_token());
    }
    if stored.revoked_at.is_some() {
        return Err(BrokerError::denied(
            Reason::TokenRevoked,
            format!("token {id} was revoked"),
            vec![("token_id", id.to_string())],
        ));
    }
    let grants = broker
        .store()
        .principal(&stored.principal)
        .await?
        .map(|p| p.grants)
        .unwrap_or_default();
    let caller = Caller::with_grants(stored.principal, grants);
    broker.auth().remember(key, &caller, seen);
    Ok(caller)
}

/// Requires that `caller` may `action` on `name` (a refusal is counted
/// and announced, see [`deny`]).
pub async fn require(
    broker: &Broker,
    caller: &Caller,
    action: Action,
    name: &str,
) -> Result<(), BrokerError> {
    if caller.may(action, name) {
        return Ok(());
    }
    Err(deny(broker, not_granted(caller, action, name), &caller.principal).await)
}

/// The refusal of `action` on `name` for `caller`.
pub fn not_granted(caller: &Caller, action: Action, name: &str) -> BrokerError {
    let what = grants::action_name(action);
    let message = if name.is_empty() || matches!(action, Action::Read | Action::Admin) {
        format!("principal {:?} may not {what}", caller.principal)
    } else {
        format!("principal {:?} may not {what} {name:?}", caller.principal)
    };
    BrokerError::denied(
        Reason::NotGranted,
        message,
        vec![
            ("principal", caller.principal.clone()),
            ("action", what.to_string()),
            ("name", name.to_string()),
        ],
    )
}

/// Counts a refusal of an authenticated principal by reason and publishes
/// its `access_denied` event on `handoff.v1.events._.access_denied` (never
/// in a run's timeline), at most [`DENIAL_EVENTS`] per principal per
/// [`DENIAL_WINDOW`]; returns the error.
pub async fn deny(broker: &Broker, err: BrokerError, principal: &str) -> BrokerError {
    let reason = err.reason();
    broker.metrics().denied(reason.as_str());
    if !broker.auth().enabled {
        return err;
    }
    if !denial_recorded(broker.auth(), principal) {
        broker.metrics().denial_unrecorded();
        return err;
    }
    tracing::info!(principal, reason = %reason, error = %err, "call refused");
    let event = pb::Event {
        kind: pb::EventKind::AccessDenied as i32,
        run_id: "_".to_string(),
        agent: principal.to_string(),
        reason: format!("{reason}: {err}"),
        ..Default::default()
    };
    broker
        .emit_unconfirmed(event, uuid::Uuid::now_v7().to_string())
        .await;
    err
}

/// Whether a denial of `principal` may be stored now (its window's count
/// is under [`DENIAL_EVENTS`]), counting it.
fn denial_recorded(auth: &Auth, principal: &str) -> bool {
    if auth.denials.len() >= DENIAL_TABLE {
        auth.denials.clear();
    }
    let mut entry = auth
        .denials
        .entry(principal.to_string())
        .or_insert((Instant::now(), 0));
    if entry.0.elapsed() >= DENIAL_WINDOW {
        *entry = (Instant::now(), 0);
    }
    entry.1 += 1;
    entry.1 <= DENIAL_EVENTS
}

// ---------------------------------------------------------- live checks

/// What an open stream must go on being allowed.
#[derive(Debug, Clone)]
pub enum Standing {
    /// Receive as this agent (a Subscribe stream).
    ReceiveAs(String),
    /// Read everything, or own this owner (a Watch stream; `None`: only
    /// `read` allows it).
    Watch(Option<String>),
}

impl Standing {
    /// Whether `caller` holds it, or the refusal.
    pub fn check(&self, caller: &Caller) -> Result<(), BrokerError> {
        match self {
            Standing::ReceiveAs(agent) if caller.may(Action::ReceiveAs, agent) => Ok(()),
            Standing::ReceiveAs(agent) => Err(not_granted(caller, Action::ReceiveAs, agent)),
            Standing::Watch(_) if caller.may(Action::Read, "") => Ok(()),
            Standing::Watch(Some(owner)) if caller.may(Action::Own, owner) => Ok(()),
            Standing::Watch(_) => Err(not_granted(caller, Action::Read, "")),
        }
    }
}

/// Why a live check ended a stream.
#[derive(Debug, Clone)]
struct Ended {
    reason: Reason,
    message: String,
}

impl Ended {
    fn error(&self) -> BrokerError {
        BrokerError::denied(self.reason, self.message.clone(), Vec::new())
    }
}

/// The live check of one open stream: a task re-authenticates its
/// credentials and re-checks its standing whenever a token, principal or
/// the bootstrap token changes (on any replica) and every [`RECHECK`];
/// once they no longer hold, [`Live::ended`] resolves with the refusal and
/// [`Live::check`] refuses at once, from memory.
pub struct Live {
    state: LiveCheck,
    rx: Option<oneshot::Receiver<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Live {
    /// Starts the live check of a stream opened with `creds` (none
    /// without auth).
    pub fn start(broker: &Broker, creds: Credentials, standing: Standing) -> Live {
        let state = LiveCheck {
            ended: Arc::new(Mutex::new(None)),
            valid: Arc::new(AtomicBool::new(true)),
        };
        if !broker.auth().enabled {
            return Live {
                state,
                rx: None,
                task: None,
            };
        }
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(watchdog(broker.clone(), creds, standing, state.clone(), tx));
        Live {
            state,
            rx: Some(rx),
            task: Some(task),
        }
    }

    /// Refuses at once if the stream's credentials no longer hold (no
    /// store read: as the live check last found them).
    pub fn check(&self) -> Result<(), BrokerError> {
        self.state.check()
    }

    /// A cheap handle that answers [`Live::check`] from another task.
    pub fn checker(&self) -> LiveCheck {
        self.state.clone()
    }

    /// Resolves with the refusal once the credentials no longer hold
    /// (never, without auth).
    pub async fn ended(&mut self) -> BrokerError {
        match self.rx.as_mut() {
            Some(rx) => {
                let _ = rx.await;
                self.rx = None;
                self.state.refusal()
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// [`Live::check`], from another task.
#[derive(Clone)]
pub struct LiveCheck {
    ended: Arc<Mutex<Option<Ended>>>,
    valid: Arc<AtomicBool>,
}

impl LiveCheck {
    /// See [`Live::check`].
    pub fn check(&self) -> Result<(), BrokerError> {
        if self.valid.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(self.refusal())
    }

    /// Why the credentials no longer hold.
    fn refusal(&self) -> BrokerError {
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match ended {
            Some(e) => e.error(),
            None => BrokerError::denied(
                Reason::NotGranted,
                "the stream's credentials no longer allow it",
                Vec::new(),
            ),
        }
    }

    /// Records that the credentials no longer hold, and why.
    fn end(&self, e: &BrokerError) {
        if let Ok(mut slot) = self.ended.lock() {
            *slot = Some(Ended {
                reason: e.reason(),
                message: e.to_string(),
            });
        }
        self.valid.store(false, Ordering::SeqCst);
    }
}

async fn watchdog(
    broker: Broker,
    creds: Credentials,
    standing: Standing,
    state: LiveCheck,
    tx: oneshot::Sender<()>,
) {
    let mut changes = broker.auth().changes.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                // No more change notices (the broker is going away): the
                // periodic check goes on.
                tokio::time::sleep(RECHECK).await;
            },
            _ = tokio::time::sleep(RECHECK) => {}
        }
        let refusal = match who(&broker, &creds).await {
            Ok(caller) => standing.check(&caller).err(),
            // A store that does not answer leaves the stream as it was:
            // the next check decides.
            Err(e) if e.class() == crate::error::Class::Unavailable => None,
            Err(e) => Some(e),
        };
        if let Some(e) = refusal {
            broker.metrics().denied(e.reason().as_str());
            tracing::info!(reason = %e.reason(), error = %e, "stream ended: its credentials no longer allow it");
            state.end(&e);
            let _ = tx.send(());
            return;
        }
    }
}

// ---------------------------------------------------------- administration

/// Stores a principal and its grants (admin).
pub async fn put_principal(
    broker: &Broker,
    caller: &Caller,
    req: pb::PutPrincipalRequest,
) -> Result<pb::PutPrincipalResponse, BrokerError> {
    require(broker, caller, Action::Admin, "").await?;
    let principal = req
        .principal
        .ok_or_else(|| BrokerError::malformed("principal", "principal is required"))?;
    grants::validate(&principal)?;
    let updated = broker.store().put_principal(&principal).await?;
    broker.auth().changed();
    tracing::info!(principal = %principal.name, grants = principal.grants.len(), updated, "principal stored");
    Ok(pb::PutPrincipalResponse {
        principal: Some(principal),
        updated,
    })
}

/// Every principal (admin).
pub async fn list_principals(
    broker: &Broker,
    caller: &Caller,
) -> Result<pb::ListPrincipalsResponse, BrokerError> {
    require(broker, caller, Action::Admin, "").await?;
    Ok(pb::ListPrincipalsResponse {
        principals: broker.store().principals().await?,
    })
}

/// Issues an API token for an existing principal (admin); its secret is
/// answered once and stored only as a digest.
pub async fn create_token(
    broker: &Broker,
    caller: &Caller,
    req: pb::CreateTokenRequest,
) -> Result<pb::CreateTokenResponse, BrokerError> {
    require(broker, caller, Action::Admin, "").await?;
    names::validate("principal", &req.principal)?;
    if broker.store().principal(&req.principal).await?.is_none() {
        return Err(BrokerError::malformed(
            "principal",
            format!(
                "principal {:?} does not exist: store it first (PutPrincipal)",
                req.principal
            ),
        ));
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let secret = hex(&random::<32>()?);
    let token = pb::ApiToken {
        id: id.clone(),
        principal: req.principal,
        secret_sha256: Sha256::digest(secret.as_bytes()).to_vec(),
        description: req.description,
        created_at: Some(now()),
        revoked_at: None,
    };
    if !broker.store().put_token(&token, None).await? {
        return Err(BrokerError::Internal(format!("token id {id} exists")));
    }
    tracing::info!(token_id = %id, principal = %token.principal, "token created");
    Ok(pb::CreateTokenResponse {
        token: Some(pb::ApiToken {
            secret_sha256: Vec::new(),
            ..token
        }),
        secret: format!("{TOKEN_PREFIX}{id}_{secret}"),
    })
}

/// Every token, without digests (admin).
pub async fn list_tokens(
    broker: &Broker,
    caller: &Caller,
) -> Result<pb::ListTokensResponse, BrokerError> {
    require(broker, caller, Action::Admin, "").await?;
    let tokens = broker
        .store()
        .tokens()
        .await?
        .into_iter()
        .map(|t| pb::ApiToken {
            secret_sha256: Vec::new(),
            ..t
        })
        .collect();
    Ok(pb::ListTokensResponse { tokens })
}

/// Revokes a token (admin); at once on this replica, and on the others as
/// soon as their watch of the tokens bucket sees it. The id `bootstrap`
/// disables the bootstrap token of `auth_token_file` on every replica,
/// for good: only an admin that did not authenticate with it may (create
/// an admin token first, so the broker keeps an administrator).
pub async fn revoke_token(
    broker: &Broker,
    caller: &Caller,
    req: pb::RevokeTokenRequest,
) -> Result<pb::RevokeTokenResponse, BrokerError> {
    require(broker, caller, Action::Admin, "").await?;
    names::validate("id", &req.id)?;
    if req.id == BOOTSTRAP_ID {
        return disable_bootstrap(broker, caller).await;
    }
    loop {
        let (mut token, revision) = broker
            .store()
            .token(&req.id)
            .await?
            .ok_or_else(|| BrokerError::malformed("id", format!("no token {:?}", req.id)))?;
        if token.revoked_at.is_none() {
            token.revoked_at = Some(now());
            if !broker.store().put_token(&token, Some(revision)).await? {
                continue;
            }
        }
        broker.auth().changed();
        tracing::info!(token_id = %req.id, "token revoked");
        return Ok(pb::RevokeTokenResponse {
            token: Some(pb::ApiToken {
                secret_sha256: Vec::new(),
                ..token
            }),
        });
    }
}

/// Stores the bootstrap token's revocation (see [`revoke_token`]).
async fn disable_bootstrap(
    broker: &Broker,
    caller: &Caller,
) -> Result<pb::RevokeTokenResponse, BrokerError> {
    if caller.bootstrap {
        return Err(BrokerError::Refused {
            reason: Reason::BootstrapInUse,
            message: "the bootstrap token cannot disable itself: create an admin principal and token (handoffctl principals set ... --grant admin; handoffctl tokens create ...) and disable it with that token".to_string(),
            metadata: vec![("token_id", BOOTSTRAP_ID.to_string())],
        });
    }
    let token = loop {
        let current = broker.store().token(BOOTSTRAP_ID).await?;
        if let Some((t, _)) = current.as_ref().filter(|(t, _)| t.revoked_at.is_some()) {
            break t.clone();
        }
        let token = pb::ApiToken {
            id: BOOTSTRAP_ID.to_string(),
            principal: "admin".to_string(),
            description: format!("bootstrap token disabled by {}", caller.principal),
            created_at: Some(now()),
            revoked_at: Some(now()),
            ..Default::default()
        };
        if broker
            .store()
            .put_token(&token, current.map(|(_, r)| r))
            .await?
        {
            break token;
        }
    };
    broker.auth().bootstrap_record(Some(&token));
    tracing::info!(by = %caller.principal, "bootstrap token disabled");
    Ok(pb::RevokeTokenResponse { token: Some(token) })
}

/// Loads whether the bootstrap token is disabled, at start.
pub async fn load_bootstrap(broker: &Broker) -> Result<(), BrokerError> {
    let record = broker.store().token(BOOTSTRAP_ID).await?;
    broker
        .auth()
        .bootstrap_record(record.as_ref().map(|(t, _)| t));
    Ok(())
}

/// Adds a new signing key (admin); the newest signs, the previous ones
/// keep verifying leases signed before.
pub async fn rotate_signing_key(
    broker: &Broker,
    caller: &Caller,
) -> Result<pb::RotateSigningKeyResponse, BrokerError> {
    require(broker, caller, Action::Admin, "").await?;
    loop {
        let current = broker.store().signing_keys().await?;
        let revision = current.as_ref().map(|(_, r)| *r);
        let mut keys = current.map(|(k, _)| k).unwrap_or_default();
        let key = new_key()?;
        let id = key.id.clone();
        keys.keys.push(key);
        let excess = keys.keys.len().saturating_sub(KEPT_KEYS);
        keys.keys.drain(..excess);
        if broker.store().put_signing_keys(&keys, revision).await? {
            set_keys(broker, keys);
            tracing::info!(key_id = %id, "signing key rotated");
            return Ok(pb::RotateSigningKeyResponse { key_id: id });
        }
    }
}

// ---------------------------------------------------------- signing keys

fn new_key() -> Result<pb::SigningKey, BrokerError> {
    Ok(pb::SigningKey {
        id: uuid::Uuid::now_v7().simple().to_string(),
        secret: random::<32>()?.to_vec(),
        created_at: Some(now()),
    })
}

fn set_keys(broker: &Broker, keys: pb::SigningKeys) {
    broker.auth().keys_record(keys);
}

fn cached_keys(broker: &Broker) -> Option<pb::SigningKeys> {
    broker.auth().keys.read().ok().and_then(|k| k.clone())
}

/// The signing keys: cached, else read from the store, else created
/// (compare-and-set, so every replica ends up with the same keys).
async fn keys(broker: &Broker, fresh: bool) -> Result<pb::SigningKeys, BrokerError> {
    if !fresh {
        if let Some(k) = cached_keys(broker) {
            return Ok(k);
        }
    }
    loop {
        if let Some((keys, _)) = broker.store().signing_keys().await? {
            set_keys(broker, keys.clone());
            return Ok(keys);
        }
        let keys = pb::SigningKeys {
            keys: vec![new_key()?],
        };
        if broker.store().put_signing_keys(&keys, None).await? {
            set_keys(broker, keys.clone());
            return Ok(keys);
        }
    }
}

/// Loads (or creates) the signing keys, at start.
pub async fn load_keys(broker: &Broker) -> Result<(), BrokerError> {
    keys(broker, true).await.map(|_| ())
}

/// Signs a delivery token with the newest key.
pub async fn sign(broker: &Broker, token: &mut pb::DeliveryToken) -> Result<(), BrokerError> {
    let keys = keys(broker, false).await?;
    let key = keys
        .keys
        .last()
        .ok_or_else(|| BrokerError::Internal("no signing key".to_string()))?;
    lease::sign(token, key);
    Ok(())
}

/// Verifies a delivery token's signature (reading the keys again once
/// when it names a key this replica has not seen: a rotation elsewhere).
pub async fn verify(broker: &Broker, token: &pb::DeliveryToken) -> Result<(), BrokerError> {
    let keys_now = keys(broker, false).await?;
    let known = keys_now.keys.iter().any(|k| k.id == token.key_id);
    let keys_now = if known {
        keys_now
    } else {
        keys(broker, true).await?
    };
    if lease::verify(token, &keys_now) {
        Ok(())
    } else {
        Err(BrokerError::denied(
            Reason::BadSignature,
            "the delivery id's signature does not verify: it was not issued by this broker, or it was altered",
            vec![("handoff_id", token.handoff_id.clone())],
        ))
    }
}

fn random<const N: usize>() -> Result<[u8; N], BrokerError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf)
        .map_err(|e| BrokerError::Internal(format!("no randomness from the OS: {e}")))?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
