//! Payloads by reference: a payload over the broker's
//! `max_inline_payload` (up to its `max_payload_size`) travels as a
//! [`pb::PayloadRef`] (name, size, SHA-256, type URL) and is read with
//! `GetPayload`. The SDK resolves every reference a delivery carries
//! before handing it to the application (the envelope's payload, and the
//! branch results of a barrier release), checking each against its size
//! and digest, so [`Delivery::payload`](crate::Delivery::payload) and
//! [`Delivery::join`](crate::Delivery::join) read it as if inline.

use futures::StreamExt;
use sha2::Digest as _;

use crate::{
    error::{Error, ErrorKind, Result},
    handoff::type_name,
    pb, Client,
};

/// The largest gRPC message the SDK sends or accepts: the broker's default
/// `max_payload_size` (64 MiB) and room for the rest of a request.
pub(crate) const MAX_MESSAGE: usize = (64 << 20) + (4 << 20);

impl Client {
    /// The payload `reference` names, fetched from the broker in chunks
    /// (`GetPayload`) and checked against the reference's size and
    /// SHA-256. `delivery_id` is a delivery of the run the caller holds
    /// (empty: the caller needs the `read` grant or to own the run).
    ///
    /// Deliveries come with their references resolved already; this is
    /// for references read elsewhere (a run's `result_ref`, say).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotFound`] (reason `PAYLOAD_NOT_FOUND`) when the
    /// payload is no longer stored (it expires with the broker's
    /// `retention`); [`ErrorKind::Decode`] when what arrived does not match
    /// the reference's size or digest.
    pub async fn get_payload(
        &self,
        run_id: &str,
        reference: &pb::PayloadRef,
        delivery_id: &str,
    ) -> Result<prost_types::Any> {
        let req = pb::GetPayloadRequest {
            run_id: run_id.to_string(),
            name: reference.name.clone(),
            delivery_id: delivery_id.to_string(),
        };
        let mut chunks = self
            .raw()
            .get_payload(self.request(req))
            .await?
            .into_inner();
        let size = usize::try_from(reference.size).unwrap_or(usize::MAX);
        let mut value = Vec::with_capacity(size.min(crate::payload::MAX_MESSAGE));
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if value.len() + chunk.data.len() > size {
                return Err(mismatch(reference, "more bytes than its size"));
            }
            value.extend_from_slice(&chunk.data);
        }
        if value.len() != size {
            return Err(mismatch(
                reference,
                &format!("{} bytes, not {size}", value.len()),
            ));
        }
        let digest = hex(&sha2::Sha256::digest(&value));
        if digest != reference.sha256 {
            return Err(mismatch(reference, &format!("SHA-256 {digest}")));
        }
        Ok(prost_types::Any {
            type_url: reference.type_url.clone(),
            value,
        })
    }
}

fn mismatch(reference: &pb::PayloadRef, what: &str) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!(
            "payload {} does not match its reference ({} bytes, SHA-256 {}): fetched {what}",
            reference.name, reference.size, reference.sha256
        ),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a delivery carries references to resolve: its payload, or the
/// branch results of the release it carries.
pub(crate) fn has_references(delivery: &pb::Delivery) -> bool {
    let Some(h) = delivery.handoff.as_ref() else {
        return false;
    };
    if h.payload.is_none() && h.payload_ref.is_some() {
        return true;
    }
    release_of(h).is_some_and(|r| r.branches.iter().any(|b| b.payload_ref.is_some()))
}

fn release_of(h: &pb::HandoffEnvelope) -> Option<pb::BarrierRelease> {
    let any = h.payload.as_ref()?;
    if type_name(&any.type_url) != <pb::BarrierRelease as prost::Name>::full_name() {
        return None;
    }
    <pb::BarrierRelease as prost::Message>::decode(any.value.as_slice()).ok()
}

/// Fills in every payload a delivery carries by reference (its
/// envelope's; a release's branches'), each checked against its
/// reference. The references stay, so the payload can be forwarded
/// without uploading it again.
pub(crate) async fn resolve(client: &Client, delivery: &mut pb::Delivery) -> Result<()> {
    let delivery_id = delivery.delivery_id.clone();
    let Some(h) = delivery.handoff.as_mut() else {
        return Ok(());
    };
    if h.payload.is_none() {
        if let Some(r) = &h.payload_ref {
            h.payload = Some(client.get_payload(&h.run_id, r, &delivery_id).await?);
        }
    }
    let Some(mut release) = release_of(h) else {
        return Ok(());
    };
    let mut changed = false;
    for branch in &mut release.branches {
        if branch.payload.is_some() {
            continue;
        }
        if let Some(r) = &branch.payload_ref {
            branch.payload = Some(client.get_payload(&h.run_id, r, &delivery_id).await?);
            changed = true;
        }
    }
    if changed {
        h.payload =
            Some(prost_types::Any::from_msg(&release).map_err(|e| {
                Error::new(ErrorKind::Decode, format!("encoding the release: {e}"))
            })?);
    }
    Ok(())
}
