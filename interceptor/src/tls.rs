//! TLS: the enterprise CA, per-SNI leaf certificates, and the verified upstream client.

pub mod ca;
pub mod leaf;
pub mod upstream;
pub mod upstream_h1;

use std::sync::Arc;

/// The crypto provider used everywhere (ring).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
