//! Kubelet-style status reconciliation, without IO: the last status each edge reported for its
//! pods and its Node (the edge's truth) against the copy the API holds.
//!
//! A kubelet's status manager writes a pod's status again whenever the API's copy differs from
//! what the kubelet knows. Someone else may change that copy: during a partition the node
//! lifecycle controller sets every pod's Ready condition to False, a user or a restore may
//! write it too. An edge that reports only what *changed* on it would leave such a status
//! wrong forever after it reconnects. [`Truths`] remembers what each edge reported and decides
//! when the API's copy has drifted from it; [`crate::upstream`] writes the truth again.
//!
//! The rules:
//!
//! - A status *covers* the truth when every field the edge reported is equal in it
//!   ([`covers`]); conditions and addresses are compared per `type`, so conditions the edge
//!   does not own (PodScheduled, DisruptionTarget) never count as drift. The status the API
//!   answered after our last write is remembered too (`applied`), so a field the API server
//!   normalizes (say, a timestamp's precision) is not drift either.
//! - Drift is written back only while the node's session is live: during a partition the
//!   API's "not ready" is right, the cloud cannot know better. When a session starts, what
//!   drifted meanwhile is written back (after a short pause in which the edge delivers what it
//!   learned offline, which replaces older truths).
//! - A cloudcore that restarted remembers nothing: the edge's first session after the restart
//!   is told to send its last statuses again (`HelloAck.resend_status`), which rebuilds the
//!   truths and rewrites only what differs.
//!
//! Memory: one JSON status (and the applied copy) per reported object, a few KiB per pod.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// An object's identity for the truths: kind, namespace (empty for a Node) and name. The uid
/// is kept inside the entry, since a watch event and a report must meet on the same entry.
type Key = (String, String, String);

fn key_of(object: &proto::ObjectRef) -> Key {
    (
        object.kind.clone(),
        object.namespace.clone(),
        object.name.clone(),
    )
}

/// The last status one edge reported for one object.
///
/// Both statuses are held as compact JSON text, not as `Value` trees: a tree is several times
/// its text, and one truth is held per pod of every edge (docs/scale.md "Memory"). serde_json's
/// maps are sorted, so two equal values have the same text. The price is a parse of the held
/// status per watched status change (`Truths::observed`), not measured on its own.
#[derive(Debug, Clone)]
struct Truth {
    node: String,
    object: proto::ObjectRef,
    generation: u64,
    status: Box<str>,
    /// The object's whole status as the API answered after the last write (or found it equal).
    applied: Option<Box<str>>,
    /// The API's copy was last seen not covering the truth.
    drifted: bool,
}

/// A status to write again because the API's copy drifted from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reassert {
    /// The reporting node.
    pub node: String,
    /// The object, with the uid it was reported for.
    pub object: proto::ObjectRef,
    /// The generation of the report being written again.
    pub generation: u64,
    /// The status the edge reported.
    pub status: Value,
}

/// The truths of every edge, and which nodes have live sessions.
#[derive(Debug, Default)]
pub struct Truths {
    entries: HashMap<Key, Truth>,
    /// Live sessions per node (a replacing session starts before the replaced one ends).
    sessions: HashMap<String, usize>,
    /// Nodes that had a session since this process started.
    seen: HashSet<String>,
}

impl Truths {
    /// An edge reported `status` for `object` (checked by the session already). A report older
    /// than the held one of the same uid changes nothing.
    pub fn reported(
        &mut self,
        node: &str,
        object: &proto::ObjectRef,
        generation: u64,
        status: &Value,
    ) {
        let key = key_of(object);
        if let Some(held) = self.entries.get(&key)
            && held.object.uid == object.uid
            && held.generation > generation
        {
            return;
        }
        let applied = self
            .entries
            .remove(&key)
            .filter(|held| held.object.uid == object.uid)
            .and_then(|held| held.applied);
        self.entries.insert(
            key,
            Truth {
                node: node.to_string(),
                object: object.clone(),
                generation,
                status: text_of(status),
                applied,
                drifted: false,
            },
        );
    }

    /// The object is gone (deleted, or another incarnation): forget its truth.
    pub fn forget(&mut self, kind: &str, namespace: &str, name: &str, uid: &str) {
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        if self
            .entries
            .get(&key)
            .is_some_and(|held| uid.is_empty() || held.object.uid == uid)
        {
            self.entries.remove(&key);
        }
    }

    /// `generation` of `object` was written (or found already equal); `live` is the object's
    /// status in the API now.
    pub fn applied(&mut self, object: &proto::ObjectRef, generation: u64, live: Value) {
        if let Some(held) = self.entries.get_mut(&key_of(object))
            && held.object.uid == object.uid
            && held.generation == generation
        {
            held.applied = Some(text_of(&live));
            held.drifted = false;
        }
    }

    /// Whether a truth is held for the object.
    pub fn holds(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.entries
            .contains_key(&(kind.to_string(), namespace.to_string(), name.to_string()))
    }

    /// A watch showed the API's `live` status of an object. Returns the truth to write again
    /// when the copy drifted from it and the node's session is live.
    pub fn observed(
        &mut self,
        kind: &str,
        namespace: &str,
        name: &str,
        uid: &str,
        live: &Value,
    ) -> Option<Reassert> {
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        let held = self.entries.get_mut(&key)?;
        if !uid.is_empty() && !held.object.uid.is_empty() && held.object.uid != uid {
            return None;
        }
        held.drifted = !covers(live, &value_of(&held.status))
            && held.applied.as_deref() != Some(&*text_of(live));
        let connected = self.sessions.get(&held.node).is_some_and(|n| *n > 0);
        (held.drifted && connected).then(|| reassert(held))
    }

    /// A session of `node` started. Returns whether it is the node's first since this process
    /// started (so the edge should send its last statuses again). The Node's own truth is
    /// dropped: its `Hello` carried a fresh status, which [`crate::nodes`] writes, and an older
    /// report must not be written over it.
    pub fn session_started(&mut self, node: &str) -> bool {
        self.entries
            .retain(|(kind, _, name), held| !(kind == "Node" && name == node && held.node == node));
        *self.sessions.entry(node.to_string()).or_default() += 1;
        self.seen.insert(node.to_string())
    }

    /// A session of `node` ended.
    pub fn session_ended(&mut self, node: &str) {
        if let Some(n) = self.sessions.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.sessions.remove(node);
            }
        }
    }

    /// The truths of `node` that drifted, to write again (if its session is live).
    pub fn drifted(&self, node: &str) -> Vec<Reassert> {
        if !self.sessions.contains_key(node) {
            return Vec::new();
        }
        self.entries
            .values()
            .filter(|held| held.node == node && held.drifted)
            .map(reassert)
            .collect()
    }

    /// How many objects' truths are held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no truth is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn reassert(held: &Truth) -> Reassert {
    Reassert {
        node: held.node.clone(),
        object: held.object.clone(),
        generation: held.generation,
        status: value_of(&held.status),
    }
}

/// A status as the compact JSON text a [`Truth`] holds.
fn text_of(status: &Value) -> Box<str> {
    status.to_string().into_boxed_str()
}

/// The status a [`Truth`] holds as text (written by [`text_of`], so it parses).
fn value_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Lists whose elements are told apart by their `type` and compared one by one.
const BY_TYPE: [&str; 2] = ["conditions", "addresses"];

/// Whether `live` (a status as the API holds it) holds every field of `reported` with the same
/// value; in `conditions` and `addresses` each reported element must equal the live element of
/// its `type` (for addresses: type and address), and live elements of other types are ignored.
pub fn covers(live: &Value, reported: &Value) -> bool {
    let Some(reported) = reported.as_object() else {
        return live == reported;
    };
    reported.iter().all(|(field, want)| {
        let have = live.get(field).unwrap_or(&Value::Null);
        if BY_TYPE.contains(&field.as_str())
            && let (Some(want), Some(have)) = (want.as_array(), have.as_array())
        {
            return want.iter().all(|element| {
                if field == "addresses" {
                    have.contains(element)
                } else {
                    have.iter()
                        .any(|h| h["type"] == element["type"] && h == element)
                }
            });
        }
        // An absent field and an explicit null are the same to the API.
        have == want
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(uid: &str) -> proto::ObjectRef {
        proto::ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "web".into(),
            uid: uid.into(),
        }
    }

    fn ready(status: &str) -> Value {
        json!({
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": status, "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "ContainersReady", "status": status},
            ],
            "containerStatuses": [{"name": "c", "ready": status == "True", "restartCount": 0}],
        })
    }

    fn with_scheduled(mut status: Value) -> Value {
        status["conditions"]
            .as_array_mut()
            .expect("conditions")
            .push(json!({"type": "PodScheduled", "status": "True"}));
        status
    }

    #[test]
    fn covers_compares_conditions_by_type_and_ignores_foreign_ones() {
        let truth = ready("True");
        assert!(covers(&with_scheduled(ready("True")), &truth));
        assert!(!covers(&with_scheduled(ready("False")), &truth));
        let mut reordered = with_scheduled(ready("True"));
        reordered["conditions"]
            .as_array_mut()
            .expect("conditions")
            .reverse();
        assert!(covers(&reordered, &truth), "order does not matter");
        let mut missing = ready("True");
        missing.as_object_mut().expect("object").remove("phase");
        assert!(!covers(&missing, &truth));
        assert!(
            covers(&json!({"a": 1}), &json!({"b": null})),
            "null is absent"
        );
        let node = json!({"addresses": [{"type": "InternalIP", "address": "192.0.2.7"}]});
        let live = json!({"addresses": [{"type": "Hostname", "address": "gw"}, {"type": "InternalIP", "address": "192.0.2.7"}]});
        assert!(covers(&live, &node));
        assert!(!covers(&json!({"addresses": []}), &node));
    }

    #[test]
    fn drift_is_reasserted_only_while_the_node_is_connected() {
        let mut truths = Truths::default();
        assert!(truths.session_started("gw"), "first session since start");
        truths.reported("gw", &pod("u1"), 5, &ready("True"));
        truths.applied(&pod("u1"), 5, with_scheduled(ready("True")));
        // Our own write seen through the watch: nothing to do.
        assert_eq!(
            truths.observed(
                "Pod",
                "default",
                "web",
                "u1",
                &with_scheduled(ready("True"))
            ),
            None
        );
        // The partition: the node lifecycle controller sets Ready=False while the edge is away.
        truths.session_ended("gw");
        assert_eq!(
            truths.observed(
                "Pod",
                "default",
                "web",
                "u1",
                &with_scheduled(ready("False"))
            ),
            None,
            "nothing is written while the node is away"
        );
        assert!(truths.drifted("gw").is_empty(), "no session, nothing due");
        assert!(!truths.session_started("gw"), "not the first session");
        let due = truths.drifted("gw");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].generation, 5);
        assert_eq!(due[0].status, ready("True"));
        // Written again: drift settled.
        truths.applied(&pod("u1"), 5, with_scheduled(ready("True")));
        assert!(truths.drifted("gw").is_empty());
        // A change by someone else while connected is written back at once.
        let again = truths.observed(
            "Pod",
            "default",
            "web",
            "u1",
            &with_scheduled(ready("False")),
        );
        assert_eq!(again.map(|r| r.generation), Some(5));
    }

    #[test]
    fn a_normalized_copy_of_what_was_written_is_not_drift() {
        let mut truths = Truths::default();
        truths.session_started("gw");
        let reported = json!({"phase": "Running", "startTime": "2026-01-01T00:00:00.123Z"});
        let normalized = json!({"phase": "Running", "startTime": "2026-01-01T00:00:00Z"});
        truths.reported("gw", &pod("u1"), 1, &reported);
        truths.applied(&pod("u1"), 1, normalized.clone());
        assert_eq!(
            truths.observed("Pod", "default", "web", "u1", &normalized),
            None
        );
    }

    #[test]
    fn the_held_text_compares_values_not_the_order_they_were_built_in() {
        let mut truths = Truths::default();
        truths.session_started("gw");
        let reported = json!({"phase": "Running", "startTime": "2026-01-01T00:00:00.123Z"});
        truths.reported("gw", &pod("u1"), 1, &reported);
        let mut applied = serde_json::Map::new();
        applied.insert("startTime".into(), json!("2026-01-01T00:00:00Z"));
        applied.insert("phase".into(), json!("Running"));
        truths.applied(&pod("u1"), 1, Value::Object(applied));
        let mut live = serde_json::Map::new();
        live.insert("phase".into(), json!("Running"));
        live.insert("startTime".into(), json!("2026-01-01T00:00:00Z"));
        assert_eq!(
            truths.observed("Pod", "default", "web", "u1", &Value::Object(live)),
            None,
            "the applied status, built in another key order, is not drift"
        );
        let other = json!({"phase": "Failed", "startTime": "2026-01-01T00:00:00Z"});
        let again = truths.observed("Pod", "default", "web", "u1", &other);
        assert_eq!(
            again.map(|r| r.status),
            Some(reported),
            "a changed copy is drift, and the report is written again as it came"
        );
    }

    #[test]
    fn older_reports_and_other_incarnations_do_not_mix() {
        let mut truths = Truths::default();
        truths.session_started("gw");
        truths.reported("gw", &pod("u1"), 7, &ready("True"));
        truths.reported("gw", &pod("u1"), 6, &ready("False"));
        assert_eq!(
            truths
                .observed("Pod", "default", "web", "u1", &ready("False"))
                .map(|r| r.status),
            Some(ready("True")),
            "the older report did not replace the newer truth"
        );
        assert_eq!(
            truths.observed("Pod", "default", "web", "u2", &ready("False")),
            None,
            "a recreated pod of the same name is not this truth"
        );
        truths.forget("Pod", "default", "web", "u2");
        assert_eq!(truths.len(), 1, "forgetting another uid keeps this one");
        truths.forget("Pod", "default", "web", "u1");
        assert!(truths.is_empty());
    }

    #[test]
    fn a_new_session_drops_the_nodes_own_older_report() {
        let mut truths = Truths::default();
        truths.session_started("gw");
        let node = proto::ObjectRef {
            kind: "Node".into(),
            namespace: String::new(),
            name: "gw".into(),
            uid: String::new(),
        };
        truths.reported(
            "gw",
            &node,
            3,
            &json!({"conditions": [{"type": "DiskPressure", "status": "False"}]}),
        );
        truths.reported("gw", &pod("u1"), 4, &ready("True"));
        truths.session_ended("gw");
        truths.session_started("gw");
        assert_eq!(truths.len(), 1, "the pod's truth stays, the Node's goes");
        assert_eq!(
            truths.observed("Node", "", "gw", "", &json!({"conditions": []})),
            None
        );
    }

    #[test]
    fn a_replacing_session_keeps_the_node_connected() {
        let mut truths = Truths::default();
        truths.session_started("gw");
        truths.session_started("gw");
        truths.session_ended("gw");
        truths.reported("gw", &pod("u1"), 1, &ready("True"));
        assert!(
            truths
                .observed("Pod", "default", "web", "u1", &ready("False"))
                .is_some()
        );
    }
}
