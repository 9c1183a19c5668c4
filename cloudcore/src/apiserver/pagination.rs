//! Lists in pages (`limit` and `continue`), as kube-apiserver serves them: every page of one
//! list is taken at the resourceVersion of the first, the `continue` token is opaque to
//! clients (base64url of `{"v":"meta.k8s.io/v1","rv":RV,"start":"KEY\u0000"}`, the shape of
//! the apiserver's own), and `remainingItemCount` is given when no selector filters the list.
//!
//! Items are ordered by their key (`name`, or `namespace/name` across namespaces), as etcd
//! orders them; a page starts at the token's key. The store serves a page at an older
//! resourceVersion from its event history ([`super::store::Store::list_at`]); once those
//! events are compacted the answer is 410 `Expired` with a token that continues at the latest
//! version, as kube-apiserver does after an etcd compaction.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::status::ApiError;

/// The token version kube-apiserver writes and reads.
const TOKEN_VERSION: &str = "meta.k8s.io/v1";

/// kube-apiserver's answer to a `continue` whose resourceVersion was compacted.
pub const INCONSISTENT_CONTINUE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// Where a list continues: the version of its first page (`None`: the latest, after an
/// expired token) and the first key of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continue {
    pub rv: Option<u64>,
    pub start: String,
}

/// The paging options of a list request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Paging {
    /// At most this many items (`None`: all).
    pub limit: Option<usize>,
    /// The page to serve, from `continue`.
    pub from: Option<Continue>,
}

impl Paging {
    /// `limit` (a positive integer; zero, negative or absent is no limit, as the apiserver
    /// treats them) and `continue` (refused with kube-apiserver's 400s when malformed or
    /// combined with a resourceVersion).
    pub fn from_query(query: &HashMap<String, String>) -> Result<Paging, ApiError> {
        let limit = match query.get("limit").map(String::as_str) {
            None | Some("") => None,
            Some(text) => {
                let n: i64 = text.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "limit: Invalid value: {text:?}: must be an integer"
                    ))
                })?;
                usize::try_from(n).ok().filter(|n| *n > 0)
            }
        };
        let from = match query.get("continue").map(String::as_str) {
            None | Some("") => None,
            Some(token) => {
                let from = decode(token).map_err(|why| {
                    ApiError::bad_request(format!("invalid continue token: {why}"))
                })?;
                if query
                    .get("resourceVersion")
                    .is_some_and(|rv| !rv.is_empty() && rv != "0")
                {
                    return Err(ApiError::bad_request(
                        "specifying resource version is not allowed when using continue",
                    ));
                }
                Some(from)
            }
        };
        Ok(Paging { limit, from })
    }

    /// Whether the list is paged at all (then items are ordered by key).
    pub fn is_paged(&self) -> bool {
        self.limit.is_some() || self.from.is_some()
    }
}

/// The token for a list at `rv` (`None`: the latest) continuing at `start`.
pub fn encode(rv: Option<u64>, start: &str) -> String {
    let rv = rv.map_or(-1, |rv| i64::try_from(rv).unwrap_or(i64::MAX));
    let token = json!({"v": TOKEN_VERSION, "rv": rv, "start": start});
    URL_SAFE_NO_PAD.encode(token.to_string())
}

/// Reads a token back; the error is the apiserver's `continue key is not valid: …` text.
pub fn decode(token: &str) -> Result<Continue, String> {
    let invalid = |why: &str| format!("continue key is not valid: {why}");
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|e| invalid(&e.to_string()))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&e.to_string()))?;
    let version = value["v"].as_str().unwrap_or_default();
    if version != TOKEN_VERSION {
        return Err(invalid(&format!(
            "server does not recognize this encoded version {version}"
        )));
    }
    let rv = match value["rv"].as_i64() {
        Some(rv) if rv > 0 => Some(rv as u64),
        Some(rv) if rv < 0 => None,
        _ => {
            return Err(invalid(
                "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
            ));
        }
    };
    let start = value["start"].as_str().unwrap_or_default();
    if start.is_empty() {
        return Err(invalid("encoded start key empty (version meta.k8s.io/v1)"));
    }
    Ok(Continue {
        rv,
        start: start.to_string(),
    })
}

/// An object's key in a list: `name`, or `namespace/name` in a list across namespaces.
pub fn key_of(object: &Value, across_namespaces: bool) -> String {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    super::store::list_key(namespace, name, across_namespaces)
}

/// One page of a list: parsed objects, or (for answers that pass objects on as stored) their
/// JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T = Value> {
    pub items: Vec<T>,
    /// The token for the next page, if there is one.
    pub next: Option<String>,
    /// How many matching items follow this page (given only when `counted`).
    pub remaining: Option<usize>,
}

/// Cuts the page out of `matching` (the items that pass the selectors, at version `rv`):
/// ordered by key, from the token's start key, at most `limit`. `counted` asks for
/// `remainingItemCount` (lists without selectors).
pub fn page(
    matching: Vec<Value>,
    paging: &Paging,
    rv: u64,
    across_namespaces: bool,
    counted: bool,
) -> Page {
    let mut pager = Pager::new(paging, across_namespaces, counted);
    pager.paged = true;
    for object in matching {
        pager.push(object);
    }
    pager.finish(rv)
}

/// Builds one page of a list from the matching items handed to it one at a time, holding at
/// most a page of them (the items past the page are only counted). An unpaged list keeps
/// every item, in the order pushed.
#[derive(Debug)]
pub struct Pager<T = Value> {
    paged: bool,
    limit: Option<usize>,
    start: Option<String>,
    across_namespaces: bool,
    counted: bool,
    /// Unpaged: every item.
    all: Vec<T>,
    /// Paged: the smallest keys from the start key on, at most `limit` of them.
    page: std::collections::BTreeMap<String, T>,
    /// Paged: items from the start key on, in the page or past it.
    total: usize,
}

/// Where a paged item falls.
enum Place {
    /// Before the page's start key: not part of this list's rest at all.
    BeforeStart,
    /// After the last item of a full page: only counted.
    PastFullPage,
    /// In the page, as far as is known yet.
    InPage,
}

impl<T> Pager<T> {
    /// A pager for `paging`'s page (`across_namespaces`: keys are `namespace/name`).
    pub fn new(paging: &Paging, across_namespaces: bool, counted: bool) -> Pager<T> {
        Pager {
            paged: paging.is_paged(),
            limit: paging.limit,
            start: paging.from.as_ref().map(|from| from.start.clone()),
            across_namespaces,
            counted,
            all: Vec::new(),
            page: std::collections::BTreeMap::new(),
            total: 0,
        }
    }

    fn place(&self, key: &str) -> Place {
        if self.start.as_deref().is_some_and(|start| key < start) {
            return Place::BeforeStart;
        }
        let full = self.limit.is_some_and(|limit| self.page.len() >= limit);
        match self.page.last_key_value() {
            Some((last, _)) if full && key > last.as_str() => Place::PastFullPage,
            _ => Place::InPage,
        }
    }

    /// Whether an item at (`namespace`, `name`) would be kept in the page, asked before its
    /// body is read. One past a full page is counted here, as [`Pager::push_at`] would count
    /// it, and must not be pushed. Counting an item that may not match is right only for the
    /// `more` of the next-page token, which is all a list with selectors gets (no
    /// `remainingItemCount`): asked there, the first `false` ends the page.
    pub fn keeps(&mut self, namespace: &str, name: &str) -> bool {
        if !self.paged {
            return true;
        }
        let key = super::store::list_key(namespace, name, self.across_namespaces);
        match self.place(&key) {
            Place::BeforeStart => false,
            Place::PastFullPage => {
                self.total += 1;
                false
            }
            Place::InPage => true,
        }
    }

    /// One matching item, at (`namespace`, `name`).
    pub fn push_at(&mut self, namespace: &str, name: &str, item: T) {
        if !self.paged {
            self.all.push(item);
            return;
        }
        let key = super::store::list_key(namespace, name, self.across_namespaces);
        self.insert(key, item);
    }

    fn insert(&mut self, key: String, item: T) {
        if let Place::BeforeStart = self.place(&key) {
            return;
        }
        self.total += 1;
        self.page.insert(key, item);
        if self.limit.is_some_and(|limit| self.page.len() > limit) {
            self.page.pop_last();
        }
    }

    /// The page, at version `rv`.
    pub fn finish(self, rv: u64) -> Page<T> {
        if !self.paged {
            return Page {
                items: self.all,
                next: None,
                remaining: None,
            };
        }
        let more = self.limit.is_some_and(|limit| limit < self.total);
        let next = more.then(|| {
            let last = self.page.last_key_value().map(|(key, _)| key.clone());
            encode(Some(rv), &format!("{}\u{0}", last.unwrap_or_default()))
        });
        let remaining = (more && self.counted).then(|| self.total - self.page.len());
        Page {
            items: self.page.into_values().collect(),
            next,
            remaining,
        }
    }
}

impl Pager<Value> {
    /// One matching object (its key from its metadata).
    pub fn push(&mut self, object: Value) {
        if !self.paged {
            self.all.push(object);
            return;
        }
        let key = key_of(&object, self.across_namespaces);
        self.insert(key, object);
    }
}

/// 410 for a `continue` whose version is no longer kept: kube-apiserver's message, and in
/// `metadata.continue` a token for the rest of the list at the latest version.
pub fn expired(from: &Continue) -> Value {
    let mut status = ApiError::gone(INCONSISTENT_CONTINUE).to_status();
    status["metadata"]["continue"] = json!(encode(None, &from.start));
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cm(ns: &str, name: &str) -> Value {
        json!({"metadata": {"namespace": ns, "name": name}})
    }

    #[test]
    fn a_pager_holds_one_page_and_counts_the_rest() {
        let paging = Paging {
            limit: Some(2),
            from: Some(Continue {
                rv: Some(7),
                start: "b/a".into(),
            }),
        };
        let mut pager = Pager::new(&paging, true, true);
        for (ns, name) in [("c", "z"), ("a", "a"), ("b", "b"), ("b", "a"), ("d", "d")] {
            pager.push(cm(ns, name));
        }
        assert_eq!(pager.page.len(), 2, "never more than a page held");
        let page = pager.finish(7);
        assert_eq!(page.items, vec![cm("b", "a"), cm("b", "b")]);
        assert_eq!(page.remaining, Some(2));
        let next = decode(page.next.as_deref().expect("a next page")).expect("token");
        assert_eq!((next.rv, next.start.as_str()), (Some(7), "b/b\u{0}"));
    }

    #[test]
    fn asking_before_parsing_gives_the_same_page_and_count_as_pushing_everything() {
        let paging = Paging {
            limit: Some(2),
            from: Some(Continue {
                rv: Some(7),
                start: "b/a".into(),
            }),
        };
        // Scan order (namespace, name), which is not always the key order ("a-b" < "a/").
        let rows = [
            ("a", "a"),
            ("a-b", "x"),
            ("b", "a"),
            ("b", "b"),
            ("b", "c"),
            ("c", "z"),
            ("d", "d"),
        ];
        let mut pushed_all = Pager::new(&paging, true, true);
        let mut asked = Pager::new(&paging, true, true);
        let mut parsed = 0;
        for (ns, name) in rows {
            pushed_all.push(cm(ns, name));
            if asked.keeps(ns, name) {
                parsed += 1;
                asked.push(cm(ns, name));
            }
        }
        assert_eq!(parsed, 2, "only the page's items are parsed: {parsed}");
        assert_eq!(asked.finish(7), pushed_all.finish(7));
    }

    #[test]
    fn tokens_round_trip_in_the_apiservers_shape() {
        let token = encode(Some(230), "pg1\u{0}");
        let raw = URL_SAFE_NO_PAD.decode(&token).expect("base64url");
        assert_eq!(
            serde_json::from_slice::<Value>(&raw).expect("json"),
            json!({"v": "meta.k8s.io/v1", "rv": 230, "start": "pg1\u{0}"})
        );
        assert_eq!(
            decode(&token),
            Ok(Continue {
                rv: Some(230),
                start: "pg1\u{0}".into()
            })
        );
        // One minted by kube-apiserver 1.36 reads the same.
        assert_eq!(
            decode("eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MjMwLCJzdGFydCI6InBnMVx1MDAwMCJ9"),
            Ok(Continue {
                rv: Some(230),
                start: "pg1\u{0}".into()
            })
        );
        assert_eq!(decode(&encode(None, "a")).expect("latest").rv, None);
    }

    #[test]
    fn malformed_tokens_are_refused_with_the_apiservers_reasons() {
        let token = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let err = |q: &[(&str, &str)]| {
            let e = Paging::from_query(&query(q)).expect_err("refused");
            assert_eq!((e.code.as_u16(), e.reason), (400, "BadRequest"));
            e.message
        };
        assert!(
            err(&[("continue", "zzz")])
                .starts_with("invalid continue token: continue key is not valid: ")
        );
        assert_eq!(
            err(&[(
                "continue",
                &token(json!({"v": "meta.k8s.io/v1", "rv": 0, "start": "a"}))
            )]),
            "invalid continue token: continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"
        );
        assert_eq!(
            err(&[(
                "continue",
                &token(json!({"v": "meta.k8s.io/v1", "rv": 5, "start": ""}))
            )]),
            "invalid continue token: continue key is not valid: encoded start key empty (version meta.k8s.io/v1)"
        );
        assert_eq!(
            err(&[("continue", &token(json!({"v": "x", "rv": 5, "start": "a"})))]),
            "invalid continue token: continue key is not valid: server does not recognize this encoded version x"
        );
        let good = encode(Some(5), "a\u{0}");
        assert_eq!(
            err(&[("continue", &good), ("resourceVersion", "5")]),
            "specifying resource version is not allowed when using continue"
        );
        assert!(
            Paging::from_query(&query(&[("continue", &good), ("resourceVersion", "0")])).is_ok()
        );
        assert!(err(&[("limit", "x")]).contains("limit"));
        assert_eq!(
            Paging::from_query(&query(&[("limit", "0")]))
                .expect("zero")
                .limit,
            None
        );
    }

    #[test]
    fn pages_follow_key_order_and_count_what_remains() {
        // Key order, not (namespace, name) order: "a-b/y" sorts before "a/x" as in etcd.
        let all = vec![cm("a", "x"), cm("a-b", "y"), cm("a", "z"), cm("b", "w")];
        let mut paging = Paging {
            limit: Some(2),
            from: None,
        };
        let mut names = Vec::new();
        let mut remaining = Vec::new();
        loop {
            let page = page(all.clone(), &paging, 9, true, true);
            names.extend(page.items.iter().map(|o| key_of(o, true)));
            remaining.push(page.remaining);
            let Some(next) = page.next else { break };
            let from = decode(&next).expect("token");
            assert_eq!(from.rv, Some(9));
            paging.from = Some(from);
        }
        assert_eq!(names, ["a-b/y", "a/x", "a/z", "b/w"]);
        assert_eq!(remaining, [Some(2), None]);
        let exact = page(
            all.clone(),
            &Paging {
                limit: Some(4),
                from: None,
            },
            9,
            true,
            true,
        );
        assert_eq!((exact.items.len(), exact.next), (4, None));
        let filtered = page(
            all,
            &Paging {
                limit: Some(1),
                from: None,
            },
            9,
            true,
            false,
        );
        assert_eq!(filtered.remaining, None);
        assert!(filtered.next.is_some());
    }

    #[test]
    fn an_expired_token_continues_at_the_latest_version() {
        let status = expired(&Continue {
            rv: Some(3),
            start: "k\u{0}".into(),
        });
        assert_eq!(status["code"], 410);
        assert_eq!(status["reason"], "Expired");
        let next = decode(status["metadata"]["continue"].as_str().expect("token")).expect("decode");
        assert_eq!((next.rv, next.start.as_str()), (None, "k\u{0}"));
    }
}
