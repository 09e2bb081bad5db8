//! Secrets on Memory.

use super::*;
use crate::store::Secrets;

#[async_trait::async_trait]
impl Secrets for Memory {
    async fn signing_keys(&self) -> Result<Option<(pb::SigningKeys, u64)>> {
        Ok(self.state()?.keys.clone())
    }

    async fn put_signing_keys(
        &self,
        keys: &pb::SigningKeys,
        revision: Option<u64>,
    ) -> Result<bool> {
        let mut s = self.state()?;
        if s.keys.as_ref().map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.keys = Some((keys.clone(), rev));
        Ok(true)
    }

    async fn principal(&self, name: &str) -> Result<Option<pb::Principal>> {
        Ok(self.state()?.principals.get(name).cloned())
    }

    async fn put_principal(&self, principal: &pb::Principal) -> Result<bool> {
        Ok(self
            .state()?
            .principals
            .insert(principal.name.clone(), principal.clone())
            .is_some())
    }

    async fn principals(&self) -> Result<Vec<pb::Principal>> {
        Ok(self.state()?.principals.values().cloned().collect())
    }

    async fn token(&self, id: &str) -> Result<Option<(pb::ApiToken, u64)>> {
        Ok(self.state()?.tokens.get(id).cloned())
    }

    async fn put_token(&self, token: &pb::ApiToken, revision: Option<u64>) -> Result<bool> {
        let mut s = self.state()?;
        if s.tokens.get(&token.id).map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.tokens.insert(token.id.clone(), (token.clone(), rev));
        Ok(true)
    }

    async fn tokens(&self) -> Result<Vec<pb::ApiToken>> {
        Ok(self
            .state()?
            .tokens
            .values()
            .map(|(t, _)| t.clone())
            .collect())
    }
}
