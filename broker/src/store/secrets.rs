//! Secrets: delivery-token signing keys, principals and API tokens.

use super::*;

/// Secrets: delivery-token signing keys, principals and API tokens.
#[async_trait::async_trait]
pub trait Secrets: Send + Sync {
    /// The keys that sign delivery tokens, and their revision.
    async fn signing_keys(&self) -> Result<Option<(pb::SigningKeys, u64)>>;

    /// Writes the signing keys: creates them when `revision` is `None`,
    /// else compare-and-set; `false` when another writer came first.
    async fn put_signing_keys(&self, keys: &pb::SigningKeys, revision: Option<u64>)
        -> Result<bool>;

    /// A principal and its grants.
    async fn principal(&self, name: &str) -> Result<Option<pb::Principal>>;

    /// Stores a principal; returns whether it existed before.
    async fn put_principal(&self, principal: &pb::Principal) -> Result<bool>;

    /// Every principal, by name.
    async fn principals(&self) -> Result<Vec<pb::Principal>>;

    /// An API token (with its secret's digest) and its revision.
    async fn token(&self, id: &str) -> Result<Option<(pb::ApiToken, u64)>>;

    /// Writes an API token: creates it when `revision` is `None`, else
    /// compare-and-set; `false` when another writer came first.
    async fn put_token(&self, token: &pb::ApiToken, revision: Option<u64>) -> Result<bool>;

    /// Every API token, oldest first.
    async fn tokens(&self) -> Result<Vec<pb::ApiToken>>;
}
