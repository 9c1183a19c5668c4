//! The embedded API's answers to bad or risky requests, checked against a real kube-apiserver
//! (`cluster::KubeCluster`) where the behaviour must match: system namespaces, body limit,
//! resourceVersion parsing, `resourceVersionMatch`, volume item paths and ConfigMap keys.

use std::path::Path;
use std::time::Duration;

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, eventually, join_and_run, kube_client};
use serde_json::{Value, json};

/// What an API answered: the object, or the `Status` of a failure.
#[derive(Debug)]
enum Answer {
    Ok(Value),
    Failed {
        code: u16,
        reason: String,
        message: String,
        causes: Vec<(String, String)>,
    },
}

impl Answer {
    fn code(&self) -> u16 {
        match self {
            Answer::Ok(_) => 200,
            Answer::Failed { code, .. } => *code,
        }
    }

    fn reason(&self) -> &str {
        match self {
            Answer::Ok(_) => "",
            Answer::Failed { reason, .. } => reason,
        }
    }
}

/// Sends one request as the admin and parses the answer; a failure that is not a `Status`
/// gets the reason `not a Status`.
async fn call(client: &kube::Client, method: &str, path: &str, body: Option<Vec<u8>>) -> Answer {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", "application/json")
        .body(body.unwrap_or_default())
        .expect("request");
    match client.request_text(request).await {
        Ok(text) => Answer::Ok(serde_json::from_str(&text).unwrap_or(Value::String(text))),
        Err(kube::Error::Api(status)) => Answer::Failed {
            code: status.code,
            reason: if status.reason == "Failed to parse error data" {
                "not a Status".into()
            } else {
                status.reason.clone()
            },
            message: status.message.clone(),
            causes: status
                .details
                .as_ref()
                .map(|d| {
                    d.causes
                        .iter()
                        .map(|c| (c.field.clone(), c.message.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        },
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn json_body(value: &Value) -> Option<Vec<u8>> {
    Some(value.to_string().into_bytes())
}

const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";

fn bad_volume_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "escape"}, "spec": {
    "automountServiceAccountToken": false,
    "containers": [{"name": "c", "image": "busybox"}],
    "volumes": [
        {"name": "v", "configMap": {"name": "x", "items": [
            {"key": "a", "path": "../etc/passwd"}, {"key": "b", "path": "/abs"},
            {"key": "c", "path": "..data"}, {"key": "d", "path": "ok/file"}]}},
        {"name": "s", "secret": {"secretName": "x", "items": [{"key": "a", "path": "a/../../b"}]}},
    ]}})
}

/// The requests whose answers must be the same from both APIs; returns them for comparison,
/// in order, as (what, code, reason, causes).
async fn same_answers(kubeconfig: &Path) -> Vec<(String, u16, String, Vec<(String, String)>)> {
    let client = kube_client(kubeconfig).await.expect("client");
    let mut answers = Vec::new();
    let mut record = |what: &str, answer: Answer| {
        let causes = match &answer {
            Answer::Failed { causes, .. } => causes.clone(),
            Answer::Ok(_) => Vec::new(),
        };
        answers.push((
            what.to_string(),
            answer.code(),
            answer.reason().to_string(),
            causes,
        ));
        answer
    };

    for ns in ["default", "kube-system", "kube-public"] {
        let answer = record(
            &format!("delete namespace {ns}"),
            call(&client, "DELETE", &format!("/api/v1/namespaces/{ns}"), None).await,
        );
        let Answer::Failed { message, .. } = answer else {
            panic!("namespace {ns} was deleted");
        };
        assert_eq!(
            message,
            format!("namespaces \"{ns}\" is forbidden: this namespace may not be deleted")
        );
    }

    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
        "data": {"a": "x".repeat(3 * 1024 * 1024 + 10)}});
    let answer = record(
        "body over 3 MiB",
        call(&client, "POST", CONFIGMAPS, json_body(&big)).await,
    );
    if let Answer::Failed { message, .. } = &answer {
        assert_eq!(message, "Request entity too large: limit is 3145728");
    }

    record(
        "list ?resourceVersion=abc",
        call(
            &client,
            "GET",
            &format!("{CONFIGMAPS}?resourceVersion=abc"),
            None,
        )
        .await,
    );
    record(
        "list ?resourceVersionMatch=Exact without resourceVersion",
        call(
            &client,
            "GET",
            &format!("{CONFIGMAPS}?resourceVersionMatch=Exact"),
            None,
        )
        .await,
    );
    record(
        "list ?resourceVersionMatch=Bogus",
        call(
            &client,
            "GET",
            &format!("{CONFIGMAPS}?resourceVersionMatch=Bogus&resourceVersion=1"),
            None,
        )
        .await,
    );

    let both = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "both"},
        "data": {"a": "x", "c": "y"}, "binaryData": {"a": "eA==", "b": "eA=="}});
    record(
        "configmap key in data and binaryData",
        call(&client, "POST", CONFIGMAPS, json_body(&both)).await,
    );
    record(
        "volume item paths outside the volume",
        call(
            &client,
            "POST",
            "/api/v1/namespaces/default/pods",
            json_body(&bad_volume_pod()),
        )
        .await,
    );

    // Not the same everywhere: kube-apiserver answers an unparseable resourceVersion on a GET
    // of one object or in an update's body with a 500; we answer 400 (docs/kubectl-compat.md).
    // Both refuse, and the update writes nothing.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}, "data": {"a": "before"}});
    assert!(matches!(
        call(&client, "POST", CONFIGMAPS, json_body(&cm)).await,
        Answer::Ok(_)
    ));
    let get = call(
        &client,
        "GET",
        &format!("{CONFIGMAPS}/probe?resourceVersion=abc"),
        None,
    )
    .await;
    assert!(get.code() >= 400, "{get:?}");
    let mut update = cm.clone();
    update["metadata"]["resourceVersion"] = json!("abc");
    update["data"]["a"] = json!("overwritten");
    let put = call(
        &client,
        "PUT",
        &format!("{CONFIGMAPS}/probe"),
        json_body(&update),
    )
    .await;
    assert!(put.code() >= 400, "{put:?}");
    let Answer::Ok(after) = call(&client, "GET", &format!("{CONFIGMAPS}/probe"), None).await else {
        panic!("probe is gone");
    };
    assert_eq!(after["data"]["a"], "before", "the update was written");
    answers
}

/// The cluster harness runs its own runtime, so this test drives its requests on another.
#[test]
fn bad_requests_get_the_answers_kube_apiserver_gives() {
    integration::init_test_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let embedded = runtime.block_on(same_answers(&cloud.kubeconfig()));

    let cluster = KubeCluster::start(
        &tmp.path().join("k8s"),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    // Without a controller-manager nobody creates the ServiceAccount pod admission asks for.
    cluster.kubectl_ok(
        &["create", "serviceaccount", "default", "-n", "default"],
        None,
    );
    let real = runtime.block_on(same_answers(&cluster.kubeconfig));

    // A 504 through kubectl: kube-rs would retry it for minutes.
    let future = format!("{CONFIGMAPS}?resourceVersionMatch=Exact&resourceVersion=99999999");
    let ours = cloud.kubectl(&["get", "--raw", &future]);
    let theirs = cluster.kubectl(&["get", "--raw", &future], None);
    let first_line = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        // `Error from server (Timeout): Timeout: Too large resource version: 99999999, current: N`
        text.lines()
            .find(|l| l.starts_with("Error from server"))
            .map(|l| l.split(", current:").next().unwrap_or_default().to_string())
            .unwrap_or(text)
    };
    assert_eq!(
        first_line(&ours),
        "Error from server (Timeout): Timeout: Too large resource version: 99999999"
    );
    assert_eq!(first_line(&ours), first_line(&theirs));

    for (ours, theirs) in embedded.iter().zip(&real) {
        assert_eq!(ours, theirs, "embedded vs kube-apiserver");
    }
    assert_eq!(embedded.len(), real.len());
    // And what those answers are.
    let codes: Vec<(&str, u16, &str)> = embedded
        .iter()
        .map(|(what, code, reason, _)| (what.as_str(), *code, reason.as_str()))
        .collect();
    assert_eq!(
        codes,
        [
            ("delete namespace default", 403, "Forbidden"),
            ("delete namespace kube-system", 403, "Forbidden"),
            ("delete namespace kube-public", 403, "Forbidden"),
            ("body over 3 MiB", 413, "RequestEntityTooLarge"),
            ("list ?resourceVersion=abc", 400, "BadRequest"),
            (
                "list ?resourceVersionMatch=Exact without resourceVersion",
                422,
                "Invalid"
            ),
            ("list ?resourceVersionMatch=Bogus", 422, "Invalid"),
            ("configmap key in data and binaryData", 422, "Invalid"),
            ("volume item paths outside the volume", 422, "Invalid"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_resource_versions_are_checked_and_exact_lists_never_serve_other_data() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let client = kube_client(&cloud.kubeconfig()).await.expect("client");
    let cm = |name: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}});
    assert!(matches!(
        call(&client, "POST", CONFIGMAPS, json_body(&cm("one"))).await,
        Answer::Ok(_)
    ));
    let Answer::Ok(list) = call(&client, "GET", CONFIGMAPS, None).await else {
        panic!("list");
    };
    let old: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("rv");
    assert!(matches!(
        call(&client, "POST", CONFIGMAPS, json_body(&cm("two"))).await,
        Answer::Ok(_)
    ));
    // An exact list at an older version is the list as it was then (rebuilt from the event
    // history, as etcd serves an old revision): never today's objects under yesterday's version.
    let Answer::Ok(exact) = call(
        &client,
        "GET",
        &format!("{CONFIGMAPS}?resourceVersionMatch=Exact&resourceVersion={old}"),
        None,
    )
    .await
    else {
        panic!("an exact list at a retained older version is served");
    };
    assert_eq!(exact["metadata"]["resourceVersion"], old.to_string());
    let names: Vec<&str> = exact["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["one"], "the list at {old}");
    let Answer::Ok(now) = call(&client, "GET", CONFIGMAPS, None).await else {
        panic!("list");
    };
    let current = now["metadata"]["resourceVersion"].as_str().expect("rv");
    let Answer::Ok(exact) = call(
        &client,
        "GET",
        &format!("{CONFIGMAPS}?resourceVersionMatch=Exact&resourceVersion={current}"),
        None,
    )
    .await
    else {
        panic!("an exact list at the current version is served");
    };
    assert_eq!(exact["items"].as_array().map(Vec::len), Some(2));

    // 400 for an unparseable resourceVersion wherever it appears.
    for path in [
        format!("{CONFIGMAPS}/one?resourceVersion=abc"),
        format!("{CONFIGMAPS}?watch=1&resourceVersion=abc"),
    ] {
        let answer = call(&client, "GET", &path, None).await;
        assert_eq!(
            (answer.code(), answer.reason()),
            (400, "BadRequest"),
            "{path}"
        );
    }
    let mut update = cm("one");
    update["metadata"]["resourceVersion"] = json!("abc");
    let put = call(
        &client,
        "PUT",
        &format!("{CONFIGMAPS}/one"),
        json_body(&update),
    )
    .await;
    assert_eq!((put.code(), put.reason()), (400, "BadRequest"), "{put:?}");
    let delete = call(
        &client,
        "DELETE",
        &format!("{CONFIGMAPS}/one"),
        json_body(&json!({"preconditions": {"resourceVersion": "abc"}})),
    )
    .await;
    assert_eq!(
        (delete.code(), delete.reason()),
        (400, "BadRequest"),
        "{delete:?}"
    );
    assert!(matches!(
        call(&client, "GET", &format!("{CONFIGMAPS}/one"), None).await,
        Answer::Ok(_)
    ));
}

#[test]
fn kubectl_sees_system_namespaces_refused_and_recreated_and_big_bodies_as_413() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let _edge = join_and_run(&cloud, &tmp.path().join("gw-1"), "gw-1", &[]);
    let lease = || {
        cloud
            .kubectl(&["get", "lease", "-n", "kube-node-lease", "gw-1"])
            .status
            .success()
    };
    assert!(eventually(Duration::from_secs(15), lease), "no lease");

    // The command: nothing is deleted.
    let out = cloud.kubectl(&["delete", "ns", "default", "kube-system", "kube-public"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for ns in ["default", "kube-system", "kube-public"] {
        assert!(
            stderr.contains(&format!(
                "Error from server (Forbidden): namespaces \"{ns}\" is forbidden: this namespace may not be deleted"
            )),
            "{stderr}"
        );
        cloud.kubectl_ok(&["get", "ns", ns], None);
    }

    // kube-node-lease may be deleted, as in Kubernetes; it comes back, and so does the lease.
    cloud.kubectl_ok(&["delete", "ns", "kube-node-lease", "--wait=true"], None);
    assert!(
        eventually(Duration::from_secs(30), || {
            cloud
                .kubectl(&["get", "ns", "kube-node-lease"])
                .status
                .success()
        }),
        "kube-node-lease was not recreated; log:\n{}",
        cloud.log()
    );
    assert!(
        eventually(Duration::from_secs(30), lease),
        "the node's lease was not renewed again; log:\n{}",
        cloud.log()
    );

    // Over HTTP/2 (kubectl), a body over the limit is a 413 Status, not a reset stream.
    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big", "namespace": "default"},
        "data": {"a": "x".repeat(3 * 1024 * 1024 + 10)}})
    .to_string();
    let out = cloud.kubectl_with_stdin(&["create", "-f", "-"], Some(&big));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Error from server (RequestEntityTooLarge)")
            && stderr.contains("Request entity too large: limit is 3145728"),
        "{stderr}"
    );
}
