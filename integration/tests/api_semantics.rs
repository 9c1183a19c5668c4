//! The request options the embedded API advertises, through the real kubectl and kube-rs:
//! `dryRun` (nothing stored, nothing watched), `fieldValidation` (Strict refuses, Warn warns
//! and drops), `limit`/`continue` (pages at one resourceVersion) and deletion propagation
//! (`--cascade=foreground|background|orphan`). The same kubectl sequence runs against a real
//! kube-apiserver and kube-controller-manager (v1.36.2), and the observable results must match.

use std::process::Output;
use std::time::Duration;

use futures::StreamExt;
use integration::cluster::{ClusterOptions, KubeCluster};
use integration::{Cloud, eventually, kube_client};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
};
use serde_json::{Value, json};

type Kubectl<'a> = &'a dyn Fn(&[&str], Option<&str>) -> Output;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(kubectl: Kubectl<'_>, args: &[&str], stdin: Option<&str>) -> Output {
    let o = kubectl(args, stdin);
    assert!(
        o.status.success(),
        "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    o
}

fn get_json(kubectl: Kubectl<'_>, args: &[&str]) -> Option<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let o = kubectl(&all, None);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).expect("kubectl JSON"))
}

fn raw(kubectl: Kubectl<'_>, path: &str) -> Value {
    let o = ok(kubectl, &["get", "--raw", path], None);
    serde_json::from_slice(&o.stdout).expect("raw JSON")
}

/// What a user sees of one kubectl sequence; equal between the embedded API and a real
/// control plane.
#[derive(Debug, PartialEq)]
struct Seen {
    strict_error: String,
    warnings: Vec<String>,
    warned_keys: Vec<String>,
    dry_create: (bool, bool, bool, bool),
    dry_delete_output: String,
    dry_delete_kept: bool,
    dry_apply_kept: String,
    page_shape: (usize, bool, Option<i64>, bool, usize, bool),
    selected_pages: Vec<(Vec<String>, bool, Option<i64>)>,
    foreground: Vec<&'static str>,
    orphaned: (bool, Option<Value>),
    background_gone: bool,
}

const BAD_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: strict}
spec:
  foo: 1
  containers:
  - {name: c, image: busybox, bar: 2}
"#;

const WARNED_CM: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: warned, labels: {app: sem}, surprise: 1}
data: {a: "1"}
extra: {deep: true}
"#;

fn owned_cm(name: &str, owner: &Value, block: bool, finalizer: bool) -> String {
    let mut cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "sem", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap",
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
            "blockOwnerDeletion": block}]},
    });
    if finalizer {
        cm["metadata"]["finalizers"] = json!(["example.com/hold"]);
    }
    cm.to_string()
}

fn wait(what: &str, check: impl FnMut() -> bool) {
    assert!(eventually(Duration::from_secs(30), check), "{what}");
}

/// The sequence: strict and warned fields, dry runs, pages, and the three propagations.
fn observe(kubectl: Kubectl<'_>) -> Seen {
    ok(kubectl, &["create", "namespace", "sem"], None);
    fn sem<'a>(args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-n", "sem"]);
        all
    }

    // fieldValidation=Strict, kubectl's default.
    let refused = kubectl(&sem(&["apply", "-f", "-"]), Some(BAD_POD));
    assert!(!refused.status.success(), "strict apply must fail");
    let strict_error = stderr(&refused)
        .lines()
        .find_map(|l| {
            l.split_once("cannot be handled as a Pod: ")
                .map(|(_, m)| m.to_string())
        })
        .unwrap_or_else(|| panic!("no strict decoding error: {}", stderr(&refused)));
    assert!(get_json(kubectl, &sem(&["pod", "strict"])).is_none());

    // Warn: stored without the unknown fields, each one reported.
    let warned = ok(
        kubectl,
        &sem(&["apply", "--validate=warn", "-f", "-"]),
        Some(WARNED_CM),
    );
    let warnings: Vec<String> = stderr(&warned)
        .lines()
        .filter(|l| l.starts_with("Warning: "))
        .map(String::from)
        .collect();
    let stored = get_json(kubectl, &sem(&["configmap", "warned"])).expect("warned stored");
    let mut warned_keys: Vec<String> = stored
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    warned_keys.sort();
    assert!(stored["metadata"].get("surprise").is_none(), "{stored}");

    // dryRun: create shows a full object, nothing exists after.
    let dry = ok(
        kubectl,
        &sem(&[
            "create",
            "configmap",
            "dry",
            "--from-literal=k=v",
            "--dry-run=server",
            "-o",
            "json",
        ]),
        None,
    );
    let dry: Value = serde_json::from_slice(&dry.stdout).expect("dry JSON");
    let dry_create = (
        dry["metadata"]["uid"].is_string(),
        dry["metadata"]["creationTimestamp"].is_string(),
        dry["metadata"].get("resourceVersion").is_none(),
        get_json(kubectl, &sem(&["configmap", "dry"])).is_none(),
    );
    let deleted = ok(
        kubectl,
        &sem(&["delete", "configmap", "warned", "--dry-run=server"]),
        None,
    );
    let dry_delete_output = stdout(&deleted).trim().to_string();
    let kept = get_json(kubectl, &sem(&["configmap", "warned"])).expect("kept");
    let dry_delete_kept = kept["metadata"].get("deletionTimestamp").is_none();
    let changed = WARNED_CM.replace("a: \"1\"", "a: \"2\"");
    ok(
        kubectl,
        &sem(&["apply", "--validate=false", "--dry-run=server", "-f", "-"]),
        Some(&changed),
    );
    let dry_apply_kept =
        get_json(kubectl, &sem(&["configmap", "warned"])).expect("kept")["data"]["a"]
            .as_str()
            .unwrap_or_default()
            .to_string();

    // Pages.
    for i in 0..5 {
        ok(
            kubectl,
            &sem(&["create", "configmap", &format!("page-{i}")]),
            None,
        );
    }
    let all = raw(kubectl, "/api/v1/namespaces/sem/configmaps");
    let total = all["items"].as_array().expect("items").len();
    let first = raw(kubectl, "/api/v1/namespaces/sem/configmaps?limit=2");
    let token = first["metadata"]["continue"].as_str().unwrap_or_default();
    ok(kubectl, &sem(&["create", "configmap", "page-late"]), None);
    let second = raw(
        kubectl,
        &format!("/api/v1/namespaces/sem/configmaps?limit=2&continue={token}"),
    );
    let page_shape = (
        first["items"].as_array().map_or(0, Vec::len),
        !token.is_empty(),
        first["metadata"]["remainingItemCount"]
            .as_i64()
            .map(|n| n - total as i64),
        second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"],
        second["items"].as_array().map_or(0, Vec::len),
        second["items"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|i| i["metadata"]["name"] != "page-late"),
    );

    // Pages with a selector: a page ends once full, whether or not anything after it matches
    // (kube-apiserver stops there and hands out a token; the next page may be empty), and no
    // remainingItemCount is given.
    ok(
        kubectl,
        &sem(&["label", "configmap", "page-0", "page-1", "sel=yes"]),
        None,
    );
    let mut selected_pages = Vec::new();
    let mut token = String::new();
    loop {
        let mut path =
            "/api/v1/namespaces/sem/configmaps?labelSelector=sel%3Dyes&limit=2".to_string();
        if !token.is_empty() {
            path.push_str(&format!("&continue={token}"));
        }
        let page = raw(kubectl, &path);
        let names = page["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        token = page["metadata"]["continue"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        selected_pages.push((
            names,
            !token.is_empty(),
            page["metadata"]["remainingItemCount"].as_i64(),
        ));
        if token.is_empty() || selected_pages.len() > 3 {
            break;
        }
    }

    // Foreground: dependents first; one with blockOwnerDeletion holds the owner.
    ok(kubectl, &sem(&["create", "configmap", "owner"]), None);
    let owner = get_json(kubectl, &sem(&["configmap", "owner"])).expect("owner");
    ok(
        kubectl,
        &["apply", "-f", "-"],
        Some(&owned_cm("blocker", &owner, true, true)),
    );
    ok(
        kubectl,
        &["apply", "-f", "-"],
        Some(&owned_cm("loose", &owner, false, false)),
    );
    ok(
        kubectl,
        &sem(&[
            "delete",
            "configmap",
            "owner",
            "--cascade=foreground",
            "--wait=false",
        ]),
        None,
    );
    let mut foreground = Vec::new();
    let marked = get_json(kubectl, &sem(&["configmap", "owner"])).expect("owner waits");
    if marked["metadata"]["deletionTimestamp"].is_string()
        && marked["metadata"]["finalizers"] == json!(["foregroundDeletion"])
    {
        foreground.push("owner marked with foregroundDeletion");
    }
    wait("the loose dependent is deleted", || {
        get_json(kubectl, &sem(&["configmap", "loose"])).is_none()
    });
    foreground.push("loose dependent deleted");
    wait("the blocking dependent is marked for deletion", || {
        get_json(kubectl, &sem(&["configmap", "blocker"]))
            .is_some_and(|b| b["metadata"]["deletionTimestamp"].is_string())
    });
    foreground.push("blocking dependent terminating");
    std::thread::sleep(Duration::from_secs(2));
    if get_json(kubectl, &sem(&["configmap", "owner"])).is_some() {
        foreground.push("owner held by the blocking dependent");
    }
    ok(
        kubectl,
        &sem(&[
            "patch",
            "configmap",
            "blocker",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ]),
        None,
    );
    wait("the owner goes once the blocking dependent is gone", || {
        get_json(kubectl, &sem(&["configmap", "owner"])).is_none()
    });
    foreground.push("owner gone after its dependents");

    // Orphan: the owner goes, the dependent stays without the reference.
    ok(kubectl, &sem(&["create", "configmap", "owner2"]), None);
    let owner2 = get_json(kubectl, &sem(&["configmap", "owner2"])).expect("owner2");
    ok(
        kubectl,
        &["apply", "-f", "-"],
        Some(&owned_cm("orphan", &owner2, true, false)),
    );
    ok(
        kubectl,
        &sem(&["delete", "configmap", "owner2", "--cascade=orphan"]),
        None,
    );
    let orphan = get_json(kubectl, &sem(&["configmap", "orphan"]));
    let orphaned = (
        get_json(kubectl, &sem(&["configmap", "owner2"])).is_none(),
        orphan.map(|o| o["metadata"]["ownerReferences"].clone()),
    );

    // Background (kubectl's default): the owner goes, then its dependent.
    ok(kubectl, &sem(&["create", "configmap", "owner3"]), None);
    let owner3 = get_json(kubectl, &sem(&["configmap", "owner3"])).expect("owner3");
    ok(
        kubectl,
        &["apply", "-f", "-"],
        Some(&owned_cm("child3", &owner3, false, false)),
    );
    ok(kubectl, &sem(&["delete", "configmap", "owner3"]), None);
    let background_gone = eventually(Duration::from_secs(30), || {
        get_json(kubectl, &sem(&["configmap", "child3"])).is_none()
    });

    Seen {
        strict_error,
        warnings,
        warned_keys,
        dry_create,
        dry_delete_output,
        dry_delete_kept,
        dry_apply_kept,
        page_shape,
        selected_pages,
        foreground,
        orphaned,
        background_gone,
    }
}

#[test]
fn kubectl_sees_the_same_options_honoured_as_on_a_real_control_plane() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("cloud")).expect("cloud dir");
    std::fs::create_dir_all(tmp.path().join("k8s")).expect("k8s dir");
    let cloud = Cloud::start(&tmp.path().join("cloud"), &[]);
    let embedded = observe(&|args, stdin| cloud.kubectl_with_stdin(args, stdin));

    // What this server must show on its own, whatever the real one does.
    assert_eq!(
        embedded.strict_error,
        // kubectl sends the keys sorted, so `containers` comes before `foo`.
        r#"strict decoding error: unknown field "spec.containers[0].bar", unknown field "spec.foo""#
    );
    assert_eq!(
        embedded.warnings,
        [
            r#"Warning: unknown field "extra""#,
            r#"Warning: unknown field "metadata.surprise""#
        ]
    );
    assert_eq!(
        embedded.warned_keys,
        ["apiVersion", "data", "kind", "metadata"]
    );
    assert_eq!(embedded.dry_create, (true, true, true, true));
    assert_eq!(
        embedded.dry_delete_output,
        r#"configmap "warned" deleted (server dry run)"#
    );
    assert!(embedded.dry_delete_kept);
    assert_eq!(embedded.dry_apply_kept, "1");
    assert_eq!(embedded.page_shape, (2, true, Some(-2), true, 2, true));
    assert_eq!(
        embedded.selected_pages,
        [
            (vec!["page-0".to_string(), "page-1".to_string()], true, None),
            (vec![], false, None)
        ]
    );
    assert_eq!(
        embedded.foreground,
        [
            "owner marked with foregroundDeletion",
            "loose dependent deleted",
            "blocking dependent terminating",
            "owner held by the blocking dependent",
            "owner gone after its dependents"
        ]
    );
    assert_eq!(embedded.orphaned, (true, Some(Value::Null)));
    assert!(embedded.background_gone);

    // The same sequence against kube-apiserver and kube-controller-manager (its garbage
    // collector does the propagation there).
    let cluster = KubeCluster::start(&tmp.path().join("k8s"), &ClusterOptions::default());
    let real = observe(&|args, stdin| cluster.kubectl(args, stdin));
    assert_eq!(
        embedded, real,
        "the embedded API differs from kube-apiserver"
    );
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some([("k".to_string(), "v".to_string())].into()),
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn kube_rs_dry_runs_write_nothing_and_pages_hold_one_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let client = kube_client(&cloud.kubeconfig()).await.expect("client");
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some("rs".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "rs");
    api.create(&PostParams::default(), &config_map("kept"))
        .await
        .expect("create");
    let from = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut watch = api
        .watch(&kube::api::WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();

    // Dry runs of every verb.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let created = api
        .create(&dry, &config_map("ghost"))
        .await
        .expect("dry create");
    assert!(created.metadata.uid.is_some(), "{created:?}");
    assert_eq!(created.metadata.resource_version, None);
    let mut generated = config_map("");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = api
        .create(&dry, &generated)
        .await
        .expect("dry generateName");
    let name = generated.metadata.name.unwrap_or_default();
    assert!(name.starts_with("gen-") && name.len() > 4, "{name}");
    assert!(api.get_opt(&name).await.expect("get").is_none());
    let patch = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let patched = api
        .patch(
            "kept",
            &patch,
            &Patch::Merge(json!({"data": {"k": "changed"}})),
        )
        .await
        .expect("dry patch");
    assert_eq!(
        patched
            .data
            .as_ref()
            .and_then(|d| d.get("k"))
            .map(String::as_str),
        Some("changed")
    );
    let mut kept = api.get("kept").await.expect("get");
    kept.data = Some([("k".to_string(), "replaced".to_string())].into());
    api.replace("kept", &dry, &kept).await.expect("dry replace");
    let delete = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    api.delete("kept", &delete).await.expect("dry delete");
    api.delete_collection(&delete, &ListParams::default())
        .await
        .expect("dry deletecollection");
    // Subresources: a pod's status and binding (no node exists, so it stays unscheduled).
    let pods: Api<Pod> = Api::namespaced(client.clone(), "rs");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "waiting"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let before = pods.get("waiting").await.expect("pod");
    pods.patch_status(
        "waiting",
        &patch,
        &Patch::Merge(json!({"status": {"phase": "Failed"}})),
    )
    .await
    .expect("dry status patch");
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "waiting"}, "target": {"kind": "Node", "name": "nowhere"}});
    let bound: Result<Value, _> = pods
        .create_subresource("binding", "waiting", &dry, &binding)
        .await;
    bound.expect("dry binding");
    // (The scheduler may write the pod's conditions meanwhile: its version is not compared.)
    let after = pods.get("waiting").await.expect("pod");
    assert_eq!(after.metadata.uid, before.metadata.uid);
    assert_eq!(after.spec.as_ref().and_then(|s| s.node_name.clone()), None);
    assert_ne!(
        after.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed")
    );

    assert!(api.get_opt("ghost").await.expect("get").is_none());
    let now = api.get("kept").await.expect("kept survives every dry run");
    assert_eq!(
        now.data
            .as_ref()
            .and_then(|d| d.get("k"))
            .map(String::as_str),
        Some("v")
    );
    assert!(now.metadata.deletion_timestamp.is_none());
    // The watch opened before sees the next real write first: no dry run reached it.
    api.create(&PostParams::default(), &config_map("real"))
        .await
        .expect("create");
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event in time")
        .expect("an event")
        .expect("a good event");
    match event {
        WatchEvent::Added(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("real")),
        other => panic!("a dry run reached the watch: {other:?}"),
    }

    // Pages: ListParams::limit, consistent at the first page's version.
    for i in 0..5 {
        api.create(&PostParams::default(), &config_map(&format!("p{i}")))
            .await
            .expect("create");
    }
    let all = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .len();
    let mut params = ListParams::default().limit(3);
    let first = api.list(&params).await.expect("page 1");
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some((all - 3) as i64));
    let version = first.metadata.resource_version.clone();
    api.create(&PostParams::default(), &config_map("p-late"))
        .await
        .expect("create");
    api.delete("p0", &DeleteParams::default())
        .await
        .expect("delete");
    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap_or_default())
        .collect();
    let mut token = first.metadata.continue_;
    while let Some(next) = token.filter(|t| !t.is_empty()) {
        params = params.continue_token(&next);
        let page = api.list(&params).await.expect("next page");
        assert_eq!(
            page.metadata.resource_version, version,
            "one version for every page"
        );
        names.extend(
            page.items
                .iter()
                .map(|c| c.metadata.name.clone().unwrap_or_default()),
        );
        token = page.metadata.continue_;
    }
    assert_eq!(names.len(), all, "{names:?}");
    assert!(
        names.contains(&"p0".to_string()),
        "deleted after the first page, still listed at its version"
    );
    assert!(
        !names.contains(&"p-late".to_string()),
        "created after the first page: not at its version"
    );

    // A malformed token is a 400 naming it.
    let bad = api
        .list(&ListParams::default().limit(2).continue_token("not-a-token"))
        .await
        .expect_err("malformed token");
    match bad {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 400);
            assert!(
                status
                    .message
                    .starts_with("invalid continue token: continue key is not valid"),
                "{}",
                status.message
            );
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn kubectl_chunks_lists_and_dry_runs_pods() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kubectl = |args: &[&str]| cloud.kubectl(args);
    for i in 0..5 {
        let o = kubectl(&["create", "configmap", &format!("c{i}")]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let chunked = kubectl(&["get", "configmaps", "--chunk-size=2", "-o", "name", "-v=6"]);
    assert!(chunked.status.success(), "{}", stderr(&chunked));
    let names: Vec<String> = stdout(&chunked).lines().map(String::from).collect();
    for i in 0..5 {
        assert!(names.contains(&format!("configmap/c{i}")), "{names:?}");
    }
    let continued = stderr(&chunked)
        .lines()
        .filter(|l| l.contains("/configmaps?continue=") && l.contains("limit=2"))
        .count();
    assert_eq!(
        continued,
        2,
        "kubectl follows two continue tokens for 5 items in pages of 2: {}",
        stderr(&chunked)
    );

    // `kubectl run --dry-run=server` prints the pod the server would store, and stores nothing.
    let run = kubectl(&[
        "run",
        "x",
        "--image=busybox",
        "--dry-run=server",
        "-o",
        "json",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let pod: Value = serde_json::from_slice(&run.stdout).expect("pod JSON");
    assert_eq!(pod["metadata"]["name"], "x");
    assert!(pod["metadata"]["uid"].is_string());
    assert_eq!(
        pod["spec"]["containers"][0]["imagePullPolicy"], "Always",
        "defaults applied"
    );
    assert!(
        !kubectl(&["get", "pod", "x"]).status.success(),
        "the dry run created the pod"
    );
    let y = kubectl(&["run", "y", "--image=busybox"]);
    assert!(y.status.success(), "{}", stderr(&y));
    let del = kubectl(&["delete", "pod", "y", "--dry-run=server"]);
    assert_eq!(stdout(&del).trim(), r#"pod "y" deleted (server dry run)"#);
    let still = kubectl(&["get", "pod", "y", "-o", "json"]);
    let still: Value = serde_json::from_slice(&still.stdout).expect("pod y");
    assert!(still["metadata"].get("deletionTimestamp").is_none());
}
