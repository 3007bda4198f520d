//! Token secrets: stored only as hashes, compared in constant time, never logged.
//!
//! Format: `sha256:<64 lowercase hex>`, the SHA-256 of the secret's UTF-8 bytes. Secrets are
//! generated (high-entropy random strings), not chosen by people, so a plain hash without
//! salt or stretching is enough and keeps the per-request check cheap (well under a
//! microsecond).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every stored secret hash.
pub const SECRET_HASH_PREFIX: &str = "sha256:";

/// Hash a secret into the stored form `sha256:<hex>`.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("{SECRET_HASH_PREFIX}{}", hex::encode(digest))
}

/// Whether `hash` has the stored form `sha256:<64 lowercase hex>`.
pub fn is_valid_secret_hash(hash: &str) -> bool {
    match hash.strip_prefix(SECRET_HASH_PREFIX) {
        Some(hex) => hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        None => false,
    }
}

/// Check a presented secret against a stored hash in constant time (with respect to the
/// secret and the hash's content). A malformed hash never verifies.
pub fn verify_secret(hash: &str, secret: &str) -> bool {
    verify_secret_bytes(hash, secret.as_bytes())
}

/// [`verify_secret`] for a secret as raw bytes (a header value need not be UTF-8).
pub fn verify_secret_bytes(hash: &str, secret: &[u8]) -> bool {
    let Some(hex_part) = hash.strip_prefix(SECRET_HASH_PREFIX) else {
        return false;
    };
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(hex_part, &mut expected).is_err() {
        return false;
    }
    let actual = Sha256::digest(secret);
    actual.as_slice().ct_eq(&expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_secret("hunter2");
        assert!(is_valid_secret_hash(&h));
        assert!(h.starts_with("sha256:"));
        assert!(verify_secret(&h, "hunter2"));
        assert!(!verify_secret(&h, "hunter3"));
        assert!(!verify_secret(&h, ""));
        assert!(!verify_secret("sha256:zz", "hunter2"));
        assert!(!verify_secret("md5:abcd", "hunter2"));
        assert!(!is_valid_secret_hash(&h.to_uppercase()));
        // Known vector: SHA-256("abc").
        assert_eq!(
            hash_secret("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
