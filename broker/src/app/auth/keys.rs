//! Delivery-token signing keys: kept, cached, used to sign and verify.

use super::*;

pub(super) fn new_key() -> Result<pb::SigningKey, BrokerError> {
    Ok(pb::SigningKey {
        id: uuid::Uuid::now_v7().simple().to_string(),
        secret: random::<32>()?.to_vec(),
        created_at: Some(now()),
    })
}

pub(super) fn set_keys(broker: &Broker, keys: pb::SigningKeys) {
    broker.auth().keys_record(keys);
}

pub(super) fn cached_keys(broker: &Broker) -> Option<pb::SigningKeys> {
    broker.auth().keys.read().ok().and_then(|k| k.clone())
}

/// The signing keys: cached, else read from the store, else created
/// (compare-and-set, so every replica ends up with the same keys).
pub(super) async fn keys(broker: &Broker, fresh: bool) -> Result<pb::SigningKeys, BrokerError> {
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

pub(super) fn random<const N: usize>() -> Result<[u8; N], BrokerError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf)
        .map_err(|e| BrokerError::Internal(format!("no randomness from the OS: {e}")))?;
    Ok(buf)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
