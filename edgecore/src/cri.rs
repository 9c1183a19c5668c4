//! A CRI v1 client: containerd's runtime and image services over its unix socket.
//!
//! Thin and typed: one method per call edgecore makes, each with a deadline, each failure a
//! [`CriError`] naming the call. The channel connects lazily and reconnects by itself, so
//! edgecore starts (and serves its local store) while containerd is still down.

use std::collections::HashMap;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Default CRI endpoint, containerd's standard socket.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// Deadline of an ordinary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of a sandbox start (CNI set-up included) and of stops with a grace period.
const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(240);

/// A CRI call failed, or the endpoint is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI endpoint {0:?} is not of the form unix:///PATH")]
    Endpoint(String),
    #[error("{call}: {}", .status.message())]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{call}: the runtime answered without {what}")]
    Incomplete {
        call: &'static str,
        what: &'static str,
    },
}

impl CriError {
    /// Whether the runtime said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CriError::Call { status, .. } if status.code() == tonic::Code::NotFound)
    }

    /// Whether the runtime does not offer this call (containerd 1.6 and `GetContainerEvents`).
    pub fn is_unimplemented(&self) -> bool {
        matches!(self, CriError::Call { status, .. } if status.code() == tonic::Code::Unimplemented)
    }

    /// Whether the runtime could not be reached at all (containerd down).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CriError::Call { status, .. } if status.code() == tonic::Code::Unavailable)
    }
}

/// The unix socket path of a `unix:///PATH` endpoint.
pub fn socket_path(endpoint: &str) -> Result<&str, CriError> {
    endpoint
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| CriError::Endpoint(endpoint.to_string()))
}

/// A connection to the runtime; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    endpoint: String,
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

impl Cri {
    /// A client for `endpoint` (`unix:///PATH`). Connects on first use.
    pub fn new(endpoint: &str) -> Result<Cri, CriError> {
        let path = socket_path(endpoint)?.to_string();
        // The URI is required by tonic and never dialled: the connector opens the socket.
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            endpoint: endpoint.to_string(),
        })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The runtime's name and version.
    pub async fn version(&self) -> Result<api::VersionResponse, CriError> {
        let message = api::VersionRequest {
            version: "v1".into(),
        };
        call(
            "Version",
            self.runtime.clone().version(request(message, CALL_TIMEOUT)),
        )
        .await
    }

    /// The image if the runtime has it (`ImageStatus` answers OK with no image when absent).
    pub async fn image_status(&self, image: &str) -> Result<Option<api::Image>, CriError> {
        let message = api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        let reply = call(
            "ImageStatus",
            self.images
                .clone()
                .image_status(request(message, CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.image)
    }

    /// Pulls an image from its registry.
    pub async fn pull_image(&self, image: &str) -> Result<String, CriError> {
        let message = api::PullImageRequest {
            image: Some(api::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reply = call(
            "PullImage",
            self.images
                .clone()
                .pull_image(request(message, LONG_CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.image_ref)
    }

    /// Starts a pod sandbox; returns its id.
    pub async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String, CriError> {
        let message = api::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let reply = call(
            "RunPodSandbox",
            self.runtime
                .clone()
                .run_pod_sandbox(request(message, LONG_CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.pod_sandbox_id)
    }

    /// Stops a sandbox and every container in it.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let message = api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        call(
            "StopPodSandbox",
            self.runtime
                .clone()
                .stop_pod_sandbox(request(message, LONG_CALL_TIMEOUT)),
        )
        .await
        .map(drop)
    }

    /// Removes a sandbox and its containers (OK if it is already gone).
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let message = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        call(
            "RemovePodSandbox",
            self.runtime
                .clone()
                .remove_pod_sandbox(request(message, LONG_CALL_TIMEOUT)),
        )
        .await
        .map(drop)
    }

    /// A sandbox's state and network.
    pub async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus, CriError> {
        let message = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        };
        let reply = call(
            "PodSandboxStatus",
            self.runtime
                .clone()
                .pod_sandbox_status(request(message, CALL_TIMEOUT)),
        )
        .await?;
        reply.status.ok_or(CriError::Incomplete {
            call: "PodSandboxStatus",
            what: "a status",
        })
    }

    /// Sandboxes carrying all of `labels`.
    pub async fn list_pod_sandboxes(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::PodSandbox>, CriError> {
        let message = api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let reply = call(
            "ListPodSandbox",
            self.runtime
                .clone()
                .list_pod_sandbox(request(message, CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.items)
    }

    /// Creates a container in a sandbox; returns its id.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let message = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let reply = call(
            "CreateContainer",
            self.runtime
                .clone()
                .create_container(request(message, LONG_CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.container_id)
    }

    /// Starts a created container.
    pub async fn start_container(&self, id: &str) -> Result<(), CriError> {
        let message = api::StartContainerRequest {
            container_id: id.to_string(),
        };
        call(
            "StartContainer",
            self.runtime
                .clone()
                .start_container(request(message, LONG_CALL_TIMEOUT)),
        )
        .await
        .map(drop)
    }

    /// Stops a container: SIGTERM, then SIGKILL after `grace` (0 kills at once).
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let message = api::StopContainerRequest {
            container_id: id.to_string(),
            timeout: grace.as_secs() as i64,
        };
        call(
            "StopContainer",
            self.runtime
                .clone()
                .stop_container(request(message, grace + LONG_CALL_TIMEOUT)),
        )
        .await
        .map(drop)
    }

    /// Removes a container (OK if it is already gone).
    pub async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let message = api::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        call(
            "RemoveContainer",
            self.runtime
                .clone()
                .remove_container(request(message, LONG_CALL_TIMEOUT)),
        )
        .await
        .map(drop)
    }

    /// A container's state, exit code, timestamps and image.
    pub async fn container_status(&self, id: &str) -> Result<api::ContainerStatus, CriError> {
        let message = api::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        let reply = call(
            "ContainerStatus",
            self.runtime
                .clone()
                .container_status(request(message, CALL_TIMEOUT)),
        )
        .await?;
        reply.status.ok_or(CriError::Incomplete {
            call: "ContainerStatus",
            what: "a status",
        })
    }

    /// Subscribes to the runtime's container events (created, started, stopped, deleted).
    /// The stream has no deadline: it lives until the runtime or the connection ends it.
    /// Runtimes that do not offer it (containerd before 1.7) answer `UNIMPLEMENTED`
    /// ([`CriError::is_unimplemented`]).
    pub async fn get_container_events(
        &self,
    ) -> Result<tonic::codec::Streaming<api::ContainerEventResponse>, CriError> {
        self.runtime
            .clone()
            .get_container_events(tonic::Request::new(api::GetEventsRequest {}))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| CriError::Call {
                call: "GetContainerEvents",
                status,
            })
    }

    /// Containers carrying all of `labels`.
    pub async fn list_containers(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::Container>, CriError> {
        let message = api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let reply = call(
            "ListContainers",
            self.runtime
                .clone()
                .list_containers(request(message, CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.containers)
    }

    /// CPU and memory usage of the sandboxes carrying all of `labels`.
    pub async fn list_pod_sandbox_stats(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::PodSandboxStats>, CriError> {
        let message = api::ListPodSandboxStatsRequest {
            filter: Some(api::PodSandboxStatsFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let reply = call(
            "ListPodSandboxStats",
            self.runtime
                .clone()
                .list_pod_sandbox_stats(request(message, CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.stats)
    }

    /// CPU and memory usage of the containers carrying all of `labels`.
    pub async fn list_container_stats(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<api::ContainerStats>, CriError> {
        let message = api::ListContainerStatsRequest {
            filter: Some(api::ContainerStatsFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let reply = call(
            "ListContainerStats",
            self.runtime
                .clone()
                .list_container_stats(request(message, CALL_TIMEOUT)),
        )
        .await?;
        Ok(reply.stats)
    }

    /// Runs a command in a container and waits for it (`timeout` 0: no limit).
    pub async fn exec_sync(
        &self,
        id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<api::ExecSyncResponse, CriError> {
        let message = api::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: command,
            timeout: timeout.as_secs() as i64,
        };
        let deadline = if timeout.is_zero() {
            LONG_CALL_TIMEOUT
        } else {
            timeout + CALL_TIMEOUT
        };
        call(
            "ExecSync",
            self.runtime.clone().exec_sync(request(message, deadline)),
        )
        .await
    }

    /// Prepares an interactive exec: the runtime answers with a URL on its streaming server,
    /// which serves it once (SPDY/3.1 or WebSocket remotecommand).
    pub async fn exec(
        &self,
        id: &str,
        command: Vec<String>,
        streams: StreamsWanted,
    ) -> Result<String, CriError> {
        let message = api::ExecRequest {
            container_id: id.to_string(),
            cmd: command,
            tty: streams.tty,
            stdin: streams.stdin,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        let reply = call(
            "Exec",
            self.runtime.clone().exec(request(message, CALL_TIMEOUT)),
        )
        .await?;
        streaming_url("Exec", reply.url)
    }

    /// Prepares an attach to a container's main process; answers the streaming URL.
    pub async fn attach(&self, id: &str, streams: StreamsWanted) -> Result<String, CriError> {
        let message = api::AttachRequest {
            container_id: id.to_string(),
            stdin: streams.stdin,
            tty: streams.tty,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        let reply = call(
            "Attach",
            self.runtime.clone().attach(request(message, CALL_TIMEOUT)),
        )
        .await?;
        streaming_url("Attach", reply.url)
    }

    /// Prepares a port-forward session into a sandbox's network namespace; answers the
    /// streaming URL (each connection names its port there).
    pub async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<String, CriError> {
        let message = api::PortForwardRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            port: vec![i32::from(port)],
        };
        let reply = call(
            "PortForward",
            self.runtime
                .clone()
                .port_forward(request(message, CALL_TIMEOUT)),
        )
        .await?;
        streaming_url("PortForward", reply.url)
    }

    /// Asks the runtime to reopen a container's log file (after it was rotated).
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), CriError> {
        let message = api::ReopenContainerLogRequest {
            container_id: id.to_string(),
        };
        call(
            "ReopenContainerLog",
            self.runtime
                .clone()
                .reopen_container_log(request(message, CALL_TIMEOUT)),
        )
        .await
        .map(drop)
    }
}

/// Which standard streams an exec or attach carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamsWanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

fn streaming_url(call: &'static str, url: String) -> Result<String, CriError> {
    if url.is_empty() {
        return Err(CriError::Incomplete {
            call,
            what: "a streaming URL",
        });
    }
    Ok(url)
}

async fn call<T>(
    name: &'static str,
    future: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    future
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| CriError::Call { call: name, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unix_endpoints_with_absolute_paths_are_accepted() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").ok(),
            Some("/run/containerd/containerd.sock")
        );
        for bad in ["tcp://1.2.3.4:5", "/run/x.sock", "unix://relative.sock", ""] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
    }
}
