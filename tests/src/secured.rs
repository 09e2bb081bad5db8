//! A broker with auth on, for the tests of who may do what: its bootstrap
//! admin, principals with grants and clients holding their tokens, a
//! second replica, and the checks those tests share (a refusal's code and
//! reason, delivery ids taken apart and put back together).

use std::{path::PathBuf, time::Duration};

use handoff_client::{pb, AgentConfig, Client, ConnectOptions, Error};
use tonic::Code;

use crate::{Broker, Nats};

/// The bootstrap admin token of a [`Secured`] broker.
pub const BOOTSTRAP: &str = "bootstrap-admin-token-for-the-auth-tests-0001";

/// A broker whose calls must be authenticated, on its own `nats-server`.
pub struct Secured {
    pub nats: Nats,
    pub broker: Broker,
    /// A client holding the bootstrap admin token.
    pub admin: Client,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Secured {
    /// A broker with auth on (`tweak` applied to its config), its
    /// bootstrap admin, and agents `planner` and `worker` (lease `lease`,
    /// 10 attempts).
    pub async fn start(lease: Duration, tweak: impl FnOnce(&mut handoffd::Config)) -> Secured {
        let nats = Nats::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, format!("{BOOTSTRAP}\n")).expect("token file");
        let file = token_file.clone();
        let broker = Broker::start(nats.url(), |c| {
            c.auth_token_file = Some(file);
            tweak(c);
        })
        .await;
        let admin = connect(&broker, Some(BOOTSTRAP)).await;
        for name in ["planner", "worker"] {
            admin
                .register_agent(AgentConfig::new(name).lease(lease).max_attempts(10))
                .await
                .expect("agent");
        }
        Secured {
            nats,
            broker,
            admin,
            token_file,
            _dir: dir,
        }
    }

    /// A second replica on the same NATS, with the same bootstrap token.
    pub async fn replica(&self) -> Broker {
        let file = self.token_file.clone();
        Broker::start(self.nats.url(), |c| c.auth_token_file = Some(file)).await
    }

    /// Sets principal `name`'s grants (through the admin).
    pub async fn put_principal(&self, name: &str, granted: &[(pb::GrantAction, &str, bool)]) {
        self.admin
            .raw()
            .put_principal(pb::PutPrincipalRequest {
                principal: Some(pb::Principal {
                    name: name.into(),
                    grants: grants(granted),
                }),
            })
            .await
            .expect("principal");
    }

    /// A principal with these grants, and a token for it: the bearer
    /// secret and the token as stored.
    pub async fn principal_token(
        &self,
        name: &str,
        granted: &[(pb::GrantAction, &str, bool)],
    ) -> (String, pb::ApiToken) {
        self.put_principal(name, granted).await;
        let created = self
            .admin
            .raw()
            .create_token(pb::CreateTokenRequest {
                principal: name.into(),
                description: format!("{name} in a test"),
            })
            .await
            .expect("token")
            .into_inner();
        (created.secret, created.token.expect("token"))
    }

    /// A principal with these grants, and a client of this broker holding
    /// a token for it.
    pub async fn principal(
        &self,
        name: &str,
        granted: &[(pb::GrantAction, &str, bool)],
    ) -> (Client, pb::ApiToken) {
        let (secret, token) = self.principal_token(name, granted).await;
        (connect(&self.broker, Some(&secret)).await, token)
    }
}

/// A client of `broker`, with a bearer token or none.
pub async fn connect(broker: &Broker, token: Option<&str>) -> Client {
    let mut opts = ConnectOptions::new();
    if let Some(t) = token {
        opts = opts.token(t);
    }
    opts.connect(format!("http://{}", broker.addr))
        .await
        .expect("connect")
}

/// Grants from `(action, pattern, deny)`.
pub fn grants(grants: &[(pb::GrantAction, &str, bool)]) -> Vec<pb::Grant> {
    grants
        .iter()
        .map(|(action, pattern, deny)| pb::Grant {
            action: *action as i32,
            pattern: pattern.to_string(),
            deny: *deny,
        })
        .collect()
}

/// Asserts that `r` was refused with `code` and `reason`; the error.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(r: Result<T, Error>, code: Code, reason: &str) -> Error {
    let err = r.expect_err(reason);
    assert_eq!(err.code(), Some(code), "{reason}: {err}");
    assert_eq!(err.reason(), Some(reason), "{err}");
    err
}

/// The events of `kind` in a timeline.
pub fn count(timeline: &[pb::Event], kind: pb::EventKind) -> usize {
    timeline.iter().filter(|e| e.kind == kind as i32).count()
}

/// The bytes of a delivery id.
pub fn id_bytes(id: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id)
        .expect("base64")
}

/// A delivery id of these bytes.
pub fn id_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The token a delivery id encodes.
pub fn decode_token(id: &str) -> pb::DeliveryToken {
    use prost::Message as _;
    pb::DeliveryToken::decode(id_bytes(id).as_slice()).expect("token")
}

/// The delivery id of a token.
pub fn encode_token(token: &pb::DeliveryToken) -> String {
    use prost::Message as _;
    id_of(&token.encode_to_vec())
}
