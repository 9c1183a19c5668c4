//! The embedded control plane through kube-rs, the client our controllers use: list then watch
//! across a cloudcore restart, 409 on a stale update, 410 for a too-old watch and the kube-rs
//! watcher relisting after it, bookmarks, streaming lists, and status-subresource semantics
//! with 404, 422 and `generateName`.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use integration::{Cloud, kube_client};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::{reflector, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

/// How long any single expected watch event may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Events the embedded API keeps for resuming watches (`StoreOptions::default`); cloudcore has
/// no flag to change it.
const EVENT_RETENTION: usize = 10_000;

async fn client(cloud: &Cloud) -> Client {
    kube_client(&cloud.kubeconfig())
        .await
        .unwrap_or_else(|e| panic!("kube client from {}: {e:#}", cloud.kubeconfig().display()))
}

async fn create_namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some([("v".to_string(), value.to_string())].into()),
        ..ConfigMap::default()
    }
}

async fn create_config_map(api: &Api<ConfigMap>, name: &str, value: &str) -> ConfigMap {
    api.create(&PostParams::default(), &config_map(name, value))
        .await
        .unwrap_or_else(|e| panic!("create configmap {name}: {e}"))
}

async fn set_value(api: &Api<ConfigMap>, name: &str, value: &str) -> ConfigMap {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": value}})),
    )
    .await
    .unwrap_or_else(|e| panic!("patch configmap {name}: {e}"))
}

async fn delete_config_map(api: &Api<ConfigMap>, name: &str) {
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete configmap {name}: {e}"));
}

fn rv(object: &impl ResourceExt) -> u64 {
    object
        .resource_version()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{} has no decimal resourceVersion: {:?}",
                object.name_any(),
                object.resource_version()
            )
        })
}

fn value_of(cm: &ConfigMap) -> Option<&str> {
    cm.data.as_ref()?.get("v").map(String::as_str)
}

/// The `kube::Error::Api` status of a failed call, or a panic naming what happened instead.
fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("{what}: expected kube::Error::Api, got {other:?}"),
    }
}

/// One watch event reduced to what the tests compare: type, name, value and rv.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    name: String,
    value: Option<String>,
    rv: u64,
}

fn seen(event: WatchEvent<ConfigMap>) -> Option<Seen> {
    let (kind, cm) = match event {
        WatchEvent::Added(cm) => ("ADDED", cm),
        WatchEvent::Modified(cm) => ("MODIFIED", cm),
        WatchEvent::Deleted(cm) => ("DELETED", cm),
        WatchEvent::Bookmark(_) => return None,
        WatchEvent::Error(status) => panic!("unexpected watch error event: {status:?}"),
    };
    Some(Seen {
        kind,
        name: cm.name_any(),
        value: value_of(&cm).map(str::to_string),
        rv: rv(&cm),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_listed_resource_version_across_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cloud = Cloud::start(tmp.path(), &[]);
    let kube = client(&cloud).await;
    create_namespace(&kube, "continuity").await;
    let cms: Api<ConfigMap> = Api::namespaced(kube.clone(), "continuity");
    for name in ["a", "b", "c"] {
        create_config_map(&cms, name, "1").await;
    }
    let listed = cms.list(&ListParams::default()).await.expect("list");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|c| c.name_any())
            .collect::<Vec<_>>(),
        ["a", "b", "c"],
        "the list holds the three configmaps"
    );
    let noted: u64 = listed
        .metadata
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .expect("the list carries a decimal resourceVersion");

    // Changes after the noted rv, before the restart.
    set_value(&cms, "a", "2").await;
    delete_config_map(&cms, "b").await;
    create_config_map(&cms, "d", "1").await;

    tokio::task::block_in_place(|| cloud.restart());
    let kube = client(&cloud).await;
    let cms: Api<ConfigMap> = Api::namespaced(kube.clone(), "continuity");
    // ... and after it.
    set_value(&cms, "c", "2").await;
    create_config_map(&cms, "e", "1").await;
    delete_config_map(&cms, "d").await;

    let expected = [
        ("MODIFIED", "a", Some("2")),
        ("DELETED", "b", Some("1")),
        ("ADDED", "d", Some("1")),
        ("MODIFIED", "c", Some("2")),
        ("ADDED", "e", Some("1")),
        ("DELETED", "d", Some("1")),
    ];
    let stream = cms
        .watch(&WatchParams::default(), &noted.to_string())
        .await
        .expect("watch from the listed resourceVersion");
    let mut events = stream
        .map(|e| e.expect("watch stream"))
        .filter_map(|e| async { seen(e) })
        .boxed();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match tokio::time::timeout(EVENT_TIMEOUT, events.next()).await {
            Ok(Some(event)) => got.push(event),
            Ok(None) => panic!("the watch ended after {got:?}"),
            Err(_) => panic!(
                "no further event within {EVENT_TIMEOUT:?}; got {got:?}, expected {expected:?}"
            ),
        }
    }
    let summary: Vec<(&str, &str, Option<&str>)> = got
        .iter()
        .map(|s| (s.kind, s.name.as_str(), s.value.as_deref()))
        .collect();
    assert_eq!(
        summary, expected,
        "the watch from rv {noted} replays exactly the changes after it, in order"
    );
    let rvs: Vec<u64> = got.iter().map(|s| s.rv).collect();
    assert!(
        rvs.first().is_some_and(|&first| first > noted) && rvs.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions grow across the restart, all after {noted}: {rvs:?}"
    );
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(1), events.next()).await {
        panic!("the watch delivered an event nobody caused: {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replace_gets_409_conflict_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kube = client(&cloud).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(kube);
    let original = create_config_map(&cms, "settings", "1").await;

    let mut fresh = original.clone();
    fresh.data = Some([("v".to_string(), "2".to_string())].into());
    let current = cms
        .replace("settings", &PostParams::default(), &fresh)
        .await
        .expect("replace with the current resourceVersion");
    assert!(rv(&current) > rv(&original), "a replace advances the rv");

    let mut stale = original.clone();
    stale.data = Some([("v".to_string(), "stale".to_string())].into());
    let status = api_error(
        cms.replace("settings", &PostParams::default(), &stale)
            .await,
        "replace with the original resourceVersion",
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "Conflict"),
        "a stale replace is a 409 Conflict: {status:?}"
    );

    let after = cms.get("settings").await.expect("get after the conflict");
    assert_eq!(
        (value_of(&after), rv(&after)),
        (Some("2"), rv(&current)),
        "the failed replace changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_old_watch_gets_410_and_the_watcher_relists() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kube = client(&cloud).await;
    create_namespace(&kube, "quiet").await;
    create_namespace(&kube, "noise").await;
    let quiet: Api<ConfigMap> = Api::namespaced(kube.clone(), "quiet");
    let noise: Api<ConfigMap> = Api::namespaced(kube.clone(), "noise");
    for name in ["keep", "change", "remove"] {
        create_config_map(&quiet, name, "1").await;
    }

    // A reflector over the quiet namespace, polled until it has listed, then not polled: a
    // paused controller. A stream does nothing unless polled, and at InitDone the watcher has
    // listed but not yet opened its watch, so when polled again it watches from the list's rv.
    let (reader, writer) = reflector::store::<ConfigMap>();
    let mut watch_errors = Vec::new();
    let mut stream = reflector(writer, watcher(quiet.clone(), watcher::Config::default())).boxed();
    let synced = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => return,
                Ok(_) => {}
                Err(e) => watch_errors.push(e.to_string()),
            }
        }
    })
    .await;
    assert!(
        synced.is_ok(),
        "the watcher did not list within {EVENT_TIMEOUT:?}: {watch_errors:?}"
    );
    assert_eq!(
        reader.state().len(),
        3,
        "the reflector holds the quiet namespace"
    );

    let before = quiet.list(&ListParams::default()).await.expect("list");
    let old_rv = before
        .metadata
        .resource_version
        .clone()
        .expect("list resourceVersion");
    set_value(&quiet, "change", "2").await;
    delete_config_map(&quiet, "remove").await;
    create_config_map(&quiet, "new", "1").await;

    // More events than the server retains, elsewhere: the old rv falls out of the window.
    let flood = EVENT_RETENTION + 50;
    futures::stream::iter(0..flood)
        .map(|i| {
            let noise = noise.clone();
            async move {
                noise
                    .create(
                        &PostParams::default(),
                        &config_map(&format!("n-{i:05}"), "1"),
                    )
                    .await
                    .map(drop)
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("flood of configmap creates");

    let mut old = quiet
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("a watch from a compacted rv is answered, with an error event")
        .boxed();
    match tokio::time::timeout(EVENT_TIMEOUT, old.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => assert_eq!(
            (status.code, status.reason.as_str()),
            (410, "Expired"),
            "a watch from a compacted rv is 410 Expired: {status:?}"
        ),
        other => panic!("expected a 410 ERROR event for rv {old_rv}, got {other:?}"),
    }

    // The paused reflector resumes: its watch from the old rv gets the 410, it relists and
    // ends up with the current state.
    let relisted = tokio::time::timeout(Duration::from_secs(20), async {
        let mut gone = false;
        while let Some(event) = stream.next().await {
            match event {
                Err(watcher::Error::WatchError(status)) if status.code == 410 => gone = true,
                Ok(watcher::Event::InitDone) if gone => return,
                Ok(_) => {}
                Err(e) => watch_errors.push(e.to_string()),
            }
        }
        panic!("the watcher stream ended");
    })
    .await;
    assert!(
        relisted.is_ok(),
        "the watcher did not get a 410 and relist within 20 s; other errors: {watch_errors:?}"
    );
    let mut state: Vec<(String, Option<String>)> = reader
        .state()
        .iter()
        .map(|cm| (cm.name_any(), value_of(cm).map(str::to_string)))
        .collect();
    state.sort();
    let current: Vec<(String, Option<String>)> = quiet
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|cm| (cm.name_any(), value_of(cm).map(str::to_string)))
        .collect();
    assert_eq!(
        state, current,
        "after relisting the reflector matches the server"
    );
    assert_eq!(
        state,
        [
            ("change".to_string(), Some("2".to_string())),
            ("keep".to_string(), Some("1".to_string())),
            ("new".to_string(), Some("1".to_string())),
        ],
        "the reflector saw the changes made while it was paused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_arrive_on_a_quiet_watch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kube = client(&cloud).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(kube);
    create_config_map(&cms, "one", "1").await;
    let listed = cms.list(&ListParams::default()).await.expect("list");
    let from = listed
        .metadata
        .resource_version
        .expect("list resourceVersion");
    let params = WatchParams::default();
    assert!(params.bookmarks, "kube-rs asks for bookmarks by default");
    let mut stream = cms.watch(&params, &from).await.expect("watch").boxed();
    // The watch is quiet: its first event must be a bookmark.
    let first = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("a bookmark within 15 s (the server sends one every 10 s)");
    let bookmark = match first {
        Some(Ok(WatchEvent::Bookmark(b))) => b,
        Some(Ok(other)) => panic!("only a bookmark was expected on a quiet watch, got {other:?}"),
        Some(Err(e)) => panic!("watch stream: {e}"),
        None => panic!("the watch ended without a bookmark"),
    };
    let at: u64 = bookmark
        .metadata
        .resource_version
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "bookmark rv is not decimal: {:?}",
                bookmark.metadata.resource_version
            )
        });
    assert!(
        at >= from.parse().expect("decimal list rv"),
        "the bookmark's rv {at} is not behind the watch's start {from}"
    );
    assert_eq!(
        (
            bookmark.types.kind.as_str(),
            bookmark.types.api_version.as_str()
        ),
        ("ConfigMap", "v1"),
        "the bookmark names the watched kind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_list_watcher_gets_the_state_then_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kube = client(&cloud).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(kube);
    for name in ["a", "b"] {
        create_config_map(&cms, name, "1").await;
    }
    // kube-rs sends sendInitialEvents=true and waits for the bookmark that ends the initial
    // events; without it the watcher never reports InitDone.
    let mut stream = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    let listed = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(event) = stream.next().await {
            match event.expect("streaming list") {
                watcher::Event::InitApply(cm) => initial.push(cm.name_any()),
                watcher::Event::InitDone => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        listed.is_ok(),
        "no end-of-initial-events bookmark within {EVENT_TIMEOUT:?}; initial events: {initial:?}"
    );
    assert_eq!(
        initial,
        ["a", "b"],
        "the initial events are the current state"
    );
    create_config_map(&cms, "c", "1").await;
    match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(watcher::Event::Apply(cm)))) => {
            assert_eq!(cm.name_any(), "c", "the first change after the list")
        }
        other => panic!("expected Apply(c) after the streaming list, got {other:?}"),
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"step": "0"}},
        // Bound to a node that does not exist, so the embedded scheduler leaves it alone.
        "spec": {
            "nodeName": "gw-absent",
            "containers": [{"name": "main", "image": "localhost/busybox:1"}],
        },
    }))
    .expect("pod")
}

fn label(pod: &Pod, key: &str) -> Option<String> {
    pod.labels().get(key).cloned()
}

fn phase(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.phase.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_subresource_and_errors_through_kube_rs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kube = client(&cloud).await;
    let pods: Api<Pod> = Api::default_namespaced(kube.clone());
    let created = pods
        .create(&PostParams::default(), &pod("split"))
        .await
        .expect("create pod");
    assert_eq!(
        phase(&created).as_deref(),
        Some("Pending"),
        "a new pod is Pending"
    );

    // replace: spec and metadata change, status does not.
    let mut replaced = created.clone();
    replaced.labels_mut().insert("step".into(), "1".into());
    if let Some(status) = replaced.status.as_mut() {
        status.phase = Some("Running".into());
    }
    let replaced = pods
        .replace("split", &PostParams::default(), &replaced)
        .await
        .expect("replace pod");
    assert_eq!(
        (
            label(&replaced, "step").as_deref(),
            phase(&replaced).as_deref()
        ),
        (Some("1"), Some("Pending")),
        "replace changes the labels and ignores status"
    );

    // replace_status: status changes, metadata does not.
    let mut with_status = replaced.clone();
    with_status.labels_mut().insert("step".into(), "2".into());
    if let Some(status) = with_status.status.as_mut() {
        status.phase = Some("Running".into());
    }
    let after_put = pods
        .replace_status("split", &PostParams::default(), &with_status)
        .await
        .expect("replace_status");
    assert_eq!(
        (
            label(&after_put, "step").as_deref(),
            phase(&after_put).as_deref()
        ),
        (Some("1"), Some("Running")),
        "replace_status changes status and ignores labels"
    );

    // patch_status: same split for a merge patch touching both.
    let after_patch = pods
        .patch_status(
            "split",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"labels": {"step": "3"}},
                "status": {"phase": "Succeeded", "message": "done"},
            })),
        )
        .await
        .expect("patch_status");
    assert_eq!(
        (
            label(&after_patch, "step").as_deref(),
            phase(&after_patch).as_deref(),
            after_patch
                .status
                .as_ref()
                .and_then(|s| s.message.as_deref()),
        ),
        (Some("1"), Some("Succeeded"), Some("done")),
        "patch_status changes status and ignores labels"
    );
    assert_eq!(
        after_patch.spec, created.spec,
        "no status write changed the spec"
    );

    let missing = api_error(pods.get("no-such-pod").await, "get of an unknown pod");
    assert_eq!(
        (missing.code, missing.reason.as_str()),
        (404, "NotFound"),
        "an unknown object is 404 NotFound: {missing:?}"
    );
    let missing = api_error(
        pods.patch_status(
            "no-such-pod",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await,
        "patch_status of an unknown pod",
    );
    assert_eq!(
        missing.code, 404,
        "patch_status of an unknown pod: {missing:?}"
    );

    let cms: Api<ConfigMap> = Api::default_namespaced(kube);
    let invalid = api_error(
        cms.create(&PostParams::default(), &config_map("Not_A_Name", "1"))
            .await,
        "create with an invalid name",
    );
    assert_eq!(
        (invalid.code, invalid.reason.as_str()),
        (422, "Invalid"),
        "an invalid name is 422 Invalid: {invalid:?}"
    );
    assert!(
        cms.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty(),
        "the invalid create wrote nothing"
    );

    let mut generated = config_map("", "1");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let first = cms
        .create(&PostParams::default(), &generated)
        .await
        .expect("create with generateName");
    let second = cms
        .create(&PostParams::default(), &generated)
        .await
        .expect("create with the same generateName again");
    for cm in [&first, &second] {
        let name = cm.name_any();
        assert!(
            name.starts_with("gen-") && name.len() > "gen-".len(),
            "generateName gives gen-<suffix>, got {name:?}"
        );
        assert!(cm.uid().is_some(), "a generated object has a uid");
    }
    assert_ne!(
        first.name_any(),
        second.name_any(),
        "generated names differ"
    );
}
