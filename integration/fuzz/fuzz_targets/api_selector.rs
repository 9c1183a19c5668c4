//! Label and field selectors as `labelSelector` / `fieldSelector` carry them: the first line is
//! the label selector, the second the field selector, the first byte picks the kind matched.
#![no_main]

use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 5] = ["Pod", "Node", "Secret", "ConfigMap", "Event"];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let kind = KINDS[usize::from(first) % KINDS.len()];
    let (labels, fields) = text.split_once('\n').unwrap_or((text, ""));
    cloudcore::apiserver::fuzzing::selectors(kind, labels, fields);
});
