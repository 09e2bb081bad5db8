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

mod admin;
mod keys;
mod live;

pub use admin::*;
pub use keys::*;
pub use live::*;
