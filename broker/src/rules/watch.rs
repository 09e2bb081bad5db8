//! Which events a `Watch` asks for.

use handoff_proto::pb;

use crate::{error::BrokerError, rules::names};

/// What the store can narrow a watch to before the broker filters the
/// rest: one run (or all) and one kind (or all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Narrowed {
    /// The run, if the watch names one.
    pub run_id: Option<String>,
    /// The kind, if the watch names exactly one.
    pub kind: Option<pb::EventKind>,
}

/// Checks a watch request and says how the store can narrow it.
pub fn narrow(req: &pb::WatchRequest) -> Result<Narrowed, BrokerError> {
    names::validate_optional("run_id", &req.run_id)?;
    names::validate_optional("agent", &req.agent)?;
    names::validate_optional("owner", &req.owner)?;
    for (i, k) in req.kinds.iter().enumerate() {
        match pb::EventKind::try_from(*k) {
            Ok(pb::EventKind::Unspecified) | Err(_) => {
                return Err(BrokerError::malformed(
                    format!("kinds[{i}]"),
                    format!("kinds: {k} is not an event kind"),
                ))
            }
            Ok(_) => {}
        }
    }
    let run_id = (!req.run_id.is_empty()).then(|| req.run_id.clone());
    let kind = match req.kinds.as_slice() {
        [one] => pb::EventKind::try_from(*one).ok(),
        _ => None,
    };
    Ok(Narrowed { run_id, kind })
}

/// Whether an event is one the watch asks for.
pub fn matches(req: &pb::WatchRequest, e: &pb::Event) -> bool {
    (req.run_id.is_empty() || e.run_id == req.run_id)
        && (req.agent.is_empty() || e.agent == req.agent || e.source_agent == req.agent)
        && (req.owner.is_empty() || e.owner == req.owner)
        && (req.kinds.is_empty() || req.kinds.contains(&e.kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrows_to_one_run_and_one_kind() {
        let mut r = pb::WatchRequest::default();
        assert_eq!(
            narrow(&r).ok(),
            Some(Narrowed {
                run_id: None,
                kind: None
            })
        );
        r.run_id = "r1".into();
        r.kinds = vec![pb::EventKind::RunFailed as i32];
        assert_eq!(
            narrow(&r).ok(),
            Some(Narrowed {
                run_id: Some("r1".into()),
                kind: Some(pb::EventKind::RunFailed)
            })
        );
        r.kinds = vec![99];
        assert!(narrow(&r).is_err());
        r.kinds.clear();
        r.run_id = "a.>".into();
        assert!(narrow(&r).is_err());
    }

    #[test]
    fn matches_agent_as_source_or_target() {
        let req = pb::WatchRequest {
            agent: "worker".into(),
            ..Default::default()
        };
        let mut e = pb::Event {
            agent: "worker".into(),
            ..Default::default()
        };
        assert!(matches(&req, &e));
        e.agent = "aggregator".into();
        assert!(!matches(&req, &e));
        e.source_agent = "worker".into();
        assert!(matches(&req, &e));
    }
}
