//! Patches as PATCH bodies: the first byte picks the content type and the kind of the stored
//! object, the rest is the patch, applied and then prepared as the update it becomes.
#![no_main]

use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [&str; 3] = [
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
];
const KINDS: [&str; 6] = ["Pod", "Node", "Secret", "ConfigMap", "Namespace", "Widget"];

fuzz_target!(|data: &[u8]| {
    let Some((&first, patch)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(first % 3)];
    let kind = KINDS[usize::from(first / 3) % KINDS.len()];
    cloudcore::apiserver::fuzzing::patch(content_type, kind, patch);
});
