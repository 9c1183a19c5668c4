//! Jobs and CronJobs in embedded mode: cloudcore's Job and CronJob controllers, its scheduler, a
//! real edge with a real containerd, real `kubectl`; and the same kubectl sequence against the
//! real control plane (kube-apiserver, kube-controller-manager v1.36), compared. Needs root,
//! Debian's containerd, runc, containernetworking-plugins and busybox-static, and the control
//! plane of `../shared/k8s` (`.ci/run` installs the rest); without them the tests fail saying
//! what is missing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use integration::cluster::{self, ClusterOptions, KubeCluster};
use integration::{Cloud, Containerd, Edge, eventually, join};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// Fields drop in order: edgecore, then containerd (removing its pods), then cloudcore.
struct Setup {
    edge: Edge,
    _containerd: Containerd,
    cloud: Cloud,
    _tmp: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let containerd = Containerd::start(&tmp.path().join("containerd"));
        let cloud = Cloud::start(tmp.path(), &[]);
        let token = cloud.token(&[]);
        let edge_dir = tmp.path().join("edge-1");
        let out = join(&edge_dir, &token, "edge-1");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
        assert!(
            eventually(Duration::from_secs(15), || edge.connected()),
            "{}",
            edge.log()
        );
        Setup {
            _tmp: tmp,
            cloud,
            _containerd: containerd,
            edge,
        }
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.cloud.kubectl_ok(args, stdin)
    }

    /// `kubectl get ARGS -o json`, or `None` when kubectl fails (not found).
    fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.cloud.kubectl(&all);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn job(&self, name: &str) -> Option<Value> {
        self.get(&["job", name])
    }

    /// The pods of Job `name`, by the label its controller sets.
    fn pods_of(&self, job: &str) -> Vec<Value> {
        let selector = format!("batch.kubernetes.io/job-name={job}");
        self.get(&["pods", "-l", &selector])
            .and_then(|l| l["items"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Polls Job `name` until `check` holds; panics after `within` with the Job, its pods and
    /// the edge's log.
    fn wait_job(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < within {
            if let Some(job) = self.job(name) {
                if check(&job) {
                    return job;
                }
                last = Some(job);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "job {name}: {what} not reached within {within:?}; last: {}\npods: {:#?}\nedge log:\n{}",
            last.map(|j| j["status"].to_string()).unwrap_or_default(),
            self.pods_of(name)
                .iter()
                .map(|p| (p["metadata"]["name"].clone(), p["status"]["phase"].clone()))
                .collect::<Vec<_>>(),
            self.edge.log()
        );
    }
}

/// The condition of `type_` with status True.
fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == "True")
}

fn reason(object: &Value, type_: &str) -> Option<String> {
    condition(object, type_).and_then(|c| c["reason"].as_str().map(String::from))
}

fn name(object: &Value) -> String {
    object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn is_active(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && !matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        )
}

/// (reason, message) of the Events about `kind`/`name`, oldest first.
fn events(kubectl: impl Fn(&[&str]) -> Output, kind: &str, name: &str) -> Vec<(String, String)> {
    let selector = format!("involvedObject.kind={kind},involvedObject.name={name}");
    let out = kubectl(&["get", "events", "--field-selector", &selector, "-o", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut items = list["items"].as_array().cloned().unwrap_or_default();
    items.sort_by_key(|e| e["firstTimestamp"].as_str().unwrap_or_default().to_string());
    items
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The events of an object once every reason in `reasons` is among them (or, after 20 s,
/// whatever there is, for the assertion to show). Events are written after the change they
/// report, by a queue, on kube-apiserver's side as on ours: a read right after seeing the
/// change may come too early.
fn events_with(
    kubectl: impl Fn(&[&str]) -> Output,
    kind: &str,
    name: &str,
    reasons: &[&str],
) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    eventually(Duration::from_secs(20), || {
        seen = events(&kubectl, kind, name);
        reasons.iter().all(|r| count_reason(&seen, r) > 0)
    });
    seen
}

fn count_reason(events: &[(String, String)], reason: &str) -> usize {
    events.iter().filter(|(r, _)| r == reason).count()
}

const IMAGE: &str = "localhost/edge/busybox:1";

fn job_manifest(name: &str, extra_spec: &str, command: &str) -> String {
    format!(
        r#"
apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
{extra_spec}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {IMAGE}
        command: ["sh", "-c", {command:?}]
"#
    )
}

/// completions 3, parallelism 2: never more than 2 pods at once, 3 succeed, Complete, and
/// `kubectl wait` and `kubectl describe` read it.
fn completions_and_parallelism(s: &Setup) {
    s.kubectl(
        &["apply", "-f", "-"],
        Some(&job_manifest(
            "work",
            "  completions: 3\n  parallelism: 2",
            "sleep 2",
        )),
    );
    let started = Instant::now();
    let mut most_active = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let active = s.pods_of("work").iter().filter(|p| is_active(p)).count();
        most_active = most_active.max(active);
        assert!(active <= 2, "{active} pods of work active at once");
        if s.job("work")
            .is_some_and(|j| condition(&j, "Complete").is_some())
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(most_active, 2, "parallelism 2 was never used");
    let out = s.cloud.kubectl(&[
        "wait",
        "--for=condition=complete",
        "job/work",
        "--timeout=30s",
    ]);
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = s.job("work").expect("job work");
    let context = || {
        format!(
            "{}\nevents: {:?}\npods: {:?}",
            job["status"],
            events(|a| s.cloud.kubectl(a), "Job", "work"),
            s.pods_of("work")
                .iter()
                .map(|p| (name(p), p["status"]["phase"].clone()))
                .collect::<Vec<_>>()
        )
    };
    assert_eq!(job["status"]["succeeded"], 3, "{}", context());
    assert!(job["status"]["failed"].is_null(), "{}", context());
    assert!(job["status"]["active"].is_null(), "{}", job["status"]);
    assert!(job["status"]["completionTime"].is_string());
    assert_eq!(
        reason(&job, "SuccessCriteriaMet").as_deref(),
        Some("CompletionsReached")
    );
    assert_eq!(
        reason(&job, "Complete").as_deref(),
        Some("CompletionsReached")
    );
    assert_eq!(
        job["status"]["uncountedTerminatedPods"],
        serde_json::json!({})
    );
    let pods = s.pods_of("work");
    assert_eq!(pods.len(), 3, "{pods:#?}");
    for pod in &pods {
        assert_eq!(pod["status"]["phase"], "Succeeded", "{}", name(pod));
        assert!(
            pod["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty()),
            "the tracking finalizer stays on {}",
            name(pod)
        );
        assert!(name(pod).starts_with("work-"));
        assert_eq!(pod["metadata"]["labels"]["job-name"], "work");
        assert_eq!(pod["metadata"]["labels"]["app"], "work");
    }
    let describe = s.kubectl(&["describe", "job", "work"], None);
    assert!(
        describe.contains("0 Active (0 Ready) / 3 Succeeded / 0 Failed"),
        "{describe}"
    );
    let events = events_with(|a| s.cloud.kubectl(a), "Job", "work", &["Completed"]);
    assert_eq!(count_reason(&events, "SuccessfulCreate"), 3, "{events:?}");
    assert!(
        events.contains(&("Completed".into(), "Job completed".into())),
        "{events:?}"
    );
}

/// backoffLimit 1: two pods fail, the second after the 10 s back-off, then Failed.
fn backoff_limit(s: &Setup) {
    s.kubectl(
        &["apply", "-f", "-"],
        Some(&job_manifest("fail", "  backoffLimit: 1", "exit 3")),
    );
    let job = s.wait_job("fail", Duration::from_secs(60), "Failed", |j| {
        condition(j, "Failed").is_some()
    });
    assert_eq!(
        reason(&job, "Failed").as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert_eq!(
        reason(&job, "FailureTarget").as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert_eq!(job["status"]["failed"], 2, "{}", job["status"]);
    assert!(job["status"]["completionTime"].is_null());
    let mut pods = s.pods_of("fail");
    assert_eq!(pods.len(), 2, "{pods:#?}");
    pods.sort_by_key(|p| {
        p["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    let finished = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
        .as_str()
        .expect("the first pod's finish time")
        .parse::<Timestamp>()
        .expect("timestamp");
    let second = pods[1]["metadata"]["creationTimestamp"]
        .as_str()
        .expect("creation time")
        .parse::<Timestamp>()
        .expect("timestamp");
    let waited = second.duration_since(finished).as_secs();
    // Whole seconds on both sides: 10 s of back-off shows as at least 9.
    assert!(
        (9..30).contains(&waited),
        "the second pod came {waited} s after the first failed"
    );
    let events = events_with(
        |a| s.cloud.kubectl(a),
        "Job",
        "fail",
        &["BackoffLimitExceeded"],
    );
    assert!(
        events.contains(&(
            "BackoffLimitExceeded".into(),
            "Job has reached the specified backoff limit".into()
        )),
        "{events:?}"
    );
}

/// activeDeadlineSeconds: the running pod is deleted and the Job fails with DeadlineExceeded.
fn active_deadline(s: &Setup) {
    s.kubectl(
        &["apply", "-f", "-"],
        Some(&job_manifest(
            "slow",
            "  activeDeadlineSeconds: 4",
            "sleep 300",
        )),
    );
    let job = s.wait_job("slow", Duration::from_secs(40), "Failed", |j| {
        condition(j, "Failed").is_some()
    });
    assert_eq!(reason(&job, "Failed").as_deref(), Some("DeadlineExceeded"));
    assert_eq!(job["status"]["failed"], 1, "{}", job["status"]);
    let start = job["status"]["startTime"].as_str().expect("startTime");
    let failed_at = condition(&job, "Failed").expect("Failed")["lastTransitionTime"]
        .as_str()
        .expect("transition time");
    let lasted = failed_at
        .parse::<Timestamp>()
        .expect("timestamp")
        .duration_since(start.parse::<Timestamp>().expect("timestamp"))
        .as_secs();
    assert!((4..20).contains(&lasted), "failed after {lasted} s");
    assert!(
        eventually(Duration::from_secs(20), || s.pods_of("slow").is_empty()),
        "the pod past the deadline stays: {:#?}",
        s.pods_of("slow")
    );
    let events = events_with(
        |a| s.cloud.kubectl(a),
        "Job",
        "slow",
        &["SuccessfulDelete", "DeadlineExceeded"],
    );
    assert_eq!(count_reason(&events, "SuccessfulDelete"), 1, "{events:?}");
    assert_eq!(count_reason(&events, "DeadlineExceeded"), 1, "{events:?}");
}

/// Indexed completion with ttlSecondsAfterFinished: each index once, with its index in the
/// environment; then the Job and its pods go.
fn indexed_with_ttl(s: &Setup) {
    s.kubectl(
        &["apply", "-f", "-"],
        Some(&job_manifest(
            "idx",
            "  completions: 2\n  parallelism: 2\n  completionMode: Indexed\n  ttlSecondsAfterFinished: 12",
            r#"test "$JOB_COMPLETION_INDEX" = "$(hostname | sed 's/^idx-//')""#,
        )),
    );
    let job = s.wait_job("idx", Duration::from_secs(40), "Complete", |j| {
        condition(j, "Complete").is_some()
    });
    assert_eq!(
        job["status"]["completedIndexes"], "0-1",
        "{}",
        job["status"]
    );
    assert_eq!(job["status"]["succeeded"], 2);
    let mut indexes: Vec<String> = s
        .pods_of("idx")
        .iter()
        .map(|p| {
            let index = p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                name(p).starts_with(&format!("idx-{index}-")),
                "{} has index {index}",
                name(p)
            );
            index
        })
        .collect();
    indexes.sort();
    assert_eq!(indexes, ["0", "1"]);
    let completed: Timestamp = condition(&job, "Complete").expect("Complete")["lastTransitionTime"]
        .as_str()
        .expect("transition time")
        .parse()
        .expect("timestamp");
    assert!(
        eventually(Duration::from_secs(30), || s.job("idx").is_none()),
        "the finished Job outlived its ttlSecondsAfterFinished"
    );
    // Whole seconds in the condition: 12 s of life show as at least 11.
    let lived = Timestamp::now().duration_since(completed).as_secs();
    assert!(
        (11..30).contains(&lived),
        "deleted {lived} s after it completed, with a time to live of 12 s"
    );
    assert!(
        eventually(Duration::from_secs(20), || s.pods_of("idx").is_empty()),
        "the pods of the deleted Job stay"
    );
}

const CRONJOB: &str = r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick}
spec:
  schedule: "*/1 * * * *"
  timeZone: UTC
  jobTemplate:
    metadata: {labels: {app: tick}}
    spec:
      template:
        spec:
          restartPolicy: Never
          terminationGracePeriodSeconds: 1
          containers:
          - {name: main, image: localhost/edge/busybox:1, command: ["true"]}
"#;

/// A CronJob fires within the minute, names its Job after the schedule time, and records it;
/// `kubectl create job --from=cronjob/...` makes a Job by hand from it.
fn cronjob_fires(s: &Setup) {
    s.kubectl(&["apply", "-f", "-"], Some(CRONJOB));
    s.kubectl(
        &["create", "job", "tick-by-hand", "--from=cronjob/tick"],
        None,
    );
    let by_hand = s.wait_job("tick-by-hand", Duration::from_secs(40), "Complete", |j| {
        condition(j, "Complete").is_some()
    });
    assert_eq!(
        by_hand["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"],
        "manual"
    );
    let owned = |j: &Value| {
        j["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
            && j["metadata"]["ownerReferences"][0]["name"] == "tick"
            && name(j) != "tick-by-hand"
    };
    let started = Instant::now();
    let fired = loop {
        let jobs = s
            .get(&["jobs"])
            .and_then(|l| l["items"].as_array().cloned())
            .unwrap_or_default();
        if let Some(job) = jobs.into_iter().find(|j| owned(j)) {
            break job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(75),
            "the CronJob did not fire within 75 s: {}",
            s.get(&["cronjob", "tick"]).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let scheduled =
        fired["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"]
            .as_str()
            .expect("scheduled-timestamp annotation")
            .to_string();
    let at: Timestamp = scheduled.parse().expect("RFC 3339");
    assert_eq!(at.as_second() % 60, 0, "{scheduled}");
    assert_eq!(name(&fired), format!("tick-{}", at.as_second() / 60));
    assert_eq!(fired["metadata"]["labels"]["app"], "tick");
    let job_name = name(&fired);
    s.wait_job(&job_name, Duration::from_secs(40), "Complete", |j| {
        condition(j, "Complete").is_some()
    });
    let mut cronjob = Value::Null;
    assert!(
        eventually(Duration::from_secs(15), || {
            cronjob = s.get(&["cronjob", "tick"]).unwrap_or_default();
            cronjob["status"]["lastSuccessfulTime"].is_string()
                && cronjob["status"]["active"].is_null()
        }),
        "{}",
        cronjob["status"]
    );
    assert_eq!(cronjob["status"]["lastScheduleTime"], scheduled.as_str());
    let events = events_with(
        |a| s.cloud.kubectl(a),
        "CronJob",
        "tick",
        &["SuccessfulCreate", "SawCompletedJob"],
    );
    assert!(
        events.contains(&("SuccessfulCreate".into(), format!("Created job {job_name}"))),
        "{events:?}"
    );
    assert!(
        events.contains(&(
            "SawCompletedJob".into(),
            format!("Saw completed job: {job_name}, status: Complete")
        )),
        "{events:?}"
    );
}

#[test]
fn jobs_and_cronjobs_run_on_an_edge() {
    let s = Setup::start();
    let started = Instant::now();
    // The CronJob needs up to a minute: every scenario runs at once, on their own objects.
    std::thread::scope(|scope| {
        let runs = [
            ("cronjob", scope.spawn(|| cronjob_fires(&s))),
            (
                "completions",
                scope.spawn(|| completions_and_parallelism(&s)),
            ),
            ("backoff", scope.spawn(|| backoff_limit(&s))),
            ("deadline", scope.spawn(|| active_deadline(&s))),
            ("indexed", scope.spawn(|| indexed_with_ttl(&s))),
        ];
        let mut failed = Vec::new();
        for (what, run) in runs {
            if let Err(panic) = run.join() {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("{what} failed: {message}");
                failed.push(what);
            }
        }
        assert!(failed.is_empty(), "failed: {failed:?}");
    });
    eprintln!("all job scenarios took {:?}", started.elapsed());
    // Last: it taints the only node.
    kept_on_a_disconnected_node(&s);
}

/// The autonomy rule: a Job past its deadline does not delete its pod while the pod's node is
/// unreachable (tainted `node.kubernetes.io/unreachable`, as the node lifecycle marks it); it
/// stays active until the node is back, then the Job deletes it and fails.
fn kept_on_a_disconnected_node(s: &Setup) {
    s.kubectl(
        &["apply", "-f", "-"],
        Some(&job_manifest(
            "kept",
            "  activeDeadlineSeconds: 8",
            "sleep 300",
        )),
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            s.pods_of("kept")
                .iter()
                .any(|p| p["status"]["phase"] == "Running")
        }),
        "the pod of kept never ran: {:#?}",
        s.pods_of("kept")
    );
    let taint = "node.kubernetes.io/unreachable:NoSchedule";
    s.kubectl(&["taint", "node", "edge-1", taint], None);
    let job = s.wait_job("kept", Duration::from_secs(20), "FailureTarget", |j| {
        condition(j, "FailureTarget").is_some()
    });
    assert_eq!(
        reason(&job, "FailureTarget").as_deref(),
        Some("DeadlineExceeded")
    );
    std::thread::sleep(Duration::from_secs(3));
    let job = s.job("kept").expect("job kept");
    assert!(condition(&job, "Failed").is_none(), "{}", job["status"]);
    assert_eq!(job["status"]["active"], 1, "{}", job["status"]);
    let pods = s.pods_of("kept");
    assert_eq!(pods.len(), 1, "{pods:#?}");
    assert!(
        pods[0]["metadata"]["deletionTimestamp"].is_null(),
        "the pod on the unreachable node was deleted"
    );
    s.kubectl(&["taint", "node", "edge-1", &format!("{taint}-")], None);
    let job = s.wait_job("kept", Duration::from_secs(30), "Failed", |j| {
        condition(j, "Failed").is_some()
    });
    assert_eq!(reason(&job, "Failed").as_deref(), Some("DeadlineExceeded"));
    assert!(
        eventually(Duration::from_secs(20), || s.pods_of("kept").is_empty()),
        "the pod stays after the node came back"
    );
}

/// What the two control planes are compared on.
struct Side {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Side {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        cluster::kubectl(&self.kubeconfig, &self.cache, args, stdin)
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn get(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&all, None)).expect("kubectl JSON")
    }

    /// The last line of kubectl's error output.
    fn refusal(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(!out.status.success(), "kubectl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_string()
    }
}

/// What a Job's pods and status look like with no node to run them, as comparable values.
fn job_observation(side: &Side, job: &str) -> Value {
    assert!(
        eventually(
            Duration::from_secs(30),
            || side.get(&["job", job])["status"]["active"] == 2
        ),
        "{job}: 2 active pods never counted: {}",
        side.get(&["job", job])["status"]
    );
    let selector = format!("batch.kubernetes.io/job-name={job}");
    let pods = side.get(&["pods", "-l", &selector]);
    let pods: Vec<Value> = pods["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let meta = &p["metadata"];
            let labels: BTreeMap<String, Value> = meta["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    // The uid differs; whether it is the Job's does not.
                    let v = if k.ends_with("controller-uid") {
                        Value::Bool(v == p["metadata"]["ownerReferences"][0]["uid"])
                    } else {
                        v
                    };
                    (k, v)
                })
                .collect();
            let mut owner = meta["ownerReferences"][0].clone();
            owner["uid"] = Value::Null;
            serde_json::json!({
                "generateName": meta["generateName"],
                "labels": labels,
                "finalizers": meta["finalizers"],
                "owner": owner,
            })
        })
        .collect();
    let mut status = side.get(&["job", job])["status"].clone();
    status["startTime"] = Value::Bool(status["startTime"].is_string());
    serde_json::json!({"pods": pods, "status": status})
}

/// The conditions without their times.
fn conditions(job: &Value) -> Value {
    let list = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Value::Array(
        list.into_iter()
            .map(|c| {
                serde_json::json!({"type": c["type"], "status": c["status"], "reason": c["reason"], "message": c["message"]})
            })
            .collect(),
    )
}

fn sorted_reasons(events: &[(String, String)]) -> Vec<String> {
    let mut reasons: Vec<String> = events.iter().map(|(r, _)| r.clone()).collect();
    reasons.sort();
    reasons
}

const COMPARED_JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: same}
spec:
  completions: 3
  parallelism: 2
  template:
    metadata: {labels: {app: same}}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 0
      containers: [{name: main, image: localhost/edge/busybox:1, command: ["true"]}]
"#;

const CATCH_UP: &str = r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: catchup}
spec:
  schedule: "*/1 * * * *"
  timeZone: UTC
  suspend: true
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: main, image: busybox}]
"#;

/// A CronJob whose last run was three hours ago (as after a long cloudcore outage, set in its
/// status while suspended): one run for the most recent time, and a warning about the 180
/// missed ones.
fn missed_runs(side: &Side) -> Value {
    // The schedule runs every minute: start early in a minute, so that a run legitimately due
    // at the next one (which a controller may start while this looks) cannot show up here.
    let second = Timestamp::now().as_second().rem_euclid(60);
    if second > 25 {
        std::thread::sleep(Duration::from_secs((61 - second) as u64));
    }
    side.ok(&["apply", "-f", "-"], Some(CATCH_UP));
    let three_hours_ago =
        Timestamp::from_second((Timestamp::now().as_second() - 3 * 3600).div_euclid(60) * 60)
            .expect("timestamp");
    let status = serde_json::json!({"status": {"lastScheduleTime": three_hours_ago.to_string()}});
    side.ok(
        &[
            "patch",
            "cronjob",
            "catchup",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
        None,
    );
    side.ok(
        &[
            "patch",
            "cronjob",
            "catchup",
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":false}}"#,
        ],
        None,
    );
    let owned = || -> Vec<Value> {
        side.get(&["jobs"])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|j| j["metadata"]["ownerReferences"][0]["name"] == "catchup")
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(20), || !owned().is_empty()),
        "no catch-up run"
    );
    // Time for a wrong second run to show.
    std::thread::sleep(Duration::from_secs(2));
    let jobs = owned();
    let cronjob = side.get(&["cronjob", "catchup"]);
    let last: Timestamp = cronjob["status"]["lastScheduleTime"]
        .as_str()
        .expect("lastScheduleTime")
        .parse()
        .expect("timestamp");
    serde_json::json!({
        "jobs": jobs.len(),
        "named after lastScheduleTime": jobs.first().map(name) == Some(format!("catchup-{}", last.as_second() / 60)),
        "lastScheduleTime within the last minute": Timestamp::now().duration_since(last).as_secs() < 60,
        "events": sorted_reasons(&events_with(
            |a| side.run(a, None),
            "CronJob",
            "catchup",
            &["SuccessfulCreate", "TooManyMissedTimes"],
        )),
    })
}

const BAD_ZONE: &str = r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: zone}
spec:
  schedule: "*/1 * * * *"
  timeZone: Europe/Pariss
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: main, image: busybox}]
"#;

/// The same kubectl sequence against the embedded API and the real control plane: a Job's
/// pods and status, its suspension, its Events, the refusal of bad CronJob schedules, and
/// `kubectl create job --from=cronjob/...`.
#[test]
fn jobs_match_the_real_control_plane() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let real = KubeCluster::start(&tmp.path().join("k8s"), &ClusterOptions::default());
    let sides = [
        Side {
            kubeconfig: cloud.kubeconfig(),
            cache: tmp.path().join("cache-embedded"),
        },
        Side {
            kubeconfig: real.kubeconfig.clone(),
            cache: tmp.path().join("cache-real"),
        },
    ];
    let observe = |side: &Side| {
        side.ok(&["apply", "-f", "-"], Some(COMPARED_JOB));
        let started = job_observation(side, "same");
        side.ok(
            &[
                "patch",
                "job",
                "same",
                "--type=merge",
                "-p",
                r#"{"spec":{"suspend":true}}"#,
            ],
            None,
        );
        let mut suspended = Value::Null;
        assert!(
            eventually(Duration::from_secs(20), || {
                suspended = side.get(&["job", "same"]);
                condition(&suspended, "Suspended").is_some()
                    && suspended["status"]["active"].is_null()
                    && side.get(&["pods", "-l", "batch.kubernetes.io/job-name=same"])["items"]
                        .as_array()
                        .is_some_and(|a| a.is_empty())
            }),
            "never suspended: {}",
            suspended["status"]
        );
        let mut status = suspended["status"].clone();
        status["conditions"] = conditions(&suspended);
        // How long deleted pods count as terminating depends on a kubelet confirming them
        // (the real side's stand-in node has none): a race, not compared.
        status["terminating"] = Value::Null;
        let job_events = sorted_reasons(&events_with(
            |a| side.run(a, None),
            "Job",
            "same",
            &["Suspended"],
        ));

        let bad_schedules: Vec<String> = ["CRON_TZ=UTC * * * * *", "61 * * * *", "* * * *"]
            .iter()
            .map(|schedule| {
                side.refusal(
                    &[
                        "create",
                        "cronjob",
                        "bad",
                        "--image=busybox",
                        &format!("--schedule={schedule}"),
                        "--",
                        "true",
                    ],
                    None,
                )
            })
            .collect();
        let bad_zone = side.refusal(&["apply", "-f", "-"], Some(BAD_ZONE));
        side.ok(
            &[
                "create",
                "cronjob",
                "hello",
                "--image=busybox",
                "--schedule=0 0 1 1 *",
                "--",
                "true",
            ],
            None,
        );
        side.ok(&["create", "job", "manual", "--from=cronjob/hello"], None);
        let manual = side.get(&["job", "manual"]);
        let mut owner = manual["metadata"]["ownerReferences"].clone();
        owner[0]["uid"] = Value::Null;
        let catch_up = missed_runs(side);
        serde_json::json!({
            "missed runs": catch_up,
            "started": started,
            "suspended": status,
            "job events": job_events,
            "bad schedules": bad_schedules,
            "bad time zone": bad_zone,
            "manual job": {
                "annotations": manual["metadata"]["annotations"],
                "owner": owner,
            },
        })
    };
    let embedded = observe(&sides[0]);
    // What both must show, so that equal is not vacuous.
    assert_eq!(
        embedded["missed runs"],
        serde_json::json!({
            "jobs": 1,
            "named after lastScheduleTime": true,
            "lastScheduleTime within the last minute": true,
            "events": ["SuccessfulCreate", "TooManyMissedTimes"],
        }),
        "{embedded:#}"
    );
    let kube = observe(&sides[1]);
    assert_eq!(embedded, kube, "embedded:\n{embedded:#}\nreal:\n{kube:#}");
}
