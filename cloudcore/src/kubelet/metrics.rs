//! A node's usage ([`proto::stream::stats::Summary`], from the edge's stats stream) in the two
//! shapes the kubelet serves it: `/metrics/resource` (Prometheus text, what metrics-server
//! scrapes) and `/stats/summary` (`stats/v1alpha1` JSON). No IO.

use std::fmt::Write as _;

use proto::stream::stats::{Memory, Summary, Usage};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The content type of `/metrics/resource`.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Milliseconds since the epoch of an RFC 3339 time, else of `now`.
fn millis(text: &str, now: OffsetDateTime) -> i128 {
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or(now)
        .unix_timestamp_nanos()
        / 1_000_000
}

fn seconds(text: &str) -> Option<f64> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
}

/// A label value escaped as the text format wants (backslash, quote, newline).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<String>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, labels: &str, value: f64, millis: i128) {
        self.samples
            .push(format!("{}{labels} {value} {millis}", self.name));
    }

    fn write(&self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for s in &self.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
}

fn cpu_seconds(u: &Usage) -> f64 {
    u.usage_core_nano_seconds as f64 / 1e9
}

fn memory_bytes(m: &Memory) -> f64 {
    m.working_set_bytes as f64
}

/// `/metrics/resource` as the kubelet renders it: label order container, namespace, pod;
/// values with millisecond timestamps; `scrape_error` 0.
pub fn resource_metrics(summary: &Summary, now: OffsetDateTime) -> String {
    let mut container_cpu = Family::new(
        "container_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
    );
    let mut container_memory = Family::new(
        "container_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the container in bytes",
    );
    let mut container_start = Family::new(
        "container_start_time_seconds",
        "gauge",
        "[STABLE] Start time of the container since unix epoch in seconds",
    );
    let mut node_cpu = Family::new(
        "node_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
    );
    let mut node_memory = Family::new(
        "node_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the node in bytes",
    );
    let mut pod_cpu = Family::new(
        "pod_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
    );
    let mut pod_memory = Family::new(
        "pod_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the pod in bytes",
    );
    for pod in &summary.pods {
        let (ns, name) = (escape(&pod.namespace), escape(&pod.name));
        for c in &pod.containers {
            let labels = format!(
                "{{container=\"{}\",namespace=\"{ns}\",pod=\"{name}\"}}",
                escape(&c.name)
            );
            container_cpu.sample(&labels, cpu_seconds(&c.cpu), millis(&c.cpu.time, now));
            container_memory.sample(
                &labels,
                memory_bytes(&c.memory),
                millis(&c.memory.time, now),
            );
            if let Some(start) = seconds(&c.start_time) {
                container_start.sample(&labels, start, millis(&c.cpu.time, now));
            }
        }
        let labels = format!("{{namespace=\"{ns}\",pod=\"{name}\"}}");
        pod_cpu.sample(&labels, cpu_seconds(&pod.cpu), millis(&pod.cpu.time, now));
        pod_memory.sample(
            &labels,
            memory_bytes(&pod.memory),
            millis(&pod.memory.time, now),
        );
    }
    let node = &summary.node;
    node_cpu.sample("", cpu_seconds(&node.cpu), millis(&node.cpu.time, now));
    node_memory.sample(
        "",
        memory_bytes(&node.memory),
        millis(&node.memory.time, now),
    );
    let mut out = String::new();
    for family in [
        &container_cpu,
        &container_memory,
        &container_start,
        &node_cpu,
        &node_memory,
        &pod_cpu,
        &pod_memory,
    ] {
        family.write(&mut out);
    }
    out.push_str("# HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise\n");
    out.push_str("# TYPE scrape_error gauge\n");
    out.push_str("scrape_error 0\n");
    out
}

/// `/stats/summary` in the kubelet's `stats/v1alpha1` shape (node and pods, CPU and memory).
pub fn summary_json(summary: &Summary) -> Value {
    let node = &summary.node;
    json!({
        "node": {
            "nodeName": node.node_name,
            "startTime": node.start_time,
            "cpu": node.cpu,
            "memory": node.memory,
        },
        "pods": summary.pods.iter().map(|p| json!({
            "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
            "startTime": p.start_time,
            "containers": p.containers.iter().map(|c| json!({
                "name": c.name,
                "startTime": c.start_time,
                "cpu": c.cpu,
                "memory": c.memory,
            })).collect::<Vec<_>>(),
            "cpu": p.cpu,
            "memory": p.memory,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::stream::stats::{ContainerUsage, NodeUsage, PodUsage};
    use std::collections::BTreeMap;

    const T: &str = "2026-12-04T21:00:00.250000000Z";
    const T_MS: i128 = 1_796_418_000_250;

    fn usage(ns: u64) -> Usage {
        Usage {
            time: T.into(),
            usage_core_nano_seconds: ns,
            usage_nano_cores: Some(1000),
        }
    }

    fn memory(bytes: u64) -> Memory {
        Memory {
            time: T.into(),
            working_set_bytes: bytes,
            ..Memory::default()
        }
    }

    fn summary() -> Summary {
        Summary {
            node: NodeUsage {
                node_name: "gw-1".into(),
                start_time: "2026-12-04T20:00:00Z".into(),
                cpu: usage(12_500_000_000),
                memory: memory(512 * 1024 * 1024),
            },
            pods: vec![PodUsage {
                namespace: "default".into(),
                name: "web\"1".into(),
                uid: "u1".into(),
                start_time: "2026-12-04T20:30:00Z".into(),
                cpu: usage(2_000_000_000),
                memory: memory(4096),
                containers: vec![ContainerUsage {
                    name: "c".into(),
                    start_time: "2026-12-04T20:30:01Z".into(),
                    cpu: usage(1_500_000_000),
                    memory: memory(2048),
                }],
            }],
        }
    }

    /// One sample as metrics-server's decoder reads it: the series name must be followed by
    /// `{` or a space, labels are found by `container="`, `pod="`, `namespace="`, the value is a
    /// float and the timestamp an integer of milliseconds.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
        millis: i128,
    }

    /// A strict reader of the text format: every family has HELP and TYPE before its samples,
    /// every sample but `scrape_error` has a millisecond timestamp.
    fn parse_strictly(text: &str) -> Vec<Sample> {
        let mut typed = BTreeMap::new();
        let mut helped = std::collections::BTreeSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.is_empty());
                helped.insert(name.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                typed.insert(name.to_string(), kind.to_string());
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, rest) = match line.find('{') {
                Some(i) if i < line.find(' ').expect("space") => {
                    let end = line.find("} ").expect("closing brace");
                    (&line[..end + 1], &line[end + 2..])
                }
                _ => line.split_once(' ').expect("name value"),
            };
            let name = series.split('{').next().expect("name").to_string();
            assert!(typed.contains_key(&name), "sample before its TYPE: {line}");
            let mut labels = BTreeMap::new();
            if let Some(body) = series.strip_prefix(&name).and_then(|s| s.strip_prefix('{')) {
                let body = body.strip_suffix('}').expect("}");
                let mut order = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").expect("key=\"");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        let (i, c) = chars.next().expect("closing quote");
                        match c {
                            '\\' => value.push(chars.next().expect("escape").1),
                            '"' => break i,
                            c => value.push(c),
                        }
                    };
                    order.push(key.to_string());
                    labels.insert(key.to_string(), value);
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
                let mut sorted = order.clone();
                sorted.sort();
                assert_eq!(order, sorted, "labels in the kubelet's order: {line}");
            }
            let mut parts = rest.split(' ');
            let value: f64 = parts.next().expect("value").parse().expect("float value");
            let millis = match parts.next() {
                Some(t) => {
                    assert!(t.chars().all(|c| c.is_ascii_digit()), "integer ms: {line}");
                    t.parse().expect("timestamp")
                }
                None => {
                    assert_eq!(name, "scrape_error", "sample without a timestamp: {line}");
                    0
                }
            };
            assert!(parts.next().is_none(), "{line}");
            samples.push(Sample {
                name,
                labels,
                value,
                millis,
            });
        }
        samples
    }

    #[test]
    fn resource_metrics_parse_as_metrics_server_reads_them() {
        let now = OffsetDateTime::now_utc();
        let text = resource_metrics(&summary(), now);
        let samples = parse_strictly(&text);
        let find = |name: &str| {
            samples
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
        };
        let node_cpu = find("node_cpu_usage_seconds_total");
        assert_eq!(node_cpu.value, 12.5);
        assert_eq!(node_cpu.millis, T_MS);
        assert!(node_cpu.labels.is_empty());
        assert_eq!(
            find("node_memory_working_set_bytes").value,
            (512 * 1024 * 1024) as f64
        );
        let cpu = find("container_cpu_usage_seconds_total");
        assert_eq!(cpu.value, 1.5);
        assert_eq!(cpu.millis, T_MS);
        let want: BTreeMap<String, String> = [
            ("container", "c"),
            ("namespace", "default"),
            ("pod", "web\"1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(cpu.labels, want);
        assert_eq!(find("container_memory_working_set_bytes").value, 2048.0);
        assert_eq!(
            find("container_start_time_seconds").value,
            1_796_416_201.0,
            "2026-12-04T20:30:01Z"
        );
        let pod_cpu = find("pod_cpu_usage_seconds_total");
        assert_eq!(pod_cpu.value, 2.0);
        assert_eq!(pod_cpu.labels.len(), 2);
        assert_eq!(find("pod_memory_working_set_bytes").value, 4096.0);
        assert_eq!(find("scrape_error").value, 0.0);
        // metrics-server drops a node with zero CPU or memory, and needs its timestamp.
        assert!(node_cpu.value > 0.0 && node_cpu.millis > 0);
    }

    #[test]
    fn a_missing_time_gets_the_scrape_time() {
        let mut s = summary();
        s.node.cpu.time = String::new();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        let samples = parse_strictly(&resource_metrics(&s, now));
        let node = samples
            .iter()
            .find(|s| s.name == "node_cpu_usage_seconds_total")
            .expect("node cpu");
        assert_eq!(node.millis, 1_800_000_000_000);
    }

    #[test]
    fn summary_has_the_kubelet_shape() {
        let v = summary_json(&summary());
        assert_eq!(v["node"]["nodeName"], "gw-1");
        assert_eq!(v["node"]["cpu"]["usageCoreNanoSeconds"], 12_500_000_000u64);
        assert_eq!(v["node"]["cpu"]["usageNanoCores"], 1000);
        assert_eq!(v["node"]["memory"]["workingSetBytes"], 512 * 1024 * 1024);
        assert_eq!(v["pods"][0]["podRef"]["name"], "web\"1");
        assert_eq!(v["pods"][0]["podRef"]["uid"], "u1");
        assert_eq!(v["pods"][0]["containers"][0]["name"], "c");
        assert_eq!(
            v["pods"][0]["containers"][0]["memory"]["workingSetBytes"],
            2048
        );
        assert_eq!(v["pods"][0]["memory"]["time"], T);
    }
}
