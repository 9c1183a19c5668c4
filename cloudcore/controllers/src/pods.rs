//! What every workload controller needs to know about pods: which are active, ready and
//! available; which controller owns them; how to make one from a template; and the autonomy
//! rule for pods of disconnected edge nodes.
//!
//! **The autonomy rule.** A pod bound to a node whose Ready condition is `Unknown` (the node
//! stopped reporting: an edge offline) keeps running on the edge and comes back with it. No
//! controller deletes or replaces it on its own account: it stays counted as the controller's
//! pod, and a rolling update that would delete it waits (and says so in the owner's
//! conditions). It goes away only when the node's autonomy duration runs out
//! (`edge.io/autonomy-duration`, enforced by cloudcore's autonomy controller, which deletes it;
//! the owner then replaces it as usual). docs/workloads.md states the rule for operators.

use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;

/// Taint of a node whose Ready condition is Unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// Whether the pod is neither being deleted nor finished (`Succeeded`/`Failed`): what a
/// ReplicaSet counts as one of its replicas.
pub fn is_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether the pod's `Ready` condition is `True`.
pub fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// When the pod's `Ready` condition last became `True`, if it is `True`.
pub fn ready_since(pod: &Pod) -> Option<Timestamp> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        ready
            .last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now),
    )
}

/// Whether the pod has been Ready for at least `min_ready_seconds` at `now` (a Deployment's
/// "available").
pub fn is_available(pod: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    match ready_since(pod) {
        None => false,
        Some(_) if min_ready_seconds <= 0 => true,
        Some(since) => now.as_second() - since.as_second() >= i64::from(min_ready_seconds),
    }
}

/// The owner reference with `controller: true`, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
}

/// A controller's owner reference to `owner` (`controller` and `blockOwnerDeletion` set, as
/// kube-controller-manager sets them).
pub fn owner_reference(api_version: &str, kind: &str, owner: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        name: owner.name.clone().unwrap_or_default(),
        uid: owner.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A pod made from `template`, owned by `owner`, in `namespace`: named `name` when given
/// (StatefulSets), else generated from `generate_name` (e.g. `web-5d8f7c9b-`).
pub fn pod_from_template(
    template: &PodTemplateSpec,
    namespace: &str,
    owner: OwnerReference,
    name: Option<String>,
    generate_name: Option<String>,
) -> Pod {
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = name;
    meta.generate_name = generate_name;
    meta.namespace = Some(namespace.to_string());
    meta.owner_references = Some(vec![owner]);
    meta.resource_version = None;
    meta.uid = None;
    meta.creation_timestamp = None;
    meta.managed_fields = None;
    Pod {
        metadata: meta,
        spec: template.spec.clone(),
        status: None,
    }
}

/// FNV-1a, 32 bits: the hash kube-controller-manager uses for `pod-template-hash` and
/// controller-revision names.
fn fnv32a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The alphabet of apimachinery's `rand.SafeEncodeString`: no vowels, no characters that
/// look alike, so a hash never spells a word.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A template's hash as a label value (`pod-template-hash`, `controller-revision-hash`): FNV-1a
/// of the template's JSON and the collision count, spelt in [`SAFE_ALPHABET`]. Stable for
/// equal templates within one build; not the same digits kube-controller-manager computes
/// (it hashes a Go printout of its struct), which nothing compares.
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut bytes = serde_json::to_vec(template).unwrap_or_default();
    if let Some(count) = collision_count {
        bytes.extend_from_slice(&count.to_le_bytes());
    }
    let decimal = fnv32a(&bytes).to_string();
    decimal
        .bytes()
        .map(|d| SAFE_ALPHABET[usize::from(d - b'0') % SAFE_ALPHABET.len()] as char)
        .collect()
}

/// Whether the node has stopped reporting: Ready is `Unknown`, or it carries the unreachable
/// taint. Pods on such a node fall under the autonomy rule (module docs).
pub fn node_disconnected(node: &Node) -> bool {
    let unknown = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Ready" && c.status == "Unknown")
        });
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key == UNREACHABLE_TAINT));
    unknown || tainted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_sensitive() {
        let mut a = PodTemplateSpec::default();
        let first = template_hash(&a, None);
        assert_eq!(first, template_hash(&a, None));
        assert!(first.bytes().all(|b| SAFE_ALPHABET.contains(&b)), "{first}");
        assert_ne!(first, template_hash(&a, Some(1)));
        a.metadata = Some(ObjectMeta {
            labels: Some([("app".to_string(), "web".to_string())].into()),
            ..ObjectMeta::default()
        });
        assert_ne!(first, template_hash(&a, None));
    }

    #[test]
    fn fnv32a_matches_the_reference_values() {
        // Test vectors of the FNV specification.
        assert_eq!(fnv32a(b""), 0x811c_9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c_292c);
        assert_eq!(fnv32a(b"foobar"), 0xbf9c_f968);
    }
}
