//! Leases that cannot be forged or outlived.
//!
//! A delivery token is signed (HMAC-SHA256 with a key every replica shares)
//! over the agent, the inbox sequence, the store reference, the handoff,
//! the attempt, the instance and the lease deadline, so it can be neither
//! guessed nor altered. Who holds a delivery now is a lease record per
//! inbox message; [`settle`] decides, from that record, whether a
//! settlement of a given attempt may proceed: a superseded attempt (the
//! lease passed, or the handoff was delivered again) or a settled one is
//! refused and changes nothing, while the same settlement repeated (an ack
//! whose answer was lost) is confirmed again.

use std::time::{Duration, SystemTime};

use handoff_proto::pb;
use hmac::{Hmac, KeyInit, Mac};
use prost::Message as _;
use sha2::Sha256;

use crate::error::{BrokerError, Reason};

type HmacSha256 = Hmac<Sha256>;

/// How long before its recorded deadline a lease stops taking
/// settlements, so a settlement never races the redelivery that the inbox
/// starts when the lease passes: a tenth of the lease, at most 200 ms.
pub fn margin(lease: Duration) -> Duration {
    (lease / 10).min(Duration::from_millis(200))
}

fn mac(secret: &[u8], token: &pb::DeliveryToken) -> Option<HmacSha256> {
    let mut unsigned = token.clone();
    unsigned.signature.clear();
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(&unsigned.encode_to_vec());
    Some(mac)
}

/// Signs `token` with `key` (sets its key id and signature).
pub fn sign(token: &mut pb::DeliveryToken, key: &pb::SigningKey) {
    token.key_id = key.id.clone();
    token.signature.clear();
    if let Some(mac) = mac(&key.secret, token) {
        token.signature = mac.finalize().into_bytes().to_vec();
    }
}

/// Whether `token` carries a valid signature by one of `keys`
/// (compared in constant time).
pub fn verify(token: &pb::DeliveryToken, keys: &pb::SigningKeys) -> bool {
    let Some(key) = keys.keys.iter().find(|k| k.id == token.key_id) else {
        return false;
    };
    match mac(&key.secret, token) {
        Some(mac) => mac.verify_slice(&token.signature).is_ok(),
        None => false,
    }
}

/// A settlement an instance asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Done (also: a complete-and-handoff consumed it).
    Ack,
    /// Deliver it again.
    Nack,
    /// Terminal failure.
    Reject,
    /// Restart the lease.
    Extend,
}

impl Ask {
    fn settled_state(self) -> Option<pb::LeaseState> {
        match self {
            Ask::Ack => Some(pb::LeaseState::Acked),
            Ask::Nack => Some(pb::LeaseState::Nacked),
            Ask::Reject => Some(pb::LeaseState::Rejected),
            Ask::Extend => None,
        }
    }
}

/// What a settlement may do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write this lease record (compare-and-set), then settle.
    Proceed(pb::Lease),
    /// The same settlement was made already: confirm it again, change
    /// nothing (an ack whose answer was lost).
    Repeat,
}

/// Decides a settlement of the attempt `token` names against the lease
/// record as stored (`None`: none). `lease` is the agent's lease (the
/// extension of an extend, and the [`margin`]).
pub fn settle(
    record: Option<&pb::Lease>,
    token: &pb::DeliveryToken,
    ask: Ask,
    now: SystemTime,
    lease: Duration,
) -> Result<Decision, BrokerError> {
    let superseded = |why: &str| BrokerError::Refused {
        reason: Reason::LeaseSuperseded,
        message: format!(
            "attempt {} of handoff {} no longer holds its lease: {why}",
            token.attempt, token.handoff_id
        ),
        metadata: vec![
            ("handoff_id", token.handoff_id.clone()),
            ("attempt", token.attempt.to_string()),
            (
                "current_attempt",
                record.map_or(0, |r| r.attempt).to_string(),
            ),
        ],
    };
    let Some(record) = record else {
        return Err(superseded("no lease is recorded for it"));
    };
    // A record of this attempt number about another, earlier delivery of
    // the handoff, nacked before this one was offered (JetStream counted
    // the redelivery from 1 again: its consumer's state was lost or
    // reset): this delivery holds the lease its token says. (An acked or
    // rejected one stays settled: its redelivery is refused.)
    let own;
    let record = if record.attempt == token.attempt
        && !record.delivery.is_empty()
        && record.delivery != token.ack_subject
        && record.state == pb::LeaseState::Nacked as i32
        && offered_after(token, record, lease)
    {
        own = pb::Lease {
            attempt: token.attempt,
            instance: token.instance.clone(),
            deadline: token.lease_deadline,
            state: pb::LeaseState::Leased as i32,
            settled_at: None,
            delivery: token.ack_subject.clone(),
        };
        &own
    } else {
        record
    };
    if record.attempt > token.attempt {
        return Err(superseded(&format!(
            "it was delivered again as attempt {}",
            record.attempt
        )));
    }
    if record.attempt < token.attempt {
        // A token from the future: only a forged one could say so.
        return Err(superseded("the lease record is older than the token"));
    }
    let state = pb::LeaseState::try_from(record.state).unwrap_or(pb::LeaseState::Unspecified);
    if state != pb::LeaseState::Leased {
        if ask.settled_state() == Some(state) {
            return Ok(Decision::Repeat);
        }
        return Err(BrokerError::Refused {
            reason: Reason::AlreadySettled,
            message: format!(
                "attempt {} of handoff {} is already settled ({})",
                token.attempt,
                token.handoff_id,
                state_name(state)
            ),
            metadata: vec![
                ("handoff_id", token.handoff_id.clone()),
                ("attempt", token.attempt.to_string()),
                ("state", state_name(state).to_string()),
            ],
        });
    }
    let deadline = record
        .deadline
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if now + margin(lease) > deadline {
        return Err(superseded("its lease passed"));
    }
    let mut next = record.clone();
    match ask.settled_state() {
        Some(settled) => {
            next.state = settled as i32;
            next.settled_at = Some(now.into());
        }
        None => next.deadline = Some((now + lease).into()),
    }
    Ok(Decision::Proceed(next))
}

/// Whether `token`'s delivery was offered after `record` was settled (its
/// lease started at its deadline less `lease`).
fn offered_after(token: &pb::DeliveryToken, record: &pb::Lease, lease: Duration) -> bool {
    let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
    match (time(token.lease_deadline), time(record.settled_at)) {
        (Some(deadline), Some(settled)) => deadline
            .checked_sub(lease)
            .is_some_and(|offered| offered >= settled),
        _ => false,
    }
}

/// The name of a lease state for messages.
pub fn state_name(state: pb::LeaseState) -> &'static str {
    match state {
        pb::LeaseState::Leased => "leased",
        pb::LeaseState::Acked => "acked",
        pb::LeaseState::Nacked => "nacked",
        pb::LeaseState::Rejected => "rejected",
        pb::LeaseState::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> pb::SigningKey {
        pb::SigningKey {
            id: id.into(),
            secret: id.as_bytes().repeat(8),
            created_at: None,
        }
    }

    fn token() -> pb::DeliveryToken {
        pb::DeliveryToken {
            agent: "worker".into(),
            stream_sequence: 7,
            ack_subject: "ref".into(),
            handoff_id: "h".into(),
            attempt: 1,
            instance: "w1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn signatures_cover_every_field() {
        let (k1, k2) = (key("k1"), key("k2"));
        let keys = pb::SigningKeys {
            keys: vec![k1.clone(), k2],
        };
        let mut t = token();
        sign(&mut t, &k1);
        assert!(verify(&t, &keys));
        let mut altered = t.clone();
        altered.attempt = 2;
        assert!(!verify(&altered, &keys));
        let mut flipped = t.clone();
        flipped.signature[0] ^= 1;
        assert!(!verify(&flipped, &keys));
        let mut unknown = t.clone();
        unknown.key_id = "k9".into();
        assert!(!verify(&unknown, &keys));
        let mut forged = token();
        sign(&mut forged, &key("guessed"));
        forged.key_id = "k1".into();
        assert!(!verify(&forged, &keys));
    }

    fn leased(attempt: u32, deadline: SystemTime) -> pb::Lease {
        pb::Lease {
            attempt,
            instance: "w1".into(),
            deadline: Some(deadline.into()),
            state: pb::LeaseState::Leased as i32,
            settled_at: None,
            delivery: "ref".into(),
        }
    }

    fn reason(r: Result<Decision, BrokerError>) -> Reason {
        r.expect_err("refused").reason()
    }

    #[test]
    fn a_superseded_attempt_changes_nothing() {
        let now = SystemTime::now();
        let lease = Duration::from_secs(5);
        let later = leased(2, now + lease);
        for ask in [Ask::Ack, Ask::Nack, Ask::Reject, Ask::Extend] {
            assert_eq!(
                reason(settle(Some(&later), &token(), ask, now, lease)),
                Reason::LeaseSuperseded
            );
        }
        let passed = leased(1, now - Duration::from_millis(1));
        assert_eq!(
            reason(settle(Some(&passed), &token(), Ask::Ack, now, lease)),
            Reason::LeaseSuperseded
        );
        assert_eq!(
            reason(settle(None, &token(), Ask::Ack, now, lease)),
            Reason::LeaseSuperseded
        );
    }

    #[test]
    fn settled_once_repeated_only_as_the_same() {
        let now = SystemTime::now();
        let lease = Duration::from_secs(5);
        let Ok(Decision::Proceed(acked)) = settle(
            Some(&leased(1, now + lease)),
            &token(),
            Ask::Ack,
            now,
            lease,
        ) else {
            panic!("ack proceeds");
        };
        assert_eq!(acked.state, pb::LeaseState::Acked as i32);
        assert_eq!(
            settle(Some(&acked), &token(), Ask::Ack, now, lease).ok(),
            Some(Decision::Repeat)
        );
        assert_eq!(
            reason(settle(Some(&acked), &token(), Ask::Reject, now, lease)),
            Reason::AlreadySettled
        );
    }

    #[test]
    fn a_later_delivery_counted_with_the_same_attempt_holds_its_own_lease() {
        let now = SystemTime::now();
        let lease = Duration::from_secs(5);
        // Attempt 1 (delivery "ref") was nacked a second ago.
        let Ok(Decision::Proceed(nacked)) = settle(
            Some(&leased(1, now + lease)),
            &token(),
            Ask::Nack,
            now - Duration::from_secs(1),
            lease,
        ) else {
            panic!("nack proceeds");
        };
        // Delivered again, counted as attempt 1 once more, offered now.
        let again = pb::DeliveryToken {
            ack_subject: "ref-2".into(),
            lease_deadline: Some((now + lease).into()),
            ..token()
        };
        let Ok(Decision::Proceed(acked)) = settle(Some(&nacked), &again, Ask::Ack, now, lease)
        else {
            panic!("the later delivery's ack proceeds");
        };
        assert_eq!(acked.state, pb::LeaseState::Acked as i32);
        assert_eq!(acked.delivery, "ref-2");
        // The nacked delivery's own token still finds its settlement.
        let first = pb::DeliveryToken {
            lease_deadline: Some((now - Duration::from_secs(2) + lease).into()),
            ..token()
        };
        assert_eq!(
            settle(Some(&nacked), &first, Ask::Nack, now, lease).ok(),
            Some(Decision::Repeat)
        );
        assert_eq!(
            reason(settle(Some(&nacked), &first, Ask::Ack, now, lease)),
            Reason::AlreadySettled
        );
        // A token of another delivery offered before the settlement (not
        // a later one) is refused as before.
        let earlier = pb::DeliveryToken {
            ack_subject: "ref-0".into(),
            lease_deadline: Some((now - Duration::from_secs(3) + lease).into()),
            ..token()
        };
        assert_eq!(
            reason(settle(Some(&nacked), &earlier, Ask::Ack, now, lease)),
            Reason::AlreadySettled
        );
    }

    #[test]
    fn extend_moves_the_deadline() {
        let now = SystemTime::now();
        let lease = Duration::from_secs(30);
        let Ok(Decision::Proceed(extended)) = settle(
            Some(&leased(1, now + Duration::from_secs(1))),
            &token(),
            Ask::Extend,
            now,
            lease,
        ) else {
            panic!("extend proceeds");
        };
        assert_eq!(extended.state, pb::LeaseState::Leased as i32);
        assert_eq!(extended.deadline, Some((now + lease).into()));
    }
}
