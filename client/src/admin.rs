//! Administration of a broker whose calls are authenticated: principals
//! and their grants, API tokens, the key that signs delivery leases. Every
//! call here needs the `admin` grant.

use handoff_proto::pb;

use crate::{
    client::Client,
    error::{Error, ErrorKind, Result},
};

/// Parses a grant as `handoffctl` writes it: `[!]action [pattern]`, for
/// example `send_as worker-*`, `receive_as worker`, `own team-a`, `read`,
/// `admin`, or `!send_as secret` (a deny, which wins over every allow).
///
/// ```
/// let g = handoff_client::parse_grant("!send_as worker-*").unwrap();
/// assert!(g.deny);
/// assert_eq!(g.pattern, "worker-*");
/// ```
pub fn parse_grant(text: &str) -> Result<pb::Grant> {
    let text = text.trim();
    let (deny, text) = match text.strip_prefix('!') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, text),
    };
    let mut words = text.split_whitespace();
    let action = match words.next() {
        Some("send_as") => pb::GrantAction::SendAs,
        Some("receive_as") => pb::GrantAction::ReceiveAs,
        Some("own") => pb::GrantAction::Own,
        Some("read") => pb::GrantAction::Read,
        Some("admin") => pb::GrantAction::Admin,
        other => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{:?} is not an action (send_as, receive_as, own, read, admin)",
                    other.unwrap_or("")
                ),
            ))
        }
    };
    let pattern = words.next().unwrap_or("").to_string();
    if words.next().is_some() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{text:?}: one pattern per grant"),
        ));
    }
    Ok(pb::Grant {
        action: action as i32,
        pattern,
        deny,
    })
}

/// A new API token: as stored (without its secret), and the bearer token
/// to hand to its client, shown this once.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The token as the broker keeps it.
    pub token: pb::ApiToken,
    /// The bearer token (`hot_<id>_<secret>`): never stored, never shown
    /// again.
    pub secret: String,
}

impl Client {
    /// Stores a principal (a person or service) and its grants, replacing
    /// any it had. Returns whether it existed.
    pub async fn put_principal(&self, name: &str, grants: Vec<pb::Grant>) -> Result<bool> {
        let principal = pb::Principal {
            name: name.to_string(),
            grants,
        };
        Ok(self
            .raw()
            .put_principal(self.request(pb::PutPrincipalRequest {
                principal: Some(principal),
            }))
            .await?
            .into_inner()
            .updated)
    }

    /// Every principal with its grants.
    pub async fn list_principals(&self) -> Result<Vec<pb::Principal>> {
        Ok(self
            .raw()
            .list_principals(self.request(pb::ListPrincipalsRequest {}))
            .await?
            .into_inner()
            .principals)
    }

    /// Issues an API token for an existing principal.
    pub async fn create_token(&self, principal: &str, description: &str) -> Result<NewToken> {
        let created = self
            .raw()
            .create_token(self.request(pb::CreateTokenRequest {
                principal: principal.to_string(),
                description: description.to_string(),
            }))
            .await?
            .into_inner();
        let token = created
            .token
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered no token"))?;
        Ok(NewToken {
            token,
            secret: created.secret,
        })
    }

    /// Every API token (without secrets), oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<pb::ApiToken>> {
        Ok(self
            .raw()
            .list_tokens(self.request(pb::ListTokensRequest {}))
            .await?
            .into_inner()
            .tokens)
    }

    /// Revokes an API token: it authenticates nobody from now on.
    pub async fn revoke_token(&self, id: &str) -> Result<pb::ApiToken> {
        self.raw()
            .revoke_token(self.request(pb::RevokeTokenRequest { id: id.to_string() }))
            .await?
            .into_inner()
            .token
            .ok_or_else(|| Error::new(ErrorKind::Other, "the broker answered no token"))
    }

    /// Adds a new key to sign delivery leases with; deliveries signed with
    /// the previous ones stay valid. Returns the new key's id.
    pub async fn rotate_signing_key(&self) -> Result<String> {
        Ok(self
            .raw()
            .rotate_signing_key(self.request(pb::RotateSigningKeyRequest {}))
            .await?
            .into_inner()
            .key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse() {
        let g = parse_grant("send_as worker-*").expect("grant");
        assert_eq!(g.action, pb::GrantAction::SendAs as i32);
        assert!(!g.deny);
        assert!(parse_grant("! own acme").expect("deny").deny);
        assert_eq!(
            parse_grant("read").expect("read").action,
            pb::GrantAction::Read as i32
        );
        for bad in ["fly away", "own a b", ""] {
            assert_eq!(
                parse_grant(bad).map_err(|e| e.kind()).err(),
                Some(ErrorKind::InvalidArgument),
                "{bad}"
            );
        }
    }
}
