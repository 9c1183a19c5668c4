//! The mapper's client of edgecore's `DeviceManagerService` (DMI) on its Unix socket:
//! registration and the twin and state reports.
//!
//! One gRPC channel, connected lazily and again after it breaks. The channel's connector marks
//! every connection it makes; when a connection closes (edgecore stopped or restarted),
//! [`Edgecore::connection_lost`] wakes, and the caller registers again: an edgecore that
//! restarted forgets nothing of ours that way, even when we had nothing to report meanwhile.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dmi::pb;
use dmi::pb::device_manager_service_client::DeviceManagerServiceClient;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one call to edgecore may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A call to edgecore that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum EdgecoreError {
    #[error("edgecore's DMI socket {socket}: {status}")]
    Call {
        socket: String,
        #[source]
        status: tonic::Status,
    },
    #[error("edgecore's DMI socket {socket}: no answer within {CALL_TIMEOUT:?}")]
    Timeout { socket: String },
}

/// A handle on edgecore's DMI; cheap to clone.
#[derive(Debug, Clone)]
pub struct Edgecore {
    socket: PathBuf,
    client: DeviceManagerServiceClient<Channel>,
    /// Signalled when a connection to edgecore closes. A permit is stored if nobody waits, so a
    /// close between two waits is not missed.
    lost: Arc<Notify>,
}

impl Edgecore {
    /// A client of the DMI socket at `socket`; connects on first use.
    pub fn new(socket: &Path) -> Edgecore {
        let lost = Arc::new(Notify::new());
        let connector = {
            let socket = socket.to_path_buf();
            let lost = lost.clone();
            tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                let lost = lost.clone();
                async move {
                    let stream = UnixStream::connect(&socket).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(WatchedStream {
                        stream,
                        _guard: CloseGuard(lost),
                    }))
                }
            })
        };
        // The URI is required by the API and unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://dmi.invalid")
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Edgecore {
            socket: socket.to_path_buf(),
            client: DeviceManagerServiceClient::new(channel),
            lost,
        }
    }

    /// `MapperRegister`.
    pub async fn register(
        &self,
        request: pb::MapperRegisterRequest,
    ) -> Result<pb::MapperRegisterResponse, EdgecoreError> {
        let mut client = self.client.clone();
        self.call(async move { client.mapper_register(request).await })
            .await
    }

    /// `ReportDeviceStatus`.
    pub async fn report_status(
        &self,
        request: pb::ReportDeviceStatusRequest,
    ) -> Result<(), EdgecoreError> {
        let mut client = self.client.clone();
        self.call(async move { client.report_device_status(request).await })
            .await
            .map(drop)
    }

    /// `ReportDeviceStates`.
    pub async fn report_state(
        &self,
        request: pb::ReportDeviceStatesRequest,
    ) -> Result<(), EdgecoreError> {
        let mut client = self.client.clone();
        self.call(async move { client.report_device_states(request).await })
            .await
            .map(drop)
    }

    /// Waits until a connection to edgecore closes.
    pub async fn connection_lost(&self) {
        self.lost.notified().await;
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, EdgecoreError> {
        let socket = self.socket.display().to_string();
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(EdgecoreError::Call { socket, status }),
            Err(_) => Err(EdgecoreError::Timeout { socket }),
        }
    }
}

/// Notifies when dropped: the connection it belongs to is gone.
#[derive(Debug)]
struct CloseGuard(Arc<Notify>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// A connection to edgecore that says when it closes.
#[derive(Debug)]
struct WatchedStream {
    stream: UnixStream,
    _guard: CloseGuard,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
