//! The cluster DNS server of edgecore, run in-process inside a network namespace the test
//! creates ([`EdgeNet`]): its address put on that namespace's `lo` by netlink, real UDP and
//! TCP sockets on port 53, a service table built here, and an upstream nameserver the test
//! runs itself (a hickory authority for `example.test`) that the server forwards other names
//! to. Needs root and iproute2; without them the test fails saying what is missing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edgecore::metrics::Metrics;
use edgecore::services::dns;
use edgecore::services::table::{
    Endpoint, Protocol, ServiceEntry, ServiceKey, ServiceKind, ServicePort,
};
use edgecore::services::{ServiceTable, ServicesConfig};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use integration::netns::EdgeNet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CLUSTER_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 96, 16));
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("test name")
}

fn key(namespace: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn endpoint(ip: &str, ready: bool, hostname: Option<&str>) -> Endpoint {
    Endpoint {
        ip: ip.parse().expect("test address"),
        ready,
        terminating: false,
        local: true,
        node_name: Some("edge-1".into()),
        hostname: hostname.map(str::to_string),
        pod: None,
        ports: BTreeMap::from([("pg".to_string(), 5432)]),
    }
}

fn entry(kind: ServiceKind, cluster_ip: Option<&str>, port: (&str, u16)) -> ServiceEntry {
    ServiceEntry {
        uid: "uid".into(),
        kind,
        cluster_ips: cluster_ip
            .map(|ip| ip.parse().expect("test address"))
            .into_iter()
            .collect(),
        ports: vec![ServicePort {
            name: port.0.into(),
            protocol: Protocol::Tcp,
            port: port.1,
            node_port: None,
        }],
        affinity: None,
        publish_not_ready: false,
        endpoints: Vec::new(),
    }
}

/// `default/web` (ClusterIP `web_ip`), `default/db` (headless, two ready endpoints and one
/// not ready), `default/ext` (ExternalName to the upstream's name).
fn service_table(revision: u64, web_ip: &str) -> ServiceTable {
    let mut db = entry(ServiceKind::Headless, None, ("pg", 5432));
    db.endpoints = vec![
        endpoint("10.1.0.5", true, Some("pg-0")),
        endpoint("10.1.0.6", true, Some("pg-1")),
        endpoint("10.1.0.7", false, Some("pg-2")),
    ];
    ServiceTable {
        revision,
        services: BTreeMap::from([
            (
                key("default", "web"),
                entry(ServiceKind::ClusterIp, Some(web_ip), ("http", 80)),
            ),
            (key("default", "db"), db),
            (
                key("default", "ext"),
                entry(
                    ServiceKind::ExternalName("www.example.test".into()),
                    None,
                    ("", 80),
                ),
            ),
        ]),
    }
}

/// The upstream: a hickory authority for `example.test` (`www` → [`UPSTREAM_ANSWER`]) on
/// `address:53`.
async fn upstream(address: IpAddr) -> anyhow::Result<Server<Catalog>> {
    let origin = name("example.test.");
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let soa = SOA::new(
        name("ns.example.test."),
        name("admin.example.test."),
        1,
        3600,
        600,
        86400,
        60,
    );
    zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1);
    zone.upsert_mut(
        Record::from_rdata(name("www.example.test."), 60, RData::A(A(UPSTREAM_ANSWER))),
        1,
    );
    let mut catalog = Catalog::new();
    let handler: Arc<dyn ZoneHandler> = Arc::new(zone);
    catalog.upsert(LowerName::new(&origin), vec![handler]);
    let mut server = Server::new(catalog);
    let socket = SocketAddr::new(address, 53);
    server.register_socket(
        tokio::net::UdpSocket::bind(socket)
            .await
            .with_context(|| format!("upstream udp {socket}"))?,
    );
    Ok(server)
}

fn question(qname: &str, qtype: RecordType) -> anyhow::Result<Vec<u8>> {
    let mut message = Message::query();
    message.add_query(Query::query(name(qname), qtype));
    message.metadata.recursion_desired = true;
    message.metadata.id = rand::random();
    Ok(message.to_vec()?)
}

/// One query over UDP to the cluster DNS.
async fn ask(qname: &str, qtype: RecordType) -> anyhow::Result<Message> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    socket
        .send_to(&question(qname, qtype)?, (CLUSTER_DNS, 53))
        .await?;
    let mut buf = vec![0; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .with_context(|| format!("no answer to {qname} {qtype}"))??;
    Ok(Message::from_vec(&buf[..n])?)
}

/// One query over TCP to the cluster DNS.
async fn ask_tcp(qname: &str, qtype: RecordType) -> anyhow::Result<Message> {
    let mut stream = tokio::net::TcpStream::connect((CLUSTER_DNS, 53)).await?;
    let bytes = question(qname, qtype)?;
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await?;
    stream.write_all(&bytes).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf).await?;
    Ok(Message::from_vec(&buf)?)
}

/// The answers' data as text, sorted.
fn data(message: &Message) -> Vec<String> {
    let mut out: Vec<String> = message.answers.iter().map(|r| r.data.to_string()).collect();
    out.sort();
    out
}

/// The addresses on the namespace's `lo`.
fn lo_addresses(net: &EdgeNet) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-n", net.name(), "-o", "addr", "show", "dev", "lo"])
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip addr show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn cluster_dns_answers_from_the_table_and_forwards_the_rest() -> anyhow::Result<()> {
    let net = EdgeNet::create()?;
    let dir = tempfile::tempdir()?;
    let resolv_conf = dir.path().join("resolv.conf");
    let upstream_ip = IpAddr::V4(net.edge_ip());
    // The cluster DNS itself is listed first: it must be skipped, not asked (a loop).
    let with_upstream = format!("nameserver {CLUSTER_DNS}\nnameserver {upstream_ip}\n");
    std::fs::write(&resolv_conf, &with_upstream)?;
    let config = ServicesConfig {
        cluster_dns: Some(CLUSTER_DNS),
        dns_upstream: resolv_conf.clone(),
        ..ServicesConfig::default()
    };
    let lo = || lo_addresses(&net);
    let cidr = format!("{CLUSTER_DNS}/32");
    assert!(
        !lo()?.contains(&cidr),
        "a fresh namespace has no cluster DNS address"
    );

    net.run_in(|| -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut upstream = upstream(upstream_ip).await?;
            let (tables, table) = watch::channel(Arc::new(service_table(1, "10.96.0.10")));
            let metrics = Arc::new(Metrics::default());
            let tracker = TaskTracker::new();
            let shutdown = CancellationToken::new();
            dns::spawn(
                CLUSTER_DNS,
                &config,
                table,
                metrics.clone(),
                &tracker,
                shutdown.clone(),
            )?;
            assert!(
                lo()?.contains(&cidr),
                "address on lo while serving: {}",
                lo()?
            );

            // A ClusterIP Service.
            let web = ask("web.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(web.metadata.response_code, ResponseCode::NoError);
            assert!(web.metadata.authoritative);
            assert_eq!(data(&web), ["10.96.0.10"]);
            assert_eq!(web.answers[0].ttl, dns::TTL);
            let aaaa = ask("web.default.svc.cluster.local.", RecordType::AAAA).await?;
            assert_eq!(
                aaaa.metadata.response_code,
                ResponseCode::NoError,
                "IPv4-only: empty, not NXDOMAIN"
            );
            assert!(aaaa.answers.is_empty());
            let srv = ask("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV).await?;
            assert_eq!(data(&srv), ["0 100 80 web.default.svc.cluster.local."]);
            let tcp = ask_tcp("web.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(data(&tcp), ["10.96.0.10"], "over TCP too");

            // A headless Service: its ready endpoints, by Service name and by hostname.
            let db = ask("db.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(data(&db), ["10.1.0.5", "10.1.0.6"]);
            let pg0 = ask("pg-0.db.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(data(&pg0), ["10.1.0.5"]);
            let pg_srv = ask("_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV).await?;
            assert_eq!(
                data(&pg_srv),
                [
                    "0 50 5432 pg-0.db.default.svc.cluster.local.",
                    "0 50 5432 pg-1.db.default.svc.cluster.local."
                ]
            );
            let not_ready = ask("pg-2.db.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(not_ready.metadata.response_code, ResponseCode::NXDomain);

            // Unknown names of the cluster domain do not exist.
            for qname in [
                "nope.default.svc.cluster.local.",
                "web.default.svc.cluster.local.default.svc.cluster.local.",
            ] {
                let nx = ask(qname, RecordType::A).await?;
                assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain, "{qname}");
                assert!(nx.answers.is_empty());
            }

            // Other names are forwarded to the upstream of the resolv.conf.
            let started = Instant::now();
            let www = ask("www.example.test.", RecordType::A).await?;
            assert_eq!(www.metadata.response_code, ResponseCode::NoError);
            assert_eq!(data(&www), [UPSTREAM_ANSWER.to_string()]);
            assert!(!www.metadata.authoritative);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "answered at once, not after asking itself: {:?}",
                started.elapsed()
            );
            let missing = ask("missing.example.test.", RecordType::A).await?;
            assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);

            // An ExternalName Service: the CNAME and the target's address.
            let ext = ask("ext.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(ext.metadata.response_code, ResponseCode::NoError);
            assert_eq!(ext.answers[0].data.to_string(), "www.example.test.");
            assert_eq!(ext.answers[1].data.to_string(), UPSTREAM_ANSWER.to_string());

            // A new table is used from the next query on.
            tables.send_replace(Arc::new(service_table(2, "10.96.0.99")));
            let web = ask("web.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(data(&web), ["10.96.0.99"]);

            // The resolv.conf is read again when it changes: without an upstream, SERVFAIL.
            std::fs::write(&resolv_conf, format!("nameserver {CLUSTER_DNS}\n"))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let answer = ask("other.example.test.", RecordType::A).await?;
                if answer.metadata.response_code == ResponseCode::ServFail {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("still forwarding 15 s after the upstream was removed");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            std::fs::write(&resolv_conf, &with_upstream)?;

            let text = metrics.render();
            for line in [
                "edgecore_dns_queries_total{result=\"cluster\"}",
                "edgecore_dns_queries_total{result=\"nxdomain\"} 3",
                "edgecore_dns_queries_total{result=\"forwarded\"}",
                "edgecore_dns_queries_total{result=\"failed\"}",
            ] {
                assert!(text.contains(line), "{line} in\n{text}");
            }

            // A graceful stop stops answering and removes the address.
            shutdown.cancel();
            tracker.close();
            tokio::time::timeout(Duration::from_secs(10), tracker.wait())
                .await
                .context("the DNS server did not stop")?;
            assert!(
                !lo()?.contains(&cidr),
                "address removed at shutdown: {}",
                lo()?
            );

            // An address left by a killed edgecore is taken over by the next start, and
            // removed by `edgecore cleanup`.
            dns::add_address(CLUSTER_DNS)?;
            assert!(lo()?.contains(&cidr));
            let (_tables, table) = watch::channel(Arc::new(service_table(1, "10.96.0.10")));
            let tracker = TaskTracker::new();
            let shutdown = CancellationToken::new();
            dns::spawn(
                CLUSTER_DNS,
                &config,
                table,
                metrics.clone(),
                &tracker,
                shutdown.clone(),
            )?;
            let web = ask("web.default.svc.cluster.local.", RecordType::A).await?;
            assert_eq!(data(&web), ["10.96.0.10"]);
            dns::remove_address(CLUSTER_DNS)?;
            assert!(!lo()?.contains(&cidr), "removed by cleanup: {}", lo()?);
            dns::remove_address(CLUSTER_DNS)?;
            shutdown.cancel();
            tracker.close();
            tracker.wait().await;
            upstream.shutdown_gracefully().await?;
            Ok(())
        })
    })?;
    Ok(())
}
