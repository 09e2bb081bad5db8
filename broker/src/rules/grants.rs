//! Who may do what: grants with `*` patterns, deny winning over allow.
//!
//! A principal holds grants (`send_as worker-*`, `receive_as worker`,
//! `own team-a`, `read`, `admin`, each allow or deny). An action on a name
//! is allowed when some allow grant of that action matches the name and no
//! deny grant of it does. `read` and `admin` take no name.

use handoff_proto::pb;

use crate::{error::BrokerError, rules::names};

/// An action a grant covers.
pub type Action = pb::GrantAction;

/// Every action.
pub const ACTIONS: [Action; 5] = [
    Action::SendAs,
    Action::ReceiveAs,
    Action::Own,
    Action::Read,
    Action::Admin,
];

/// Whether `pattern` matches `name`: `*` stands for any run of characters
/// (none included); every other character stands for itself.
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == name;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether `grants` allow `action` on `name` (`name` is ignored for read
/// and admin).
pub fn allowed(grants: &[pb::Grant], action: Action, name: &str) -> bool {
    let applies = |g: &&pb::Grant| {
        g.action == action as i32
            && (matches!(action, Action::Read | Action::Admin) || matches(&g.pattern, name))
    };
    let mut any_allow = false;
    for g in grants.iter().filter(applies) {
        if g.deny {
            return false;
        }
        any_allow = true;
    }
    any_allow
}

/// The name of an action, as `handoffctl` writes it.
pub fn action_name(action: Action) -> &'static str {
    match action {
        Action::SendAs => "send_as",
        Action::ReceiveAs => "receive_as",
        Action::Own => "own",
        Action::Read => "read",
        Action::Admin => "admin",
        Action::Unspecified => "unspecified",
    }
}

/// Checks a principal's name and grants before they are stored.
pub fn validate(principal: &pb::Principal) -> Result<(), BrokerError> {
    names::validate("principal.name", &principal.name)?;
    for (i, g) in principal.grants.iter().enumerate() {
        let field = format!("principal.grants[{i}]");
        let action = Action::try_from(g.action).unwrap_or(Action::Unspecified);
        match action {
            Action::Unspecified => {
                return Err(BrokerError::malformed(field, "grant has no action"));
            }
            Action::Read | Action::Admin => {}
            _ => {
                let ok = !g.pattern.is_empty()
                    && g.pattern
                        .chars()
                        .all(|c| c == '*' || c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    return Err(BrokerError::malformed(
                        field,
                        format!(
                            "pattern {:?} of {} is not a name with `*` wildcards",
                            g.pattern,
                            action_name(action)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `[!]action [pattern]`, as handoffctl writes grants.
    pub(crate) fn g(text: &str) -> pb::Grant {
        let (deny, text) = match text.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (action, pattern) = text.split_once(' ').unwrap_or((text, ""));
        let action = ACTIONS
            .into_iter()
            .find(|a| action_name(*a) == action)
            .expect("an action");
        pb::Grant {
            action: action as i32,
            pattern: pattern.to_string(),
            deny,
        }
    }

    #[test]
    fn patterns() {
        assert!(matches("worker", "worker"));
        assert!(!matches("worker", "worker-2"));
        assert!(matches("worker-*", "worker-2"));
        assert!(matches("worker-*", "worker-"));
        assert!(!matches("worker-*", "planner"));
        assert!(matches("*", "anything"));
        assert!(matches("*-eu", "team-eu"));
        assert!(!matches("*-eu", "team-us"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXcYYb"));
        assert!(!matches("ab*ba", "aba"), "the ends may not overlap");
    }

    #[test]
    fn deny_wins_and_nothing_is_allowed_by_default() {
        let grants = [
            g("send_as worker-*"),
            g("!send_as worker-secret"),
            g("read"),
        ];
        assert!(allowed(&grants, Action::SendAs, "worker-1"));
        assert!(!allowed(&grants, Action::SendAs, "worker-secret"));
        assert!(!allowed(&grants, Action::SendAs, "planner"));
        assert!(!allowed(&grants, Action::ReceiveAs, "worker-1"));
        assert!(allowed(&grants, Action::Read, ""));
        assert!(!allowed(&grants, Action::Admin, ""));
        assert!(!allowed(&[], Action::Read, ""));
        assert!(!allowed(&[g("read"), g("!read")], Action::Read, ""));
    }

    #[test]
    fn validation() {
        let bad = pb::Principal {
            name: "svc".into(),
            grants: vec![g("send_as a.b")],
        };
        assert_eq!(
            validate(&bad).map_err(|e| e.field().map(str::to_string)),
            Err(Some("principal.grants[0]".to_string()))
        );
        let no_name = pb::Principal {
            name: "a b".into(),
            grants: vec![],
        };
        assert!(validate(&no_name).is_err());
    }
}
