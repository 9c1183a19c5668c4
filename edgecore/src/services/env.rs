//! The Service environment variables the kubelet gives each container (`FOO_SERVICE_HOST`,
//! `FOO_PORT_80_TCP`, ...), from the service table.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::ServiceTable;
use super::table::ServiceEntry;

/// The namespace of the Services every pod gets variables for (the kubelet's master service
/// namespace).
const MASTER_NAMESPACE: &str = "default";
/// Those Services.
const MASTER_SERVICES: [&str; 1] = ["kubernetes"];

/// The variables for a container of a pod in `namespace`, as the kubelet makes them:
///
/// - the Services of `namespace` (with `enable_service_links`; the pod's `enableServiceLinks`,
///   true by default) and `default/kubernetes` always, a Service of the pod's namespace of that
///   name winning;
/// - only Services with a cluster IP (not headless, not ExternalName);
/// - per Service, in the kubelet's order: `{SVC}_SERVICE_HOST`, `{SVC}_SERVICE_PORT` (the first
///   port), `{SVC}_SERVICE_PORT_{NAME}` per named port, then Docker's link variables:
///   `{SVC}_PORT` (the first port's URL), and per port `{SVC}_PORT_{PORT}_{PROTO}` (URL),
///   `..._PROTO`, `..._PORT`, `..._ADDR`; names upper case with `-` as `_`.
///
/// Services come in name order (the kubelet's order is a map's). The container's own `env`
/// wins over these; the caller merges them ([`crate::pods::spec::container_env`]).
pub fn service_env(
    table: &ServiceTable,
    namespace: &str,
    enable_service_links: bool,
) -> Vec<(String, String)> {
    let mut chosen: BTreeMap<&str, &ServiceEntry> = BTreeMap::new();
    for (key, entry) in &table.services {
        if entry.cluster_ips.is_empty() || entry.ports.is_empty() {
            continue;
        }
        let name = key.name.as_str();
        if key.namespace == MASTER_NAMESPACE && MASTER_SERVICES.contains(&name) {
            chosen.entry(name).or_insert(entry);
        } else if key.namespace == namespace && enable_service_links {
            chosen.insert(name, entry);
        }
    }
    let mut vars = Vec::new();
    for (name, entry) in chosen {
        variables(name, entry, &mut vars);
    }
    vars
}

/// `name` as a variable name: upper case, `-` as `_`.
fn variable_name(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The variables of one Service, appended to `vars`.
fn variables(name: &str, entry: &ServiceEntry, vars: &mut Vec<(String, String)>) {
    let (Some(&ip), Some(first)) = (entry.cluster_ips.first(), entry.ports.first()) else {
        return;
    };
    let prefix = variable_name(name);
    let host = ip.to_string();
    let url = |protocol: &str, port: u16| {
        format!(
            "{}://{}",
            protocol.to_ascii_lowercase(),
            SocketAddr::new(ip, port)
        )
    };
    vars.push((format!("{prefix}_SERVICE_HOST"), host.clone()));
    vars.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
    for port in entry.ports.iter().filter(|p| !p.name.is_empty()) {
        vars.push((
            format!("{prefix}_SERVICE_PORT_{}", variable_name(&port.name)),
            port.port.to_string(),
        ));
    }
    vars.push((
        format!("{prefix}_PORT"),
        url(first.protocol.as_str(), first.port),
    ));
    for port in &entry.ports {
        let protocol = port.protocol.as_str();
        let port_prefix = format!("{prefix}_PORT_{}_{protocol}", port.port);
        vars.push((port_prefix.clone(), url(protocol, port.port)));
        vars.push((
            format!("{port_prefix}_PROTO"),
            protocol.to_ascii_lowercase(),
        ));
        vars.push((format!("{port_prefix}_PORT"), port.port.to_string()));
        vars.push((format!("{port_prefix}_ADDR"), host.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::{Protocol, ServiceKey, ServiceKind, ServicePort};
    use super::*;

    fn entry(kind: ServiceKind, ips: &[&str], ports: &[(&str, Protocol, u16)]) -> ServiceEntry {
        ServiceEntry {
            uid: "u".into(),
            kind,
            cluster_ips: ips.iter().map(|s| s.parse().expect("test ip")).collect(),
            ports: ports
                .iter()
                .map(|(name, protocol, port)| ServicePort {
                    name: name.to_string(),
                    protocol: *protocol,
                    port: *port,
                    node_port: None,
                })
                .collect(),
            affinity: None,
            publish_not_ready: false,
            endpoints: Vec::new(),
        }
    }

    fn table() -> ServiceTable {
        let mut table = ServiceTable::default();
        let mut add = |ns: &str, name: &str, e: ServiceEntry| {
            table.services.insert(
                ServiceKey {
                    namespace: ns.into(),
                    name: name.into(),
                },
                e,
            );
        };
        add(
            "default",
            "kubernetes",
            entry(
                ServiceKind::ClusterIp,
                &["10.96.0.1"],
                &[("https", Protocol::Tcp, 443)],
            ),
        );
        add(
            "shop",
            "web-front",
            entry(
                ServiceKind::NodePort,
                &["10.96.0.20"],
                &[
                    ("http", Protocol::Tcp, 80),
                    ("metrics-port", Protocol::Udp, 9100),
                ],
            ),
        );
        add(
            "shop",
            "db",
            entry(ServiceKind::Headless, &[], &[("", Protocol::Tcp, 5432)]),
        );
        add(
            "shop",
            "ext",
            entry(ServiceKind::ExternalName("x.example".into()), &[], &[]),
        );
        add(
            "other",
            "cache",
            entry(
                ServiceKind::ClusterIp,
                &["10.96.0.30"],
                &[("", Protocol::Tcp, 6379)],
            ),
        );
        add(
            "v6",
            "api",
            entry(
                ServiceKind::ClusterIp,
                &["fd00::5"],
                &[("", Protocol::Sctp, 7000)],
            ),
        );
        table
    }

    fn names(vars: &[(String, String)]) -> Vec<&str> {
        vars.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn variables_follow_the_kubelet_naming_and_order() {
        let vars = service_env(&table(), "shop", true);
        let want = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
            ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
            ("KUBERNETES_PORT_443_TCP_PORT", "443"),
            ("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1"),
            ("WEB_FRONT_SERVICE_HOST", "10.96.0.20"),
            ("WEB_FRONT_SERVICE_PORT", "80"),
            ("WEB_FRONT_SERVICE_PORT_HTTP", "80"),
            ("WEB_FRONT_SERVICE_PORT_METRICS_PORT", "9100"),
            ("WEB_FRONT_PORT", "tcp://10.96.0.20:80"),
            ("WEB_FRONT_PORT_80_TCP", "tcp://10.96.0.20:80"),
            ("WEB_FRONT_PORT_80_TCP_PROTO", "tcp"),
            ("WEB_FRONT_PORT_80_TCP_PORT", "80"),
            ("WEB_FRONT_PORT_80_TCP_ADDR", "10.96.0.20"),
            ("WEB_FRONT_PORT_9100_UDP", "udp://10.96.0.20:9100"),
            ("WEB_FRONT_PORT_9100_UDP_PROTO", "udp"),
            ("WEB_FRONT_PORT_9100_UDP_PORT", "9100"),
            ("WEB_FRONT_PORT_9100_UDP_ADDR", "10.96.0.20"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(vars, want, "headless and ExternalName Services have none");
    }

    #[test]
    fn an_unnamed_port_and_ipv6() {
        let vars = service_env(&table(), "v6", true);
        let api: Vec<_> = vars.iter().filter(|(k, _)| k.starts_with("API_")).collect();
        let want = [
            ("API_SERVICE_HOST", "fd00::5"),
            ("API_SERVICE_PORT", "7000"),
            ("API_PORT", "sctp://[fd00::5]:7000"),
            ("API_PORT_7000_SCTP", "sctp://[fd00::5]:7000"),
            ("API_PORT_7000_SCTP_PROTO", "sctp"),
            ("API_PORT_7000_SCTP_PORT", "7000"),
            ("API_PORT_7000_SCTP_ADDR", "fd00::5"),
        ];
        let got: Vec<(&str, &str)> = api.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn service_links_off_keeps_only_the_master_service() {
        let vars = service_env(&table(), "shop", false);
        assert!(
            names(&vars).iter().all(|n| n.starts_with("KUBERNETES_")),
            "{vars:?}"
        );
        assert_eq!(vars.len(), 8);
        let other = service_env(&table(), "other", true);
        assert!(names(&other).contains(&"CACHE_SERVICE_HOST"));
        assert!(
            !names(&other).contains(&"WEB_FRONT_SERVICE_HOST"),
            "other namespaces' Services are not listed"
        );
    }

    #[test]
    fn a_kubernetes_service_of_the_pods_namespace_wins() {
        let mut table = table();
        table.services.insert(
            ServiceKey {
                namespace: "shop".into(),
                name: "kubernetes".into(),
            },
            entry(
                ServiceKind::ClusterIp,
                &["10.96.9.9"],
                &[("", Protocol::Tcp, 80)],
            ),
        );
        let vars = service_env(&table, "shop", true);
        let host: Vec<_> = vars
            .iter()
            .filter(|(k, _)| k == "KUBERNETES_SERVICE_HOST")
            .collect();
        assert_eq!(host.len(), 1);
        assert_eq!(host[0].1, "10.96.9.9");
        let vars = service_env(&table, "shop", false);
        let host: Vec<_> = vars
            .iter()
            .filter(|(k, _)| k == "KUBERNETES_SERVICE_HOST")
            .collect();
        assert_eq!(
            host[0].1, "10.96.0.1",
            "without service links only default's"
        );
        assert!(service_env(&ServiceTable::default(), "shop", true).is_empty());
    }
}
