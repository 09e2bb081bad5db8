//! What a call presents to prove who makes it: the bearer token of its
//! `authorization` metadata, and the principal its client certificate
//! names.

use tonic::Request;

use crate::{app::auth::Credentials, tls::principal_of_certificate};

/// The credentials of a request.
pub fn of<T>(req: &Request<T>) -> Credentials {
    let bearer = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .filter(|t| !t.is_empty());
    // The leaf of a client certificate the TLS handshake verified
    // against `tls_client_ca`.
    let certificate = req.peer_certs().and_then(|chain| {
        chain
            .first()
            .and_then(|leaf| principal_of_certificate(leaf))
    });
    Credentials {
        bearer,
        certificate,
        peer: req.remote_addr().map(|a| a.ip()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let mut req = Request::new(());
        assert!(of(&req).bearer.is_none());
        req.metadata_mut()
            .insert("authorization", "Bearer hot_a_b".parse().expect("value"));
        assert_eq!(of(&req).bearer.as_deref(), Some("hot_a_b"));
        req.metadata_mut()
            .insert("authorization", "Basic abc".parse().expect("value"));
        assert!(of(&req).bearer.is_none());
    }
}
