//! The Service environment variables the kubelet gives each container (`FOO_SERVICE_HOST`,
//! `FOO_PORT_80_TCP`, ...), from the service table.

use super::ServiceTable;

/// The variables for a container of a pod in `namespace`, in the kubelet's order; with
/// `enable_service_links` false only the `kubernetes` Service's.
pub fn service_env(
    table: &ServiceTable,
    namespace: &str,
    enable_service_links: bool,
) -> Vec<(String, String)> {
    let _ = (table, namespace, enable_service_links);
    Vec::new()
}
