//! TLS to clients, the files it reads, and who a client certificate names.
//!
//! With `tls_cert` and `tls_key` the broker serves gRPC over TLS only
//! (rustls, through tonic). With `tls_client_ca` too, it asks every client
//! for a certificate and accepts those issued by that CA; the certificate
//! stays optional, so a client without one can still connect and present a
//! bearer token. A certificate from any other CA fails the handshake.
//!
//! # The principal of a client certificate
//!
//! [`principal_of_certificate`] names the principal a verified client
//! certificate speaks for:
//!
//! 1. the first URI subject alternative name of the form
//!    `handoff://principal/<name>` (`<name>` non-empty, without `/`, `?` or
//!    `#`), if the certificate has one;
//! 2. else the first Common Name (CN) of its subject;
//! 3. else none: the certificate authenticates no one.
//!
//! So a CA can issue certificates for principals whose names are not host
//! names (URI SAN), and a plain certificate with `CN=planner` works too.
//!
//! Every file is read at start; a missing or malformed one is reported with
//! the configuration key that names it (see [`check_files`], which the
//! command line runs with the other configuration checks).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::extensions::GeneralName;

use crate::config::{Config, TlsFiles};

/// The URI SAN prefix that names a principal in a client certificate.
pub const PRINCIPAL_URI_PREFIX: &str = "handoff://principal/";

/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A file named by the configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} {}: {reason}", .path.display())]
pub struct FileError {
    /// The configuration key that names the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl FileError {
    fn new(key: &'static str, path: &Path, reason: impl Into<String>) -> FileError {
        FileError {
            key,
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Reads a file named by configuration key `key`.
pub fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| FileError::new(key, path, e.to_string()))
}

/// Reads a secret (password, token, seed): the file's text without
/// surrounding whitespace, which must not be empty.
pub fn read_secret(key: &'static str, path: &Path) -> Result<String, FileError> {
    let bytes = read_file(key, path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| FileError::new(key, path, "is not UTF-8 text"))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(FileError::new(key, path, "is empty"));
    }
    Ok(secret.to_string())
}

/// Reads a PEM file holding one or more certificates.
pub fn read_certificates(key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    let pem = read_file(key, path)?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| FileError::new(key, path, format!("bad PEM: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(FileError::new(
            key,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(pem)
}

/// Reads a PEM file holding a private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| FileError::new(key, path, format!("holds no usable PEM private key ({e})")))?;
    Ok(pem)
}

/// Reads a certificate chain and its key.
fn read_identity(
    files: &TlsFiles,
    cert_key: &'static str,
    key_key: &'static str,
) -> Result<Identity, FileError> {
    let cert = read_certificates(cert_key, &files.cert)?;
    let key = read_private_key(key_key, &files.key)?;
    Ok(Identity::from_pem(cert, key))
}

/// The TLS settings of the gRPC server, or `None` to serve plaintext.
pub fn server_config(config: &Config) -> Result<Option<ServerTlsConfig>, FileError> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new()
        .identity(read_identity(files, "tls_cert", "tls_key")?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls
            .client_ca_root(Certificate::from_pem(read_certificates(
                "tls_client_ca",
                ca,
            )?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// The console's TLS settings: the gRPC listener's certificate and key
/// (`tls_cert`, `tls_key`), HTTP/1.1; `None` to serve
/// plain HTTP. The console signs in with API tokens, so it asks for no
/// client certificate.
pub fn console_config(
    config: &Config,
) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>, FileError> {
    use tokio_rustls::rustls;
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    let chain = read_certificates("tls_cert", &files.cert)?;
    let key = read_private_key("tls_key", &files.key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            FileError::new(
                "tls_cert",
                &files.cert,
                format!("holds no usable PEM certificate ({e})"),
            )
        })?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        FileError::new(
            "tls_key",
            &files.key,
            format!("holds no usable PEM private key ({e})"),
        )
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FileError::new("tls_cert", &files.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            FileError::new(
                "tls_cert",
                &files.cert,
                format!("does not go with tls_key ({e})"),
            )
        })?;
    // HTTP/1.1 only: its requests carry `Host`, which the console's
    // same-origin check compares `Origin` with.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(std::sync::Arc::new(server)))
}

/// Time a console client has to finish the TLS handshake.
pub const CONSOLE_HANDSHAKE_TIMEOUT: Duration = HANDSHAKE_TIMEOUT;

/// Checks every file the configuration names (TLS, NATS credentials, the
/// bootstrap token) can be read and parsed, and returns every problem.
pub fn check_files(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |r: Result<(), FileError>| {
        if let Err(e) = r {
            problems.push(e.to_string());
        }
    };
    if let Some(files) = &config.tls {
        note(read_certificates("tls_cert", &files.cert).map(drop));
        note(read_private_key("tls_key", &files.key).map(drop));
    }
    if let Some(ca) = &config.tls_client_ca {
        note(read_certificates("tls_client_ca", ca).map(drop));
    }
    if let Some(path) = &config.auth_token_file {
        note(read_secret("auth_token_file", path).map(drop));
    }
    let nats = &config.nats_auth;
    let secrets = [
        ("nats_password_file", &nats.password_file),
        ("nats_token_file", &nats.token_file),
        ("nats_nkey_seed_file", &nats.nkey_seed_file),
        ("nats_creds_file", &nats.creds_file),
    ];
    for (key, path) in secrets {
        if let Some(path) = path {
            note(read_secret(key, path).map(drop));
        }
    }
    if let Some(ca) = &nats.tls_ca {
        note(read_certificates("nats_tls_ca", ca).map(drop));
    }
    if let Some(files) = &nats.tls_client {
        note(read_certificates("nats_tls_cert", &files.cert).map(drop));
        note(read_private_key("nats_tls_key", &files.key).map(drop));
    }
    problems
}

/// The principal a client certificate (DER) names: its first URI SAN
/// `handoff://principal/<name>`, else its subject's Common Name; `None`
/// if it has neither or does not parse. See the module documentation.
///
/// It does not verify the certificate: call it on certificates the TLS
/// handshake verified (`request.peer_certs()`).
pub fn principal_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let from_uri = san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri
                .strip_prefix(PRINCIPAL_URI_PREFIX)
                .filter(|n| !n.is_empty() && !n.contains(['/', '?', '#'])),
            _ => None,
        });
        if let Some(name) = from_uri {
            return Some(name.to_string());
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(str::to_string);
    common_name
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn the_common_name_names_the_principal() {
        let der = cert(Some("planner"), vec![]);
        assert_eq!(principal_of_certificate(&der).as_deref(), Some("planner"));
    }

    #[test]
    fn a_principal_uri_san_wins_over_the_common_name() {
        let der = cert(
            Some("planner.example.org"),
            vec![
                SanType::DnsName("planner.example.org".try_into().expect("ia5")),
                uri("spiffe://example.org/planner"),
                uri("handoff://principal/planner-7"),
                uri("handoff://principal/second"),
            ],
        );
        assert_eq!(principal_of_certificate(&der).as_deref(), Some("planner-7"));
    }

    #[test]
    fn malformed_principal_uris_fall_back_to_the_common_name() {
        let der = cert(
            Some("worker"),
            vec![
                uri("handoff://principal/"),
                uri("handoff://principal/a/b"),
                uri("handoff://other/x"),
            ],
        );
        assert_eq!(principal_of_certificate(&der).as_deref(), Some("worker"));
    }

    #[test]
    fn no_name_no_principal() {
        assert_eq!(principal_of_certificate(&cert(None, vec![])), None);
        assert_eq!(principal_of_certificate(b"not a certificate"), None);
    }

    #[test]
    fn files_are_reported_with_their_key() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let e = read_certificates("tls_cert", &missing).expect_err("missing");
        assert_eq!(e.key, "tls_cert");
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "hello").expect("write");
        assert_eq!(
            read_private_key("tls_key", &text).expect_err("no key").key,
            "tls_key"
        );
        assert_eq!(
            read_certificates("tls_client_ca", &text)
                .expect_err("no cert")
                .key,
            "tls_client_ca"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        assert!(read_secret("nats_password_file", &empty).is_err());
        std::fs::write(&empty, "s3cret\n").expect("write");
        assert_eq!(
            read_secret("nats_password_file", &empty).expect("secret"),
            "s3cret"
        );
    }
}
