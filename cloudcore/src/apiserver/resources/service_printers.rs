//! Server-side printing of Services, Endpoints and EndpointSlices: the columns and cells of
//! kube-apiserver's table printers for them (`kubectl get svc`, `get ep`, `get
//! endpointslices`), the Service's wide `Selector` column included.

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::{AGE, Column, NAME, array, column, since, str_of, wide};
use crate::apiserver::services;

const SERVICE_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Type",
        "string",
        "type determines how the Service is exposed. Defaults to ClusterIP. Valid options are ExternalName, ClusterIP, NodePort, and LoadBalancer.",
    ),
    column(
        "Cluster-IP",
        "string",
        "clusterIP is the IP address of the service and is usually assigned randomly.",
    ),
    column(
        "External-IP",
        "string",
        "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
    ),
    column(
        "Port(s)",
        "string",
        "The list of ports that are exposed by this service.",
    ),
    AGE,
    wide(
        "Selector",
        "string",
        "Route service traffic to pods with label keys and values matching this selector.",
    ),
];

const ENDPOINTS_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Endpoints",
        "string",
        "Endpoints of the service (address:port), at most three shown.",
    ),
    AGE,
];

const ENDPOINT_SLICE_COLUMNS: &[Column] = &[
    NAME,
    column(
        "AddressType",
        "string",
        "addressType specifies the type of address carried by this EndpointSlice.",
    ),
    column(
        "Ports",
        "string",
        "ports specifies the list of network ports exposed by each endpoint in this slice.",
    ),
    column(
        "Endpoints",
        "string",
        "endpoints is a list of unique endpoints in this slice.",
    ),
    AGE,
];

/// The columns of `kind`, or `None` for kinds printed elsewhere.
pub(super) fn columns(kind: &str) -> Option<&'static [Column]> {
    Some(match kind {
        "Service" => SERVICE_COLUMNS,
        "Endpoints" => ENDPOINTS_COLUMNS,
        "EndpointSlice" => ENDPOINT_SLICE_COLUMNS,
        _ => return None,
    })
}

/// At most three items joined by commas, then ` + N more...`; `empty` for none.
fn at_most_three(items: &[String], empty: &str) -> String {
    const MAX: usize = 3;
    if items.is_empty() {
        return empty.to_string();
    }
    let shown = items[..items.len().min(MAX)].join(",");
    if items.len() > MAX {
        format!("{shown} + {} more...", items.len() - MAX)
    } else {
        shown
    }
}

/// kubectl's EXTERNAL-IP: the external IPs; for a LoadBalancer its ingress addresses first
/// (`<pending>` when it has none); for ExternalName the external name.
fn external_ip(service: &Value) -> String {
    let spec = &service["spec"];
    let external: Vec<String> = array(service, &["spec", "externalIPs"])
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    match spec["type"].as_str().unwrap_or("ClusterIP") {
        "ExternalName" => str_of(service, &["spec", "externalName"]).to_string(),
        "LoadBalancer" => {
            let mut addresses: Vec<String> = array(service, &["status", "loadBalancer", "ingress"])
                .iter()
                .filter_map(|i| {
                    i["ip"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .or_else(|| i["hostname"].as_str())
                        .map(String::from)
                })
                .collect();
            addresses.extend(external);
            if addresses.is_empty() {
                "<pending>".into()
            } else {
                addresses.join(",")
            }
        }
        _ if external.is_empty() => "<none>".into(),
        _ => external.join(","),
    }
}

/// kubectl's PORT(S): `port[:nodePort]/protocol` for each port, `<none>` without ports.
fn service_ports(service: &Value) -> String {
    let ports: Vec<String> = array(service, &["spec", "ports"])
        .iter()
        .map(|p| {
            let protocol = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64().filter(|n| *n > 0) {
                Some(node_port) => format!("{}:{node_port}/{protocol}", p["port"]),
                None => format!("{}/{protocol}", p["port"]),
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

fn endpoints_text(endpoints: &Value) -> String {
    let mut items = Vec::new();
    for subset in array(endpoints, &["subsets"]) {
        let ports = array(subset, &["ports"]);
        for address in array(subset, &["addresses"]) {
            let ip = str_of(address, &["ip"]);
            if ports.is_empty() {
                items.push(ip.to_string());
            }
            for port in ports {
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip.to_string()
                };
                items.push(format!("{host}:{}", port["port"]));
            }
        }
    }
    at_most_three(&items, "<none>")
}

/// The cells of `kind`'s row, or `None` for kinds printed elsewhere.
pub(super) fn cells(kind: &str, object: &Value, now: OffsetDateTime) -> Option<Vec<Value>> {
    let name = json!(str_of(object, &["metadata", "name"]));
    let age = json!(since(&object["metadata"]["creationTimestamp"], now));
    Some(match kind {
        "Service" => {
            let cluster_ip = str_of(object, &["spec", "clusterIP"]);
            let selector = services::selector_text(&object["spec"]["selector"]);
            vec![
                name,
                json!(str_of(object, &["spec", "type"])),
                json!(if cluster_ip.is_empty() {
                    "<none>"
                } else {
                    cluster_ip
                }),
                json!(external_ip(object)),
                json!(service_ports(object)),
                age,
                json!(if selector.is_empty() {
                    "<none>".to_string()
                } else {
                    selector
                }),
            ]
        }
        "Endpoints" => vec![name, json!(endpoints_text(object)), age],
        "EndpointSlice" => {
            let ports: Vec<String> = array(object, &["ports"])
                .iter()
                .map(|p| match p["port"].as_i64() {
                    Some(port) => port.to_string(),
                    None => p["name"]
                        .as_str()
                        .filter(|n| !n.is_empty())
                        .unwrap_or("*")
                        .to_string(),
                })
                .collect();
            let addresses: Vec<String> = array(object, &["endpoints"])
                .iter()
                .flat_map(|e| array(e, &["addresses"]).iter())
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            vec![
                name,
                json!(str_of(object, &["addressType"])),
                json!(at_most_three(&ports, "<unset>")),
                json!(at_most_three(&addresses, "<unset>")),
                age,
            ]
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, object: Value) -> Vec<Value> {
        let now = OffsetDateTime::now_utc();
        cells(kind, &object, now).expect("printed here")
    }

    #[test]
    fn services_print_like_kubectl_get_svc() {
        let svc = |spec: Value| json!({"metadata": {"name": "web"}, "spec": spec});
        let r = row(
            "Service",
            svc(json!({"type": "ClusterIP", "clusterIP": "10.96.0.50",
                       "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
                       "selector": {"tier": "web", "app": "a"}})),
        );
        assert_eq!(r[1], "ClusterIP");
        assert_eq!(r[2], "10.96.0.50");
        assert_eq!(r[3], "<none>");
        assert_eq!(r[4], "80/TCP,53/UDP");
        assert_eq!(r[6], "app=a,tier=web");
        let r = row(
            "Service",
            svc(json!({"type": "NodePort", "clusterIP": "10.96.0.9",
                       "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]})),
        );
        assert_eq!(r[4], "80:30080/TCP");
        assert_eq!(r[6], "<none>");
        let r = row(
            "Service",
            svc(json!({"type": "LoadBalancer", "clusterIP": "10.96.0.9", "ports": []})),
        );
        assert_eq!(
            (r[3].as_str(), r[4].as_str()),
            (Some("<pending>"), Some("<none>"))
        );
        let r = row(
            "Service",
            svc(json!({"type": "ExternalName", "externalName": "example.com"})),
        );
        assert_eq!(
            (r[2].as_str(), r[3].as_str()),
            (Some("<none>"), Some("example.com"))
        );
        let r = row(
            "Service",
            svc(json!({"type": "ClusterIP", "clusterIP": "None"})),
        );
        assert_eq!(r[2], "None");
    }

    #[test]
    fn endpoints_and_slices_show_three_then_a_count() {
        let ep = json!({"metadata": {"name": "web"}, "subsets": [
            {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}, {"port": 81}]}]});
        assert_eq!(
            row("Endpoints", ep)[1],
            "10.0.0.1:80,10.0.0.1:81,10.0.0.2:80 + 1 more..."
        );
        let empty = json!({"metadata": {"name": "web"}});
        assert_eq!(row("Endpoints", empty.clone())[1], "<none>");
        let slice = json!({"metadata": {"name": "web-x"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80}],
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]});
        let r = row("EndpointSlice", slice);
        assert_eq!((r[1].as_str(), r[2].as_str()), (Some("IPv4"), Some("80")));
        assert_eq!(r[3], "10.0.0.1,10.0.0.2");
        let r = row("EndpointSlice", empty);
        assert_eq!(
            (r[2].as_str(), r[3].as_str()),
            (Some("<unset>"), Some("<unset>"))
        );
    }
}
