//! TLS: the enterprise CA, per-SNI leaf certificates, and the verified upstream client.

pub mod ca;
pub mod leaf;
pub mod upstream;
pub mod upstream_h1;

use std::sync::Arc;

use rustls::crypto::ring::cipher_suite;

/// The crypto provider used everywhere, assembled from two libraries by what each does fastest in
/// `bench proxy`: aws-lc-rs (rustls' default) for key exchange, signing and verification: its
/// X25519, done on every handshake including resumed ones, took about half of ring's CPU time with a
/// new connection per request; ring for the cipher suites (record encryption and the TLS 1.3 key
/// schedule's HKDF): aws-lc-rs' took about 1 µs more per keep-alive request. AES-128-GCM/SHA-256 is
/// preferred in TLS 1.3: as secure for this use, and cheaper per handshake and per record than
/// AES-256-GCM/SHA-384 (SHA-256 has CPU instructions on current x86 and ARM servers, SHA-384 often
/// runs in plain code). The leaf configurations apply this order over the client's.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::CryptoProvider {
        cipher_suites: rustls::crypto::ring::default_provider().cipher_suites,
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
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

/// Makes `crypto_provider` the process-wide default, for libraries that build TLS configurations
/// without naming one (the Kubernetes client): with two crypto libraries linked, rustls has no
/// default of its own. Idempotent.
pub fn install_default_provider() {
    // An error means a default is already installed (this one, from an earlier call).
    let _ = rustls::crypto::CryptoProvider::install_default((*crypto_provider()).clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_suite_stays_and_aes_128_comes_first() {
        let ours = crypto_provider();
        let default = rustls::crypto::ring::default_provider();
        assert_eq!(ours.cipher_suites.len(), default.cipher_suites.len());
        for suite in &default.cipher_suites {
            assert!(ours.cipher_suites.iter().any(|s| s.suite() == suite.suite()));
        }
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    #[test]
    fn key_exchange_comes_from_aws_lc_and_the_process_default_is_ours() {
        let ours = crypto_provider();
        let names = |groups: &[&'static dyn rustls::crypto::SupportedKxGroup]| {
            groups.iter().map(|g| g.name()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&ours.kx_groups),
            names(&rustls::crypto::aws_lc_rs::default_provider().kx_groups)
        );
        install_default_provider();
        install_default_provider();
        let installed = rustls::crypto::CryptoProvider::get_default().expect("a process default");
        let suites = |provider: &rustls::crypto::CryptoProvider| {
            provider
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(suites(installed), suites(&ours));
    }
}
