//! The rules of one handoff: its id, its depth, request validation,
//! delivery tokens and attempts.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use handoff_proto::pb;
use prost::Message as _;
use uuid::Uuid;

use crate::{error::BrokerError, rules::names};

/// Namespace of the deterministic (v5) handoff ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0c_4a1e_9d3b_4c55_8f1e_2b7d_9e4a_0c31);

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The id of a new handoff.
///
/// - completing a delivery: derived from the consumed handoff, the target
///   and the idempotency key, so an agent that crashed after its handoff
///   was stored and redoes the work produces the same handoff again;
/// - with an idempotency key: derived from the run, source and key;
/// - otherwise: a fresh time-ordered id (no retry protection).
pub fn handoff_id(req: &pb::HandoffRequest, consumed_handoff: Option<&str>) -> String {
    let target = if req.r#final {
        "\u{0}final"
    } else if req.to_barrier {
        "\u{0}barrier"
    } else {
        req.target_agent.as_str()
    };
    let name = match consumed_handoff {
        Some(parent) => format!("c\u{0}{parent}\u{0}{target}\u{0}{}", req.idempotency_key),
        None if !req.idempotency_key.is_empty() => format!(
            "k\u{0}{}\u{0}{}\u{0}{}",
            req.run_id, req.source_agent, req.idempotency_key
        ),
        None => return Uuid::now_v7().to_string(),
    };
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

/// A deterministic id derived from `name` (the same name, the same id).
pub fn derived_id(name: &str) -> String {
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The id of the copy of a handoff that is routed to a fallback agent.
pub fn fallback_id(handoff_id: &str, fallback: &str) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("f\u{0}{handoff_id}\u{0}{fallback}").as_bytes(),
    )
    .to_string()
}

/// The label of a run's pipeline.
pub fn pipeline_of(run: &pb::Run) -> &str {
    if run.pipeline.is_empty() {
        "default"
    } else {
        &run.pipeline
    }
}

/// Depth of a handoff: 1 without a parent, the parent's + 1 otherwise. A
/// final handoff ends the run instead of adding a hop, so the cap does not
/// apply to it.
pub fn depth(
    parent_depth: Option<u32>,
    max_depth: u32,
    is_final: bool,
) -> Result<u32, BrokerError> {
    let depth = parent_depth.map_or(1, |d| d.saturating_add(1));
    if !is_final && depth > max_depth {
        return Err(BrokerError::DepthExceeded { depth, max_depth });
    }
    Ok(depth)
}

/// The name of the object that holds a payload of run `run_id` whose
/// value has SHA-256 `sha256` (hex): content-addressed within its run, so
/// the same payload handed off again in a run is stored once, and a
/// reference names the run it belongs to.
pub fn payload_name(run_id: &str, sha256: &str) -> String {
    format!("{run_id}/{sha256}")
}

/// Checks a payload reference of run `run_id`: a name of that run's, a
/// type URL, a hex SHA-256.
pub fn validate_ref(run_id: &str, r: &pb::PayloadRef) -> Result<(), BrokerError> {
    let Some(digest) = r
        .name
        .strip_prefix(run_id)
        .and_then(|n| n.strip_prefix('/'))
    else {
        return Err(BrokerError::malformed(
            "payload_ref.name",
            format!(
                "payload_ref {:?} is not a payload of run {run_id:?}: a handoff may reference only payloads of its own run",
                r.name
            ),
        ));
    };
    let hex = |d: &str| {
        d.len() == 64
            && d.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(digest) {
        return Err(BrokerError::malformed(
            "payload_ref.name",
            format!("payload_ref {:?} is not <run_id>/<sha256>", r.name),
        ));
    }
    if !hex(&r.sha256) {
        return Err(BrokerError::malformed(
            "payload_ref.sha256",
            "payload_ref.sha256 is the lowercase hex SHA-256 of the payload (64 characters)",
        ));
    }
    if r.type_url.trim().is_empty() {
        return Err(BrokerError::malformed(
            "payload_ref.type_url",
            "payload_ref.type_url is required (the payload's message type)",
        ));
    }
    Ok(())
}

/// The encoded size of the `Any` a reference stands for (type URL and
/// value), as a payload's size is measured.
pub fn ref_encoded_len(r: &pb::PayloadRef) -> usize {
    let value = usize::try_from(r.size).unwrap_or(usize::MAX);
    prost_types::Any {
        type_url: r.type_url.clone(),
        value: Vec::new(),
    }
    .encoded_len()
    .saturating_add(value)
    .saturating_add(prost::length_delimiter_len(value) + 1)
}

/// Checks everything about a handoff request that needs no state; a
/// payload (or the one a `payload_ref` names) over `max_payload_size` is
/// refused.
pub fn validate_handoff(
    req: &pb::HandoffRequest,
    max_payload_size: usize,
) -> Result<(), BrokerError> {
    names::validate("run_id", &req.run_id)?;
    names::validate_optional("source_agent", &req.source_agent)?;
    names::validate_optional("barrier_id", &req.barrier_id)?;
    names::validate_optional("branch_key", &req.branch_key)?;
    if req.r#final && req.to_barrier {
        return Err(BrokerError::malformed(
            "final",
            "a handoff is either final or to_barrier, not both",
        ));
    }
    if req.r#final || req.to_barrier {
        if !req.target_agent.is_empty() {
            return Err(BrokerError::malformed(
                "target_agent",
                format!(
                    "a {} handoff has no target_agent",
                    if req.r#final { "final" } else { "to_barrier" }
                ),
            ));
        }
    } else {
        if req.target_agent.is_empty() {
            return Err(BrokerError::malformed(
                "target_agent",
                "target_agent is required unless the handoff is final or to_barrier",
            ));
        }
        names::validate("target_agent", &req.target_agent)?;
    }
    if req.to_barrier
        && req.consumes.is_empty()
        && (req.barrier_id.is_empty() || req.branch_key.is_empty())
    {
        return Err(BrokerError::malformed(
            "barrier_id",
            "a to_barrier handoff names barrier_id and branch_key, or consumes a delivery of a branch",
        ));
    }
    let size = match (&req.payload, &req.payload_ref) {
        (Some(_), Some(_)) => {
            return Err(BrokerError::malformed(
                "payload_ref",
                "a handoff carries payload or payload_ref, not both",
            ))
        }
        (None, None) => return Err(BrokerError::malformed("payload", "payload is required")),
        (Some(payload), None) => {
            if payload.type_url.trim().is_empty() {
                return Err(BrokerError::malformed(
                    "payload.type_url",
                    "payload.type_url is required (the payload's message type)",
                ));
            }
            payload.encoded_len()
        }
        (None, Some(r)) => {
            validate_ref(&req.run_id, r)?;
            ref_encoded_len(r)
        }
    };
    if size > max_payload_size {
        return Err(BrokerError::PayloadTooLarge {
            size,
            limit: max_payload_size,
            setting: "max_payload_size",
        });
    }
    if let Some(c) = req.confidence {
        if !(0.0..=1.0).contains(&c) {
            return Err(BrokerError::malformed(
                "confidence",
                format!("confidence {c} is outside [0, 1]"),
            ));
        }
    }
    if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(BrokerError::malformed(
            "idempotency_key",
            format!(
                "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY}",
                req.idempotency_key.len()
            ),
        ));
    }
    for (i, t) in req.tool_results.iter().enumerate() {
        if t.tool.is_empty() {
            return Err(BrokerError::malformed(
                format!("tool_results[{i}].tool"),
                format!("tool_results[{i}].tool is empty"),
            ));
        }
    }
    Ok(())
}

/// Encodes a delivery token (opaque to clients).
pub fn encode_token(token: &pb::DeliveryToken) -> String {
    URL_SAFE_NO_PAD.encode(token.encode_to_vec())
}

/// Decodes a delivery token; INVALID_ARGUMENT if it is not one, or not in
/// the one encoding the broker issues (protobuf's canonical encoding, in
/// unpadded URL-safe base64): the signature covers that encoding, so an id
/// with an extra field, fields in another order or other base64 is not
/// the one issued, and anything keyed by the id string cannot be
/// sidestepped. Whether its store reference really names that agent's
/// delivery is the store's to say ([`crate::store::Store::reference_matches`]).
pub fn decode_token(s: &str) -> Result<pb::DeliveryToken, BrokerError> {
    let bad = |why: &str| BrokerError::BadDeliveryId(why.to_string());
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad("not a token issued by the broker"))?;
    let token = pb::DeliveryToken::decode(bytes.as_slice())
        .map_err(|_| bad("not a token issued by the broker"))?;
    if token.stream_sequence == 0
        || token.handoff_id.is_empty()
        || token.ack_subject.is_empty()
        || names::validate("agent", &token.agent).is_err()
    {
        return Err(bad("not a token issued by the broker"));
    }
    if encode_token(&token) != s {
        return Err(bad("not in the encoding the broker issues"));
    }
    Ok(token)
}

/// What to do with a message the inbox offers for the `delivered`-th time.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Hand it to an instance as attempt `n`.
    Deliver(u32),
    /// Attempts are used up: route it to the fallback or the dead letter.
    Exhausted,
}

/// Decides an offer against the agent's max attempts.
pub fn offer(delivered: i64, max_attempts: u32) -> Offer {
    let n = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
    if n > max_attempts {
        Offer::Exhausted
    } else {
        Offer::Deliver(n)
    }
}

/// What the claim on a consumed delivery, as the handoff's read found it,
/// makes of the handoff: the part of its plan decided before the right to
/// the run and the guards are checked, and the part after.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimRuling {
    /// Nothing to answer from the claim: this request made it, or the
    /// handoff consumes no delivery.
    Proceed,
    /// A redo (or a retry) of what the delivery stored: answered with the
    /// stored receipt, however long ago, whatever its content. `republish`:
    /// its `handoff_accepted` event is published again (deduplicated), in
    /// case the first call failed on it; `ack`: the consumed delivery is
    /// acked again (its lease lives, and a fan-out leaves that to its
    /// agent).
    Redo {
        /// The receipt the first call answered.
        receipt: pb::HandoffResponse,
        /// Whether to publish the event again.
        republish: bool,
        /// Whether to ack the consumed delivery again.
        ack: bool,
    },
    /// A delivery whose lease is gone, already consumed by a handoff to
    /// another target: refused as ROLE_CONFUSION, the cause to name rather
    /// than the settlement it made.
    Confused {
        /// The refusal's message.
        message: String,
        /// The refusal's metadata.
        metadata: Vec<(&'static str, String)>,
    },
    /// Claimed by an earlier attempt that stored nothing (it died between
    /// claiming and storing): once the guards pass, this request takes the
    /// claim over.
    TakeOver,
    /// Claimed by another request: once the guards pass, that claim is
    /// checked against this request.
    Check,
}

/// Rules on the claim `held` by another request on the delivery `token`
/// consumes, for handoff `id` of `req` (see [`ClaimRuling`]). `lease_lives`:
/// whether the delivery's lease is this caller's and live (`None`: not
/// known); `stored_age`: how long ago the claim's first receipt was
/// recorded; `dedupe_window`: how long JetStream recognises a message id.
pub fn rule_claim(
    held: Option<&pb::ConsumeClaim>,
    req: &pb::HandoffRequest,
    id: &str,
    token: &pb::DeliveryToken,
    lease_lives: Option<bool>,
    stored_age: Option<std::time::Duration>,
    dedupe_window: std::time::Duration,
) -> ClaimRuling {
    let Some(first) = held else {
        return ClaimRuling::Proceed;
    };
    if let Some(receipt) = stored_receipt(first, req, id) {
        return ClaimRuling::Redo {
            receipt,
            republish: stored_age.is_some_and(|age| age < dedupe_window),
            ack: !req.fan_out && lease_lives == Some(true),
        };
    }
    if lease_lives == Some(false) {
        let mine = claim_of(req, id, token.attempt);
        if let Some((message, metadata)) = role_confusion(token, first, &mine) {
            return ClaimRuling::Confused { message, metadata };
        }
    }
    if first.stored.is_empty() && first.attempt < token.attempt {
        ClaimRuling::TakeOver
    } else {
        ClaimRuling::Check
    }
}

/// The claim handoff `id` of `req` makes on the delivery it consumes
/// (attempt `attempt`), before anything is stored.
pub fn claim_of(req: &pb::HandoffRequest, id: &str, attempt: u32) -> pb::ConsumeClaim {
    pb::ConsumeClaim {
        target_agent: req.target_agent.clone(),
        fan_out: req.fan_out,
        handoff_id: id.to_string(),
        attempt,
        stored: Vec::new(),
        stored_at: None,
        barrier_id: if req.fan_out {
            req.barrier_id.clone()
        } else {
            String::new()
        },
        state_revision: 0,
    }
}

/// The receipt a claim holds for this request: its own stored handoff, or,
/// for a single handoff from the delivery (no fan-out) to the same target,
/// the one stored first, whatever the redo's content.
pub fn stored_receipt(
    claim: &pb::ConsumeClaim,
    req: &pb::HandoffRequest,
    id: &str,
) -> Option<pb::HandoffResponse> {
    if let Some(own) = claim.stored.iter().find(|r| r.handoff_id == id) {
        return Some(own.clone());
    }
    let single = !claim.fan_out && !req.fan_out;
    let same = claim.target_agent == req.target_agent;
    (single && same)
        .then(|| claim.stored.first().cloned())
        .flatten()
}

/// When a delivery already consumed by a handoff to one target is consumed
/// again by a handoff to another (unless both declare `fan_out`): the
/// refusal's message and metadata.
pub fn role_confusion(
    token: &pb::DeliveryToken,
    first: &pb::ConsumeClaim,
    mine: &pb::ConsumeClaim,
) -> Option<(String, Vec<(&'static str, String)>)> {
    if first.target_agent == mine.target_agent || (first.fan_out && mine.fan_out) {
        return None;
    }
    let name = |t: &str| {
        if t.is_empty() {
            "the run's final result".to_string()
        } else {
            format!("agent {t:?}")
        }
    };
    let message = format!(
        "delivery of handoff {} was already consumed by a handoff to {} (handoff {}); one delivery goes to one target unless every handoff from it declares fan_out",
        token.handoff_id,
        name(&first.target_agent),
        first.handoff_id
    );
    let metadata = vec![
        ("consumed_handoff_id", token.handoff_id.clone()),
        ("first_target", first.target_agent.clone()),
        ("first_handoff_id", first.handoff_id.clone()),
    ];
    Some((message, metadata))
}

/// A run's `failure` when a handoff of it was dead-lettered (what
/// `RedriveDeadLetter` recognises to resume the run).
pub fn dead_letter_failure(handoff_id: &str, reason: &str) -> String {
    format!("handoff {handoff_id} dead-lettered: {reason}")
}

/// Where a handoff's delivery stands, from the events about it in the
/// order they were stored: its status and how many deliveries were made
/// of it.
pub fn delivery_status(events: &[&pb::Event]) -> (pb::HandoffStatus, u32) {
    use pb::{EventKind as K, HandoffStatus as S};
    let mut status = S::Unspecified;
    let mut attempts = 0;
    for e in events {
        status = match K::try_from(e.kind).unwrap_or(K::Unspecified) {
            K::HandoffAccepted if e.inbox_sequence == 0 && e.agent.is_empty() => {
                if e.branch_key.is_empty() {
                    S::Final
                } else {
                    S::ToBarrier
                }
            }
            K::HandoffAccepted if status == S::Unspecified => S::Pending,
            K::Delivered | K::Redelivered => {
                attempts = attempts.max(e.attempt).max(attempts + 1);
                S::Delivered
            }
            K::Nacked if status == S::Delivered => S::Pending,
            K::HandoffRedriven => S::Pending,
            K::Acked => S::Acked,
            K::Rejected => S::Rejected,
            K::DeadLettered => S::DeadLettered,
            K::RoutedToFallback => S::RoutedToFallback,
            K::Discarded => S::Discarded,
            _ => status,
        };
    }
    (status, attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(target: &str, attempt: u32, stored: &[&str]) -> pb::ConsumeClaim {
        pb::ConsumeClaim {
            target_agent: target.into(),
            handoff_id: stored.first().map_or("h-first", |s| s).to_string(),
            attempt,
            stored: stored
                .iter()
                .map(|id| pb::HandoffResponse {
                    handoff_id: id.to_string(),
                    sequence: 7,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_claim_rules_a_redo_a_confusion_a_take_over_or_a_check() {
        use std::time::Duration;
        let window = Duration::from_secs(120);
        let token = pb::DeliveryToken {
            handoff_id: "consumed".into(),
            attempt: 2,
            ..Default::default()
        };
        let to = |target: &str| pb::HandoffRequest {
            target_agent: target.into(),
            ..Default::default()
        };
        let rule = |held: Option<&pb::ConsumeClaim>, req: &pb::HandoffRequest, lives, age| {
            rule_claim(held, req, "h-new", &token, lives, age, window)
        };
        // No claim held by another request.
        assert_eq!(rule(None, &to("b"), Some(true), None), ClaimRuling::Proceed);
        // A redo to the same target answers the first receipt, whatever its
        // id; the event again only within the window, the ack only while
        // the lease lives.
        let stored = claim("b", 2, &["h-first"]);
        let recent = Some(Duration::from_secs(5));
        match rule(Some(&stored), &to("b"), Some(true), recent) {
            ClaimRuling::Redo {
                receipt,
                republish,
                ack,
            } => {
                assert_eq!(receipt.handoff_id, "h-first");
                assert!(republish && ack);
            }
            other => panic!("{other:?}"),
        }
        let old = Some(Duration::from_secs(600));
        assert!(matches!(
            rule(Some(&stored), &to("b"), Some(false), old),
            ClaimRuling::Redo {
                republish: false,
                ack: false,
                ..
            }
        ));
        // Another target from a settled delivery: ROLE_CONFUSION.
        match rule(Some(&stored), &to("c"), Some(false), recent) {
            ClaimRuling::Confused { metadata, .. } => {
                assert!(metadata.contains(&("first_target", "b".to_string())));
            }
            other => panic!("{other:?}"),
        }
        // Another target while the lease lives: checked after the guards.
        assert_eq!(
            rule(Some(&stored), &to("c"), Some(true), recent),
            ClaimRuling::Check
        );
        // An earlier attempt that stored nothing is taken over; one of this
        // attempt is checked.
        let empty = claim("c", 1, &[]);
        assert_eq!(
            rule(Some(&empty), &to("b"), Some(true), None),
            ClaimRuling::TakeOver
        );
        let same_attempt = claim("c", 2, &[]);
        assert_eq!(
            rule(Some(&same_attempt), &to("b"), Some(true), None),
            ClaimRuling::Check
        );
        // Both fan-outs: no confusion, each its own receipt.
        let mut fan = claim("b", 2, &["h-first"]);
        fan.fan_out = true;
        let mut req = to("c");
        req.fan_out = true;
        assert_eq!(
            rule(Some(&fan), &req, Some(false), recent),
            ClaimRuling::Check
        );
    }
    use crate::error::Reason;

    fn req() -> pb::HandoffRequest {
        pb::HandoffRequest {
            run_id: "r1".into(),
            source_agent: "planner".into(),
            target_agent: "worker".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/x.Y".into(),
                value: vec![1, 2, 3],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_derived_from_the_consumed_delivery() {
        let r = req();
        assert_eq!(handoff_id(&r, Some("p")), handoff_id(&r, Some("p")));
        assert_ne!(handoff_id(&r, Some("p")), handoff_id(&r, Some("q")));
        let mut other_target = r.clone();
        other_target.target_agent = "critic".into();
        assert_ne!(
            handoff_id(&r, Some("p")),
            handoff_id(&other_target, Some("p"))
        );
    }

    #[test]
    fn ids_from_idempotency_keys() {
        let mut r = req();
        assert_ne!(
            handoff_id(&r, None),
            handoff_id(&r, None),
            "no key: fresh ids"
        );
        r.idempotency_key = "k".into();
        assert_eq!(handoff_id(&r, None), handoff_id(&r, None));
        let mut other_run = r.clone();
        other_run.run_id = "r2".into();
        assert_ne!(handoff_id(&r, None), handoff_id(&other_run, None));
    }

    #[test]
    fn depth_is_parent_plus_one_and_capped() {
        assert_eq!(depth(None, 5, false).ok(), Some(1));
        assert_eq!(depth(Some(4), 5, false).ok(), Some(5));
        let err = depth(Some(5), 5, false).expect_err("over the cap");
        assert_eq!(err.reason(), Reason::DepthCap);
        assert!(err.to_string().contains('6') && err.to_string().contains('5'));
        assert_eq!(depth(Some(5), 5, true).ok(), Some(6), "final is not a hop");
    }

    #[test]
    fn validation() {
        assert!(validate_handoff(&req(), 1024).is_ok());
        let mut r = req();
        r.payload = None;
        assert_eq!(
            validate_handoff(&r, 1024).map_err(|e| e.reason()),
            Err(Reason::MalformedRequest)
        );
        let mut r = req();
        r.confidence = Some(1.5);
        assert_eq!(
            validate_handoff(&r, 1024).map_err(|e| e.field().map(str::to_string)),
            Err(Some("confidence".to_string()))
        );
        let mut r = req();
        r.confidence = Some(f64::NAN);
        assert!(validate_handoff(&r, 1024).is_err());
        let r = req();
        assert_eq!(
            validate_handoff(&r, 10).map_err(|e| e.reason()),
            Err(Reason::PayloadTooLarge)
        );
        let mut r = req();
        r.r#final = true;
        assert!(validate_handoff(&r, 1024).is_err(), "final with a target");
        r.target_agent.clear();
        assert!(validate_handoff(&r, 1024).is_ok());
        let mut r = req();
        r.target_agent = "a.b".into();
        assert_eq!(
            validate_handoff(&r, 1024).map_err(|e| e.reason()),
            Err(Reason::InvalidName)
        );
    }

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let t = pb::DeliveryToken {
            agent: "worker".into(),
            stream_sequence: 7,
            ack_subject: "$JS.ACK.HANDOFF_INBOX.worker.1.7.1.0.0".into(),
            handoff_id: "h".into(),
            ..Default::default()
        };
        assert_eq!(decode_token(&encode_token(&t)).ok(), Some(t.clone()));
        for forged in [
            pb::DeliveryToken {
                stream_sequence: 0,
                ..t.clone()
            },
            pb::DeliveryToken {
                agent: "a.b".into(),
                ..t.clone()
            },
            pb::DeliveryToken {
                ack_subject: String::new(),
                ..t.clone()
            },
        ] {
            assert!(decode_token(&encode_token(&forged)).is_err(), "{forged:?}");
        }
        for bad in ["", "!!", "aGVsbG8"] {
            assert_eq!(
                decode_token(bad).map_err(|e| e.reason()),
                Err(Reason::BadDeliveryId)
            );
        }
        // The same fields in other encodings: an unknown field appended,
        // the fields in another order, padded base64.
        let canonical = t.encode_to_vec();
        let mut extra = canonical.clone();
        extra.extend_from_slice(&[0xF8, 0x06, 0x01]); // field 111, varint 1
        let mut reordered = pb::DeliveryToken {
            handoff_id: t.handoff_id.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        reordered.extend(
            pb::DeliveryToken {
                handoff_id: String::new(),
                ..t.clone()
            }
            .encode_to_vec(),
        );
        assert_eq!(
            pb::DeliveryToken::decode(reordered.as_slice()).ok(),
            Some(t.clone()),
            "the same token"
        );
        // Padded base64 (a length a multiple of 3 has no padding).
        let padded = base64::engine::general_purpose::URL_SAFE.encode(&canonical);
        let padded = (padded != encode_token(&t)).then_some(padded);
        for id in [
            Some(URL_SAFE_NO_PAD.encode(&extra)),
            Some(URL_SAFE_NO_PAD.encode(&reordered)),
            padded,
        ]
        .into_iter()
        .flatten()
        {
            assert_eq!(
                decode_token(&id).map_err(|e| e.reason()),
                Err(Reason::BadDeliveryId),
                "{id}"
            );
        }
    }

    #[test]
    fn attempts() {
        assert_eq!(offer(1, 3), Offer::Deliver(1));
        assert_eq!(offer(3, 3), Offer::Deliver(3));
        assert_eq!(offer(4, 3), Offer::Exhausted);
    }

    #[test]
    fn a_handoffs_status_follows_its_events() {
        use pb::{EventKind as K, HandoffStatus as S};
        let e = |kind: K, attempt: u32| pb::Event {
            kind: kind as i32,
            attempt,
            agent: "worker".to_string(),
            inbox_sequence: 7,
            ..Default::default()
        };
        let of = |events: &[pb::Event]| {
            let refs: Vec<&pb::Event> = events.iter().collect();
            delivery_status(&refs)
        };
        assert_eq!(of(&[]), (S::Unspecified, 0));
        assert_eq!(of(&[e(K::HandoffAccepted, 0)]), (S::Pending, 0));
        assert_eq!(
            of(&[e(K::HandoffAccepted, 0), e(K::Delivered, 1)]),
            (S::Delivered, 1)
        );
        assert_eq!(
            of(&[
                e(K::HandoffAccepted, 0),
                e(K::Delivered, 1),
                e(K::Nacked, 1)
            ]),
            (S::Pending, 1)
        );
        assert_eq!(
            of(&[
                e(K::HandoffAccepted, 0),
                e(K::Delivered, 1),
                e(K::Nacked, 1),
                e(K::Redelivered, 2),
                e(K::Acked, 2),
                // An accepted event published again changes nothing.
                e(K::HandoffAccepted, 0),
            ]),
            (S::Acked, 2)
        );
        assert_eq!(
            of(&[
                e(K::HandoffAccepted, 0),
                e(K::Delivered, 5),
                e(K::DeadLettered, 5)
            ]),
            (S::DeadLettered, 5)
        );
        assert_eq!(
            of(&[e(K::HandoffAccepted, 0), e(K::Discarded, 0)]).0,
            S::Discarded
        );
        assert_eq!(
            of(&[
                e(K::HandoffAccepted, 0),
                e(K::Delivered, 1),
                e(K::DeadLettered, 1),
                e(K::HandoffRedriven, 0),
            ]),
            (S::Pending, 1)
        );
        let final_ = pb::Event {
            kind: K::HandoffAccepted as i32,
            ..Default::default()
        };
        assert_eq!(of(std::slice::from_ref(&final_)).0, S::Final);
        let branch = pb::Event {
            branch_key: "b1".to_string(),
            ..final_
        };
        assert_eq!(of(&[branch]).0, S::ToBarrier);
    }
}
