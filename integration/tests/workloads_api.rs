//! apps/v1, batch/v1 and ServiceAccount objects in the embedded API through the real kubectl:
//! defaults, validation, the scale subresource, `set image` / `set env` / `rollout restart` /
//! `label` / client-side `apply`, server-side printing, discovery (`api-resources`, `get all`),
//! the `default` ServiceAccount, and `/readyz` following the store. None of it needs a workload
//! controller: these are the API's own answers. The defaults and messages are compared with a
//! real kube-apiserver's.

use std::time::Duration;

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, eventually};
use serde_json::Value;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(cloud: &Cloud, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let out = ok(cloud.kubectl(&args), &args.join(" "));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The header row of a `kubectl get` output, its columns split on runs of spaces.
fn header(output: &str) -> Vec<String> {
    output
        .lines()
        .next()
        .unwrap_or_default()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

/// The row of `name` (first column), its cells split on runs of spaces.
fn row(output: &str, name: &str) -> Vec<String> {
    output
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in\n{output}"))
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      nodeSelector: {node-role.kubernetes.io/edge: ""}
      containers: [{name: agent, image: localhost/busybox:1}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: localhost/busybox:1}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: once, image: localhost/busybox:1, command: ["true"]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick}
spec:
  schedule: "*/5 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: tick, image: localhost/busybox:1}]
"#;

const BAD_SELECTOR: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  selector: {matchLabels: {app: bad}}
  template:
    metadata: {labels: {app: other}}
    spec:
      containers: [{name: c, image: localhost/busybox:1}]
"#;

#[test]
fn workload_objects_behave_as_kube_apiserver_makes_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    ok(cloud.kubectl(&["create", "namespace", "apps"]), "create ns");

    // The ServiceAccount controller gives the new namespace its `default` account, and gives
    // it back when it is deleted.
    let has_default = || {
        cloud
            .kubectl(&["get", "serviceaccount", "default", "-n", "apps"])
            .status
            .success()
    };
    assert!(eventually(Duration::from_secs(10), has_default));
    let sa = ok(cloud.kubectl(&["get", "sa", "-n", "apps"]), "get sa");
    assert_eq!(header(&sa), ["NAME", "SECRETS", "AGE"], "{sa}");
    assert_eq!(row(&sa, "default")[1], "0", "{sa}");
    let uid = json_of(&cloud, &["get", "sa", "default", "-n", "apps"])["metadata"]["uid"].clone();
    ok(
        cloud.kubectl(&["delete", "sa", "default", "-n", "apps"]),
        "delete sa",
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let again = cloud.kubectl(&["get", "sa", "default", "-n", "apps", "-o", "json"]);
            again.status.success()
                && serde_json::from_slice::<Value>(&again.stdout)
                    .is_ok_and(|sa| sa["metadata"]["uid"] != uid)
        }),
        "the default ServiceAccount comes back"
    );

    // A Deployment gets kube-apiserver's defaults, its template a pod's.
    ok(
        cloud.kubectl(&[
            "create",
            "deployment",
            "web",
            "--image=localhost/nginx:1.25",
            "--replicas=2",
            "--port=80",
            "-n",
            "apps",
        ]),
        "create deployment",
    );
    let web = json_of(&cloud, &["get", "deploy", "web", "-n", "apps"]);
    let spec = &web["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], "25%");
    assert_eq!(spec["revisionHistoryLimit"], 10);
    assert_eq!(spec["progressDeadlineSeconds"], 600);
    let container = &spec["template"]["spec"]["containers"][0];
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    assert_eq!(container["terminationMessagePolicy"], "File");
    assert_eq!(container["ports"][0]["protocol"], "TCP");
    assert_eq!(spec["template"]["spec"]["restartPolicy"], "Always");
    // The Deployment controller runs here: it writes the revision annotation on the object
    // (a generation bump, docs/workloads.md), after which only spec changes move it.
    assert!(
        eventually(Duration::from_secs(10), || {
            json_of(&cloud, &["get", "deploy", "web", "-n", "apps"])["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                == "1"
        }),
        "the controller did not take the Deployment"
    );
    let settled =
        json_of(&cloud, &["get", "deploy", "web", "-n", "apps"])["metadata"]["generation"]
            .as_i64()
            .expect("generation");

    // The scale subresource: kubectl scale, with and without a precondition.
    let scale = ok(
        cloud.kubectl(&[
            "get",
            "--raw",
            "/apis/apps/v1/namespaces/apps/deployments/web/scale",
        ]),
        "get scale",
    );
    let scale: Value = serde_json::from_str(&scale).expect("scale json");
    assert_eq!(
        (&scale["kind"], &scale["apiVersion"]),
        (&Value::from("Scale"), &Value::from("autoscaling/v1"))
    );
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=web");
    ok(
        cloud.kubectl(&["scale", "deployment", "web", "--replicas=3", "-n", "apps"]),
        "scale",
    );
    let refused = cloud.kubectl(&[
        "scale",
        "deployment",
        "web",
        "--current-replicas=2",
        "--replicas=1",
        "-n",
        "apps",
    ]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("Expected replicas to be 2, was 3"),
        "{}",
        text(&refused)
    );
    ok(
        cloud.kubectl(&[
            "scale",
            "deployment/web",
            "--current-replicas=3",
            "--replicas=4",
            "-n",
            "apps",
        ]),
        "scale with a precondition",
    );
    let web = json_of(&cloud, &["get", "deploy", "web", "-n", "apps"]);
    assert_eq!(web["spec"]["replicas"], 4);
    assert_eq!(
        web["metadata"]["generation"],
        settled + 2,
        "each scale is a spec change"
    );
    let scaled = settled + 2;

    // Labels do not move the generation; set image, set env and rollout restart change the
    // template as asked and do.
    ok(
        cloud.kubectl(&["label", "deployment", "web", "tier=front", "-n", "apps"]),
        "label",
    );
    assert_eq!(
        json_of(&cloud, &["get", "deploy", "web", "-n", "apps"])["metadata"]["generation"],
        scaled,
        "a label is no spec change"
    );
    ok(
        cloud.kubectl(&[
            "set",
            "image",
            "deployment/web",
            "nginx=localhost/nginx:1.26",
            "-n",
            "apps",
        ]),
        "set image",
    );
    ok(
        cloud.kubectl(&["set", "env", "deployment/web", "MODE=edge", "-n", "apps"]),
        "set env",
    );
    ok(
        cloud.kubectl(&["rollout", "restart", "deployment/web", "-n", "apps"]),
        "rollout restart",
    );
    let web = json_of(&cloud, &["get", "deploy", "web", "-n", "apps"]);
    assert_eq!(web["metadata"]["labels"]["tier"], "front");
    let template = &web["spec"]["template"];
    let container = &template["spec"]["containers"][0];
    assert_eq!(container["image"], "localhost/nginx:1.26");
    assert_eq!(container["env"][0]["name"], "MODE");
    assert_eq!(container["ports"][0]["containerPort"], 80, "the rest stays");
    assert!(
        template["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"].is_string(),
        "{template}"
    );
    // Three template changes, each a bump (and each a new revision the controller may note).
    let generation = web["metadata"]["generation"].as_i64().expect("generation");
    assert!(
        generation >= scaled + 3,
        "three template changes: {generation}"
    );

    // Printing.
    let get = ok(
        cloud.kubectl(&["get", "deploy", "-n", "apps"]),
        "get deploy",
    );
    assert_eq!(
        header(&get),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{get}"
    );
    assert_eq!(row(&get, "web")[1], "0/4", "{get}");
    let wide = ok(
        cloud.kubectl(&["get", "deploy", "-o", "wide", "-n", "apps"]),
        "get deploy -o wide",
    );
    assert_eq!(
        header(&wide)[5..],
        ["CONTAINERS", "IMAGES", "SELECTOR"],
        "{wide}"
    );
    assert_eq!(
        row(&wide, "web")[5..],
        ["nginx", "localhost/nginx:1.26", "app=web"],
        "{wide}"
    );

    // Client-side apply of a changed Deployment, twice.
    let mut applied = json_of(&cloud, &["get", "deploy", "web", "-n", "apps"]);
    for key in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
        applied["metadata"]
            .as_object_mut()
            .expect("meta")
            .remove(key);
    }
    applied.as_object_mut().expect("object").remove("status");
    applied["spec"]["replicas"] = Value::from(1);
    let manifest = applied.to_string();
    let out = ok(
        cloud.kubectl_with_stdin(&["apply", "-n", "apps", "-f", "-"], Some(&manifest)),
        "apply",
    );
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let out = ok(
        cloud.kubectl_with_stdin(&["apply", "-n", "apps", "-f", "-"], Some(&manifest)),
        "apply again",
    );
    assert!(out.contains("deployment.apps/web unchanged"), "{out}");
    assert_eq!(
        json_of(&cloud, &["get", "deploy", "web", "-n", "apps"])["spec"]["replicas"],
        1
    );

    // A selector that does not select the template is refused with the field path, and a
    // selector cannot change.
    let bad = cloud.kubectl_with_stdin(&["apply", "-n", "apps", "-f", "-"], Some(BAD_SELECTOR));
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains(
            "spec.template.metadata.labels: Invalid value: {\"app\":\"other\"}: `selector` does not match template `labels`"
        ),
        "{}",
        text(&bad)
    );
    let immutable = cloud.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "apps",
        "-p",
        r#"{"spec":{"selector":{"matchLabels":{"app":"x"}},"template":{"metadata":{"labels":{"app":"x"}}}}}"#,
    ]);
    assert!(!immutable.status.success());
    assert!(
        text(&immutable).contains(
            "spec.selector: Invalid value: {\"matchLabels\":{\"app\":\"x\"}}: field is immutable"
        ),
        "{}",
        text(&immutable)
    );

    // The other kinds: defaults, the Job's generated selector, printing, `get all`.
    let out = ok(
        cloud.kubectl_with_stdin(&["apply", "-n", "apps", "-f", "-"], Some(WORKLOADS)),
        "apply workloads",
    );
    for line in [
        "daemonset.apps/agent created",
        "statefulset.apps/db created",
        "job.batch/once created",
        "cronjob.batch/tick created",
    ] {
        assert!(out.contains(line), "{out}");
    }
    let job = json_of(&cloud, &["get", "job", "once", "-n", "apps"]);
    let job_uid = job["metadata"]["uid"].as_str().expect("uid");
    assert_eq!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        job_uid
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"],
        "once"
    );
    assert_eq!(job["spec"]["backoffLimit"], 6);
    let jobs = ok(
        cloud.kubectl(&["get", "jobs", "-o", "wide", "-n", "apps"]),
        "get jobs",
    );
    assert_eq!(
        header(&jobs),
        [
            "NAME",
            "STATUS",
            "COMPLETIONS",
            "DURATION",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ],
        "{jobs}"
    );
    assert_eq!(row(&jobs, "once")[2], "0/1", "{jobs}");
    assert_eq!(
        row(&jobs, "once").last().map(String::as_str),
        Some(format!("batch.kubernetes.io/controller-uid={job_uid}").as_str()),
        "{jobs}"
    );
    let selected = ok(
        cloud.kubectl(&[
            "get",
            "jobs",
            "--field-selector",
            "status.successful=0",
            "-o",
            "name",
            "-n",
            "apps",
        ]),
        "jobs by status.successful",
    );
    assert_eq!(selected.trim(), "job.batch/once");
    let cronjobs = ok(cloud.kubectl(&["get", "cronjobs", "-n", "apps"]), "get cj");
    assert_eq!(
        header(&cronjobs),
        [
            "NAME",
            "SCHEDULE",
            "TIMEZONE",
            "SUSPEND",
            "ACTIVE",
            "LAST SCHEDULE",
            "AGE"
        ],
        "{cronjobs}"
    );
    assert_eq!(
        row(&cronjobs, "tick")[1..6],
        ["*/5 * * * *", "<none>", "False", "0", "<none>"],
        "{cronjobs}"
    );
    let ds = ok(cloud.kubectl(&["get", "ds", "-n", "apps"]), "get ds");
    assert_eq!(
        header(&ds),
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "NODE SELECTOR",
            "AGE"
        ],
        "{ds}"
    );
    assert_eq!(
        row(&ds, "agent")[6],
        "node-role.kubernetes.io/edge=",
        "{ds}"
    );
    let sts = ok(cloud.kubectl(&["get", "sts", "-n", "apps"]), "get sts");
    assert_eq!(header(&sts), ["NAME", "READY", "AGE"], "{sts}");
    assert_eq!(row(&sts, "db")[1], "0/2", "{sts}");
    ok(
        cloud.kubectl(&["scale", "statefulset", "db", "--replicas=3", "-n", "apps"]),
        "scale sts",
    );
    let all = ok(
        cloud.kubectl(&["get", "all", "-n", "apps", "-o", "name"]),
        "get all",
    );
    for name in [
        "deployment.apps/web",
        "daemonset.apps/agent",
        "statefulset.apps/db",
        "job.batch/once",
        "cronjob.batch/tick",
    ] {
        assert!(all.lines().any(|l| l == name), "{name} in\n{all}");
    }

    // Discovery: the kinds, short names and the scale subresource as kube-apiserver lists them.
    let resources = ok(
        cloud.kubectl(&["api-resources", "--api-group=apps"]),
        "api-resources",
    );
    for (name, short, kind) in [
        ("deployments", "deploy", "Deployment"),
        ("replicasets", "rs", "ReplicaSet"),
        ("daemonsets", "ds", "DaemonSet"),
        ("statefulsets", "sts", "StatefulSet"),
    ] {
        let cells = row(&resources, name);
        assert_eq!(
            (cells[1].as_str(), cells[2].as_str(), cells[4].as_str()),
            (short, "apps/v1", kind),
            "{resources}"
        );
    }
    let batch = ok(
        cloud.kubectl(&["api-resources", "--api-group=batch", "-o", "name"]),
        "api-resources batch",
    );
    assert_eq!(
        batch.lines().collect::<Vec<_>>(),
        ["cronjobs.batch", "jobs.batch"]
    );

    // Pods without a ServiceAccount get `default`; manifests naming one keep it.
    ok(
        cloud.kubectl(&["run", "lone", "--image=localhost/busybox:1", "-n", "apps"]),
        "run",
    );
    let pod = json_of(&cloud, &["get", "pod", "lone", "-n", "apps"]);
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    ok(
        cloud.kubectl(&[
            "run",
            "builder",
            "--image=localhost/busybox:1",
            "--overrides={\"spec\":{\"serviceAccountName\":\"builder\"}}",
            "-n",
            "apps",
        ]),
        "run with a service account",
    );
    let pod = json_of(&cloud, &["get", "pod", "builder", "-n", "apps"]);
    assert_eq!(pod["spec"]["serviceAccountName"], "builder");
}

#[test]
fn embedded_readyz_fails_while_the_store_cannot_be_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let readyz = |verbose: bool| {
        let url = format!(
            "https://127.0.0.1:{}/readyz{}",
            cloud.api_port,
            if verbose { "?verbose" } else { "" }
        );
        let out = std::process::Command::new("curl")
            .args(["-sk", "-w", "\n%{http_code}", &url])
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = body.rsplit_once('\n').expect("status line");
        (code.to_string(), body.to_string())
    };
    assert!(
        eventually(Duration::from_secs(20), || readyz(false).0 == "200"),
        "{:?}",
        readyz(true)
    );
    let (_, body) = readyz(true);
    assert!(body.contains("[+]api-store ok"), "{body}");
    // cloudcore's own readiness names the controllers (all synced once they listed).
    let metrics = |path: &str| integration::http_get(cloud.metrics_port, path);
    assert!(
        eventually(Duration::from_secs(10), || metrics("/readyz?verbose")
            .is_some_and(|b| b.contains("[+]controllers ok"))),
        "{:?}",
        metrics("/readyz?verbose")
    );

    // Swap api.db for a directory under the running cloudcore: its open connections would
    // go on writing into a file that is no longer there.
    let db = cloud.dir.join("api.db");
    let aside = cloud.dir.join("api.db.aside");
    std::fs::rename(&db, &aside).expect("move api.db aside");
    std::fs::create_dir(&db).expect("a directory in its place");
    let (code, body) = readyz(false);
    assert_eq!(code, "500", "{body}");
    assert!(body.contains("[-]api-store failed: "), "{body}");
    assert!(body.contains("readyz check failed"), "{body}");
    let out = cloud.kubectl(&["get", "--raw", "/readyz"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("InternalError"), "{}", text(&out));
    let out = cloud.kubectl(&["get", "--raw", "/livez"]);
    assert!(out.status.success(), "livez stays ok: {}", text(&out));

    // Put it back: ready again.
    std::fs::remove_dir(&db).expect("remove the directory");
    std::fs::rename(&aside, &db).expect("api.db back");
    assert!(
        eventually(Duration::from_secs(10), || readyz(false).0 == "200"),
        "{:?}",
        readyz(true)
    );
}

/// The same manifests against a real kube-apiserver and the embedded API: the same specs after
/// defaulting, and the same validation messages.
#[test]
fn defaults_and_messages_match_kube_apiserver() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let cluster = KubeCluster::start(
        &tmp.path().join("k8s"),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let deployment = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx:1.25, ports: [{containerPort: 80}]}]
"#;
    for manifest in [deployment, WORKLOADS] {
        let create = ["create", "-n", "default", "-f", "-", "-o", "json"];
        let ours = ok(
            cloud.kubectl_with_stdin(&create, Some(manifest)),
            "create (embedded)",
        );
        let theirs = cluster.kubectl_ok(&create, Some(manifest));
        let specs = |out: &str| -> Vec<Value> {
            // One JSON document per object created.
            serde_json::Deserializer::from_str(out)
                .into_iter::<Value>()
                .map(|item| item.unwrap_or_else(|e| panic!("{e}: {out}")))
                .map(|item| {
                    let uid = item["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    // A Job's generated selector and labels carry its uid.
                    let spec = item["spec"].to_string().replace(&uid, "UID");
                    serde_json::from_str(&spec).expect("spec")
                })
                .collect()
        };
        assert_eq!(specs(&ours), specs(&theirs));
    }
    for (manifest, what) in [
        (BAD_SELECTOR, "selector"),
        (
            r#"{"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "badcj"},
                "spec": {"schedule": "bogus", "concurrencyPolicy": "Sometimes",
                         "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                           "containers": [{"name": "c", "image": "busybox"}]}}}}}}"#,
            "cronjob",
        ),
    ] {
        let create = ["create", "-n", "default", "-f", "-"];
        let ours = cloud.kubectl_with_stdin(&create, Some(manifest));
        let theirs = cluster.kubectl(&create, Some(manifest));
        assert!(!ours.status.success() && !theirs.status.success(), "{what}");
        // kubectl's rendering of the Status (kind, name, each field cause), without its
        // warnings about version skew.
        let message = |o: &std::process::Output| -> Vec<String> {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("warning"))
                .map(|l| l.trim_end().to_string())
                .collect()
        };
        assert!(
            message(&theirs).join("\n").contains("is invalid"),
            "{}",
            text(&theirs)
        );
        assert_eq!(message(&ours), message(&theirs), "{what}");
    }
}
