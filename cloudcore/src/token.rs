//! Bootstrap tokens (`[a-z0-9]{6}.[a-z0-9]{16}`, the kubeadm shape) and node-name rules.
//!
//! The id is public (listed, logged); the secret is shown once at creation and only its SHA-256
//! is stored.

use std::fmt;
use std::time::Duration;

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

/// The shortest `--ttl` a token may have. Anything shorter is expired by the time
/// `token create` has printed it; a second is still useless to an operator, but lets tests
/// make a token that expires.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(1);

/// Parses `token create --ttl`: a humantime duration of at least [`MIN_TOKEN_TTL`]. kubeadm
/// reads `0` as "never expires"; here every token expires, so `0` is refused with that said.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!(
            "{text:?} is negative; a token's lifetime is a positive duration such as 30m or 24h"
        ));
    }
    let ttl = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 30m or 24h: {e}"))?;
    if ttl.is_zero() {
        return Err(
            "0 would issue a token that is already expired; every join token expires here (unlike kubeadm, where 0 means never): give a lifetime such as 24h".into(),
        );
    }
    if ttl < MIN_TOKEN_TTL {
        return Err(format!(
            "{text} is shorter than the minimum of {}; the token would be expired before it is printed",
            humantime::format_duration(MIN_TOKEN_TTL)
        ));
    }
    Ok(ttl)
}

/// Why a node name was refused. The name is shown escaped and, when long, cut short: it may
/// come from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node name {} is not a valid DNS-1123 subdomain: {why}", shown(name))]
pub struct InvalidNodeName {
    pub name: String,
    pub why: &'static str,
}

/// `name` quoted with control characters escaped, its first 64 characters only when longer.
fn shown(name: &str) -> String {
    const SHOWN: usize = 64;
    let count = name.chars().count();
    if count <= SHOWN {
        return format!("{name:?}");
    }
    let head: String = name.chars().take(SHOWN).collect();
    format!("{head:?}... ({count} characters)")
}

/// Most labels a join may ask for.
pub const MAX_JOIN_LABELS: usize = 64;

/// Checks a join's labels as Kubernetes checks a Node's (qualified-name keys, label values),
/// so that they can always be written to the Node. The error names the first bad label,
/// escaped.
pub fn validate_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_JOIN_LABELS {
        return Err(format!(
            "{} labels are more than the limit of {MAX_JOIN_LABELS}",
            labels.len()
        ));
    }
    for (key, value) in labels {
        let (prefix, name) = match key.split_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        if prefix.is_some_and(|p| validate_node_name(p).is_err())
            || !is_label_value(name)
            || name.is_empty()
        {
            return Err(format!(
                "label key {} is not a qualified name (an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
                shown(key)
            ));
        }
        if !is_label_value(value) {
            return Err(format!(
                "label {} has the invalid value {}: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
                shown(key),
                shown(value)
            ));
        }
    }
    Ok(())
}

/// A Kubernetes label value: empty, or at most 63 of `[A-Za-z0-9-_.]` with alphanumeric ends.
fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    value.is_empty()
        || (value.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
}

/// Checks a node name the way Kubernetes checks Node names (RFC 1123 subdomain).
pub fn validate_node_name(name: &str) -> Result<(), InvalidNodeName> {
    match proto::message::node_name_problem(name) {
        None => Ok(()),
        Some(why) => Err(InvalidNodeName {
            name: name.to_string(),
            why,
        }),
    }
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
    fn join_labels() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(
            validate_labels(&labels(&[
                ("zone", "a"),
                ("node-role.kubernetes.io/gateway", "")
            ])),
            Ok(())
        );
        for (pairs, says) in [
            (labels(&[("zone", "a\nb")]), "invalid value"),
            (labels(&[("bad key", "a")]), "not a qualified name"),
            (labels(&[("Example.com/x", "a")]), "not a qualified name"),
            (labels(&[("zone", &"v".repeat(64))]), "invalid value"),
        ] {
            let e = validate_labels(&pairs).expect_err(says);
            assert!(e.contains(says) && !e.contains('\n'), "{e}");
        }
        let many: std::collections::BTreeMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels(&many).is_err());
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("1s"), Ok(MIN_TOKEN_TTL));
        for (bad, says) in [
            ("0s", "already expired"),
            ("0", "already expired"),
            ("1ms", "shorter than the minimum of 1s"),
            ("-5m", "negative"),
            ("soon", "not a duration"),
        ] {
            let e = parse_ttl(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn long_and_hostile_names_are_shown_short_and_escaped() {
        let e = validate_node_name(&"a".repeat(300)).expect_err("too long");
        let text = e.to_string();
        assert!(text.contains("limit of 253"), "{text}");
        assert!(
            text.contains("(300 characters)") && text.len() < 200,
            "{text}"
        );
        let e = validate_node_name("gw\nINFO forged").expect_err("newline");
        assert!(!e.to_string().contains('\n'), "{e}");
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
