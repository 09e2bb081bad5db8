//! Payloads by reference: a payload over `max_inline_payload` (up to
//! `max_payload_size`), or one that would take its envelope past NATS's
//! max_payload (a large barrier release), is stored in the
//! `handoff_payloads` object store under `<run_id>/<sha256>`, and the
//! envelope carries a [`pb::PayloadRef`] (name, size, digest, type URL)
//! instead. The SDKs fetch it with `GetPayload` and check it against the
//! reference, so a delivery reads as if its payload were inline.
//!
//! The guards still see the whole payload: a request's payload reference
//! is resolved ([`resolve_request`]) before the contract checks run. A
//! payload is moved out of its envelope ([`externalize_known`]) once they
//! passed, but written to the object store ([`Pending::put`]) only once
//! every other check of the handoff has passed too (its size, its barrier
//! branch, its state delta), just before the handoff is stored: nothing is
//! stored for a handoff its checks refuse. (A run or barrier that a
//! concurrent call ends between that write and the handoff's store still
//! refuses it; its object then stays until `retention`.)

use bytes::Bytes;
use handoff_proto::pb;
use prost::Message as _;

use crate::{
    app::{access, auth::Caller, Broker},
    error::BrokerError,
    rules::{handoff as rules, names},
    store::{sha256_hex, PayloadInfo, PayloadReader},
};

/// Payloads at least this large are hashed on the blocking pool.
const BLOCKING_HASH_BYTES: usize = 64 * 1024;

/// Bytes an envelope may still gain after [`externalize`] measured it
/// (the state revision the handoff path sets afterwards, and margin).
const ENVELOPE_SLACK: usize = 64;

/// Largest chunk `GetPayload` answers.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Resolves a request's `payload_ref` into its payload, so the guards
/// check the whole payload: the reference must name a payload of the
/// request's run that is stored (else `PAYLOAD_NOT_FOUND`) with the
/// reference's size and digest (else `PAYLOAD_DIGEST_MISMATCH`). Returns
/// the verified reference (the envelope then carries it again, without
/// storing the payload twice); `None` for a request with an inline
/// payload.
pub async fn resolve_request(
    broker: &Broker,
    req: &mut pb::HandoffRequest,
) -> Result<Option<pb::PayloadRef>, BrokerError> {
    let Some(r) = req.payload_ref.take() else {
        return Ok(None);
    };
    rules::validate_ref(&req.run_id, &r)?;
    let value = fetch(broker, &r).await?;
    req.payload = Some(prost_types::Any {
        type_url: r.type_url.clone(),
        value: value.to_vec(),
    });
    Ok(Some(r))
}

/// Fetches the payload a reference names and checks it against the
/// reference: its size and SHA-256.
pub async fn fetch(broker: &Broker, r: &pb::PayloadRef) -> Result<Bytes, BrokerError> {
    let not_found = || BrokerError::PayloadNotFound {
        name: r.name.clone(),
    };
    let info = broker
        .store()
        .payload_info(&r.name)
        .await?
        .ok_or_else(not_found)?;
    check(r, &info)?;
    let value = broker
        .store()
        .get_payload(&r.name)
        .await?
        .ok_or_else(not_found)?;
    // The object store checks the value against its own digest as it
    // reads; the size is checked again here against the reference.
    check(
        r,
        &PayloadInfo {
            size: value.len() as u64,
            ..info
        },
    )?;
    Ok(value)
}

/// Refuses a reference whose size or digest is not the stored object's.
fn check(r: &pb::PayloadRef, info: &PayloadInfo) -> Result<(), BrokerError> {
    if info.size != r.size || info.sha256 != r.sha256 {
        return Err(BrokerError::PayloadDigestMismatch {
            name: r.name.clone(),
            size: r.size,
            sha256: r.sha256.clone(),
            stored_size: info.size,
            stored_sha256: info.sha256.clone(),
        });
    }
    Ok(())
}

/// A payload moved out of its envelope, not written yet: its reference is
/// in the envelope already, and [`Pending::put`] writes it.
#[must_use = "a payload moved out of its envelope must be written before the envelope is stored"]
pub struct Pending {
    reference: pb::PayloadRef,
    value: Bytes,
}

impl Pending {
    /// Writes the payload to the object store. Idempotent: the object's
    /// name is the run and the payload's digest, so a retry stores
    /// nothing new.
    pub async fn put(self, broker: &Broker) -> Result<(), BrokerError> {
        let Pending { reference, value } = self;
        let stored = broker.store().put_payload(&reference.name, value).await?;
        if stored.sha256 != reference.sha256 || stored.size != reference.size {
            return Err(BrokerError::Internal(format!(
                "payload {} was stored as {} bytes with SHA-256 {}",
                reference.name, stored.size, stored.sha256
            )));
        }
        tracing::debug!(name = %reference.name, size = reference.size, "payload stored by reference");
        Ok(())
    }
}

/// Moves an envelope's payload out of it when it is over
/// `max_inline_payload`, or when the encoded envelope would exceed NATS's
/// max_payload; the envelope then carries a `payload_ref` (with the size
/// and SHA-256 that let the SDKs verify what they fetch) instead, and the
/// payload is returned, to be written ([`Pending::put`]) once nothing can
/// refuse the handoff any more. An envelope that fits is left as it is.
/// `known`, a verified reference to this very payload (a forwarded one),
/// is reused: nothing is left to write.
pub async fn externalize_known(
    broker: &Broker,
    envelope: &mut pb::HandoffEnvelope,
    known: Option<&pb::PayloadRef>,
) -> Result<Option<Pending>, BrokerError> {
    let inline = broker.config().max_inline_payload;
    externalize_over(broker, envelope, known, inline).await
}

/// Moves a payload the broker built itself (a barrier's release) into the
/// object store only when the envelope would not fit in one NATS message:
/// `max_inline_payload` bounds what callers send inline, not this.
pub async fn externalize_built(
    broker: &Broker,
    envelope: &mut pb::HandoffEnvelope,
) -> Result<(), BrokerError> {
    match externalize_over(broker, envelope, None, usize::MAX).await? {
        Some(pending) => pending.put(broker).await,
        None => Ok(()),
    }
}

async fn externalize_over(
    broker: &Broker,
    envelope: &mut pb::HandoffEnvelope,
    known: Option<&pb::PayloadRef>,
    inline: usize,
) -> Result<Option<Pending>, BrokerError> {
    let Some(payload) = envelope.payload.as_ref() else {
        return Ok(None);
    };
    let max_payload = broker.store().max_payload();
    let over_inline = payload.encoded_len() > inline;
    let over_nats =
        max_payload > 0 && envelope.encoded_len().saturating_add(ENVELOPE_SLACK) > max_payload;
    if !over_inline && !over_nats {
        return Ok(None);
    }
    let Some(payload) = envelope.payload.take() else {
        return Ok(None);
    };
    let pending = match known {
        Some(r) if r.type_url == payload.type_url && r.size == payload.value.len() as u64 => {
            envelope.payload_ref = Some(r.clone());
            return Ok(None);
        }
        _ => match reference(&envelope.run_id, payload.clone()).await {
            Ok(p) => p,
            Err(e) => {
                envelope.payload = Some(payload);
                return Err(e);
            }
        },
    };
    envelope.payload_ref = Some(pending.reference.clone());
    Ok(Some(pending))
}

/// The reference a payload of run `run_id` is stored under (its digest
/// computed), and the value to write there.
async fn reference(run_id: &str, payload: prost_types::Any) -> Result<Pending, BrokerError> {
    let value = Bytes::from(payload.value);
    let sha256 = if value.len() < BLOCKING_HASH_BYTES {
        sha256_hex(&value)
    } else {
        // Hashing megabytes takes milliseconds: off the async workers.
        let v = value.clone();
        tokio::task::spawn_blocking(move || sha256_hex(&v))
            .await
            .map_err(|e| BrokerError::Internal(format!("hashing the payload failed: {e}")))?
    };
    Ok(Pending {
        reference: pb::PayloadRef {
            name: rules::payload_name(run_id, &sha256),
            size: value.len() as u64,
            sha256,
            type_url: payload.type_url,
        },
        value,
    })
}

/// `GetPayload`: the payload a reference names, for a caller who may read
/// its run (an agent presenting a delivery of the run, its owner, or a
/// principal with `read`, as `GetState`), to read as it comes from the
/// object store (never whole in memory). The answer's reference carries
/// the name, size and digest (the type URL is the caller's reference's).
pub async fn get(
    broker: &Broker,
    caller: &Caller,
    req: pb::GetPayloadRequest,
) -> Result<(pb::PayloadRef, PayloadReader), BrokerError> {
    names::validate("run_id", &req.run_id)?;
    let run = access::read(broker, caller, &req.run_id, &req.delivery_id).await?;
    let of_run = req
        .name
        .strip_prefix(run.id.as_str())
        .is_some_and(|rest| rest.starts_with('/'));
    if !of_run {
        return Err(BrokerError::malformed(
            "name",
            format!(
                "payload {:?} is not a payload of run {:?}",
                req.name, run.id
            ),
        ));
    }
    let not_found = || BrokerError::PayloadNotFound {
        name: req.name.clone(),
    };
    let info = broker
        .store()
        .payload_info(&req.name)
        .await?
        .ok_or_else(not_found)?;
    // The object store checks the value against this digest as it reads.
    let value = broker
        .store()
        .read_payload(&req.name)
        .await?
        .ok_or_else(not_found)?;
    Ok((
        pb::PayloadRef {
            name: req.name.clone(),
            size: info.size,
            sha256: info.sha256,
            type_url: String::new(),
        },
        value,
    ))
}
