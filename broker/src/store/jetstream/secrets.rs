//! Secrets on JetStream.

use super::*;
use crate::store::Secrets;

#[async_trait::async_trait]
impl Secrets for JetStream {
    async fn signing_keys(&self) -> Result<Option<(pb::SigningKeys, u64)>> {
        read(&self.keys, "delivery").await
    }

    async fn put_signing_keys(
        &self,
        keys: &pb::SigningKeys,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.write(
            &self.keys,
            "delivery",
            keys.encode_to_vec().into(),
            revision,
        )
        .await
    }

    async fn principal(&self, name: &str) -> Result<Option<pb::Principal>> {
        Ok(read(&self.principals, name).await?.map(|(p, _)| p))
    }

    async fn put_principal(&self, principal: &pb::Principal) -> Result<bool> {
        let existed = self.principal(&principal.name).await?.is_some();
        self.principals
            .put(&principal.name, principal.encode_to_vec().into())
            .await
            .map_err(|e| BrokerError::nats("storing the principal", e))?;
        Ok(existed)
    }

    async fn principals(&self) -> Result<Vec<pb::Principal>> {
        let mut out: Vec<pb::Principal> = Self::all(&self.principals).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn token(&self, id: &str) -> Result<Option<(pb::ApiToken, u64)>> {
        read(&self.tokens, id).await
    }

    async fn put_token(&self, token: &pb::ApiToken, revision: Option<u64>) -> Result<bool> {
        self.write(
            &self.tokens,
            &token.id,
            token.encode_to_vec().into(),
            revision,
        )
        .await
    }

    async fn tokens(&self) -> Result<Vec<pb::ApiToken>> {
        let mut out: Vec<pb::ApiToken> = Self::all(&self.tokens).await?;
        out.sort_by(|a, b| {
            a.created_at
                .map(|t| (t.seconds, t.nanos))
                .cmp(&b.created_at.map(|t| (t.seconds, t.nanos)))
        });
        Ok(out)
    }
}
