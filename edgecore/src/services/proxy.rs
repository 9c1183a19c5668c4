//! The data path: one nftables table (family `ip`) that edgecore creates and alone writes,
//! modelled on kube-proxy's nftables mode, replaced in one transaction whenever the service
//! table changes ([docs/services.md]).
//!
//! The table, for a Service port with ready local endpoints:
//!
//! ```text
//! nat-prerouting, nat-output (nat, dstnat) ─► services:
//!     ip daddr . meta l4proto . th dport vmap { CLUSTER-IP . tcp . 80 : goto svc-H }
//!     fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap { tcp . 30080 : goto ext-H }
//! ext-H:   jump mark-for-masquerade; goto svc-H
//! svc-H:   ip saddr @aff-E goto ep-E ...          (ClientIP affinity only)
//!          numgen random mod N vmap { 0 : goto ep-E, ... }
//! ep-E:    ip saddr IP jump mark-for-masquerade    (hairpin)
//!          update @aff-E { ip saddr }             (ClientIP affinity only)
//!          meta l4proto tcp dnat to IP:PORT
//! nat-postrouting (nat, srcnat) ─► masquerading: marked packets are masqueraded
//! filter-input/forward/output (filter, -110): ct state new, a cluster IP:port or NodePort
//!     without endpoints ─► reject-service (TCP reset, ICMP port unreachable otherwise)
//! ```
//!
//! Chain and set names are `svc-`, `ext-`, `ep-`, `aff-` and 16 hex digits of a SHA-256 over
//! namespace, name, port and endpoint, never the names themselves. The crate's schema has no
//! verdict type for named maps, so the dispatch maps are anonymous verdict maps inside the
//! rules; they are rewritten with the rules in the same transaction.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nftables::expr::{
    BinaryOperation, CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression,
    NgMode, Numgen, Payload, PayloadField, Prefix, SetItem, Verdict,
};
use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType,
    SetTypeValue, Table,
};
use nftables::stmt::{JumpTarget, Mangle, Match, NAT, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook, RejectCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::table::{Protocol, ServiceEntry, ServiceKey, ServiceKind, ServiceTable};

/// The packet mark bit that asks for masquerading (kube-proxy's bit).
pub const MASQUERADE_MARK: u32 = 0x4000;
/// The sysctl that makes bridged IPv4 traffic pass the `ip` hooks (br_netfilter).
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

const NAT_PREROUTING: &str = "nat-prerouting";
const NAT_OUTPUT: &str = "nat-output";
const NAT_POSTROUTING: &str = "nat-postrouting";
const FILTER_INPUT: &str = "filter-input";
const FILTER_FORWARD: &str = "filter-forward";
const FILTER_OUTPUT: &str = "filter-output";
const SERVICES: &str = "services";
const MASQUERADING: &str = "masquerading";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const REJECT_SERVICE: &str = "reject-service";
/// nat chains at dstnat/srcnat, filter chains just before the usual filter priority (0), as
/// kube-proxy does.
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;
const FILTER_EARLY: i32 = -110;

/// The data path could not be programmed or removed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("nftables refused the ruleset: {0}")]
    Apply(String),
    #[error("cannot run {program}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read table {table} from nft: {reason}")]
    List { table: String, reason: String },
}

/// How `nft` is run: the program and the arguments before `-j` (e.g. `ip netns exec NAME nft`
/// in tests). edgecore itself runs `nft` from `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl Default for NftCommand {
    fn default() -> Self {
        NftCommand {
            program: PathBuf::from("nft"),
            args: Vec::new(),
        }
    }
}

impl NftCommand {
    /// `nft` inside the network namespace `name` (`ip netns exec NAME nft`).
    pub fn in_netns(name: &str) -> NftCommand {
        NftCommand {
            program: PathBuf::from("ip"),
            args: ["netns", "exec", name, "nft"].map(String::from).to_vec(),
        }
    }

    /// Runs `nft -j ARGS` with `input` on stdin; its stdout, or nft's own words on failure.
    async fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<Output, ProxyError> {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .arg("-j")
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let exec = |source| ProxyError::Exec {
            program: self.program.display().to_string(),
            source,
        };
        let mut child = command.spawn().map_err(exec)?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input).await.map_err(exec)?;
            drop(stdin);
        }
        let out = child.wait_with_output().await.map_err(exec)?;
        Ok(Output {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

/// How replies of service traffic between two pods on the same bridge find their way back
/// through conntrack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hairpin {
    /// br_netfilter passes bridged traffic through the `ip` hooks: only an endpoint reaching
    /// itself is masqueraded (as kube-proxy does).
    BridgeNetfilter,
    /// Bridged traffic skips netfilter: every service connection is masqueraded, so replies
    /// come back through the gateway (kube-proxy's `--masquerade-all`).
    MasqueradeAll,
}

/// Turns on `net.bridge.bridge-nf-call-iptables` in this network namespace when the sysctl
/// exists; the hairpin mode that follows, logged.
pub fn enable_bridge_netfilter() -> Hairpin {
    let path = std::path::Path::new(BRIDGE_NF_CALL_IPTABLES);
    if !path.exists() {
        tracing::info!(
            sysctl = BRIDGE_NF_CALL_IPTABLES,
            "services: no br_netfilter here; masquerading all service traffic"
        );
        return Hairpin::MasqueradeAll;
    }
    match std::fs::read_to_string(path) {
        Ok(value) if value.trim() == "1" => return Hairpin::BridgeNetfilter,
        _ => {}
    }
    match std::fs::write(path, "1") {
        Ok(()) => {
            tracing::info!(
                sysctl = BRIDGE_NF_CALL_IPTABLES,
                "services: set to 1 so bridged pod-to-pod replies pass conntrack"
            );
            Hairpin::BridgeNetfilter
        }
        Err(e) => {
            tracing::warn!(
                sysctl = BRIDGE_NF_CALL_IPTABLES,
                error = %e,
                "services: cannot turn on br_netfilter; masquerading all service traffic"
            );
            Hairpin::MasqueradeAll
        }
    }
}

/// The chains and sets of the table, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objects {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

/// One transaction and the objects the table holds after it.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub batch: Nftables<'static>,
    pub objects: Objects,
    /// Service ports programmed with at least one endpoint.
    pub services: usize,
}

/// The owner of one table: replaces its contents with each [`Proxy::sync`].
#[derive(Debug)]
pub struct Proxy {
    nft: NftCommand,
    table: String,
    hairpin: Hairpin,
    /// What the table holds after the last successful sync; `None` until the table was read
    /// (at start, and after a failure, when the kernel is asked again).
    known: Option<Objects>,
}

impl Proxy {
    pub fn new(nft: NftCommand, table: String, hairpin: Hairpin) -> Proxy {
        Proxy {
            nft,
            table,
            hairpin,
            known: None,
        }
    }

    /// Replaces the table's contents with `services` in one transaction (taking over what an
    /// earlier edgecore left); the number of service ports programmed and the time taken.
    pub async fn sync(&mut self, services: &ServiceTable) -> Result<(usize, Duration), ProxyError> {
        let started = Instant::now();
        let known = match self.known.take() {
            Some(known) => known,
            None => list(&self.nft, &self.table).await?.unwrap_or_default(),
        };
        let rendered = render(&self.table, services, self.hairpin, &known);
        let input = serde_json::to_vec(&rendered.batch)
            .map_err(|e| ProxyError::Apply(format!("cannot encode the batch: {e}")))?;
        let out = self.nft.run(&["-f", "-"], Some(&input)).await?;
        if !out.success {
            return Err(ProxyError::Apply(out.stderr));
        }
        self.known = Some(rendered.objects);
        Ok((rendered.services, started.elapsed()))
    }

    /// Deletes the table (graceful stop).
    pub async fn remove(&mut self) -> Result<(), ProxyError> {
        self.known = None;
        delete_table(&self.nft, &self.table).await
    }
}

/// Renders `services` into table `table` and applies it once with `nft`: the time taken (for
/// benchmarks of rule updates).
pub async fn apply_once(
    nft: &NftCommand,
    table: &str,
    services: &ServiceTable,
) -> Result<Duration, ProxyError> {
    let mut proxy = Proxy::new(nft.clone(), table.to_string(), Hairpin::BridgeNetfilter);
    Ok(proxy.sync(services).await?.1)
}

/// Removes edgecore's table, if present.
pub async fn cleanup(table: &str) -> Result<(), ProxyError> {
    delete_table(&NftCommand::default(), table).await
}

/// Deletes `table` (family ip) with `nft`, if present.
pub async fn delete_table(nft: &NftCommand, table: &str) -> Result<(), ProxyError> {
    if list(nft, table).await?.is_none() {
        return Ok(());
    }
    let batch = Nftables {
        objects: Cow::Owned(vec![NfObject::CmdObject(NfCmd::Delete(
            NfListObject::Table(Table {
                family: NfFamily::IP,
                name: table.to_string().into(),
                handle: None,
            }),
        ))]),
    };
    let input = serde_json::to_vec(&batch)
        .map_err(|e| ProxyError::Apply(format!("cannot encode the batch: {e}")))?;
    let out = nft.run(&["-f", "-"], Some(&input)).await?;
    if !out.success {
        return Err(ProxyError::Apply(out.stderr));
    }
    Ok(())
}

/// The chains and sets of `table` (family ip); `None` when there is no such table.
pub async fn list(nft: &NftCommand, table: &str) -> Result<Option<Objects>, ProxyError> {
    let out = nft.run(&["list", "table", "ip", table], None).await?;
    if !out.success {
        if out.stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(ProxyError::List {
            table: table.to_string(),
            reason: out.stderr,
        });
    }
    // Read as plain JSON, not the crate's schema: only names are needed, and a rule whose
    // expressions the schema does not know must not stop a takeover.
    let listed: serde_json::Value =
        serde_json::from_str(&out.stdout).map_err(|e| ProxyError::List {
            table: table.to_string(),
            reason: e.to_string(),
        })?;
    let mut objects = Objects::default();
    for object in listed["nftables"].as_array().into_iter().flatten() {
        for kind in ["chain", "set", "map"] {
            let Some(item) = object.get(kind) else {
                continue;
            };
            if item["family"] != "ip" || item["table"] != table {
                continue;
            }
            if let Some(name) = item["name"].as_str() {
                let into = match kind {
                    "chain" => &mut objects.chains,
                    _ => &mut objects.sets,
                };
                into.insert(name.to_string());
            }
        }
    }
    Ok(Some(objects))
}

/// 16 hex digits of SHA-256 over `parts` (each followed by a NUL, so no two lists collide).
fn hash(parts: &[&str]) -> String {
    let mut digest = Sha256::new();
    for part in parts {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    hex::encode(&digest.finalize()[..8])
}

fn l4proto(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn string(s: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(s.into()))
}

fn goto(chain: &str) -> Expression<'static> {
    Expression::Verdict(Verdict::Goto(JumpTarget {
        target: chain.to_string().into(),
    }))
}

fn jump(chain: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: chain.to_string().into(),
    })
}

fn goto_stmt(chain: &str) -> Statement<'static> {
    Statement::Goto(JumpTarget {
        target: chain.to_string().into(),
    })
}

/// `ip daddr . meta l4proto . th dport`
fn service_key() -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        payload("ip", "daddr"),
        meta(MetaKey::L4proto),
        payload("th", "dport"),
    ]))
}

/// `meta l4proto . th dport`
fn node_port_key() -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        meta(MetaKey::L4proto),
        payload("th", "dport"),
    ]))
}

/// `fib daddr type local ip daddr != 127.0.0.0/8`
fn local_destination() -> [Statement<'static>; 2] {
    [
        matches(
            Expression::Named(NamedExpression::Fib(Fib {
                result: FibResult::Type,
                flags: HashSet::from([FibFlag::Daddr]),
            })),
            Operator::EQ,
            string("local"),
        ),
        matches(
            payload("ip", "daddr"),
            Operator::NEQ,
            Expression::Named(NamedExpression::Prefix(Prefix {
                addr: Box::new(string("127.0.0.0")),
                len: 8,
            })),
        ),
    ]
}

fn vmap(key: Expression<'static>, items: Vec<SetItem<'static>>) -> Statement<'static> {
    Statement::VerdictMap(nftables::stmt::VerdictMap {
        key,
        data: Expression::Named(NamedExpression::Set(items)),
    })
}

fn ct_state_new() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        string("new"),
    )
}

/// The transaction that makes `table` hold exactly `services`, given that it now holds
/// `known`: chains are added and flushed (never deleted and re-created, so affinity sets of
/// endpoints that stay keep their entries), obsolete chains and sets deleted, rules added.
pub fn render(table: &str, services: &ServiceTable, hairpin: Hairpin, known: &Objects) -> Rendered {
    let mut builder = Builder::new(table);
    let mut dispatch = Vec::new();
    let mut node_ports = Vec::new();
    let mut reject_services = Vec::new();
    let mut reject_node_ports = Vec::new();
    let mut programmed = 0;
    // A cluster IP:port or NodePort goes to the first Service (by namespace/name) that has it;
    // the API never gives two Services the same, but a bad object must not fail the table.
    let mut claimed_ips = HashSet::new();
    let mut claimed_node_ports = HashSet::new();
    for (key, entry) in &services.services {
        if !matches!(entry.kind, ServiceKind::ClusterIp | ServiceKind::NodePort) {
            continue;
        }
        let cluster_ips: Vec<Ipv4Addr> = entry
            .cluster_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(ip) => Some(*ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        for port in &entry.ports {
            let proto = l4proto(port.protocol);
            let cluster_ips: Vec<Ipv4Addr> = cluster_ips
                .iter()
                .copied()
                .filter(|ip| {
                    let free = claimed_ips.insert((*ip, proto, port.port));
                    if !free {
                        tracing::warn!(
                            service.namespace = %key.namespace,
                            service.name = %key.name,
                            address = %format!("{ip}:{}/{proto}", port.port),
                            "services: address taken by another Service; left out"
                        );
                    }
                    free
                })
                .collect();
            let node_port = port.node_port.filter(|node_port| {
                let free = claimed_node_ports.insert((proto, *node_port));
                if !free {
                    tracing::warn!(
                        service.namespace = %key.namespace,
                        service.name = %key.name,
                        node_port = *node_port,
                        "services: NodePort taken by another Service; left out"
                    );
                }
                free
            });
            let endpoints: Vec<(Ipv4Addr, u16)> = entry
                .routed_endpoints(&port.name)
                .filter_map(|(e, target)| match e.ip {
                    IpAddr::V4(ip) => Some((ip, target)),
                    IpAddr::V6(_) => None,
                })
                .collect();
            if endpoints.is_empty() {
                for ip in &cluster_ips {
                    reject_services.push(SetItem::Mapping(
                        concat_key(ip, proto, port.port),
                        goto(REJECT_SERVICE),
                    ));
                }
                if let Some(node_port) = node_port {
                    reject_node_ports.push(SetItem::Mapping(
                        node_port_item(proto, node_port),
                        goto(REJECT_SERVICE),
                    ));
                }
                continue;
            }
            programmed += 1;
            let service_chain =
                builder.service_port(key, entry, &port.name, proto, &endpoints, hairpin);
            for ip in &cluster_ips {
                dispatch.push(SetItem::Mapping(
                    concat_key(ip, proto, port.port),
                    goto(&service_chain),
                ));
            }
            if let Some(node_port) = node_port {
                let external = format!("ext-{}", &service_chain["svc-".len()..]);
                builder.chain(&external);
                builder.rule(&external, vec![jump(MARK_FOR_MASQUERADE)]);
                builder.rule(&external, vec![goto_stmt(&service_chain)]);
                node_ports.push(SetItem::Mapping(
                    node_port_item(proto, node_port),
                    goto(&external),
                ));
            }
        }
    }
    builder.base_chain(NAT_PREROUTING, NfChainType::NAT, NfHook::Prerouting, DSTNAT);
    builder.base_chain(NAT_OUTPUT, NfChainType::NAT, NfHook::Output, DSTNAT);
    builder.base_chain(
        NAT_POSTROUTING,
        NfChainType::NAT,
        NfHook::Postrouting,
        SRCNAT,
    );
    builder.base_chain(
        FILTER_INPUT,
        NfChainType::Filter,
        NfHook::Input,
        FILTER_EARLY,
    );
    builder.base_chain(
        FILTER_FORWARD,
        NfChainType::Filter,
        NfHook::Forward,
        FILTER_EARLY,
    );
    builder.base_chain(
        FILTER_OUTPUT,
        NfChainType::Filter,
        NfHook::Output,
        FILTER_EARLY,
    );
    for chain in [SERVICES, MASQUERADING, MARK_FOR_MASQUERADE, REJECT_SERVICE] {
        builder.chain(chain);
    }
    builder.rule(NAT_PREROUTING, vec![jump(SERVICES)]);
    builder.rule(NAT_OUTPUT, vec![jump(SERVICES)]);
    builder.rule(NAT_POSTROUTING, vec![jump(MASQUERADING)]);
    if !dispatch.is_empty() {
        builder.rule(SERVICES, vec![vmap(service_key(), dispatch)]);
    }
    if !node_ports.is_empty() {
        let mut rule = local_destination().to_vec();
        rule.push(vmap(node_port_key(), node_ports));
        builder.rule(SERVICES, rule);
    }
    let mark = meta(MetaKey::Mark);
    builder.rule(
        MARK_FOR_MASQUERADE,
        vec![Statement::Mangle(Mangle {
            key: mark.clone(),
            value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                mark.clone(),
                Expression::Number(MASQUERADE_MARK),
            ]))),
        })],
    );
    builder.rule(
        MASQUERADING,
        vec![
            matches(
                Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    mark.clone(),
                    Expression::Number(MASQUERADE_MARK),
                ))),
                Operator::EQ,
                Expression::Number(0),
            ),
            Statement::Return(None),
        ],
    );
    builder.rule(
        MASQUERADING,
        vec![
            Statement::Mangle(Mangle {
                key: mark.clone(),
                value: Expression::BinaryOperation(Box::new(BinaryOperation::XOR(
                    mark,
                    Expression::Number(MASQUERADE_MARK),
                ))),
            }),
            Statement::Masquerade(Some(NAT {
                addr: None,
                family: None,
                port: None,
                flags: Some(HashSet::from([nftables::stmt::NATFlag::FullyRandom])),
            })),
        ],
    );
    builder.rule(
        REJECT_SERVICE,
        vec![
            matches(meta(MetaKey::L4proto), Operator::EQ, string("tcp")),
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
        ],
    );
    builder.rule(
        REJECT_SERVICE,
        vec![Statement::Reject(Some(Reject::new(
            Some(RejectType::ICMP),
            Some(RejectCode::PortUnreach),
        )))],
    );
    if !reject_services.is_empty() {
        for chain in [FILTER_FORWARD, FILTER_OUTPUT] {
            builder.rule(
                chain,
                vec![ct_state_new(), vmap(service_key(), reject_services.clone())],
            );
        }
    }
    if !reject_node_ports.is_empty() {
        for chain in [FILTER_INPUT, FILTER_OUTPUT] {
            let mut rule = vec![ct_state_new()];
            rule.extend(local_destination());
            rule.push(vmap(node_port_key(), reject_node_ports.clone()));
            builder.rule(chain, rule);
        }
    }
    builder.finish(known, programmed)
}

fn concat_key(ip: &Ipv4Addr, proto: &'static str, port: u16) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        string(ip.to_string()),
        string(proto),
        Expression::Number(u32::from(port)),
    ]))
}

fn node_port_item(proto: &'static str, port: u16) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        string(proto),
        Expression::Number(u32::from(port)),
    ]))
}

/// Collects the table's chains, sets and rules in the order the transaction needs.
struct Builder {
    table: String,
    /// Chains in order of creation: (name, base chain hook).
    chains: BTreeMap<String, Option<(NfChainType, NfHook, i32)>>,
    sets: BTreeMap<String, u32>,
    rules: Vec<(String, Vec<Statement<'static>>)>,
}

impl Builder {
    fn new(table: &str) -> Builder {
        Builder {
            table: table.to_string(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            rules: Vec::new(),
        }
    }

    fn chain(&mut self, name: &str) {
        self.chains.entry(name.to_string()).or_insert(None);
    }

    fn base_chain(&mut self, name: &str, kind: NfChainType, hook: NfHook, prio: i32) {
        self.chains
            .insert(name.to_string(), Some((kind, hook, prio)));
    }

    fn rule(&mut self, chain: &str, statements: Vec<Statement<'static>>) {
        self.rules.push((chain.to_string(), statements));
    }

    /// The chains of one Service port with endpoints; the name of its `svc-` chain.
    fn service_port(
        &mut self,
        key: &ServiceKey,
        entry: &ServiceEntry,
        port_name: &str,
        proto: &'static str,
        endpoints: &[(Ipv4Addr, u16)],
        hairpin: Hairpin,
    ) -> String {
        let id = [key.namespace.as_str(), key.name.as_str(), port_name, proto];
        let service_chain = format!("svc-{}", hash(&id));
        self.chain(&service_chain);
        if hairpin == Hairpin::MasqueradeAll {
            self.rule(&service_chain, vec![jump(MARK_FOR_MASQUERADE)]);
        }
        let affinity = entry
            .affinity
            .map(|t| t.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
        let mut targets = Vec::new();
        for (ip, port) in endpoints {
            let address = format!("{ip}:{port}");
            let endpoint_id = hash(&[id[0], id[1], id[2], id[3], &address]);
            let endpoint_chain = format!("ep-{endpoint_id}");
            self.chain(&endpoint_chain);
            self.rule(
                &endpoint_chain,
                vec![
                    matches(payload("ip", "saddr"), Operator::EQ, string(ip.to_string())),
                    jump(MARK_FOR_MASQUERADE),
                ],
            );
            if let Some(timeout) = affinity {
                // The timeout is part of the set's name: a changed timeout is a new set.
                let set = format!("aff-{}", hash(&[&endpoint_id, &timeout.to_string()]));
                self.sets.insert(set.clone(), timeout);
                self.rule(
                    &service_chain,
                    vec![
                        matches(
                            payload("ip", "saddr"),
                            Operator::EQ,
                            string(format!("@{set}")),
                        ),
                        goto_stmt(&endpoint_chain),
                    ],
                );
                self.rule(
                    &endpoint_chain,
                    vec![Statement::Set(nftables::stmt::Set {
                        op: nftables::stmt::SetOp::Update,
                        elem: payload("ip", "saddr"),
                        set: format!("@{set}").into(),
                    })],
                );
            }
            self.rule(
                &endpoint_chain,
                vec![
                    matches(meta(MetaKey::L4proto), Operator::EQ, string(proto)),
                    Statement::DNAT(Some(NAT {
                        addr: Some(string(ip.to_string())),
                        family: None,
                        port: Some(Expression::Number(u32::from(*port))),
                        flags: None,
                    })),
                ],
            );
            targets.push(endpoint_chain);
        }
        let items = targets
            .iter()
            .enumerate()
            .map(|(i, chain)| SetItem::Mapping(Expression::Number(i as u32), goto(chain)))
            .collect();
        self.rule(
            &service_chain,
            vec![vmap(
                Expression::Named(NamedExpression::Numgen(Numgen {
                    mode: NgMode::Random,
                    ng_mod: targets.len() as u32,
                    offset: None,
                })),
                items,
            )],
        );
        service_chain
    }

    fn finish(self, known: &Objects, services: usize) -> Rendered {
        let family = NfFamily::IP;
        let table: Cow<'static, str> = self.table.clone().into();
        let chain = |name: &str, base: Option<(NfChainType, NfHook, i32)>| Chain {
            family,
            table: table.clone(),
            name: name.to_string().into(),
            newname: None,
            handle: None,
            _type: base.map(|b| b.0),
            hook: base.map(|b| b.1),
            prio: base.map(|b| b.2),
            dev: None,
            policy: None,
        };
        let set = |name: &str, timeout: Option<u32>| Set {
            family,
            table: table.clone(),
            name: name.to_string().into(),
            handle: None,
            set_type: SetTypeValue::Single(SetType::Ipv4Addr),
            policy: None,
            // Only `timeout`: nft 1.0.6's JSON parser refuses the `dynamic` flag, and a set
            // that `update` writes from the packet path works without it.
            flags: timeout.map(|_| HashSet::from([SetFlag::Timeout])),
            elem: None,
            timeout,
            gc_interval: None,
            size: None,
            comment: None,
        };
        let mut commands = vec![NfCmd::Add(NfListObject::Table(Table {
            family,
            name: table.clone(),
            handle: None,
        }))];
        for (name, base) in &self.chains {
            commands.push(NfCmd::Add(NfListObject::Chain(chain(name, *base))));
            commands.push(NfCmd::Flush(FlushObject::Chain(chain(name, None))));
        }
        // Sets the table already holds are left as they are (entries and all): nft marks a
        // set that `update` writes as dynamic when it creates it, and adding it again without
        // that flag (which nft 1.0.6's JSON parser does not accept) would fail.
        for (name, timeout) in self
            .sets
            .iter()
            .filter(|(name, _)| !known.sets.contains(*name))
        {
            commands.push(NfCmd::Add(NfListObject::Set(Box::new(set(
                name,
                Some(*timeout),
            )))));
        }
        let obsolete_chains: Vec<&String> = known
            .chains
            .iter()
            .filter(|c| !self.chains.contains_key(*c))
            .collect();
        for name in &obsolete_chains {
            commands.push(NfCmd::Flush(FlushObject::Chain(chain(name, None))));
        }
        for name in &obsolete_chains {
            commands.push(NfCmd::Delete(NfListObject::Chain(chain(name, None))));
        }
        for name in known.sets.iter().filter(|s| !self.sets.contains_key(*s)) {
            commands.push(NfCmd::Delete(NfListObject::Set(Box::new(set(name, None)))));
        }
        for (chain_name, statements) in self.rules {
            commands.push(NfCmd::Add(NfListObject::Rule(Rule {
                family,
                table: table.clone(),
                chain: chain_name.into(),
                expr: statements.into(),
                handle: None,
                index: None,
                comment: None,
            })));
        }
        Rendered {
            batch: Nftables {
                objects: commands.into_iter().map(NfObject::CmdObject).collect(),
            },
            objects: Objects {
                chains: self.chains.into_keys().collect(),
                sets: self.sets.into_keys().collect(),
            },
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::table::{Endpoint, ServicePort};

    fn endpoint(ip: &str, port: u16, ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            ready,
            terminating: false,
            local: true,
            node_name: None,
            hostname: None,
            pod: None,
            ports: BTreeMap::from([("http".to_string(), port)]),
        }
    }

    fn table(name: &str, endpoints: Vec<Endpoint>, affinity: Option<Duration>) -> ServiceTable {
        let mut table = ServiceTable::default();
        table.services.insert(
            ServiceKey {
                namespace: "default".into(),
                name: name.into(),
            },
            ServiceEntry {
                uid: "u".into(),
                kind: ServiceKind::NodePort,
                cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                }],
                affinity,
                publish_not_ready: false,
                endpoints,
            },
        );
        table
    }

    fn json(rendered: &Rendered) -> String {
        serde_json::to_string(&rendered.batch).expect("json")
    }

    #[test]
    fn a_service_with_two_ready_endpoints_balances_and_pins_clients() {
        let services = table(
            "web",
            vec![
                endpoint("10.99.0.2", 8080, true),
                endpoint("10.99.0.3", 8080, true),
                endpoint("10.99.0.4", 8080, false),
            ],
            Some(Duration::from_secs(60)),
        );
        let rendered = render(
            "edgecore",
            &services,
            Hairpin::BridgeNetfilter,
            &Objects::default(),
        );
        let text = json(&rendered);
        assert_eq!(rendered.services, 1);
        let count = |prefix: &str| {
            rendered
                .objects
                .chains
                .iter()
                .filter(|c| c.starts_with(prefix))
                .count()
        };
        assert_eq!((count("svc-"), count("ext-"), count("ep-")), (1, 1, 2));
        assert_eq!(
            rendered.objects.sets.len(),
            2,
            "one affinity set per endpoint"
        );
        assert!(
            text.contains(r#"{"numgen":{"mode":"random","mod":2}}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"{"dnat":{"addr":"10.99.0.2","port":8080}}"#),
            "{text}"
        );
        assert!(
            !text.contains("10.99.0.4"),
            "an unready endpoint is not programmed: {text}"
        );
        assert!(text.contains(r#""timeout":60"#), "{text}");
        assert!(
            text.contains(
                r#"{"set":{"op":"update","elem":{"payload":{"protocol":"ip","field":"saddr"}}"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"["10.96.0.10","tcp",80]"#), "{text}");
        assert!(text.contains(r#"["tcp",30080]"#), "{text}");
        assert!(text.contains(r#""fully-random""#), "{text}");
        assert!(
            !text.contains("web"),
            "names never reach the ruleset: {text}"
        );
    }

    #[test]
    fn a_service_without_ready_endpoints_is_rejected() {
        let services = table("web", vec![endpoint("10.99.0.2", 8080, false)], None);
        let rendered = render(
            "edgecore",
            &services,
            Hairpin::BridgeNetfilter,
            &Objects::default(),
        );
        let text = json(&rendered);
        assert_eq!(rendered.services, 0);
        assert!(
            !rendered
                .objects
                .chains
                .iter()
                .any(|c| c.starts_with("svc-"))
        );
        assert!(
            text.contains(r#"{"goto":{"target":"reject-service"}}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"{"reject":{"type":"tcp reset"}}"#),
            "{text}"
        );
    }

    #[test]
    fn obsolete_chains_and_sets_are_flushed_and_deleted_in_the_same_batch_and_the_table_never_is() {
        let before = table(
            "web",
            vec![endpoint("10.99.0.2", 8080, true)],
            Some(Duration::from_secs(60)),
        );
        let first = render(
            "edgecore",
            &before,
            Hairpin::BridgeNetfilter,
            &Objects::default(),
        );
        let after = table(
            "web",
            vec![endpoint("10.99.0.3", 8080, true)],
            Some(Duration::from_secs(60)),
        );
        let second = render("edgecore", &after, Hairpin::BridgeNetfilter, &first.objects);
        let old_endpoint: Vec<&String> = first
            .objects
            .chains
            .difference(&second.objects.chains)
            .collect();
        assert_eq!(old_endpoint.len(), 1);
        let old_set = first
            .objects
            .sets
            .difference(&second.objects.sets)
            .next()
            .expect("old set");
        let commands: Vec<String> = second
            .batch
            .objects
            .iter()
            .map(|o| serde_json::to_string(o).expect("json"))
            .collect();
        let position = |needle: &str| commands.iter().position(|c| c.contains(needle));
        let flush = position(&format!(
            r#"{{"flush":{{"chain":{{"family":"ip","table":"edgecore","name":"{}""#,
            old_endpoint[0]
        ))
        .expect("flush");
        let delete = position(&format!(
            r#"{{"delete":{{"chain":{{"family":"ip","table":"edgecore","name":"{}""#,
            old_endpoint[0]
        ))
        .expect("delete");
        assert!(flush < delete);
        assert!(
            position(&format!(
                r#"{{"delete":{{"set":{{"family":"ip","table":"edgecore","name":"{old_set}""#
            ))
            .is_some()
        );
        assert!(position(r#"{"delete":{"table""#).is_none());
        assert!(
            position(r#"{"flush":{"set""#).is_none(),
            "affinity sets are never flushed"
        );
        // The same endpoint keeps its set name: its affinity entries stay.
        let again = render(
            "edgecore",
            &before,
            Hairpin::BridgeNetfilter,
            &first.objects,
        );
        assert_eq!(again.objects, first.objects);
    }

    #[test]
    fn masquerade_all_marks_every_service_connection() {
        let services = table("web", vec![endpoint("10.99.0.2", 8080, true)], None);
        let bridged = json(&render(
            "t",
            &services,
            Hairpin::BridgeNetfilter,
            &Objects::default(),
        ));
        let all = json(&render(
            "t",
            &services,
            Hairpin::MasqueradeAll,
            &Objects::default(),
        ));
        let jumps = |text: &str| {
            text.matches(r#"{"jump":{"target":"mark-for-masquerade"}}"#)
                .count()
        };
        assert_eq!(jumps(&all), jumps(&bridged) + 1);
    }

    #[test]
    fn a_cluster_ip_or_node_port_given_twice_goes_to_the_first_service_only() {
        let mut services = table("a", vec![endpoint("10.99.0.2", 8080, true)], None);
        let b = table("b", vec![endpoint("10.99.0.3", 8080, true)], None);
        services.services.extend(b.services);
        let rendered = render(
            "t",
            &services,
            Hairpin::BridgeNetfilter,
            &Objects::default(),
        );
        let text = json(&rendered);
        assert_eq!(
            text.matches(r#"["10.96.0.10","tcp",80]"#).count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches(r#"["tcp",30080]"#).count(), 1, "{text}");
    }

    #[test]
    fn chain_names_are_hashes_of_the_names() {
        assert_eq!(hash(&["a", "bc"]).len(), 16);
        assert_ne!(hash(&["a", "bc"]), hash(&["ab", "c"]));
        let hostile = table(
            "x; delete table ip filter",
            vec![endpoint("10.99.0.2", 8080, true)],
            None,
        );
        let text = json(&render(
            "edgecore",
            &hostile,
            Hairpin::BridgeNetfilter,
            &Objects::default(),
        ));
        assert!(!text.contains("delete table"), "{text}");
    }
}
