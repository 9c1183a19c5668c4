//! Services, Endpoints and EndpointSlices in the embedded API through the real kubectl: the
//! `default/kubernetes` Service, `create service clusterip|nodeport|externalname`, `expose
//! deployment`, `get svc` / `get endpointslices` columns, `describe svc`, `apply` of fixed
//! addresses, conflicts and out-of-range requests refused, dry runs that hold nothing,
//! concurrent creates getting distinct addresses, allocations kept across a restart and
//! freed by a delete, the range flags refused in kube mode; and the defaults and refusals
//! compared with a real kube-apiserver's.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Output;

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, bin};
use serde_json::Value;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} was accepted: {}", text(&o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_of(cloud: &Cloud, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let out = cloud.kubectl_ok(&args, None);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Cells of a `kubectl get` line split on runs of two or more spaces.
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

fn header(output: &str) -> Vec<String> {
    cells(output.lines().next().unwrap_or_default())
}

fn row(output: &str, name: &str) -> Vec<String> {
    cells(
        output
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row {name} in\n{output}")),
    )
}

fn cluster_ip(cloud: &Cloud, name: &str) -> String {
    json_of(cloud, &["get", "svc", name])["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn in_range(ip: &str, network: Ipv4Addr, prefix: u32) -> bool {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return false;
    };
    let mask = u32::MAX << (32 - prefix);
    u32::from(ip) & mask == u32::from(network)
}

const FIXED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: fixed}
spec:
  type: NodePort
  clusterIP: 10.100.0.50
  selector: {app: fixed}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 31060}]
"#;

/// The embedded API's Services end to end, with its own ranges.
#[test]
fn services_through_kubectl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cloud = Cloud::start(
        tmp.path(),
        &[
            "--service-cluster-ip-range",
            "10.100.0.0/24",
            "--service-node-port-range",
            "31000-31099",
        ],
    );
    let net = Ipv4Addr::new(10, 100, 0, 0);

    // default/kubernetes: the range's first address, 443 named https to the API's port.
    let svc = ok(cloud.kubectl(&["get", "svc"]), "get svc");
    assert_eq!(
        header(&svc),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(
        row(&svc, "kubernetes")[..5],
        ["kubernetes", "ClusterIP", "10.100.0.1", "<none>", "443/TCP"]
    );
    let kubernetes = json_of(&cloud, &["get", "svc", "kubernetes"]);
    assert_eq!(kubernetes["spec"]["ports"][0]["name"], "https");
    assert_eq!(
        kubernetes["spec"]["ports"][0]["targetPort"],
        i64::from(cloud.api_port)
    );
    let api = format!("127.0.0.1:{}", cloud.api_port);
    let ep = ok(cloud.kubectl(&["get", "endpoints", "kubernetes"]), "get ep");
    assert_eq!(row(&ep, "kubernetes")[1], api);
    let slices = ok(cloud.kubectl(&["get", "endpointslices"]), "get slices");
    assert_eq!(
        header(&slices),
        ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    );
    assert_eq!(
        row(&slices, "kubernetes")[..4],
        [
            "kubernetes".to_string(),
            "IPv4".into(),
            cloud.api_port.to_string(),
            "127.0.0.1".into()
        ]
    );

    // kubectl create service ...
    ok(
        cloud.kubectl(&["create", "service", "clusterip", "web", "--tcp=80:8080"]),
        "create clusterip",
    );
    let web_ip = cluster_ip(&cloud, "web");
    assert!(
        in_range(&web_ip, net, 24) && web_ip != "10.100.0.1",
        "{web_ip}"
    );
    ok(
        cloud.kubectl(&[
            "create",
            "service",
            "nodeport",
            "np",
            "--tcp=80:8080",
            "--node-port=31050",
        ]),
        "create nodeport",
    );
    ok(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "headless",
            "--clusterip=None",
        ]),
        "create headless",
    );
    ok(
        cloud.kubectl(&[
            "create",
            "service",
            "externalname",
            "ext",
            "--external-name=db.example.com",
        ]),
        "create externalname",
    );
    let svc = ok(cloud.kubectl(&["get", "svc", "-o", "wide"]), "get svc wide");
    let np = row(&svc, "np");
    assert_eq!(
        (np[1].as_str(), np[4].as_str()),
        ("NodePort", "80:31050/TCP")
    );
    assert_eq!(np[6], "app=np");
    let headless = row(&svc, "headless");
    assert_eq!(headless[2], "None");
    let ext = row(&svc, "ext");
    assert_eq!(
        (ext[1].as_str(), ext[2].as_str(), ext[3].as_str()),
        ("ExternalName", "<none>", "db.example.com")
    );
    let described = ok(cloud.kubectl(&["describe", "svc", "np"]), "describe");
    for want in ["Type:", "NodePort", "31050/TCP", "8080/TCP", "app=np"] {
        assert!(described.contains(want), "{want} not in\n{described}");
    }
    assert!(described.contains(&cluster_ip(&cloud, "np")), "{described}");

    // kubectl expose deployment: the selector comes from the Deployment.
    ok(
        cloud.kubectl(&["create", "deployment", "app", "--image=localhost/busybox:1"]),
        "create deployment",
    );
    ok(
        cloud.kubectl(&[
            "expose",
            "deployment",
            "app",
            "--port=80",
            "--target-port=8080",
            "--type=NodePort",
        ]),
        "expose",
    );
    let exposed = json_of(&cloud, &["get", "svc", "app"]);
    assert_eq!(exposed["spec"]["selector"]["app"], "app");
    assert_eq!(exposed["spec"]["ports"][0]["targetPort"], 8080);
    let node_port = exposed["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .unwrap_or(0);
    assert!((31000..=31099).contains(&node_port), "{exposed}");

    // apply with a fixed clusterIP and nodePort; applied again it keeps them.
    ok(
        cloud.kubectl_with_stdin(&["apply", "-f", "-"], Some(FIXED)),
        "apply",
    );
    let again = ok(
        cloud.kubectl_with_stdin(&["apply", "-f", "-"], Some(FIXED)),
        "apply again",
    );
    assert!(again.contains("unchanged"), "{again}");
    let fixed = json_of(&cloud, &["get", "svc", "fixed"]);
    assert_eq!(fixed["spec"]["clusterIPs"][0], "10.100.0.50");
    assert_eq!(fixed["spec"]["ports"][0]["nodePort"], 31060);
    // Server-side apply too.
    ok(
        cloud.kubectl_with_stdin(&["apply", "--server-side", "-f", "-"], Some(FIXED)),
        "apply --server-side",
    );

    // Conflicts and ranges, with kube-apiserver's 422 wording naming the field.
    let taken_ip = refused(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "dup",
            "--tcp=80",
            "--clusterip=10.100.0.50",
        ]),
        "a taken cluster IP",
    );
    assert!(
        taken_ip.contains(r#"Service "dup" is invalid: spec.clusterIPs: Invalid value: ["10.100.0.50"]: failed to allocate IP 10.100.0.50: provided IP is already allocated"#),
        "{taken_ip}"
    );
    let outside = refused(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "dup",
            "--tcp=80",
            "--clusterip=10.96.0.50",
        ]),
        "an IP out of range",
    );
    assert!(
        outside.contains("failed to allocate IP 10.96.0.50: the provided network does not match the current range"),
        "{outside}"
    );
    let taken_port = refused(
        cloud.kubectl(&[
            "create",
            "service",
            "nodeport",
            "dup",
            "--tcp=80",
            "--node-port=31060",
        ]),
        "a taken node port",
    );
    assert!(
        taken_port.contains(
            "spec.ports[0].nodePort: Invalid value: 31060: provided port is already allocated"
        ),
        "{taken_port}"
    );
    let far_port = refused(
        cloud.kubectl(&[
            "create",
            "service",
            "nodeport",
            "dup",
            "--tcp=80",
            "--node-port=30000",
        ]),
        "a node port out of range",
    );
    assert!(
        far_port.contains("spec.ports[0].nodePort: Invalid value: 30000: provided port is not in the valid range. The range of valid ports is 31000-31099"),
        "{far_port}"
    );
    let changed = refused(
        cloud.kubectl(&[
            "patch",
            "svc",
            "fixed",
            "-p",
            r#"{"spec":{"clusterIP":"10.100.0.51","clusterIPs":["10.100.0.51"]}}"#,
        ]),
        "a cluster IP change",
    );
    assert!(changed.contains("may not change once set"), "{changed}");

    // A dry run answers with an address and holds nothing.
    let dry: Value = serde_json::from_str(&ok(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "dry",
            "--tcp=80",
            "--dry-run=server",
            "-o",
            "json",
        ]),
        "dry run",
    ))
    .expect("json");
    let dry_ip = dry["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(in_range(&dry_ip, net, 24), "{dry}");
    assert!(!cloud.kubectl(&["get", "svc", "dry"]).status.success());
    ok(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "wet",
            "--tcp=80",
            &format!("--clusterip={dry_ip}"),
        ]),
        "the dry run's address is free",
    );

    // Deleting a Service frees its address and ports.
    ok(cloud.kubectl(&["delete", "svc", "np"]), "delete np");
    ok(
        cloud.kubectl(&[
            "create",
            "service",
            "nodeport",
            "np2",
            "--tcp=80",
            "--node-port=31050",
        ]),
        "node port reused",
    );
    let web_ip_arg = format!("--clusterip={web_ip}");
    ok(cloud.kubectl(&["delete", "svc", "web"]), "delete web");
    ok(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "web2",
            "--tcp=80",
            &web_ip_arg,
        ]),
        "cluster IP reused",
    );

    // Concurrent creates never share an address or a port.
    let names: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
    std::thread::scope(|scope| {
        for name in &names {
            let cloud = &cloud;
            scope.spawn(move || {
                ok(
                    cloud.kubectl(&["create", "service", "nodeport", name, "--tcp=80"]),
                    "concurrent create",
                )
            });
        }
    });
    let all = json_of(&cloud, &["get", "svc"]);
    let items = all["items"].as_array().expect("items");
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for item in items {
        let ip = item["spec"]["clusterIP"].as_str().unwrap_or_default();
        if ip != "None" && !ip.is_empty() {
            assert!(ips.insert(ip.to_string()), "{ip} given twice:\n{all}");
        }
        for port in item["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(n) = port["nodePort"].as_i64() {
                assert!(ports.insert(n), "node port {n} given twice:\n{all}");
            }
        }
    }
    assert!(ips.len() >= 16 + 4, "{ips:?}");

    // A restart keeps every allocation and still refuses the taken ones.
    let before = ok(
        cloud.kubectl(&["get", "svc", "-o", "json"]),
        "before restart",
    );
    cloud.restart();
    let after = ok(
        cloud.kubectl(&["get", "svc", "-o", "json"]),
        "after restart",
    );
    let specs = |text: &str| -> Vec<Value> {
        let list: Value = serde_json::from_str(text).expect("json");
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["spec"].clone())
            .collect()
    };
    assert_eq!(specs(&before), specs(&after));
    let taken_ip = refused(
        cloud.kubectl(&[
            "create",
            "service",
            "clusterip",
            "dup",
            "--tcp=80",
            "--clusterip=10.100.0.50",
        ]),
        "a taken cluster IP after restart",
    );
    assert!(
        taken_ip.contains("provided IP is already allocated"),
        "{taken_ip}"
    );
}

/// The range flags belong to the embedded API: in kube mode they are refused (exit 64).
#[test]
fn range_flags_are_refused_in_kube_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for flag in [
        "--service-cluster-ip-range=10.100.0.0/24",
        "--service-node-port-range=31000-31099",
    ] {
        let out = std::process::Command::new(bin("cloudcore"))
            .args([
                "serve",
                "--control-plane",
                "kube",
                "--kubeconfig",
                "/nonexistent",
            ])
            .arg("--data-dir")
            .arg(tmp.path())
            .arg(flag)
            .output()
            .expect("run cloudcore");
        assert_eq!(out.status.code(), Some(64), "{}", text(&out));
        let name = flag.split('=').next().unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(name),
            "{}",
            text(&out)
        );
    }
    let bad = std::process::Command::new(bin("cloudcore"))
        .args([
            "serve",
            "--service-cluster-ip-range",
            "fd00::/108",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .expect("run cloudcore");
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
    assert!(
        text(&bad).contains("service-cluster-ip-range"),
        "{}",
        text(&bad)
    );
}

const COMPARED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: plain}
spec:
  selector: {app: plain}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  type: NodePort
  sessionAffinity: ClientIP
  publishNotReadyAddresses: true
  selector: {app: sticky}
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: balanced}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  ipFamilyPolicy: PreferDualStack
  ports: [{port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  selector: {app: db}
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec:
  type: ExternalName
  externalName: db.example.com
"#;

/// What the server allocates differs by nature; everything else must be the same.
fn comparable(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Some(map) = spec.as_object_mut() {
        for field in ["clusterIP", "clusterIPs", "healthCheckNodePort"] {
            if map
                .get(field)
                .is_some_and(|v| v != "None" && v != &serde_json::json!(["None"]))
            {
                map.insert(field.into(), "ALLOCATED".into());
            }
        }
    }
    for port in spec["ports"].as_array_mut().into_iter().flatten() {
        if port.get("nodePort").is_some() {
            port["nodePort"] = "ALLOCATED".into();
        }
    }
    spec
}

/// The same manifests against a real kube-apiserver and the embedded API (default ranges in
/// both, 10.96.0.0/12 here and /16 there): the same specs after defaulting and allocation,
/// and the same refusals.
#[test]
fn defaults_and_refusals_match_kube_apiserver() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let cluster = KubeCluster::start(
        &tmp.path().join("k8s"),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let create = ["create", "-f", "-", "-o", "json"];
    let ours = ok(
        cloud.kubectl_with_stdin(&create, Some(COMPARED)),
        "create (embedded)",
    );
    let theirs = cluster.kubectl_ok(&create, Some(COMPARED));
    let specs = |out: &str| -> Vec<(Value, Value)> {
        serde_json::Deserializer::from_str(out)
            .into_iter::<Value>()
            .map(|item| item.unwrap_or_else(|e| panic!("{e}: {out}")))
            .map(|item| (comparable(&item["spec"]), item["status"].clone()))
            .collect()
    };
    assert_eq!(specs(&ours), specs(&theirs));
    // Both give the kubernetes Service the first address, port 443 named https.
    let theirs_k = cluster.get_json(&["svc", "kubernetes"]);
    let ours_k = json_of(&cloud, &["get", "svc", "kubernetes"]);
    assert_eq!(ours_k["spec"]["clusterIP"], theirs_k["spec"]["clusterIP"]);
    assert_eq!(
        ours_k["spec"]["ports"][0]["name"],
        theirs_k["spec"]["ports"][0]["name"]
    );
    assert_eq!(
        ours_k["spec"]["ports"][0]["port"],
        theirs_k["spec"]["ports"][0]["port"]
    );

    let first = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "first"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.50", "ports": [{"port": 80, "nodePort": 30080}]}}"#;
    ok(
        cloud.kubectl_with_stdin(&["create", "-f", "-"], Some(first)),
        "first (embedded)",
    );
    cluster.kubectl_ok(&["create", "-f", "-"], Some(first));
    let refusals = [
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"ports": [{"port": 80}, {"port": 81}]}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"ports": [{"port": 80}], "ipFamilyPolicy": "RequireDualStack"}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"ports": [{"port": 80}], "ipFamilies": ["IPv6"]}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"type": "NodePort", "clusterIP": "None", "ports": [{"port": 0}]}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"type": "ExternalName", "externalName": "Bad_Name", "clusterIP": "10.96.0.9"}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b.ad"},
            "spec": {"ports": [{"port": 80, "nodePort": 30001, "targetPort": "Bad_Name", "protocol": "XX"}],
                     "sessionAffinity": "Foo", "internalTrafficPolicy": "X"}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"ports": [{"port": 80}], "clusterIP": "10.96.0.50"}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"ports": [{"port": 80}], "clusterIP": "10.200.0.50"}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}}"#,
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 40000}]}}"#,
        r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "bad"},
            "addressType": "Foo"}"#,
    ];
    // kubectl's rendering of the Status, without warnings about version skew or deprecation.
    let message = |o: &Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| !l.to_ascii_lowercase().starts_with("warning"))
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    for manifest in refusals {
        let ours = cloud.kubectl_with_stdin(&["create", "-f", "-"], Some(manifest));
        let theirs = cluster.kubectl(&["create", "-f", "-"], Some(manifest));
        assert!(!ours.status.success(), "accepted here: {manifest}");
        assert!(!theirs.status.success(), "accepted there: {manifest}");
        assert_eq!(message(&ours), message(&theirs), "{manifest}");
    }
    let patch = [
        "patch",
        "svc",
        "first",
        "-p",
        r#"{"spec":{"clusterIP":"10.96.0.51","clusterIPs":["10.96.0.51"]}}"#,
    ];
    let ours = cloud.kubectl(&patch);
    let theirs = cluster.kubectl(&patch, None);
    assert!(!ours.status.success() && !theirs.status.success());
    assert_eq!(message(&ours), message(&theirs));
}
