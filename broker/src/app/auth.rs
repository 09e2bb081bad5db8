//! Who calls, and whether they may: authentication of a caller from its
//! credentials, the authorization of each use case, the principals and
//! API tokens an admin manages, and the keys that sign delivery tokens.
//!
//! With no auth configured (a broker on loopback for development) every
//! caller is [`Caller::local`] and may do anything. With auth, a call
//! carries a bearer token (an API token issued by [`create_token`], or the
//! bootstrap admin token from `auth_token_file`) or a client certificate
//! that names a principal; the principal's grants decide (see
//! [`crate::rules::grants`]). Every refusal is counted by reason and
//! published as an `access_denied` event.

use std::{
    sync::RwLock,
    time::{Duration, Instant},
};

use dashmap::DashMap;
use handoff_proto::pb;
use sha2::{Digest, Sha256};

use crate::{
    app::{now, Broker},
    error::{BrokerError, Reason},
    rules::{
        grants::{self, Action},
        lease, names,
    },
};

/// How long a verified bearer token is trusted before the store is asked
/// again (a revocation on another replica takes at most this long; on the
/// replica that revokes it, at once).
const TOKEN_CACHE: Duration = Duration::from_secs(2);

/// Signing keys kept after a rotation: the newest signs, all verify, so a
/// lease signed before a rotation stays valid.
const KEPT_KEYS: usize = 3;

/// The prefix of the API tokens this broker issues.
const TOKEN_PREFIX: &str = "hot_";

/// How this broker authenticates callers, and its caches.
pub struct Auth {
    enabled: bool,
    bootstrap: Option<String>,
    verified: DashMap<String, (Caller, Instant, String)>,
    keys: RwLock<Option<pb::SigningKeys>>,
}

impl Auth {
    /// No authentication: every caller may do anything.
    pub fn disabled() -> Auth {
        Auth {
            enabled: false,
            bootstrap: None,
            verified: DashMap::new(),
            keys: RwLock::new(None),
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
}

/// What a call presents.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The bearer token of the `authorization` metadata.
    pub bearer: Option<String>,
    /// The principal named by the verified client certificate.
    pub certificate: Option<String>,
}

/// Who calls.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal's name (`local` without auth).
    pub principal: String,
    grants: Vec<pb::Grant>,
    unrestricted: bool,
}

impl Caller {
    /// The caller of a broker without auth: may do anything.
    pub fn local() -> Caller {
        Caller {
            principal: "local".to_string(),
            grants: Vec::new(),
            unrestricted: true,
        }
    }

    /// A caller with these grants.
    pub fn with_grants(principal: impl Into<String>, grants: Vec<pb::Grant>) -> Caller {
        Caller {
            principal: principal.into(),
            grants,
            unrestricted: false,
        }
    }

    /// Whether this caller may `action` on `name`.
    pub fn may(&self, action: Action, name: &str) -> bool {
        self.unrestricted || grants::allowed(&self.grants, action, name)
    }
}

/// Authenticates a call. A refusal is counted and announced.
pub async fn authenticate(broker: &Broker, creds: &Credentials) -> Result<Caller, BrokerError> {
    let auth = broker.auth();
    if !auth.enabled {
        return Ok(Caller::local());
    }
    match who(broker, creds).await {
        Ok(caller) => Ok(caller),
        Err(e) => Err(deny(broker, e, "", None).await),
    }
}

async fn who(broker: &Broker, creds: &Credentials) -> Result<Caller, BrokerError> {
    let auth = broker.auth();
    if let Some(token) = &creds.bearer {
        if let Some(boot) = &auth.bootstrap {
            if constant_time_eq(token.as_bytes(), boot.as_bytes()) {
                return Ok(bootstrap_admin());
            }
        }
        return api_token(broker, token).await;
    }
    if let Some(name) = &creds.certificate {
        return match broker.store().principal(name).await? {
            Some(p) => Ok(Caller::with_grants(p.name, p.grants)),
            None => Err(BrokerError::denied(
                Reason::BadCredentials,
                format!("the client certificate names principal {name:?}, which is not registered"),
                vec![("principal", name.clone())],
            )),
        };
    }
    Err(BrokerError::denied(
        Reason::MissingCredentials,
        "this broker requires a bearer token (authorization: Bearer ...) or a client certificate",
        Vec::new(),
    ))
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
    Caller::with_grants("admin", all)
}

fn bad_token() -> BrokerError {
    BrokerError::denied(
        Reason::BadCredentials,
        "the bearer token is not one this broker issued",
        Vec::new(),
    )
}

/// `hot_<id>_<secret>`: checked against the stored digest of the secret,
/// cached for [`TOKEN_CACHE`].
async fn api_token(broker: &Broker, token: &str) -> Result<Caller, BrokerError> {
    let cache = &broker.auth().verified;
    if let Some(hit) = cache.get(token) {
        if hit.1.elapsed() < TOKEN_CACHE {
            return Ok(hit.0.clone());
        }
    }
    let (id, secret) = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .ok_or_else(bad_token)?;
    if names::problem(id).is_some() {
        return Err(bad_token());
    }
    let (stored, _) = broker.store().token(id).await?.ok_or_else(bad_token)?;
    let digest = Sha256::digest(secret.as_bytes());
    if !constant_time_eq(&digest, &stored.secret_sha256) {
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
    cache.insert(
        token.to_string(),
        (caller.clone(), Instant::now(), id.to_string()),
    );
    Ok(caller)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Requires that `caller` may `action` on `name`; `run` names the run the
/// call is about (for the `access_denied` event).
pub async fn require(
    broker: &Broker,
    caller: &Caller,
    action: Action,
    name: &str,
    run: Option<&pb::Run>,
) -> Result<(), BrokerError> {
    if caller.may(action, name) {
        return Ok(());
    }
    Err(deny(
        broker,
        not_granted(caller, action, name),
        &caller.principal,
        run,
    )
    .await)
}

fn not_granted(caller: &Caller, action: Action, name: &str) -> BrokerError {
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

/// Counts a refusal by reason and publishes its `access_denied` event
/// (on the run's subject when the call is about a run, else on `_`);
/// returns the error.
pub async fn deny(
    broker: &Broker,
    err: BrokerError,
    principal: &str,
    run: Option<&pb::Run>,
) -> BrokerError {
    let reason = err.reason();
    broker.metrics().denied(reason.as_str());
    tracing::info!(principal, reason = %reason, error = %err, "call refused");
    let event = pb::Event {
        kind: pb::EventKind::AccessDenied as i32,
        run_id: run.map_or("_".to_string(), |r| r.id.clone()),
        owner: run.map(|r| r.owner.clone()).unwrap_or_default(),
        agent: principal.to_string(),
        reason: format!("{reason}: {err}"),
        ..Default::default()
    };
    broker
        .emit_unconfirmed(event, uuid::Uuid::now_v7().to_string())
        .await;
    err
}

// ---------------------------------------------------------- administration

/// Stores a principal and its grants (admin).
pub async fn put_principal(
    broker: &Broker,
    caller: &Caller,
    req: pb::PutPrincipalRequest,
) -> Result<pb::PutPrincipalResponse, BrokerError> {
    require(broker, caller, Action::Admin, "", None).await?;
    let principal = req
        .principal
        .ok_or_else(|| BrokerError::malformed("principal", "principal is required"))?;
    grants::validate(&principal)?;
    let updated = broker.store().put_principal(&principal).await?;
    broker.auth().verified.clear();
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
    require(broker, caller, Action::Admin, "", None).await?;
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
    require(broker, caller, Action::Admin, "", None).await?;
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
    require(broker, caller, Action::Admin, "", None).await?;
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

/// Revokes a token (admin); at once on this replica, within
/// [`TOKEN_CACHE`] on the others.
pub async fn revoke_token(
    broker: &Broker,
    caller: &Caller,
    req: pb::RevokeTokenRequest,
) -> Result<pb::RevokeTokenResponse, BrokerError> {
    require(broker, caller, Action::Admin, "", None).await?;
    names::validate("id", &req.id)?;
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
        broker.auth().verified.retain(|_, v| v.2 != req.id);
        tracing::info!(token_id = %req.id, "token revoked");
        return Ok(pb::RevokeTokenResponse {
            token: Some(pb::ApiToken {
                secret_sha256: Vec::new(),
                ..token
            }),
        });
    }
}

/// Adds a new signing key (admin); the newest signs, the previous ones
/// keep verifying leases signed before.
pub async fn rotate_signing_key(
    broker: &Broker,
    caller: &Caller,
) -> Result<pb::RotateSigningKeyResponse, BrokerError> {
    require(broker, caller, Action::Admin, "", None).await?;
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
    if let Ok(mut slot) = broker.auth().keys.write() {
        *slot = Some(keys);
    }
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
