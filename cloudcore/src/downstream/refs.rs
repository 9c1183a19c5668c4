//! What a pod references: the ConfigMaps and Secrets an edge may read because a pod bound to it
//! needs them.
//!
//! This is the pod part of the graph the Kubernetes Node authorizer keeps: a node may read a
//! ConfigMap or Secret only when a pod bound to it names that object. The same paths are
//! followed here, for every kind of container (containers, initContainers,
//! ephemeralContainers) and every volume source that can carry a secret reference.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, LocalObjectReference, Pod, Volume};

/// The ConfigMaps and Secrets a pod needs, by name (all in the pod's namespace).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodRefs {
    /// Names of ConfigMaps the pod reads.
    pub config_maps: BTreeSet<String>,
    /// Names of Secrets the pod reads.
    pub secrets: BTreeSet<String>,
}

impl PodRefs {
    fn config_map(&mut self, name: &str) {
        if !name.is_empty() {
            self.config_maps.insert(name.to_string());
        }
    }

    fn secret(&mut self, name: &str) {
        if !name.is_empty() {
            self.secrets.insert(name.to_string());
        }
    }

    fn secret_ref(&mut self, reference: Option<&LocalObjectReference>) {
        if let Some(r) = reference {
            self.secret(&r.name);
        }
    }

    /// `env[].valueFrom` and `envFrom[]` of one container, whatever its kind.
    fn environment(&mut self, env: Option<&[EnvVar]>, env_from: Option<&[EnvFromSource]>) {
        for source in env
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.value_from.as_ref())
        {
            if let Some(selector) = &source.config_map_key_ref {
                self.config_map(&selector.name);
            }
            if let Some(selector) = &source.secret_key_ref {
                self.secret(&selector.name);
            }
        }
        for source in env_from.unwrap_or_default() {
            if let Some(r) = &source.config_map_ref {
                self.config_map(&r.name);
            }
            if let Some(r) = &source.secret_ref {
                self.secret(&r.name);
            }
        }
    }

    fn volume(&mut self, volume: &Volume) {
        if let Some(source) = &volume.config_map {
            self.config_map(&source.name);
        }
        if let Some(source) = &volume.secret {
            self.secret(source.secret_name.as_deref().unwrap_or_default());
        }
        if let Some(projected) = &volume.projected {
            for source in projected.sources.as_deref().unwrap_or_default() {
                if let Some(p) = &source.config_map {
                    self.config_map(&p.name);
                }
                if let Some(p) = &source.secret {
                    self.secret(&p.name);
                }
            }
        }
        if let Some(source) = &volume.azure_file {
            self.secret(&source.secret_name);
        }
        if let Some(source) = &volume.cephfs {
            self.secret_ref(source.secret_ref.as_ref());
        }
        if let Some(source) = &volume.cinder {
            self.secret_ref(source.secret_ref.as_ref());
        }
        if let Some(source) = &volume.flex_volume {
            self.secret_ref(source.secret_ref.as_ref());
        }
        if let Some(source) = &volume.iscsi {
            self.secret_ref(source.secret_ref.as_ref());
        }
        if let Some(source) = &volume.rbd {
            self.secret_ref(source.secret_ref.as_ref());
        }
        if let Some(source) = &volume.scale_io {
            self.secret_ref(Some(&source.secret_ref));
        }
        if let Some(source) = &volume.storageos {
            self.secret_ref(source.secret_ref.as_ref());
        }
        if let Some(source) = &volume.csi {
            self.secret_ref(source.node_publish_secret_ref.as_ref());
        }
    }
}

/// The ConfigMaps and Secrets `pod` references; empty names are skipped.
pub fn pod_refs(pod: &Pod) -> PodRefs {
    let mut refs = PodRefs::default();
    let Some(spec) = &pod.spec else {
        return refs;
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.as_deref().unwrap_or_default())
    {
        refs.environment(c.env.as_deref(), c.env_from.as_deref());
    }
    for c in spec.ephemeral_containers.as_deref().unwrap_or_default() {
        refs.environment(c.env.as_deref(), c.env_from.as_deref());
    }
    for volume in spec.volumes.as_deref().unwrap_or_default() {
        refs.volume(volume);
    }
    for secret in spec.image_pull_secrets.as_deref().unwrap_or_default() {
        refs.secret(&secret.name);
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(spec: Value) -> Pod {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "app", "image": "busybox"}]);
        }
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": spec,
        }))
        .expect("a valid pod")
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn follows_every_reference_path() {
        // (case, pod spec, config maps, secrets)
        let cases: Vec<(&str, Value, &[&str], &[&str])> = vec![
            (
                "container env valueFrom",
                json!({"containers": [{"name": "c", "env": [
                    {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "a"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "b"}}},
                    {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "D", "value": "plain"}
                ]}]}),
                &["cm-env"],
                &["s-env"],
            ),
            (
                "container envFrom",
                json!({"containers": [{"name": "c", "envFrom": [
                    {"configMapRef": {"name": "cm-from"}},
                    {"secretRef": {"name": "s-from"}, "prefix": "S_"}
                ]}]}),
                &["cm-from"],
                &["s-from"],
            ),
            (
                "init container env and envFrom",
                json!({"initContainers": [{"name": "i", "image": "busybox",
                    "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s-init", "key": "a"}}}],
                    "envFrom": [{"configMapRef": {"name": "cm-init"}}]
                }]}),
                &["cm-init"],
                &["s-init"],
            ),
            (
                "ephemeral container env and envFrom",
                json!({"ephemeralContainers": [{"name": "debug", "image": "busybox",
                    "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-eph", "key": "a"}}}],
                    "envFrom": [{"secretRef": {"name": "s-eph"}}]
                }]}),
                &["cm-eph"],
                &["s-eph"],
            ),
            (
                "configMap and secret volumes",
                json!({"volumes": [
                    {"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "s-vol"}}
                ]}),
                &["cm-vol"],
                &["s-vol"],
            ),
            (
                "projected volume sources",
                json!({"volumes": [{"name": "p", "projected": {"sources": [
                    {"configMap": {"name": "cm-proj"}},
                    {"secret": {"name": "s-proj"}},
                    {"serviceAccountToken": {"path": "token"}},
                    {"downwardAPI": {"items": []}}
                ]}}]}),
                &["cm-proj"],
                &["s-proj"],
            ),
            (
                "volume sources with a secretRef",
                json!({"volumes": [
                    {"name": "ceph", "cephfs": {"monitors": ["m"], "secretRef": {"name": "s-cephfs"}}},
                    {"name": "cinder", "cinder": {"volumeID": "v", "secretRef": {"name": "s-cinder"}}},
                    {"name": "flex", "flexVolume": {"driver": "d", "secretRef": {"name": "s-flex"}}},
                    {"name": "iscsi", "iscsi": {"targetPortal": "t", "iqn": "i", "lun": 0, "secretRef": {"name": "s-iscsi"}}},
                    {"name": "rbd", "rbd": {"monitors": ["m"], "image": "i", "secretRef": {"name": "s-rbd"}}},
                    {"name": "scaleio", "scaleIO": {"gateway": "g", "system": "s", "secretRef": {"name": "s-scaleio"}}},
                    {"name": "storageos", "storageos": {"secretRef": {"name": "s-storageos"}}},
                    {"name": "azure", "azureFile": {"secretName": "s-azure", "shareName": "share"}},
                    {"name": "csi", "csi": {"driver": "d", "nodePublishSecretRef": {"name": "s-csi"}}}
                ]}),
                &[],
                &[
                    "s-azure",
                    "s-cephfs",
                    "s-cinder",
                    "s-csi",
                    "s-flex",
                    "s-iscsi",
                    "s-rbd",
                    "s-scaleio",
                    "s-storageos",
                ],
            ),
            (
                "image pull secrets",
                json!({"imagePullSecrets": [{"name": "registry"}, {"name": "mirror"}]}),
                &[],
                &["mirror", "registry"],
            ),
            (
                "empty names are skipped, repeated names kept once",
                json!({
                    "containers": [{"name": "c", "envFrom": [{"configMapRef": {"name": ""}}, {"secretRef": {"name": "dup"}}]}],
                    "volumes": [
                        {"name": "a", "secret": {}},
                        {"name": "b", "secret": {"secretName": "dup"}},
                        {"name": "c", "configMap": {"name": ""}},
                        {"name": "d", "cephfs": {"monitors": ["m"], "secretRef": {"name": ""}}}
                    ],
                    "imagePullSecrets": [{"name": ""}]
                }),
                &[],
                &["dup"],
            ),
            (
                "a pod with no references",
                json!({"volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/srv"}}]}),
                &[],
                &[],
            ),
        ];
        for (case, spec, config_maps, secrets) in cases {
            let refs = pod_refs(&pod(spec));
            assert_eq!(refs.config_maps, names(config_maps), "{case}: config maps");
            assert_eq!(refs.secrets, names(secrets), "{case}: secrets");
        }
    }

    #[test]
    fn a_pod_without_a_spec_references_nothing() {
        assert_eq!(pod_refs(&Pod::default()), PodRefs::default());
        assert_eq!(pod_refs(&pod(json!({}))), PodRefs::default());
    }
}
