//! Bootstrap tokens (`[a-z0-9]{6}.[a-z0-9]{16}`, the kubeadm shape) and node-name rules.
//!
//! The id is public (listed, logged); the secret is shown once at creation and only its SHA-256
//! is stored.

use std::fmt;

use rand::Rng;
use sha2::{Digest, Sha256};

const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A parsed bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: String,
    secret: String,
}

/// The text given is not a bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token must look like `abcdef.0123456789abcdef` (6 and 16 characters of [a-z0-9])")]
pub struct MalformedToken;

impl BootstrapToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut pick = |n: usize| -> String {
            (0..n)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                .collect()
        };
        BootstrapToken {
            id: pick(ID_LEN),
            secret: pick(SECRET_LEN),
        }
    }

    /// Parses `id.secret`.
    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        let (id, secret) = text.split_once('.').ok_or(MalformedToken)?;
        let valid = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
        if !valid(id, ID_LEN) || !valid(secret, SECRET_LEN) {
            return Err(MalformedToken);
        }
        Ok(BootstrapToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// Hex SHA-256 of the secret: what the registry stores.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }

    /// The full `id.secret` text, for printing once to the operator.
    pub fn reveal(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// Never prints the secret.
impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes without an early exit, so timing does not tell how much matched.
pub fn hashes_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Why a node name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node name {name:?} is not a valid DNS-1123 subdomain: {why}")]
pub struct InvalidNodeName {
    pub name: String,
    pub why: &'static str,
}

/// Checks a node name the way Kubernetes checks Node names (RFC 1123 subdomain).
pub fn validate_node_name(name: &str) -> Result<(), InvalidNodeName> {
    let fail = |why| {
        Err(InvalidNodeName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > 253 {
        return fail("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return fail("each dot-separated part must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return fail("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail("each part must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back() {
        for _ in 0..100 {
            let token = BootstrapToken::generate();
            assert_eq!(BootstrapToken::parse(&token.reveal()), Ok(token));
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcdef.x",
            "abc!ef.0123456789abcdef",
        ] {
            assert_eq!(BootstrapToken::parse(bad), Err(MalformedToken), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = BootstrapToken::parse("abcdef.0123456789abcdef").expect("valid");
        let shown = format!("{token:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("abcdef"));
    }

    #[test]
    fn hash_comparison() {
        let token = BootstrapToken::parse("abcdef.0123456789abcdef").expect("valid");
        assert!(hashes_match(
            &token.secret_hash(),
            &hash_secret("0123456789abcdef")
        ));
        assert!(!hashes_match(
            &token.secret_hash(),
            &hash_secret("0123456789abcdeg")
        ));
        assert!(!hashes_match("ab", "abc"));
    }

    #[test]
    fn node_names() {
        for good in ["gw-1", "a", "line-3.factory-7", "0node"] {
            assert_eq!(validate_node_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "GW-1",
            "-gw",
            "gw-",
            "gw_1",
            "a..b",
            &"x".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }
}
