//! Services at the edge, end to end (issue 16's "Done when"), in both control-plane modes.
//!
//! Everything is real: a gateway is a network namespace holding edgecore and its containerd
//! ([`integration::gateway`]), so the pod bridge, edgecore's nftables table and the cluster DNS
//! address are all inside it; the root end of its veth stands for both the uplink (cloudcore
//! listens there) and the factory LAN (NodePorts are reached from there, and the gateway's
//! upstream resolver runs there). Pods are busybox: `httpd` serving its pod's name, `wget` and
//! `nslookup` as clients, run with `edgecore ctl exec` (which needs no cloud). Needs root,
//! iproute2, nftables, util-linux and what the containerd tests need; kube mode also the
//! control plane in ../shared/k8s. Without them the tests fail saying what is missing.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use integration::eventually;
use integration::gateway::{
    CLUSTER_DNS, Gateway, GatewayOptions, Mode, NFT_TABLE, client_pod, http_get_at, tail,
    web_deployment,
};

/// The name the upstream resolver knows, and its address (TEST-NET-1).
const EXTERNAL_NAME: &str = "external.example";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// The readiness probe's period (failureThreshold 1): a pod is unready at most this long
/// after its probe starts failing.
const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How soon after a pod turns unready no request may reach it (the issue's figure).
const UNREADY_TO_GONE: Duration = Duration::from_secs(2);
/// How long a new Service or endpoint may take to reach the gateway's data path through the
/// cloud (API, controllers, relay, sync).
const PROPAGATION: Duration = Duration::from_secs(60);

fn gateway(mode: Mode, node: &str) -> Gateway {
    let mut options = GatewayOptions::new(mode, node);
    options
        .upstream_zone
        .insert(EXTERNAL_NAME.to_string(), EXTERNAL_IP);
    Gateway::start(options)
}

/// `web` (ClusterIP, port 80 to the named port), `web-sticky` (ClientIP affinity), `web-np`
/// (NodePort) and `web-headless` (no cluster IP), all selecting the web pods.
const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
---
apiVersion: v1
kind: Service
metadata: {name: web-sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports:
  - {port: 8080, targetPort: 8080}
"#;

/// Starts the web Deployment and waits until both replicas are Running and Ready; their
/// names and IPs.
fn start_web(g: &Gateway) -> BTreeMap<String, String> {
    g.apply(&web_deployment(&g.node, 2));
    g.wait(Duration::from_secs(90), "two ready web pods", |g| {
        let pods = g.running_pods("app=web");
        pods.len() == 2 && pods.keys().all(|name| g.pod_ready_is(name, "True"))
    });
    g.running_pods("app=web")
}

fn start_client(g: &Gateway, name: &str) {
    g.apply(&client_pod(name, &g.node));
    g.wait(Duration::from_secs(60), "the client pod running", |g| {
        g.get("pod", name)
            .is_some_and(|p| p["status"]["phase"] == "Running")
            && g.exec(name, &["true"]).0 == 0
    });
}

fn cluster_ip(g: &Gateway, service: &str) -> String {
    let svc = g
        .get("service", service)
        .unwrap_or_else(|| panic!("service {service} missing\n{}", g.context()));
    svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_else(|| panic!("service {service} has no clusterIP: {svc}"))
        .to_string()
}

/// `count` requests from pod `client` to `url` (busybox wget, one connection each, 2 s
/// timeout through busybox's `timeout`: Debian 12's static busybox 1.35 wget segfaults with
/// its own `-T`): how many each pod name answered, with `FAIL` for those that failed.
fn requests(g: &Gateway, client: &str, url: &str, count: usize) -> BTreeMap<String, usize> {
    let script = format!(
        "i=0; while [ $i -lt {count} ]; do timeout 2 wget -qO- {url} 2>/dev/null || echo FAIL; i=$((i+1)); done"
    );
    let (code, out, err) = g.exec(client, &["sh", "-c", &script]);
    assert_eq!(code, 0, "ctl exec {client}: {err}");
    let mut seen = BTreeMap::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *seen.entry(line.to_string()).or_default() += 1;
    }
    seen
}

/// Waits until a request from `client` to `url` is answered by a web pod.
fn wait_reachable(g: &Gateway, client: &str, url: &str, pods: &BTreeMap<String, String>) {
    g.wait(
        PROPAGATION,
        &format!("{url} answering from {client}"),
        |g| {
            let (code, out, _) = g.exec(client, &["timeout", "2", "wget", "-qO-", url]);
            code == 0 && pods.contains_key(out.trim())
        },
    );
}

/// Makes `pod` unready (its probe's file removed, through the CRI) and checks that within
/// [`PROBE_PERIOD`] + [`UNREADY_TO_GONE`] no request to `url` from `client` reaches it any
/// more, and that 40 further requests all go to the other pod. Returns how long it took.
fn unready_leaves_the_data_path(g: &Gateway, client: &str, url: &str, pod: &str) -> Duration {
    let (code, _, err) = g.exec(pod, &["rm", "-f", "/tmp/ready"]);
    assert_eq!(code, 0, "rm /tmp/ready in {pod}: {err}");
    let removed = Instant::now();
    let budget = PROBE_PERIOD + UNREADY_TO_GONE;
    let gone = loop {
        let seen = requests(g, client, url, 10);
        if !seen.contains_key(pod) && !seen.contains_key("FAIL") {
            break removed.elapsed();
        }
        assert!(
            removed.elapsed() < budget + Duration::from_secs(3),
            "{pod} still answered {url} {:?} after its probe file was removed: {seen:?}\n{}",
            removed.elapsed(),
            g.context()
        );
    };
    let seen = requests(g, client, url, 40);
    assert!(
        !seen.contains_key(pod) && !seen.contains_key("FAIL") && seen.values().sum::<usize>() == 40,
        "after {gone:?} the unready {pod} still answers or requests fail: {seen:?}\n{}",
        g.context()
    );
    assert!(
        gone <= budget,
        "{pod} left the data path {gone:?} after its probe file was removed, more than {budget:?} (probe period + {UNREADY_TO_GONE:?})\n{}",
        g.context()
    );
    gone
}

/// Makes `pod` ready again and waits until requests reach both web pods.
fn ready_again(g: &Gateway, client: &str, url: &str, pod: &str) {
    let (code, _, err) = g.exec(pod, &["touch", "/tmp/ready"]);
    assert_eq!(code, 0, "touch /tmp/ready in {pod}: {err}");
    g.wait(
        Duration::from_secs(10),
        &format!("{pod} answering again"),
        |g| requests(g, client, url, 20).contains_key(pod),
    );
}

/// `nslookup NAME` in pod `client` against its resolv.conf: (exit code, output).
fn nslookup(g: &Gateway, client: &str, name: &str) -> (i32, String) {
    let (code, out, err) = g.exec(client, &["nslookup", name]);
    (code, out + &err)
}

/// The ClusterIP Service by name and by FQDN, load balancing over both replicas, ClientIP
/// affinity, the Service environment variables, the DNS (headless, NXDOMAIN, forwarding),
/// and a replica turning unready leaving the data path in time, online and partitioned.
fn cluster_ip_dns_and_readiness(mode: Mode, node: &str) {
    let g = gateway(mode, node);
    g.apply(SERVICES);
    let pods = start_web(&g);
    let names: Vec<String> = pods.keys().cloned().collect();
    // Started after the Services: it gets their environment variables.
    start_client(&g, "client");
    let ip = cluster_ip(&g, "web");

    let (code, env, err) = g.exec("client", &["env"]);
    assert_eq!(code, 0, "env in client: {err}");
    for expected in [
        format!("WEB_SERVICE_HOST={ip}"),
        "WEB_SERVICE_PORT=80".to_string(),
        "WEB_SERVICE_PORT_HTTP=80".to_string(),
        format!("WEB_PORT=tcp://{ip}:80"),
        format!("WEB_PORT_80_TCP=tcp://{ip}:80"),
        format!("WEB_PORT_80_TCP_ADDR={ip}"),
        "WEB_PORT_80_TCP_PORT=80".to_string(),
        "WEB_PORT_80_TCP_PROTO=tcp".to_string(),
        format!("WEB_STICKY_SERVICE_HOST={}", cluster_ip(&g, "web-sticky")),
    ] {
        assert!(
            env.lines().any(|l| l == expected),
            "{expected} missing from the client's environment:\n{env}"
        );
    }
    assert!(
        !env.contains("WEB_HEADLESS_SERVICE_HOST"),
        "a headless Service gets no variables, as with the kubelet:\n{env}"
    );

    // DNS: headless Services resolve to the pods, unknown names in the cluster domain get
    // NXDOMAIN without asking upstream, other names are forwarded upstream.
    // busybox nslookup asks for A and AAAA; its exit code says whether both were answered, so
    // the output is what is checked.
    let (_, out) = nslookup(&g, "client", "web-headless.default.svc.cluster.local");
    for pod_ip in pods.values() {
        assert!(
            out.contains(&format!("Address: {pod_ip}")),
            "the headless Service resolves to every pod IP ({pods:?}):\n{out}"
        );
    }
    assert!(!out.contains(&ip), "not to a cluster IP:\n{out}");
    let (_, out) = nslookup(&g, "client", "web.default.svc.cluster.local");
    assert!(
        out.contains(&format!("Address: {ip}")),
        "web resolves to its cluster IP {ip}:\n{out}"
    );
    let (_, out) = nslookup(&g, "client", "nosuch.default.svc.cluster.local");
    assert!(
        out.contains("NXDOMAIN"),
        "an unknown Service gets NXDOMAIN:\n{out}"
    );
    let (_, out) = nslookup(&g, "client", &format!("{EXTERNAL_NAME}."));
    assert!(
        out.contains(&format!("Address: {EXTERNAL_IP}")),
        "{EXTERNAL_NAME} is forwarded to the gateway's resolver:\n{out}\nupstream saw: {:?}",
        g.resolver.queries()
    );
    let asked = g.resolver.queries();
    assert!(
        asked.iter().any(|q| q == EXTERNAL_NAME),
        "the upstream resolver was asked {EXTERNAL_NAME}: {asked:?}"
    );
    assert!(
        !asked.iter().any(|q| q.ends_with("svc.cluster.local")),
        "names of the cluster domain are answered on the gateway, never forwarded: {asked:?}"
    );

    let fqdn = "http://web.default.svc.cluster.local/";
    wait_reachable(&g, "client", fqdn, &pods);
    wait_reachable(&g, "client", "http://web/", &pods);
    let seen = requests(&g, "client", "http://web/", 100);
    assert_eq!(
        seen.values().sum::<usize>(),
        100,
        "100 requests, each answered once: {seen:?}"
    );
    for name in &names {
        assert!(
            seen.get(name).is_some_and(|n| *n > 0),
            "over 100 requests to http://web/ both replicas answer: {seen:?}\n{}",
            g.context()
        );
    }
    assert!(!seen.contains_key("FAIL"), "no request failed: {seen:?}");
    let seen = requests(&g, "client", fqdn, 20);
    assert!(
        seen.keys().all(|k| pods.contains_key(k)) && seen.values().sum::<usize>() == 20,
        "{fqdn}: {seen:?}"
    );

    wait_reachable(&g, "client", "http://web-sticky/", &pods);
    let seen = requests(&g, "client", "http://web-sticky/", 40);
    assert!(
        seen.len() == 1 && seen.values().sum::<usize>() == 40 && !seen.contains_key("FAIL"),
        "ClientIP affinity pins the client to one replica: {seen:?}\n{}",
        g.context()
    );

    // Readiness, online.
    let url = "http://web/";
    let took = unready_leaves_the_data_path(&g, "client", url, &names[0]);
    eprintln!(
        "online: {} left the data path {took:?} after its probe file went",
        names[0]
    );
    ready_again(&g, "client", url, &names[0]);

    // Readiness, partitioned from the cloud: the edge's own view of its pods decides.
    g.net.cut().expect("cut");
    g.wait(
        Duration::from_secs(45),
        "the edge noticing the partition",
        |g| !g.edge().connected(),
    );
    let seen = requests(&g, "client", url, 20);
    assert!(
        seen.values().sum::<usize>() == 20 && !seen.contains_key("FAIL"),
        "partitioned, the Service keeps answering: {seen:?}"
    );
    let took = unready_leaves_the_data_path(&g, "client", url, &names[1]);
    eprintln!(
        "offline: {} left the data path {took:?} after its probe file went",
        names[1]
    );
    ready_again(&g, "client", url, &names[1]);
    g.net.heal().expect("heal");
    g.wait(Duration::from_secs(30), "the edge reconnected", |g| {
        g.edge().connected()
    });
}

/// The NodePort from the LAN side; kill -9 of edgecore with traffic flowing (rules stay,
/// nothing fails), a Service created meanwhile programmed after the restart; graceful stop
/// and `edgecore cleanup` leave no table and no DNS address; a table of someone else stays as
/// it was throughout.
fn node_port_restart_and_cleanup(mode: Mode, node: &str) {
    let mut g = gateway(mode, node);
    // Someone else's rules in the gateway's network, before edgecore programs anything.
    g.nft(&["add", "table", "inet", "someone_else"]);
    g.nft(&[
        "add",
        "chain",
        "inet",
        "someone_else",
        "input",
        "{ type filter hook input priority 0 ; policy accept ; }",
    ]);
    g.nft(&[
        "add",
        "rule",
        "inet",
        "someone_else",
        "input",
        "tcp",
        "dport",
        "9",
        "accept",
    ]);
    let theirs = g
        .nft_table("inet", "someone_else")
        .expect("the test's own table");
    let untouched = |g: &Gateway, when: &str| {
        assert_eq!(
            g.nft_table("inet", "someone_else").as_deref(),
            Some(theirs.as_str()),
            "{when}: the table edgecore did not create is untouched"
        );
    };

    g.apply(SERVICES);
    let pods = start_web(&g);
    start_client(&g, "client");
    let ip = cluster_ip(&g, "web");
    wait_reachable(&g, "client", &format!("http://{ip}/"), &pods);

    // NodePort, from the root end of the veth (the factory LAN).
    let np = g.get("service", "web-np").expect("web-np");
    let node_port = np["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap_or_else(|| panic!("web-np has no nodePort: {np}")) as u16;
    let lan = SocketAddr::from((g.net.edge_ip(), node_port));
    let answered = |body: Option<String>| body.is_some_and(|b| pods.contains_key(b.trim()));
    assert!(
        eventually(PROPAGATION, || answered(http_get_at(
            lan,
            "/",
            Duration::from_secs(2)
        ))),
        "NodePort {lan} does not answer from the LAN side\n{}",
        g.context()
    );
    let mut lan_seen = BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        if let Some(body) = http_get_at(lan, "/", Duration::from_secs(2)) {
            *lan_seen.entry(body.trim().to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        lan_seen.values().sum::<usize>(),
        40,
        "every request to the NodePort is answered: {lan_seen:?}"
    );
    untouched(&g, "with the Services programmed");

    // kill -9 with traffic flowing: from a pod to the cluster IP, and from the LAN.
    let before = g.edgecore_table().expect("edgecore's table");
    assert!(
        before.contains(&ip),
        "the table holds web's cluster IP {ip}:\n{before}"
    );
    let looping = g.spawn_exec(
        "client",
        &[
            "sh",
            "-c",
            &format!(
                "i=0; while [ $i -lt 200 ]; do timeout 1 wget -qO- http://{ip}/ >/dev/null 2>&1 && echo OK || echo FAIL; i=$((i+1)); sleep 0.05; done"
            ),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (lan_ok, lan_failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let lan_loop = {
        let (stop, ok, failed) = (stop.clone(), lan_ok.clone(), lan_failed.clone());
        let pods = pods.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get_at(lan, "/", Duration::from_secs(1)) {
                    Some(body) if pods.contains_key(body.trim()) => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    g.kill_edge();
    let after_kill = g
        .edgecore_table()
        .expect("a killed edgecore leaves its table");
    assert!(
        after_kill.contains(&ip) && after_kill.contains(&node_port.to_string()),
        "the rules stay after kill -9:\n{after_kill}"
    );
    // A Service created while edgecore is down is programmed once it is back.
    g.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec:\n  selector: {app: web}\n  ports:\n  - {port: 8000, targetPort: 8080}\n",
    );
    let late_ip = cluster_ip(&g, "late");
    std::thread::sleep(Duration::from_secs(3));
    g.start_edge();
    let restarted = Instant::now();
    g.wait(Duration::from_secs(30), "the edge reconnected", |g| {
        g.edge().connected()
    });
    g.wait(PROPAGATION, "the late Service programmed", |g| {
        g.edgecore_table().is_some_and(|t| t.contains(&late_ip))
    });
    eprintln!(
        "restart → late Service programmed: {:?}",
        restarted.elapsed()
    );
    let out = looping.wait_with_output().expect("the client loop");
    stop.store(true, Ordering::Relaxed);
    lan_loop.join().expect("the LAN loop");
    let loop_out = String::from_utf8_lossy(&out.stdout);
    let (ok, failed) = (
        loop_out.lines().filter(|l| *l == "OK").count(),
        loop_out.lines().filter(|l| *l == "FAIL").count(),
    );
    assert!(
        ok > 50 && failed == 0,
        "traffic to {ip} from a pod never stopped across kill -9 and restart: {ok} ok, {failed} failed\n{}",
        g.context()
    );
    let (ok, failed) = (
        lan_ok.load(Ordering::Relaxed),
        lan_failed.load(Ordering::Relaxed),
    );
    assert!(
        ok > 20 && failed == 0,
        "traffic to NodePort {lan} never stopped: {ok} ok, {failed} failed\n{}",
        g.context()
    );
    let seen = requests(&g, "client", &format!("http://{late_ip}:8000/"), 10);
    assert!(
        seen.keys().all(|k| pods.contains_key(k)) && seen.values().sum::<usize>() == 10,
        "the late Service answers: {seen:?}"
    );
    untouched(&g, "after kill -9 and restart");

    // Graceful stop: no table, no address.
    g.stop_edge();
    assert!(
        g.edgecore_table().is_none(),
        "a graceful stop leaves no table; ruleset:\n{}",
        g.ruleset()
    );
    assert!(
        !g.has_dns_address(),
        "a graceful stop removes {CLUSTER_DNS} from lo"
    );
    untouched(&g, "after a graceful stop");

    // kill -9, then `edgecore cleanup` (an uninstall): no table, no address; twice is fine.
    g.start_edge();
    g.wait(PROPAGATION, "edgecore's table back", |g| {
        g.edgecore_table().is_some_and(|t| t.contains(&ip)) && g.has_dns_address()
    });
    g.kill_edge();
    assert!(g.edgecore_table().is_some(), "kill -9 leaves the table");
    for round in 1..=2 {
        let out = g.cleanup();
        assert!(
            out.status.success(),
            "edgecore cleanup (round {round}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        g.edgecore_table().is_none(),
        "edgecore cleanup leaves no table ip {NFT_TABLE}; ruleset:\n{}",
        g.ruleset()
    );
    assert!(
        !g.has_dns_address(),
        "cleanup removes {CLUSTER_DNS} from lo"
    );
    untouched(&g, "after edgecore cleanup");
    eprintln!("edge log (end):\n{}", tail(&g.edge_log(), 5));
}

/// The harness itself: a pod on the gateway gets an IP of the gateway's subnet (its bridge is
/// inside the namespace) and is reachable by it from the root namespace through the route the
/// harness adds.
fn gateway_runs_pods_reachable_by_their_ip(mode: Mode, node: &str) {
    let g = gateway(mode, node);
    let pods = start_web(&g);
    g.route_pods();
    let prefix = g.pod_subnet.trim_end_matches("0/24").to_string();
    for (name, ip) in &pods {
        assert!(
            ip.starts_with(&prefix),
            "pod {name} has {ip}, outside the gateway's {}",
            g.pod_subnet
        );
        let address = SocketAddr::new(ip.parse().expect("pod IP"), 8080);
        let body = http_get_at(address, "/", Duration::from_secs(2));
        assert_eq!(
            body.as_deref().map(str::trim),
            Some(name.as_str()),
            "pod {name} at {address} from the root namespace\n{}",
            g.context()
        );
    }
    // The pod bridge is inside the namespace, not in the root one.
    let inside = g.host("ip", &["-o", "addr", "show", "to", &g.pod_subnet]);
    assert!(
        !inside.stdout.is_empty(),
        "the pod bridge is in the gateway's namespace"
    );
    let outside = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "to", &g.pod_subnet])
        .output()
        .expect("ip");
    assert!(outside.stdout.is_empty(), "and not in the root namespace");
}

#[test]
fn embedded_gateway_runs_pods_reachable_by_their_ip() {
    gateway_runs_pods_reachable_by_their_ip(Mode::Embedded, "gw-harness-e");
}

#[test]
fn kube_gateway_runs_pods_reachable_by_their_ip() {
    gateway_runs_pods_reachable_by_their_ip(Mode::Kube, "gw-harness-k");
}

#[test]
fn embedded_cluster_ip_dns_and_readiness_online_and_partitioned() {
    cluster_ip_dns_and_readiness(Mode::Embedded, "gw-svc-e1");
}

#[test]
fn kube_cluster_ip_dns_and_readiness_online_and_partitioned() {
    cluster_ip_dns_and_readiness(Mode::Kube, "gw-svc-k1");
}

#[test]
fn embedded_node_port_restart_and_cleanup() {
    node_port_restart_and_cleanup(Mode::Embedded, "gw-svc-e2");
}

#[test]
fn kube_node_port_restart_and_cleanup() {
    node_port_restart_and_cleanup(Mode::Kube, "gw-svc-k2");
}
