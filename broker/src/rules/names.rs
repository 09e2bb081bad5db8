//! Validation of the names that become NATS subject tokens.
//!
//! Agent names, run ids, owners, instances, barrier ids and branch keys are
//! `[A-Za-z0-9_-]{1,128}` (idempotency keys are not names: any characters,
//! at most 256 bytes, hashed into an id). Anything else (a `.`, `*`, `>`, whitespace, an
//! empty or over-long name) would change the meaning of a subject, so it is
//! refused before any work is done.

use crate::error::BrokerError;

/// Longest name accepted, in bytes (all accepted characters are ASCII).
pub const MAX_NAME_LEN: usize = 128;

/// Why `value` is not a valid name (`[A-Za-z0-9_-]{1,128}`), if it is not.
pub fn problem(value: &str) -> Option<String> {
    if value.is_empty() {
        Some("is empty".to_string())
    } else if value.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} characters long; the limit is {MAX_NAME_LEN}",
            value.chars().count()
        ))
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
            .map(|c| format!("contains {c:?}; allowed are A-Z a-z 0-9 _ -"))
    }
}

/// Checks `value` as the name of `field`; the error names both.
pub fn validate(field: &'static str, value: &str) -> Result<(), BrokerError> {
    match problem(value) {
        None => Ok(()),
        Some(reason) => Err(BrokerError::InvalidName {
            field,
            value: shorten(value),
            reason,
        }),
    }
}

/// Like [`validate`], but an empty value is allowed (an optional name).
pub fn validate_optional(field: &'static str, value: &str) -> Result<(), BrokerError> {
    if value.is_empty() {
        Ok(())
    } else {
        validate(field, value)
    }
}

fn shorten(value: &str) -> String {
    if value.chars().count() <= 40 {
        value.to_string()
    } else {
        let head: String = value.chars().take(40).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tokens() {
        for ok in ["a", "planner", "run-1_B", &"x".repeat(128)] {
            assert!(validate("agent", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_subject_syntax_and_sizes() {
        for bad in ["", "a.b", "a*", ">", "a b", "tab\t", "é", &"x".repeat(129)] {
            let err = validate("agent", bad).expect_err(bad);
            assert_eq!(err.reason(), crate::error::Reason::InvalidName, "{bad}");
        }
        assert!(validate_optional("agent", "").is_ok());
    }
}
