//! The enterprise CA that signs the leaf certificates presented to intercepted clients.
//!
//! Loaded from PEM files as a Kubernetes Secret mounts them: the certificate file holds the issuing CA
//! first, optionally followed by its chain (intermediate CA → root); the key file holds the issuing
//! CA's PKCS#8 private key and must not be readable by other users.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error(
        "CA key {0} is readable by other users (mode {1:o}); restrict it (chmod 600, or defaultMode 0400 on the \
         Secret volume)"
    )]
    KeyPermissions(PathBuf, u32),
    #[error("CA certificate {0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    #[error("CA certificate {0}: {1}")]
    BadCertificate(PathBuf, String),
    #[error("CA key {0}: {1} (a PKCS#8 PEM key is expected)")]
    BadKey(PathBuf, String),
    #[error("generating the CA: {0}")]
    Generate(String),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// A loaded CA, ready to sign leaves.
pub struct EnterpriseCa {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA certificate followed by its chain, as sent after each leaf.
    pub chain: Vec<CertificateDer<'static>>,
    /// Subject of the issuing CA, for logs.
    pub subject: String,
    /// Earliest `notAfter` of the issuing CA and its chain (Unix seconds): leaves stop being trusted then.
    pub not_after: i64,
}

impl std::fmt::Debug for EnterpriseCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnterpriseCa")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl EnterpriseCa {
    /// Loads the CA from its certificate (and chain) file and key file.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let mode = std::fs::metadata(key_path)
            .map_err(|e| CaError::Read(key_path.to_owned(), e))?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(CaError::KeyPermissions(key_path.to_owned(), mode & 0o777));
        }
        let cert_pem =
            std::fs::read_to_string(cert_path).map_err(|e| CaError::Read(cert_path.to_owned(), e))?;
        let key_pem = std::fs::read_to_string(key_path).map_err(|e| CaError::Read(key_path.to_owned(), e))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::BadCertificate(cert_path.to_owned(), e.to_string()))?;
        let issuing = chain
            .first()
            .ok_or_else(|| CaError::NoCertificate(cert_path.to_owned()))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey(key_path.to_owned(), e.to_string()))?;
        let subject = subject_of(issuing).unwrap_or_else(|| "<unknown>".into());
        let not_after = chain
            .iter()
            .map(|cert| {
                x509_parser::parse_x509_certificate(cert)
                    .map(|(_, parsed)| parsed.validity().not_after.timestamp())
                    .map_err(|e| CaError::BadCertificate(cert_path.to_owned(), e.to_string()))
            })
            .try_fold(i64::MAX, |earliest, expiry| expiry.map(|e| earliest.min(e)))?;
        let issuer = Issuer::from_ca_cert_der(issuing, key)
            .map_err(|e| CaError::BadCertificate(cert_path.to_owned(), e.to_string()))?;
        Ok(Self {
            issuer,
            chain,
            subject,
            not_after,
        })
    }

    /// The signer for leaf certificates.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.subject().to_string())
}

/// Paths of a CA written by [`init`].
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where [`init`] keeps the CA in `dir`.
pub fn files_in(dir: &Path) -> CaFiles {
    CaFiles {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
    }
}

/// Creates a development CA (`ca.crt`, `ca.key` with mode 0600) in `dir`, or reuses one already there.
pub fn init(dir: &Path, common_name: &str) -> Result<(CaFiles, bool), CaError> {
    let files = files_in(dir);
    if files.cert.exists() && files.key.exists() {
        return Ok((files, false));
    }
    std::fs::create_dir_all(dir).map_err(|e| CaError::Write(dir.to_owned(), e))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "interceptor development CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let key = KeyPair::generate().map_err(|e| CaError::Generate(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, cert.pem()).map_err(|e| CaError::Write(files.cert.clone(), e))?;
    Ok((files, true))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CaError::Write(path.to_owned(), e))?;
    file.write_all(contents)
        .map_err(|e| CaError::Write(path.to_owned(), e))
}

/// How to make clients trust the CA, printed by `interceptor ca init`.
pub fn trust_instructions(cert: &Path) -> String {
    let cert = cert.display();
    format!(
        "Make clients trust this CA:\n\
         \x20 Debian/Ubuntu system store: cp {cert} /usr/local/share/ca-certificates/interceptor.crt && update-ca-certificates\n\
         \x20 Python (requests/httpx, openai, anthropic SDKs): SSL_CERT_FILE={cert} or REQUESTS_CA_BUNDLE={cert}\n\
         \x20 Node.js: NODE_EXTRA_CA_CERTS={cert}\n\
         \x20 curl: --cacert {cert} (or CURL_CA_BUNDLE)\n\
         \x20 Kubernetes: mount it into pods from a ConfigMap (or cert-manager trust-manager Bundle) and set the variables above.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_loadable_ca_with_a_private_key() {
        let dir = std::env::temp_dir().join(format!("interceptor-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (files, created) = init(&dir, "Test CA").expect("init");
        assert!(created);
        let mode = std::fs::metadata(&files.key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ca = EnterpriseCa::load(&files.cert, &files.key).expect("load");
        assert!(ca.subject.contains("Test CA"), "{}", ca.subject);
        assert_eq!(ca.chain.len(), 1);
        let (_, again) = init(&dir, "Test CA").expect("reuse");
        assert!(!again, "an existing CA is reused");

        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = EnterpriseCa::load(&files.cert, &files.key).expect_err("world-readable key");
        assert!(err.to_string().contains("readable by other users"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
