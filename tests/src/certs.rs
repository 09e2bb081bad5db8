//! Certificates for TLS tests, generated with rcgen: a certificate
//! authority that issues server, host and client certificates.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
pub use rcgen::{ExtendedKeyUsagePurpose, SanType};

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, as PEM.
    pub pem: String,
}

/// A certificate and its key, as PEM, and the certificate as DER.
pub struct Leaf {
    /// The certificate, as PEM.
    pub cert: String,
    /// Its private key, as PEM.
    pub key: String,
    /// The certificate, as DER.
    pub der: Vec<u8>,
}

impl Ca {
    /// A new self-signed authority named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate with common name `cn`, these SANs and these extended
    /// key usages.
    pub fn issue(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A certificate for host `name`, also valid for 127.0.0.1 (where the
    /// test reaches it).
    pub fn host(&self, name: &str, usages: Vec<ExtendedKeyUsagePurpose>) -> Leaf {
        self.issue(
            name,
            vec![
                SanType::DnsName(name.try_into().expect("DNS name")),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            usages,
        )
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.host("localhost", vec![ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A client certificate naming `principal` by URI SAN (and something
    /// else by its common name).
    pub fn client(&self, principal: &str) -> Leaf {
        self.issue(
            "someone-else",
            vec![SanType::URI(
                format!("handoff://principal/{principal}")
                    .as_str()
                    .try_into()
                    .expect("URI"),
            )],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }
}
