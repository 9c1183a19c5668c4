//! The embedded control plane through the real `kubectl`: discovery, apply (twice), get, watch,
//! describe, label, annotate, selectors, delete, and the error contract.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::{Cloud, eventually};

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        out(&o),
        err(&o)
    );
    out(&o)
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: app-config
  labels: {app: web}
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata:
  name: app-secret
  labels: {app: web}
data:
  password: aHVudGVyMg==
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web, tier: front}
spec:
  nodeName: gw-1
  containers:
  - name: web
    image: localhost/busybox:1
    command: ["sleep", "3600"]
    env:
    - name: PASSWORD
      valueFrom: {secretKeyRef: {name: app-secret, key: password}}
    volumeMounts:
    - {name: config, mountPath: /etc/app}
  volumes:
  - name: config
    configMap: {name: app-config}
---
apiVersion: v1
kind: Pod
metadata:
  name: other
  labels: {app: batch}
spec:
  nodeName: gw-2
  containers:
  - {name: job, image: localhost/busybox:1}
"#;

#[test]
fn kubectl_works_against_the_embedded_api() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);

    let namespaces = ok(
        cloud.kubectl(&["get", "namespaces", "-o", "name"]),
        "get namespaces",
    );
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(
            namespaces.contains(&format!("namespace/{ns}")),
            "{namespaces}"
        );
    }

    let applied = ok(
        cloud.kubectl_with_stdin(&["apply", "-f", "-"], Some(MANIFESTS)),
        "apply",
    );
    for line in [
        "configmap/app-config created",
        "secret/app-secret created",
        "pod/web created",
        "pod/other created",
    ] {
        assert!(applied.contains(line), "{applied}");
    }
    let again = ok(
        cloud.kubectl_with_stdin(&["apply", "-f", "-"], Some(MANIFESTS)),
        "apply again",
    );
    for line in [
        "configmap/app-config unchanged",
        "secret/app-secret unchanged",
        "pod/web unchanged",
    ] {
        assert!(
            again.contains(line),
            "a second apply changes nothing: {again}"
        );
    }

    let yaml = ok(
        cloud.kubectl(&["get", "pod", "web", "-o", "yaml"]),
        "get -o yaml",
    );
    assert!(
        yaml.contains("name: web") && yaml.contains("uid:") && yaml.contains("creationTimestamp:"),
        "{yaml}"
    );
    let secret = ok(
        cloud.kubectl(&[
            "get",
            "secret",
            "app-secret",
            "-o",
            "jsonpath={.data.password}",
        ]),
        "secret",
    );
    assert_eq!(secret, "aHVudGVyMg==");

    let table = ok(cloud.kubectl(&["get", "pods"]), "get pods");
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("NAME") && h.contains("STATUS")),
        "{table}"
    );
    assert!(
        table.contains("web") && table.contains("Pending"),
        "{table}"
    );

    let by_node = ok(
        cloud.kubectl(&[
            "get",
            "pods",
            "--field-selector",
            "spec.nodeName=gw-1",
            "-o",
            "name",
        ]),
        "field selector",
    );
    assert_eq!(by_node.trim(), "pod/web");
    let by_label = ok(
        cloud.kubectl(&["get", "pods", "-l", "app in (web),tier", "-o", "name"]),
        "label selector",
    );
    assert_eq!(by_label.trim(), "pod/web");
    let not_web = ok(
        cloud.kubectl(&["get", "pods", "-l", "app!=web", "-o", "name"]),
        "negative selector",
    );
    assert_eq!(not_web.trim(), "pod/other");

    ok(
        cloud.kubectl(&["label", "pod", "web", "release=1"]),
        "label",
    );
    ok(
        cloud.kubectl(&["annotate", "pod", "web", "note=checked"]),
        "annotate",
    );
    let labels = ok(
        cloud.kubectl(&[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.metadata.labels.release}/{.metadata.annotations.note}",
        ]),
        "read labels",
    );
    assert_eq!(labels, "1/checked");

    let described = ok(cloud.kubectl(&["describe", "pod", "web"]), "describe");
    assert!(
        described.contains("Name:") && described.contains("web") && described.contains("gw-1"),
        "{described}"
    );

    // A watch sees a later change.
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .arg("--cache-dir")
        .arg(tmp.path().join("watch-cache"))
        .args([
            "get",
            "configmap",
            "app-config",
            "-w",
            "-o",
            "jsonpath={.data.greeting}{\"\\n\"}",
        ])
        .env("HOME", tmp.path())
        .env_remove("KUBECONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl -w");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(),
        Some("hello")
    );
    ok(
        cloud.kubectl(&[
            "patch",
            "configmap",
            "app-config",
            "-p",
            r#"{"data":{"greeting":"bonjour"}}"#,
        ]),
        "patch",
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(),
        Some("bonjour"),
        "the watch shows the update"
    );
    let _ = watch.kill();
    let _ = watch.wait();

    ok(
        cloud.kubectl(&["delete", "configmap", "app-config"]),
        "delete",
    );
    let gone = cloud.kubectl(&["get", "configmap", "app-config"]);
    assert!(!gone.status.success());
    assert!(
        err(&gone).contains("NotFound") || err(&gone).contains("not found"),
        "{}",
        err(&gone)
    );
    ok(
        cloud.kubectl(&["delete", "pod", "other", "--grace-period=0", "--force"]),
        "force delete",
    );
    assert!(eventually(Duration::from_secs(5), || {
        out(&cloud.kubectl(&["get", "pods", "-o", "name"])).trim() == "pod/web"
    }));
}

#[test]
fn failed_requests_get_status_bodies_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);

    // No credentials: 401 with a Status body (curl, because kubectl without credentials
    // prompts for a user name).
    let anonymous = Command::new("curl")
        .args(["-sk", "-w", "\n%{http_code}"])
        .arg(format!(
            "https://127.0.0.1:{}/api/v1/namespaces/default/pods",
            cloud.api_port
        ))
        .output()
        .expect("curl is installed by .ci/run");
    let text = out(&anonymous);
    assert!(text.ends_with("\n401"), "{text}");
    assert!(
        text.contains("\"reason\":\"Unauthorized\"") && text.contains("\"kind\":\"Status\""),
        "{text}"
    );

    // Malformed body: 400 with a Status, nothing written.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"metadata\": {\"name\": \"x\"").expect("write");
    let created = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .arg("--cache-dir")
        .arg(tmp.path().join("raw-cache"))
        .args([
            "create",
            "--raw",
            "/api/v1/namespaces/default/configmaps",
            "-f",
        ])
        .arg(&bad)
        .env("HOME", tmp.path())
        .env_remove("KUBECONFIG")
        .output()
        .expect("kubectl");
    assert!(!created.status.success());
    assert!(
        err(&created).contains("BadRequest") || err(&created).contains("not valid JSON"),
        "{}",
        err(&created)
    );

    // Invalid object: 422 naming the field.
    let invalid = cloud.kubectl_with_stdin(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\n"),
    );
    assert!(!invalid.status.success());
    assert!(err(&invalid).contains("metadata.name"), "{}", err(&invalid));

    // Unknown resource: 404.
    let unknown = cloud.kubectl(&["get", "--raw", "/api/v1/widgets"]);
    assert!(!unknown.status.success());
    assert!(
        err(&unknown).contains("NotFound") || err(&unknown).contains("not find"),
        "{}",
        err(&unknown)
    );

    let configmaps = ok(
        cloud.kubectl(&["get", "configmaps", "-A", "-o", "name"]),
        "list",
    );
    assert_eq!(configmaps.trim(), "", "no failed request wrote anything");

    // Stale update: 409.
    ok(
        cloud.kubectl_with_stdin(
            &["create", "-f", "-"],
            Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata: {a: b}\n"),
        ),
        "create",
    );
    let stale = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  resourceVersion: \"1\"\ndata: {a: c}\n";
    let replaced = cloud.kubectl_with_stdin(&["replace", "-f", "-"], Some(stale));
    assert!(!replaced.status.success());
    assert!(
        err(&replaced).contains("Conflict") || err(&replaced).contains("modified"),
        "{}",
        err(&replaced)
    );
}

#[test]
fn finalizers_hold_deletion_and_owner_references_collect_dependents() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let text = |args: &[&str]| ok(cloud.kubectl(args), &args.join(" "));

    // Finalizers: delete marks, the last finalizer's removal deletes.
    ok(
        cloud.kubectl_with_stdin(
            &["create", "-f", "-"],
            Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\n"),
        ),
        "create held",
    );
    text(&["delete", "configmap", "held", "--wait=false"]);
    let marked = text(&[
        "get",
        "configmap",
        "held",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(!marked.is_empty(), "deletion is pending on the finalizer");
    text(&[
        "patch",
        "configmap",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    assert!(eventually(Duration::from_secs(5), || !cloud
        .kubectl(&["get", "configmap", "held"])
        .status
        .success()));

    // Owner references: deleting the owner deletes its dependents (background propagation);
    // with --cascade=orphan the dependent stays and loses the reference.
    for owner in ["owner-a", "owner-b"] {
        ok(
            cloud.kubectl(&["create", "configmap", owner]),
            "create owner",
        );
        let uid = text(&["get", "configmap", owner, "-o", "jsonpath={.metadata.uid}"]);
        let dependent = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dep-of-{owner}\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: {owner}\n    uid: {uid}\n"
        );
        ok(
            cloud.kubectl_with_stdin(&["create", "-f", "-"], Some(&dependent)),
            "create dependent",
        );
    }
    text(&["delete", "configmap", "owner-a"]);
    assert!(
        eventually(Duration::from_secs(5), || !cloud
            .kubectl(&["get", "configmap", "dep-of-owner-a"])
            .status
            .success()),
        "the dependent of a deleted owner is collected"
    );
    text(&["delete", "configmap", "owner-b", "--cascade=orphan"]);
    assert!(eventually(Duration::from_secs(5), || {
        text(&[
            "get",
            "configmap",
            "dep-of-owner-b",
            "-o",
            "jsonpath={.metadata.ownerReferences}",
        ])
        .is_empty()
    }));
}
