//! Leaf certificates minted per SNI, signed by the enterprise CA, cached and renewed before expiry.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::ca::EnterpriseCa;

/// Minting failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LeafError {
    #[error("minting a leaf for {0:?}: {1}")]
    Mint(String, String),
    #[error("minting task failed: {0}")]
    Task(String),
}

/// Leaf metrics.
#[derive(Clone)]
pub struct LeafMetrics {
    minted: IntCounterVec,
}

impl LeafMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let minted = IntCounterVec::new(
            Opts::new(
                "interceptor_leaf_certificates_minted_total",
                "Leaf certificates minted, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(minted.clone()))?;
        Ok(Self { minted })
    }
}

/// The per-SNI server configurations (leaf + chain), minted on first use.
pub struct LeafCerts {
    ca: Arc<EnterpriseCa>,
    ttl: Duration,
    cache: moka::future::Cache<String, Arc<ServerConfig>>,
    metrics: LeafMetrics,
}

impl LeafCerts {
    /// `ttl` is the leaf lifetime; a cached leaf is replaced once two thirds of it have passed, so a
    /// client never receives a leaf that is about to expire. At most `capacity` SNIs are cached (LRU).
    pub fn new(ca: Arc<EnterpriseCa>, ttl: Duration, capacity: u64, metrics: LeafMetrics) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(ttl * 2 / 3)
            .build();
        Self {
            ca,
            ttl,
            cache,
            metrics,
        }
    }

    /// The server configuration for `sni`. Minting runs on a blocking thread and concurrent requests
    /// for the same SNI share one minting.
    pub async fn server_config(&self, sni: &str) -> Result<Arc<ServerConfig>, Arc<LeafError>> {
        let sni = sni.to_ascii_lowercase();
        let ca = self.ca.clone();
        let ttl = self.ttl;
        let metrics = self.metrics.clone();
        self.cache
            .try_get_with(sni.clone(), async move {
                let result = tokio::task::spawn_blocking(move || mint(&ca, &sni, ttl))
                    .await
                    .map_err(|e| LeafError::Task(e.to_string()))
                    .and_then(|r| r);
                let label = if result.is_ok() { "success" } else { "failure" };
                metrics.minted.with_label_values(&[label]).inc();
                result
            })
            .await
    }
}

fn mint(ca: &EnterpriseCa, sni: &str, ttl: Duration) -> Result<Arc<ServerConfig>, LeafError> {
    let error = |e: &dyn std::fmt::Display| LeafError::Mint(sni.to_owned(), e.to_string());
    let mut params = CertificateParams::new(vec![sni.to_owned()]).map_err(|e| error(&e))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, sni);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::try_from(ttl).map_err(|e| error(&e))?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(|e| error(&e))?;
    let cert = params.signed_by(&key, ca.issuer()).map_err(|e| error(&e))?;
    let mut chain = vec![cert.der().clone()];
    chain.extend(ca.chain.iter().cloned());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(super::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| error(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The provider's suite order (AES-128-GCM first) over the client's.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::crypto::ring::cipher_suite;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

    /// Moves TLS records between the two ends until neither has anything to send.
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) {
        for _ in 0..10 {
            let mut records = Vec::new();
            client.write_tls(&mut records).expect("client writes");
            if !records.is_empty() {
                server.read_tls(&mut records.as_slice()).expect("server reads");
                server.process_new_packets().expect("server accepts");
            }
            let mut replies = Vec::new();
            server.write_tls(&mut replies).expect("server writes");
            if !replies.is_empty() {
                client.read_tls(&mut replies.as_slice()).expect("client reads");
                client.process_new_packets().expect("client accepts");
            }
            if records.is_empty() && replies.is_empty() {
                return;
            }
        }
    }

    #[test]
    fn a_minted_leaf_is_trusted_and_its_suite_order_wins_over_the_clients() {
        let dir = std::env::temp_dir().join(format!("interceptor-leaf-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (files, _) = crate::tls::ca::init(&dir, "Leaf Test CA").expect("init");
        let ca = EnterpriseCa::load(&files.cert, &files.key).expect("load");
        let server_config = mint(&ca, "api.openai.com", Duration::from_secs(3600)).expect("mint");

        let mut roots = RootCertStore::empty();
        for cert in &ca.chain {
            roots.add(cert.clone()).expect("CA certificate");
        }
        // OpenSSL's order: AES-256 first.
        let mut client_provider = rustls::crypto::aws_lc_rs::default_provider();
        client_provider.cipher_suites = vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ];
        let client_config = ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("api.openai.com").expect("name");
        let mut client = ClientConnection::new(Arc::new(client_config), name).expect("client");
        let mut server = ServerConnection::new(server_config).expect("server");
        handshake(&mut client, &mut server);
        assert!(!client.is_handshaking(), "the client trusts the minted leaf");
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
