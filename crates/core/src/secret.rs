//! API key secrets and org admin tokens: shown once, stored as SHA-256 only,
//! compared in constant time. Randomness is an input (the caller's CSPRNG).

use sha2::{Digest, Sha256};

/// SHA-256 of a secret or token.
pub type SecretHash = [u8; 32];

/// How many random bytes a secret carries (256 bits).
pub const SECRET_RANDOM_LEN: usize = 32;

/// The prefix of an API key secret; a gateway can recognise one at a glance.
pub const KEY_SECRET_PREFIX: &str = "tly_sk_";
/// The prefix of an org admin token.
pub const ORG_TOKEN_PREFIX: &str = "tly_at_";
/// The prefix of an org viewer token.
pub const VIEWER_TOKEN_PREFIX: &str = "tly_vt_";
/// The prefix of a gateway token (of one org or of every org).
pub const GATEWAY_TOKEN_PREFIX: &str = "tly_gt_";

pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two hashes without an early exit, so the time taken says nothing
/// about where they differ.
pub fn ct_eq(a: &SecretHash, b: &SecretHash) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Builds a secret from random bytes: `prefix` then lowercase hex.
pub fn encode_secret(prefix: &str, random: &[u8; SECRET_RANDOM_LEN]) -> String {
    let mut s = String::with_capacity(prefix.len() + 2 * SECRET_RANDOM_LEN);
    s.push_str(prefix);
    for b in random {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_hash_and_compare() {
        let s = encode_secret(KEY_SECRET_PREFIX, &[0xab; SECRET_RANDOM_LEN]);
        assert!(s.starts_with("tly_sk_abab"));
        assert_eq!(s.len(), KEY_SECRET_PREFIX.len() + 64);
        let h = hash_secret(&s);
        assert!(ct_eq(&h, &hash_secret(&s)));
        assert!(!ct_eq(&h, &hash_secret("tly_sk_other")));
    }
}
