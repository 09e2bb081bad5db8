//! Signal 1: payload fields dropped on an edge. A field is dropped when the
//! consumed payload has a value in it and the outgoing payload's type has a
//! top-level field of the same name that is left empty: the order id agent
//! A fetched and B never passed on.

use prost_reflect::{DynamicMessage, MessageDescriptor};

/// The dropped fields between a consumed payload and an outgoing one, by
/// name, sorted. Payloads that do not decode drop nothing (the guards
/// refuse an outgoing one that does not decode before this runs).
pub fn dropped_fields(
    consumed: &MessageDescriptor,
    consumed_bytes: &[u8],
    outgoing: &MessageDescriptor,
    outgoing_bytes: &[u8],
) -> Vec<String> {
    let (Ok(before), Ok(after)) = (
        DynamicMessage::decode(consumed.clone(), consumed_bytes),
        DynamicMessage::decode(outgoing.clone(), outgoing_bytes),
    ) else {
        return Vec::new();
    };
    let mut dropped: Vec<String> = outgoing
        .fields()
        .filter(|f| !after.has_field(f))
        .filter(|f| {
            consumed
                .get_field_by_name(f.name())
                .is_some_and(|c| before.has_field(&c))
        })
        .map(|f| f.name().to_string())
        .collect();
    dropped.sort();
    dropped
}

/// Checks a contract's `carry` fields: each must be a top-level field of
/// the message. One line per bad name.
pub fn check_carry(message: &MessageDescriptor, carry: &[String]) -> Result<(), Vec<String>> {
    let bad: Vec<String> = carry
        .iter()
        .filter(|name| message.get_field_by_name(name).is_none())
        .map(|name| {
            format!(
                "carry field {name:?}: {} has no top-level field of that name",
                message.full_name()
            )
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;

    fn pool() -> DescriptorPool {
        crate::rules::contracts::testing::pool(
            r#"syntax = "proto3"; package t;
               message A { string order_id = 1; string query = 2; int32 n = 3; }
               message B { string order_id = 1; string summary = 2; int32 n = 3; }"#,
        )
    }

    fn encode(pool: &DescriptorPool, ty: &str, fields: &[(&str, prost_reflect::Value)]) -> Vec<u8> {
        let desc = pool.get_message_by_name(ty).expect("type");
        let mut m = DynamicMessage::new(desc);
        for (name, v) in fields {
            m.set_field_by_name(name, v.clone());
        }
        prost::Message::encode_to_vec(&m)
    }

    #[test]
    fn a_field_with_a_value_before_and_empty_after_is_dropped() {
        use prost_reflect::Value as V;
        let pool = pool();
        let a = pool.get_message_by_name("t.A").expect("A");
        let b = pool.get_message_by_name("t.B").expect("B");
        let before = encode(
            &pool,
            "t.A",
            &[("order_id", V::String("A-1".into())), ("n", V::I32(2))],
        );
        let after = encode(
            &pool,
            "t.B",
            &[("summary", V::String("s".into())), ("n", V::I32(2))],
        );
        assert_eq!(
            dropped_fields(&a, &before, &b, &after),
            vec!["order_id".to_string()]
        );
        let kept = encode(
            &pool,
            "t.B",
            &[("order_id", V::String("A-1".into())), ("n", V::I32(2))],
        );
        assert!(dropped_fields(&a, &before, &b, &kept).is_empty());
        assert!(check_carry(&b, &["order_id".to_string()]).is_ok());
        assert!(check_carry(&b, &["nope".to_string()]).is_err());
    }
}
