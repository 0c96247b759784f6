//! A test "public" CA, standing in for the web PKI that signs real providers' certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and its PEM file on disk.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the CA certificate (give it to clients as their trust anchor).
    pub cert_pem: String,
    pub pem_path: PathBuf,
}

/// A server certificate chain and key, ready for rustls.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The same certificate and key as PEM (for servers configured by files, e.g. nginx).
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// Creates a CA named `name` and writes its certificate to `dir/<file>`.
    pub fn new(name: &str, dir: &Path, file: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Interceptor test PKI");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let cert_pem = cert.pem();
        let pem_path = dir.join(file);
        std::fs::write(&pem_path, &cert_pem).with_context(|| format!("writing {}", pem_path.display()))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            pem_path,
        })
    }

    /// Issues a server certificate for `names`.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<ServerCert> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = CertificateParams::new(names).context("certificate parameters")?;
        let key = KeyPair::generate().context("generating a server key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a server certificate")?;
        Ok(ServerCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A rustls server configuration presenting `cert` (HTTP/2 and HTTP/1.1).
pub fn server_config(cert: ServerCert) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)
        .context("server certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
