//! Administration: principals, API tokens, the bootstrap token and the
//! signing keys' rotation.

use super::*;

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
pub(super) async fn disable_bootstrap(
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
