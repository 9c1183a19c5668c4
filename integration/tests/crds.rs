//! Custom resources in the embedded control plane, through the real kubectl and kube-rs: a
//! CustomResourceDefinition applied and established, its objects validated, pruned and
//! defaulted by the schema, printed with its columns, its `status` and `scale` subresources,
//! a cluster-scoped definition, watch, selectors, garbage collection by owner references,
//! the registry rebuilt after a restart, and deletion of the definition removing its objects.
//! The last test runs the same kubectl sequence against a real kube-apiserver and compares.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, eventually, kube_client};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams};
use kube::discovery::{Discovery, Scope};
use serde_json::{Value, json};

/// A namespaced definition with a schema covering the checks kube-apiserver makes, printer
/// columns (one wide), and the status and scale subresources.
const WIDGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale:
        specReplicasPath: .spec.replicas
        statusReplicasPath: .status.replicas
        labelSelectorPath: .status.selector
    additionalPrinterColumns:
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Color, type: string, jsonPath: .spec.color}
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Size, type: number, jsonPath: .spec.size, priority: 1}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [color]
            properties:
              replicas: {type: integer, minimum: 0, maximum: 10, default: 1}
              color: {type: string, enum: [red, green, blue]}
              size: {type: number, exclusiveMinimum: true, minimum: 0}
              name: {type: string, minLength: 2, maxLength: 5, pattern: '^[a-z]+$'}
              tags: {type: array, items: {type: string}, maxItems: 2}
              port: {x-kubernetes-int-or-string: true}
              extra: {type: object, x-kubernetes-preserve-unknown-fields: true}
              mode: {type: string, default: fast}
          status:
            type: object
            properties:
              replicas: {type: integer}
              selector: {type: string}
              conditions:
                type: array
                items:
                  type: object
                  properties:
                    type: {type: string}
                    status: {type: string}
"#;

/// A cluster-scoped definition without printer columns (kube-apiserver's default Age column),
/// served in two versions (conversion `None`: objects stored once, read in either).
const GADGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Cluster
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-preserve-unknown-fields: true
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              id: {type: string, format: uuid}
              list: {type: array, minItems: 2, items: {type: integer, multipleOf: 2}}
"#;

/// A definition asking for names `WIDGETS` has: kind `Widget` and short name `wd`.
const RIVAL: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: rivals.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: rivals, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object}
"#;

/// Objects kube-apiserver refuses, each with the causes it gives.
const INVALID: &[(&str, &str)] = &[
    (
        "bad-type",
        r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"bad-type"},"spec":{"color":"red","replicas":"x"}}"#,
    ),
    (
        "bad-many",
        r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"bad-many"},"spec":{"color":"pink","replicas":11,"size":0,"name":"A","tags":["a","b","c"],"port":1.5}}"#,
    ),
    (
        "bad-required",
        r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"bad-required"},"spec":{"name":"abcdefg"}}"#,
    ),
    (
        "bad-nested",
        r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"bad-nested"},"spec":{"color":"red","name":"AB1","tags":[1],"extra":5,"replicas":-1}}"#,
    ),
];

/// A valid widget with an undeclared field and a field left to its default.
const W1: &str = r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w1","labels":{"app":"w"}},"spec":{"color":"green","replicas":3,"size":1.5,"port":"http","extra":{"deep":{"a":1}},"unknown":true},"junk":1}"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `* field: message` causes of a kubectl error, sorted (kube-apiserver's order is not
/// stable: its validator walks maps).
fn causes(stderr: &str) -> Vec<String> {
    let mut lines: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("* "))
        .map(String::from)
        .collect();
    if lines.is_empty()
        && let Some((_, one)) = stderr.trim().split_once(" is invalid: ")
    {
        lines.push(one.to_string());
    }
    lines.sort();
    lines
}

/// What a test compares of a kubectl table: the header and rows with the AGE column (always
/// last here) cut off, as the two servers created the objects at different times.
fn without_age(table: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| {
            let cut = l.rfind("  ").map_or(l, |i| &l[..i]);
            cut.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// A kubectl table with its column padding collapsed.
fn normalized(table: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// Something that runs kubectl: the embedded API or a real cluster.
trait Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output;

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&all, None)).expect("kubectl JSON")
    }

    fn establish(&self, definition: &str, name: &str) {
        self.ok(&["apply", "-f", "-"], Some(definition));
        self.ok(
            &[
                "wait",
                "--for",
                "condition=established",
                "--timeout=30s",
                &format!("crd/{name}"),
            ],
            None,
        );
    }
}

impl Kubectl for Cloud {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        self.kubectl_with_stdin(args, stdin)
    }
}

impl Kubectl for KubeCluster {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        self.kubectl(args, stdin)
    }
}

#[test]
fn custom_resources_are_served_from_their_definitions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cloud = Cloud::start(tmp.path(), &[]);

    // The definition gets its conditions and accepted names, and is served right after.
    cloud.establish(WIDGETS, "widgets.example.com");
    let crd = cloud.json(&["crd", "widgets.example.com"]);
    let conditions = crd["status"]["conditions"].as_array().expect("conditions");
    for kind in ["NamesAccepted", "Established"] {
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == kind && c["status"] == "True"),
            "{kind} in {conditions:?}"
        );
    }
    assert_eq!(crd["status"]["acceptedNames"]["listKind"], "WidgetList");
    assert_eq!(crd["spec"]["names"]["listKind"], "WidgetList");
    let resources = cloud.ok(&["api-resources", "--api-group=example.com"], None);
    assert!(
        normalized(&resources).contains(&"widgets wd example.com/v1 true Widget".to_string()),
        "{resources}"
    );

    // A valid object is pruned and defaulted; invalid ones are refused with their field paths.
    cloud.ok(&["create", "--validate=false", "-f", "-"], Some(W1));
    let w1 = cloud.json(&["widget", "w1"]);
    assert_eq!(w1["spec"]["mode"], "fast", "default applied: {w1}");
    assert!(w1["spec"].get("unknown").is_none(), "pruned: {w1}");
    assert!(w1.get("junk").is_none(), "pruned: {w1}");
    assert_eq!(w1["spec"]["extra"]["deep"]["a"], 1, "preserved: {w1}");
    assert_eq!(w1["metadata"]["generation"], 1);
    for (name, body) in INVALID {
        let out = cloud.run(&["create", "--validate=false", "-f", "-"], Some(body));
        assert!(!out.status.success(), "{name} was accepted");
        assert!(
            text(&out.stderr).contains(&format!("The Widget \"{name}\" is invalid")),
            "{}",
            text(&out.stderr)
        );
    }
    let refused = cloud.run(
        &["create", "--validate=false", "-f", "-"],
        Some(INVALID[0].1),
    );
    assert!(
        causes(&text(&refused.stderr)).contains(
            &r#"spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string""#
                .to_string()
        ),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        !cloud
            .run(&["get", "widget", "bad-type"], None)
            .status
            .success()
    );
    let explained = cloud.ok(&["explain", "widgets.spec.replicas"], None);
    assert!(
        explained.contains("KIND:       Widget") && explained.contains("replicas <integer>"),
        "{explained}"
    );

    // Printer columns, by plural, short name and kind; the priority-1 column only wide.
    for name in ["widgets", "wd", "Widget", "widget.example.com"] {
        let table = cloud.ok(&["get", name], None);
        assert_eq!(
            without_age(&table),
            ["NAME REPLICAS COLOR READY", "w1 3 green"],
            "{name}: {table}"
        );
    }
    let wide = cloud.ok(&["get", "wd", "-o", "wide"], None);
    assert_eq!(
        without_age(&wide),
        ["NAME REPLICAS COLOR READY SIZE", "w1 3 green 1.5"],
        "{wide}"
    );

    // status is written only through its subresource; spec changes bump the generation.
    cloud.ok(
        &[
            "patch", "widget", "w1", "--subresource=status", "--type=merge", "-p",
            r#"{"status":{"replicas":2,"selector":"app=w","conditions":[{"type":"Ready","status":"True"}]}}"#,
        ],
        None,
    );
    cloud.ok(
        &[
            "patch",
            "widget",
            "w1",
            "--type=merge",
            "-p",
            r#"{"spec":{"color":"blue"},"status":{"replicas":9}}"#,
        ],
        None,
    );
    let w1 = cloud.json(&["widget", "w1"]);
    assert_eq!(
        (
            &w1["spec"]["color"],
            &w1["status"]["replicas"],
            &w1["metadata"]["generation"]
        ),
        (&json!("blue"), &json!(2), &json!(2)),
        "{w1}"
    );
    assert_eq!(
        without_age(&cloud.ok(&["get", "wd", "w1", "--no-headers"], None)),
        ["w1 3 blue True"]
    );
    let out = cloud.run(
        &[
            "patch",
            "widget",
            "w1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"replicas":-1}}"#,
        ],
        None,
    );
    assert_eq!(
        causes(&text(&out.stderr)),
        [".status.replicas: Invalid value: -1: should be a non-negative integer"],
        "{}",
        text(&out.stderr)
    );

    // scale reads and writes the declared paths.
    cloud.ok(&["scale", "widget", "w1", "--replicas=5"], None);
    let scale: Value = serde_json::from_str(&cloud.ok(
        &[
            "get",
            "--raw",
            "/apis/example.com/v1/namespaces/default/widgets/w1/scale",
        ],
        None,
    ))
    .expect("scale JSON");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 5);
    assert_eq!(scale["status"], json!({"replicas": 2, "selector": "app=w"}));
    // A dry-run scale answers the new count and changes nothing; the scale above recorded its
    // manager like any other update.
    cloud.ok(
        &["scale", "widget", "w1", "--replicas=7", "--dry-run=server"],
        None,
    );
    let replicas = cloud.ok(
        &["get", "widget", "w1", "-o", "jsonpath={.spec.replicas}"],
        None,
    );
    assert_eq!(replicas.trim(), "5", "a dry-run scale changed the object");
    let managers = cloud.ok(
        &[
            "get",
            "widget",
            "w1",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
        None,
    );
    // `kubectl scale` sends no fieldManager: its User-Agent names it `kubectl`.
    assert!(
        managers.split_whitespace().any(|m| m == "kubectl"),
        "the scale was not recorded: {managers}"
    );
    assert_eq!(cloud.json(&["widget", "w1"])["spec"]["replicas"], 5);

    // Selectors on custom resources.
    let two = r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w2","labels":{"app":"v"}},"spec":{"color":"red"}}"#;
    cloud.ok(&["create", "-f", "-"], Some(two));
    assert_eq!(
        cloud
            .ok(&["get", "wd", "-l", "app=v", "-o", "name"], None)
            .trim(),
        "widget.example.com/w2"
    );
    assert_eq!(
        cloud
            .ok(
                &[
                    "get",
                    "wd",
                    "--field-selector",
                    "metadata.name=w1",
                    "-o",
                    "name"
                ],
                None
            )
            .trim(),
        "widget.example.com/w1"
    );

    // A cluster-scoped definition with the default columns.
    cloud.establish(GADGETS, "gadgets.example.com");
    let gadget = r#"{"apiVersion":"example.com/v1","kind":"Gadget","metadata":{"name":"g1"},"spec":{"id":"8e813ff2-c608-4e25-b6cb-3772eb2cff40","list":[2,4]}}"#;
    cloud.ok(&["create", "-f", "-"], Some(gadget));
    let table = cloud.ok(&["get", "gadgets"], None);
    assert_eq!(
        table
            .lines()
            .next()
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["NAME", "AGE"]),
        "{table}"
    );
    assert!(table.contains("g1"), "{table}");
    for version in ["v1", "v1beta1"] {
        let read = cloud.json(&[&format!("gadgets.{version}.example.com"), "g1"]);
        assert_eq!(read["apiVersion"], format!("example.com/{version}"));
        assert_eq!(read["spec"]["list"], json!([2, 4]));
    }
    let groups: Value =
        serde_json::from_str(&cloud.ok(&["get", "--raw", "/apis/example.com"], None))
            .expect("group");
    assert_eq!(groups["preferredVersion"]["version"], "v1", "{groups}");
    let bad = r#"{"apiVersion":"example.com/v1","kind":"Gadget","metadata":{"name":"g2"},"spec":{"id":"nope","list":[3]}}"#;
    let out = cloud.run(&["create", "-f", "-"], Some(bad));
    assert_eq!(
        causes(&text(&out.stderr)),
        [
            r#"spec.id: Invalid value: "nope": spec.id in body must be of type uuid: "nope""#,
            "spec.list: Invalid value: 1: spec.list in body should have at least 2 items",
            "spec.list[0]: Invalid value: 3: spec.list[0] in body should be a multiple of 2",
        ],
        "{}",
        text(&out.stderr)
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(kube_rs_sees_and_watches_widgets(&cloud));

    // Garbage collection for and of custom resources.
    let w1_uid = cloud.json(&["widget", "w1"])["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let owned = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "of-w1",
        "ownerReferences": [{"apiVersion": "example.com/v1", "kind": "Widget", "name": "w1", "uid": w1_uid}]}});
    cloud.ok(&["create", "-f", "-"], Some(&owned.to_string()));
    let owner = cloud.ok(&["create", "configmap", "owner", "-o", "json"], None);
    let owner_uid = serde_json::from_str::<Value>(&owner).expect("json")["metadata"]["uid"].clone();
    let dependent = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w3",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}]},
        "spec": {"color": "red"}});
    cloud.ok(&["create", "-f", "-"], Some(&dependent.to_string()));
    cloud.ok(&["delete", "widget", "w1"], None);
    cloud.ok(&["delete", "configmap", "owner"], None);
    assert!(
        eventually(Duration::from_secs(10), || {
            !cloud
                .run(&["get", "configmap", "of-w1"], None)
                .status
                .success()
                && !cloud.run(&["get", "widget", "w3"], None).status.success()
        }),
        "dependents of deleted owners remain"
    );

    // After a restart the registry is rebuilt from the store.
    cloud.restart();
    assert!(
        eventually(Duration::from_secs(20), || cloud
            .run(&["get", "gadget", "g1"], None)
            .status
            .success()),
        "gadgets not served after a restart"
    );

    // Deleting the definition deletes its objects, then the definition.
    cloud.ok(
        &["delete", "crd", "widgets.example.com", "--timeout=30s"],
        None,
    );
    assert!(
        !cloud
            .run(&["get", "crd", "widgets.example.com"], None)
            .status
            .success(),
        "the definition outlived its deletion"
    );
    let gone = cloud.run(&["get", "widgets"], None);
    assert!(
        !gone.status.success(),
        "widgets still served: {}",
        text(&gone.stdout)
    );
    cloud.establish(WIDGETS, "widgets.example.com");
    let left = cloud.ok(&["get", "widgets", "-A", "-o", "name"], None);
    assert_eq!(left.trim(), "", "objects outlived their definition");
}

async fn kube_rs_sees_and_watches_widgets(cloud: &Cloud) {
    let client = kube_client(&cloud.kubeconfig()).await.expect("client");
    let discovery = Discovery::new(client.clone())
        .filter(&["example.com"])
        .run()
        .await
        .expect("discovery");
    let group = discovery.get("example.com").expect("group discovered");
    let (resource, capabilities) = group
        .recommended_resources()
        .into_iter()
        .find(|(r, _)| r.kind == "Widget")
        .expect("Widget discovered");
    assert_eq!(resource.plural, "widgets");
    assert_eq!(capabilities.scope, Scope::Namespaced);
    assert!(
        capabilities
            .subresources
            .iter()
            .any(|(s, _)| s.plural == "widgets/status" || s.plural == "status"),
        "{:?}",
        capabilities.subresources
    );

    let api: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let listed = api.list(&Default::default()).await.expect("list");
    assert!(
        listed
            .items
            .iter()
            .any(|w| w.metadata.name.as_deref() == Some("w1"))
    );
    let rv = listed.metadata.resource_version.expect("list rv");
    let mut events = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    let object: DynamicObject = serde_json::from_value(json!({"apiVersion": "example.com/v1",
        "kind": "Widget", "metadata": {"name": "watched"}, "spec": {"color": "red"}}))
    .expect("object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    api.delete("watched", &DeleteParams::default())
        .await
        .expect("delete");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("a watch event in time")
            .expect("watch stream");
        match event {
            Some(WatchEvent::Added(o)) => seen.push(("ADDED", o)),
            Some(WatchEvent::Deleted(o)) => seen.push(("DELETED", o)),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    assert_eq!(seen[0].0, "ADDED");
    assert_eq!(
        seen[0].1.data["spec"]["replicas"], 1,
        "defaults in watch events"
    );
    assert_eq!(seen[1].0, "DELETED");
}

#[test]
fn custom_resources_answer_as_kube_apiserver_does() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let cluster = KubeCluster::start(
        &tmp.path().join("k8s"),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let servers: [(&str, &dyn Kubectl); 2] = [("embedded", &cloud), ("kube-apiserver", &cluster)];
    let mut answers: Vec<Vec<String>> = Vec::new();
    for (who, server) in servers {
        server.establish(WIDGETS, "widgets.example.com");
        server.establish(GADGETS, "gadgets.example.com");
        let mut answer = Vec::new();
        // A definition whose kind and short name are taken is stored, not established.
        server.ok(&["apply", "-f", "-"], Some(RIVAL));
        server.ok(
            &[
                "wait",
                "--for=condition=NamesAccepted=false",
                "--timeout=30s",
                "crd/rivals.example.com",
            ],
            None,
        );
        answer.push(server.ok(
            &["get", "crd", "rivals.example.com", "-o",
              "jsonpath={.status.conditions[*].reason} {.status.conditions[*].message} {.status.acceptedNames}"],
            None,
        ));
        let out = server.run(&["get", "rivals"], None);
        answer.push(format!("rivals served: {}", out.status.success()));
        for (name, body) in INVALID {
            let out = server.run(&["create", "--validate=false", "-f", "-"], Some(body));
            assert!(!out.status.success(), "{who} accepted {name}");
            answer.push(format!("{name}: {:?}", causes(&text(&out.stderr))));
        }
        server.ok(&["create", "--validate=false", "-f", "-"], Some(W1));
        answer.push(server.ok(&["get", "widget", "w1", "-o", "jsonpath={.spec}"], None));
        answer.extend(without_age(&server.ok(&["get", "wd", "-o", "wide"], None)));
        server.ok(&["scale", "wd", "w1", "--replicas=4"], None);
        answer.extend(without_age(&server.ok(&["get", "widgets"], None)));
        answer.extend(normalized(
            &server.ok(&["api-resources", "--api-group=example.com"], None),
        ));
        answer.push(server.ok(
            &[
                "get",
                "crd",
                "widgets.example.com",
                "-o",
                "jsonpath={.status.acceptedNames}",
            ],
            None,
        ));
        let out = server.run(
            &[
                "patch",
                "widget",
                "w1",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"replicas":"x"}}"#,
            ],
            None,
        );
        answer.push(format!("status: {:?}", causes(&text(&out.stderr))));
        let gadget = r#"{"apiVersion":"example.com/v1","kind":"Gadget","metadata":{"name":"g1"},"spec":{"id":"nope","list":[3]}}"#;
        let out = server.run(&["create", "-f", "-"], Some(gadget));
        answer.push(format!("gadget: {:?}", causes(&text(&out.stderr))));
        let gadget = r#"{"apiVersion":"example.com/v1beta1","kind":"Gadget","metadata":{"name":"g2"},"spec":{"free":1,"id":"8e813ff2-c608-4e25-b6cb-3772eb2cff40"}}"#;
        server.ok(&["create", "-f", "-"], Some(gadget));
        answer.push(server.ok(
            &[
                "get",
                "gadgets.v1.example.com",
                "g2",
                "-o",
                "jsonpath={.apiVersion} {.spec}",
            ],
            None,
        ));
        answer.push(server.ok(
            &["get", "gadgets", "g2", "-o", "jsonpath={.apiVersion}"],
            None,
        ));
        server.ok(
            &["delete", "crd", "widgets.example.com", "--timeout=60s"],
            None,
        );
        answer.push(format!(
            "after delete: {}",
            server
                .run(&["get", "crd", "widgets.example.com"], None)
                .status
                .success()
        ));
        answers.push(answer);
    }
    // Not a vacuous comparison: the answers hold the refusals and the tables.
    let embedded = answers[0].join("\n");
    for expected in [
        "spec.replicas in body must be of type integer",
        "should be a non-negative integer",
        "NAME REPLICAS COLOR READY SIZE",
        "w1 4 green",
        "must be of type uuid",
        "replicas in body must be of type integer",
        "ListKindConflict",
        "rivals served: false",
        // Written in v1beta1 (which keeps unknown fields), pruned by the storage version's
        // schema.
        "example.com/v1 {\"id\":\"8e813ff2-c608-4e25-b6cb-3772eb2cff40\"}",
    ] {
        assert!(embedded.contains(expected), "{expected} in {embedded}");
    }
    assert_eq!(
        answers[0], answers[1],
        "embedded (left) and kube-apiserver (right) differ"
    );
}
