//! Short, stable fingerprints (first 16 hex digits of SHA-256) for log fields and metric labels.

/// The first 8 bytes of the SHA-256 of `data`, as 16 lowercase hex digits.
pub fn short_sha256(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_short_and_stable() {
        let hash = short_sha256(b"python3\0-m\0app\0");
        assert_eq!(hash.len(), 16);
        assert_eq!(hash, short_sha256(b"python3\0-m\0app\0"));
        assert_ne!(hash, short_sha256(b"python3\0-m\0other\0"));
        // SHA-256("abc") starts with ba7816bf8f01cfea.
        assert_eq!(short_sha256(b"abc"), "ba7816bf8f01cfea");
    }
}
