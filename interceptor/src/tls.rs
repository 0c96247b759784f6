//! TLS: the enterprise CA, per-SNI leaf certificates, and the verified upstream client.

pub mod ca;
pub mod leaf;
pub mod upstream;
pub mod upstream_h1;

use std::sync::Arc;

use rustls::crypto::aws_lc_rs::cipher_suite;

/// The crypto provider used everywhere: aws-lc-rs (rustls' default; its X25519 key exchange, done
/// on every handshake including resumed ones, took about half of ring's CPU time in `bench proxy`
/// with a new connection per request), with AES-128-GCM/SHA-256 preferred in TLS 1.3: as secure for
/// this use, and cheaper per handshake and per record than AES-256-GCM/SHA-384 (SHA-256
/// has CPU instructions on current x86 and ARM servers, SHA-384 often runs in plain code). The leaf
/// configurations apply this order over the client's.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let preferred = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let rest: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|suite| !preferred.iter().any(|p| p.suite() == suite.suite()))
        .copied()
        .collect();
    provider.cipher_suites = preferred.into_iter().chain(rest).collect();
    Arc::new(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_suite_stays_and_aes_128_comes_first() {
        let ours = crypto_provider();
        let default = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(ours.cipher_suites.len(), default.cipher_suites.len());
        for suite in &default.cipher_suites {
            assert!(ours.cipher_suites.iter().any(|s| s.suite() == suite.suite()));
        }
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
