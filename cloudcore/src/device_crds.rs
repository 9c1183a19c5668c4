//! KubeEdge's device API as this cloud serves it: the Device and DeviceModel
//! CustomResourceDefinitions (`deploy/kubernetes/devices-crds.yaml`, the one source for kube
//! mode's manifest and the embedded API's definitions) and the [`ApiResource`]s that downstream
//! and upstream use to read and write `devices.kubeedge.io/v1beta1`.
//!
//! In embedded mode [`install`] creates both definitions at start through the API (kube-rs, as
//! any client would), or replaces them when the file changed since they were written (a digest
//! of the definition is kept in an annotation), and waits until they are `Established`, so the
//! relay's first list already sees the resources. In kube mode the operator applies the file and
//! cloudcore only watches ([docs/devices.md](../../docs/devices.md)).

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, PostParams};
use serde::Deserialize as _;
use sha2::{Digest as _, Sha256};

/// The definitions, as shipped in `deploy/kubernetes/devices-crds.yaml`.
pub const DEFINITIONS: &str = include_str!("../../deploy/kubernetes/devices-crds.yaml");

/// Annotation holding the SHA-256 of the definition cloudcore wrote (embedded mode), so a
/// changed file replaces it at the next start and an unchanged one is left alone.
pub const DIGEST_ANNOTATION: &str = "edge.io/definition-sha256";

/// How long [`install`] waits for a definition to be `Established`.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the device definitions could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error(
        "deploy/kubernetes/devices-crds.yaml: document {index} is not a CustomResourceDefinition"
    )]
    Parse {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("cannot write CustomResourceDefinition {name}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "CustomResourceDefinition {name} is not established after {}s",
        ESTABLISH_TIMEOUT.as_secs()
    )]
    NotEstablished { name: String },
}

/// `devices.kubeedge.io/v1beta1` `devices`.
pub fn device_resource() -> ApiResource {
    resource(devices::DEVICE_KIND, devices::DEVICES)
}

/// `devices.kubeedge.io/v1beta1` `devicemodels`.
pub fn model_resource() -> ApiResource {
    resource(devices::DEVICE_MODEL_KIND, devices::DEVICE_MODELS)
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: devices::GROUP.into(),
        version: devices::VERSION.into(),
        api_version: devices::API_VERSION.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The definitions of [`DEFINITIONS`], each annotated with its digest.
pub fn definitions() -> Result<Vec<CustomResourceDefinition>, DefinitionError> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(DEFINITIONS).enumerate() {
        let mut definition = CustomResourceDefinition::deserialize(document)
            .map_err(|source| DefinitionError::Parse { index, source })?;
        let digest = digest(&definition);
        definition
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(DIGEST_ANNOTATION.into(), digest);
        out.push(definition);
    }
    Ok(out)
}

/// SHA-256 (hex) of the definition as parsed from the file.
fn digest(definition: &CustomResourceDefinition) -> String {
    let bytes = serde_json::to_vec(definition).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))
}

/// What [`install`] did to one definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Installed {
    Created,
    Replaced,
    Current,
}

/// Creates the device definitions, or replaces those written from another version of the
/// file, and waits until the API serves them (embedded mode, at start).
pub async fn install(client: &kube::Client) -> Result<(), DefinitionError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for definition in definitions()? {
        let name = definition.metadata.name.clone().unwrap_or_default();
        let write = |source| DefinitionError::Write {
            name: name.clone(),
            source,
        };
        let live = api.get_opt(&name).await.map_err(write)?;
        let installed = match live {
            None => {
                api.create(&PostParams::default(), &definition)
                    .await
                    .map_err(write)?;
                Installed::Created
            }
            Some(live) if annotation(&live) == annotation(&definition) => Installed::Current,
            Some(live) => {
                let mut replacement = definition.clone();
                replacement.metadata.resource_version = live.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &replacement)
                    .await
                    .map_err(write)?;
                Installed::Replaced
            }
        };
        wait_established(&api, &name).await?;
        match installed {
            Installed::Created => tracing::info!(definition = %name, "device definition created"),
            Installed::Replaced => {
                tracing::info!(definition = %name, "device definition replaced by this version's")
            }
            Installed::Current => tracing::debug!(definition = %name, "device definition current"),
        }
    }
    Ok(())
}

fn annotation(definition: &CustomResourceDefinition) -> Option<&str> {
    definition
        .metadata
        .annotations
        .as_ref()?
        .get(DIGEST_ANNOTATION)
        .map(String::as_str)
}

async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
) -> Result<(), DefinitionError> {
    let deadline = tokio::time::Instant::now() + ESTABLISH_TIMEOUT;
    loop {
        let established = api.get_opt(name).await.ok().flatten().is_some_and(|d| {
            d.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DefinitionError::NotEstablished { name: name.into() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(
        definition: &CustomResourceDefinition,
    ) -> &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion
    {
        assert_eq!(definition.spec.versions.len(), 1, "only v1beta1 is served");
        &definition.spec.versions[0]
    }

    #[test]
    fn the_file_holds_both_definitions_of_v1beta1_with_a_digest() {
        let definitions = definitions().expect("the shipped file parses");
        let names: Vec<_> = definitions
            .iter()
            .map(|d| d.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "devicemodels.devices.kubeedge.io",
                "devices.devices.kubeedge.io"
            ]
        );
        for definition in &definitions {
            assert_eq!(definition.spec.group, devices::GROUP);
            assert_eq!(definition.spec.scope, "Namespaced");
            let version = version(definition);
            assert_eq!(version.name, devices::VERSION);
            assert!(version.served && version.storage);
            let digest = annotation(definition).expect("digest annotation");
            assert_eq!(digest.len(), 64);
        }
        assert_ne!(
            annotation(&definitions[0]),
            annotation(&definitions[1]),
            "each definition has its own digest"
        );
    }

    #[test]
    fn devices_have_the_status_subresource_and_the_operator_columns() {
        let definitions = definitions().expect("parses");
        let device = definitions
            .iter()
            .find(|d| d.spec.names.kind == devices::DEVICE_KIND)
            .expect("Device");
        let version = version(device);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "the edge writes status through its subresource"
        );
        let columns: Vec<(String, String, String)> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), c.type_.clone(), c.json_path.clone()))
            .collect();
        for expected in [
            ("Node", "string", ".spec.nodeName"),
            ("Model", "string", ".spec.deviceModelRef.name"),
            ("State", "string", ".status.state"),
            ("Last Seen", "date", ".status.lastOnlineTime"),
        ] {
            assert!(
                columns
                    .iter()
                    .any(|(n, t, p)| (n.as_str(), t.as_str(), p.as_str()) == expected),
                "{expected:?} in {columns:?}"
            );
        }
    }

    #[test]
    fn resources_name_the_group_version_and_plural() {
        let device = device_resource();
        assert_eq!(device.api_version, "devices.kubeedge.io/v1beta1");
        assert_eq!(
            (device.kind.as_str(), device.plural.as_str()),
            ("Device", "devices")
        );
        let model = model_resource();
        assert_eq!(
            (model.kind.as_str(), model.plural.as_str()),
            ("DeviceModel", "devicemodels")
        );
    }
}
