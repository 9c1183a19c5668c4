//! Server-side apply and managedFields on the embedded API, through the real kubectl and
//! kube-rs: `kubectl apply --server-side` and its conflicts, `--force-conflicts`, fields removed
//! from the applied configuration, the client-side to server-side migration kubectl performs,
//! `Update` managers, and apply on the status subresource. The kubectl sequence runs against
//! the real kube-apiserver too (`KubeCluster`, etcd and kube-apiserver only) and the observable
//! results are compared. No containerd or edge is needed: apply semantics need no controller.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, kube_client};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

/// One kubectl for both servers, so their answers are compared for the same client.
const KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";

/// kubectl with a private cache against one server.
struct Kubectl {
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig: &Path, home: PathBuf) -> Kubectl {
        std::fs::create_dir_all(&home).expect("kubectl home");
        assert!(
            Path::new(KUBECTL).exists(),
            "{KUBECTL} is missing (every machine of this project has kubectl 1.27 to 1.33 there)"
        );
        Kubectl {
            kubeconfig: kubeconfig.to_path_buf(),
            home,
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.join("cache"))
            .args(args)
            .env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl output")
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

    fn get(&self, what: &str) -> Value {
        let text = self.ok(
            &[
                "get",
                what,
                "-n",
                "default",
                "-o",
                "json",
                "--show-managed-fields",
            ],
            None,
        );
        serde_json::from_str(&text).expect("kubectl JSON")
    }
}

/// `managedFields` without times (they differ between runs), each entry noting whether it
/// had one, sorted by manager.
fn managed(object: &Value) -> Value {
    let mut entries: Vec<Value> = object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut e| {
            let timed = e.as_object_mut().and_then(|m| m.remove("time")).is_some();
            e["timed"] = json!(timed);
            e
        })
        .collect();
    entries.sort_by(|a, b| a["manager"].as_str().cmp(&b["manager"].as_str()));
    Value::Array(entries)
}

/// The first line of kubectl's error, without the version-skew warning.
fn error_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.starts_with("error:") || l.starts_with("Error from server"))
        .unwrap_or_default()
        .to_string()
}

const CONFIG_MAP: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: ssa
  labels: {app: ssa}
data: {k1: v1, k2: v2}
";

const CONFIG_MAP_OTHER: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: ssa
data: {k1: other}
";

/// kubectl's configuration without `k2` (and without `k1`, which `other` took over).
const CONFIG_MAP_SMALLER: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: ssa
  labels: {app: ssa}
data: {k3: v3}
";

fn deployment(replicas: u32, env: bool) -> String {
    let env = if env {
        "        env:\n        - {name: A, value: \"1\"}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {{app: web}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: c
        image: busybox
        ports:
        - containerPort: 80
{env}      tolerations:
      - {{key: k, operator: Exists}}
"
    )
}

/// What a user sees of the kubectl sequence: outputs, errors and the managedFields after
/// each step, normalized so two servers can be compared.
fn sequence(k: &Kubectl) -> Value {
    let mut seen = serde_json::Map::new();
    let apply = |file: &str, extra: &[&str]| {
        let mut args = vec!["apply", "--server-side", "-n", "default", "-f", "-"];
        args.extend_from_slice(extra);
        k.run(&args, Some(file))
    };
    // Apply twice: the second is a no-op.
    let first = apply(CONFIG_MAP, &[]);
    seen.insert(
        "first".into(),
        json!(String::from_utf8_lossy(&first.stdout)),
    );
    let after_first = k.get("configmap/ssa");
    let second = apply(CONFIG_MAP, &[]);
    seen.insert(
        "second".into(),
        json!(String::from_utf8_lossy(&second.stdout)),
    );
    let after_second = k.get("configmap/ssa");
    seen.insert(
        "second_wrote_nothing".into(),
        json!(
            after_first["metadata"]["resourceVersion"]
                == after_second["metadata"]["resourceVersion"]
        ),
    );
    seen.insert("applied".into(), managed(&after_second));
    // Another manager with a different value: a conflict.
    let conflict = apply(CONFIG_MAP_OTHER, &["--field-manager=other"]);
    seen.insert("conflict_exit".into(), json!(conflict.status.code()));
    seen.insert("conflict_error".into(), json!(error_line(&conflict)));
    seen.insert(
        "conflict_suggests_force".into(),
        json!(String::from_utf8_lossy(&conflict.stderr).contains("--force-conflicts")),
    );
    let forced = apply(
        CONFIG_MAP_OTHER,
        &["--field-manager=other", "--force-conflicts"],
    );
    seen.insert("forced_exit".into(), json!(forced.status.code()));
    let after_force = k.get("configmap/ssa");
    seen.insert("forced_data".into(), after_force["data"].clone());
    seen.insert("forced".into(), managed(&after_force));
    // kubectl stops applying k2: it goes; k1 stays, other owns it.
    k.ok(
        &["apply", "--server-side", "-n", "default", "-f", "-"],
        Some(CONFIG_MAP_SMALLER),
    );
    let smaller = k.get("configmap/ssa");
    seen.insert("smaller_data".into(), smaller["data"].clone());
    seen.insert("smaller".into(), managed(&smaller));
    // An Update manager: kubectl label.
    k.ok(&["label", "-n", "default", "configmap/ssa", "tier=a"], None);
    seen.insert("labelled".into(), managed(&k.get("configmap/ssa")));
    // Update managers of a ConfigMap: create, merge patch, client-side apply.
    k.ok(
        &["create", "-n", "default", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: upd}\ndata: {a: b}\n"),
    );
    seen.insert("created".into(), managed(&k.get("configmap/upd")));
    k.ok(
        &[
            "patch",
            "configmap",
            "upd",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"data":{"a":"c","n":"1"}}"#,
        ],
        None,
    );
    seen.insert("patched".into(), managed(&k.get("configmap/upd")));
    // `[{}]` is the documented way to clear them.
    k.ok(
        &[
            "patch",
            "configmap",
            "upd",
            "-n",
            "default",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/metadata/managedFields","value":[{}]}]"#,
        ],
        None,
    );
    seen.insert("reset".into(), managed(&k.get("configmap/upd")));
    k.ok(
        &["apply", "-n", "default", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: csa\n  labels: {x: z}\ndata: {q: r}\n"),
    );
    seen.insert(
        "client_side_applied".into(),
        managed(&k.get("configmap/csa")),
    );
    // Client-side apply, then server-side apply: kubectl migrates the ownership.
    k.ok(
        &["apply", "-n", "default", "-f", "-"],
        Some(&deployment(2, true)),
    );
    let migrated = apply(&deployment(3, true), &[]);
    seen.insert("migrated_exit".into(), json!(migrated.status.code()));
    seen.insert("migrated_error".into(), json!(error_line(&migrated)));
    let web = k.get("deployment/web");
    seen.insert("migrated_replicas".into(), web["spec"]["replicas"].clone());
    seen.insert(
        "migrated_last_applied".into(),
        json!(
            web["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
                .as_str()
                .map(|t| serde_json::from_str::<Value>(t).expect("annotation JSON"))
        ),
    );
    seen.insert(
        "migrated".into(),
        managed(&web)
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["operation"] == "Apply")
            .cloned()
            .collect(),
    );
    seen.insert(
        "client_side_manager_left".into(),
        json!(
            managed(&web)
                .as_array()
                .expect("entries")
                .iter()
                .any(|e| e["manager"] == "kubectl-client-side-apply")
        ),
    );
    // The env list leaves the configuration: it leaves the object.
    k.ok(
        &["apply", "--server-side", "-n", "default", "-f", "-"],
        Some(&deployment(3, false)),
    );
    let web = k.get("deployment/web");
    seen.insert(
        "env_after_removal".into(),
        web["spec"]["template"]["spec"]["containers"][0]["env"].clone(),
    );
    Value::Object(seen)
}

fn entry(manager: &str, api_version: &str, operation: &str, fields: Value, timed: bool) -> Value {
    json!({"manager": manager, "operation": operation, "apiVersion": api_version,
        "fieldsType": "FieldsV1", "fieldsV1": fields, "timed": timed})
}

/// What the sequence must show on any conforming server.
fn check_sequence(seen: &Value) {
    assert_eq!(
        seen["first"], "configmap/ssa serverside-applied\n",
        "{seen:#}"
    );
    assert_eq!(seen["second"], "configmap/ssa serverside-applied\n");
    assert_eq!(seen["second_wrote_nothing"], true, "{seen:#}");
    assert_eq!(
        seen["applied"],
        json!([entry(
            "kubectl",
            "v1",
            "Apply",
            json!({"f:data": {"f:k1": {}, "f:k2": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}),
            true
        )]),
        "{seen:#}"
    );
    assert_eq!(seen["conflict_exit"], 1, "{seen:#}");
    assert_eq!(
        seen["conflict_error"],
        "error: Apply failed with 1 conflict: conflict with \"kubectl\": .data.k1"
    );
    assert_eq!(seen["conflict_suggests_force"], true);
    assert_eq!(seen["forced_exit"], 0, "{seen:#}");
    assert_eq!(seen["forced_data"], json!({"k1": "other", "k2": "v2"}));
    assert_eq!(
        seen["forced"],
        json!([
            entry(
                "kubectl",
                "v1",
                "Apply",
                json!({"f:data": {"f:k2": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}),
                true
            ),
            entry(
                "other",
                "v1",
                "Apply",
                json!({"f:data": {"f:k1": {}}}),
                true
            ),
        ]),
        "{seen:#}"
    );
    assert_eq!(seen["smaller_data"], json!({"k1": "other", "k3": "v3"}));
    assert_eq!(
        seen["labelled"][1],
        entry(
            "kubectl-label",
            "v1",
            "Update",
            json!({"f:metadata": {"f:labels": {"f:tier": {}}}}),
            true
        ),
        "{seen:#}"
    );
    assert_eq!(
        seen["created"],
        json!([entry(
            "kubectl-create",
            "v1",
            "Update",
            json!({"f:data": {".": {}, "f:a": {}}}),
            true
        )]),
        "{seen:#}"
    );
    assert_eq!(
        seen["patched"][1],
        entry(
            "kubectl-patch",
            "v1",
            "Update",
            json!({"f:data": {"f:a": {}, "f:n": {}}}),
            true
        ),
        "{seen:#}"
    );
    assert_eq!(seen["reset"], json!([]), "{seen:#}");
    assert_eq!(
        seen["client_side_applied"],
        json!([entry(
            "kubectl-client-side-apply",
            "v1",
            "Update",
            json!({
                "f:data": {".": {}, "f:q": {}},
                "f:metadata": {
                    "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                    "f:labels": {".": {}, "f:x": {}},
                },
            }),
            true
        )]),
        "{seen:#}"
    );
    assert_eq!(seen["migrated_exit"], 0, "{seen:#}");
    assert_eq!(seen["migrated_replicas"], 3);
    assert_eq!(seen["migrated_last_applied"]["spec"]["replicas"], 3);
    assert_eq!(seen["client_side_manager_left"], false, "{seen:#}");
    assert_eq!(
        seen["migrated"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"],
        json!({"k:{\"name\":\"c\"}": {
            ".": {},
            "f:env": {"k:{\"name\":\"A\"}": {".": {}, "f:name": {}, "f:value": {}}},
            "f:image": {},
            "f:name": {},
            "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}},
        }}),
        "{seen:#}"
    );
    assert_eq!(seen["env_after_removal"], Value::Null, "{seen:#}");
}

/// The kubectl sequence on the embedded API shows what server-side apply promises, and the
/// same as the real kube-apiserver v1.36 shows for it.
#[test]
fn kubectl_server_side_apply_matches_kube_apiserver() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(&tmp.path().join("embedded"), &[]);
    let embedded = sequence(&Kubectl::new(
        &cloud.kubeconfig(),
        tmp.path().join("kubectl-embedded"),
    ));
    check_sequence(&embedded);
    let cluster = KubeCluster::start(
        &tmp.path().join("kube"),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let real = sequence(&Kubectl::new(
        &cluster.kubeconfig,
        tmp.path().join("kubectl-kube"),
    ));
    check_sequence(&real);
    let keys: Vec<&String> = embedded.as_object().expect("object").keys().collect();
    for key in keys {
        assert_eq!(
            embedded[key], real[key],
            "{key} differs from kube-apiserver's\nembedded: {:#}\nkube-apiserver: {:#}",
            embedded[key], real[key]
        );
    }
}

/// kube-rs `Patch::Apply`: apply-create, shared ownership of an equal value, a forced takeover,
/// and apply on the status subresource owning only status fields.
#[tokio::test]
async fn kube_rs_apply_and_status_subresource() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let client = kube_client(&cloud.kubeconfig())
        .await
        .unwrap_or_else(|e| panic!("kube client: {e:#}"));
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let config = |value: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kr"},
            "data": {"key": value}})
    };
    let created = maps
        .patch(
            "kr",
            &PatchParams::apply("alpha"),
            &Patch::Apply(config("1")),
        )
        .await
        .expect("apply-create");
    let entries = created
        .metadata
        .managed_fields
        .clone()
        .expect("managedFields");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].manager.as_deref(), Some("alpha"));
    assert_eq!(entries[0].operation.as_deref(), Some("Apply"));
    // The same value from beta: shared, no conflict.
    let shared = maps
        .patch(
            "kr",
            &PatchParams::apply("beta"),
            &Patch::Apply(config("1")),
        )
        .await
        .expect("shared");
    let mut managers: Vec<_> = shared
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|e| e.manager.clone())
        .collect();
    managers.sort();
    assert_eq!(managers, ["alpha", "beta"]);
    // A different value conflicts with alpha (409, reason Conflict) unless forced.
    let e = maps
        .patch(
            "kr",
            &PatchParams::apply("beta"),
            &Patch::Apply(config("2")),
        )
        .await
        .expect_err("conflict");
    let kube::Error::Api(status) = e else {
        panic!("not an API error: {e}")
    };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Apply failed with 1 conflict: conflict with \"alpha\": .data.key"
    );
    let forced = maps
        .patch(
            "kr",
            &PatchParams::apply("beta").force(),
            &Patch::Apply(config("2")),
        )
        .await
        .expect("forced");
    assert_eq!(forced.data.expect("data")["key"], "2");
    let managers: Vec<_> = forced
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|e| e.manager.clone())
        .collect();
    assert_eq!(managers, ["beta"], "alpha lost its only field");
    // A resourceVersion in the configuration is a precondition.
    let mut stale = config("3");
    stale["metadata"]["resourceVersion"] = json!("1");
    let e = maps
        .patch("kr", &PatchParams::apply("beta"), &Patch::Apply(stale))
        .await
        .expect_err("stale resourceVersion");
    let kube::Error::Api(status) = e else {
        panic!("not an API error: {e}")
    };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.ends_with("the object has been modified; please apply your changes to the latest version and try again"),
        "{}",
        status.message
    );

    // kube-rs sends no User-Agent: its updates are recorded as `unknown`, as kube-apiserver does.
    let plain: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "plain"},
        "data": {"a": "b"}}))
    .expect("configmap");
    let created = maps
        .create(&kube::api::PostParams::default(), &plain)
        .await
        .expect("create");
    let entries = created.metadata.managed_fields.expect("managedFields");
    assert_eq!(
        (
            entries[0].manager.as_deref(),
            entries[0].operation.as_deref()
        ),
        (Some("unknown"), Some("Update"))
    );

    // Status: only status fields, recorded with the subresource.
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    let spec = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "st"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "st"}},
            "template": {"metadata": {"labels": {"app": "st"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}});
    deployments
        .patch(
            "st",
            &PatchParams::apply("spec-writer"),
            &Patch::Apply(spec),
        )
        .await
        .expect("apply deployment");
    let status = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "st"},
        "spec": {"replicas": 7}, "status": {"observedGeneration": 1, "replicas": 4}});
    let written = deployments
        .patch_status(
            "st",
            &PatchParams::apply("status-writer"),
            &Patch::Apply(status),
        )
        .await
        .expect("apply status");
    assert_eq!(
        written.spec.expect("spec").replicas,
        Some(1),
        "spec untouched"
    );
    assert_eq!(written.status.expect("status").replicas, Some(4));
    let entry = written
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some("status-writer"))
        .cloned()
        .expect("status-writer entry");
    assert_eq!(entry.subresource.as_deref(), Some("status"));
    assert_eq!(
        serde_json::to_value(entry.fields_v1.expect("fieldsV1")).expect("json"),
        json!({"f:status": {"f:observedGeneration": {}, "f:replicas": {}}})
    );
}
