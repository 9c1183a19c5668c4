//! The running daemon's local control socket, `DIR/edgecore.sock` (mode 0600, root only):
//! how `edgecore ctl` asks the daemon to act on a pod (`ctl restart`) with no cloud.
//!
//! One request per connection, one JSON object per line each way:
//!
//! ```text
//! → {"restart":{"namespace":"default","name":"web"}}
//! ← {"ok":true,"message":"pod default/web: restarting app (restartCount 2)"}
//! ```
//!
//! Reads (`ctl get`, `ctl logs`) do not come here: they read the store and the log files, so
//! they work with the daemon stopped too.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::pods;

/// The socket's file name in the data dir.
pub const SOCKET: &str = "edgecore.sock";
/// A request line longer than this is refused.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a request may take: a restart waits for the containers' grace period.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// A connection that has not sent its whole request line this long after connecting is
/// closed: `ctl` writes it at once, so only a stuck or idle client waits that long.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What `edgecore ctl` can ask of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// Restart the pod's running containers now (`edgecore ctl restart`).
    Restart { namespace: String, name: String },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
}

/// Asking the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "edgecore is not running with this data dir (nothing listens on {path}); start it, or pass the --data-dir it runs with"
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not allowed to reach edgecore's control socket {path}: it is root's (mode 0600, in a data dir of mode 0700); run edgecore ctl as root (sudo)"
    )]
    NotPermitted {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to edgecore on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("edgecore on {path} answered something unreadable: {why}")]
    BadAnswer { path: PathBuf, why: String },
}

/// Sends `request` to the daemon running on `data_dir` and waits for its answer.
pub async fn request(data_dir: &Path, request: &Request) -> Result<Response, ControlError> {
    let path = data_dir.join(SOCKET);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(&path).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::NotPermitted {
                path: path.clone(),
                source,
            }
        } else {
            ControlError::NotRunning {
                path: path.clone(),
                source,
            }
        }
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    write.shutdown().await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    serde_json::from_str(answer.trim_end()).map_err(|e| ControlError::BadAnswer {
        path: path.clone(),
        why: if answer.is_empty() {
            "the connection closed without an answer".into()
        } else {
            e.to_string()
        },
    })
}

/// Binds the socket: a stale file from an earlier run is replaced, and only root may connect.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = data_dir.join(SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until `shutdown`, handing pod requests to the pod manager (`None` when
/// this edgecore runs no pods).
pub async fn serve(
    listener: UnixListener,
    pods: Option<mpsc::Sender<pods::Request>>,
    shutdown: CancellationToken,
) {
    serve_with(listener, pods, shutdown, REQUEST_READ_TIMEOUT).await
}

async fn serve_with(
    listener: UnixListener,
    pods: Option<mpsc::Sender<pods::Request>>,
    shutdown: CancellationToken,
    read_timeout: Duration,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let pods = pods.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, pods, read_timeout).await {
                tracing::debug!(error = %e, "control socket: connection failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    pods: Option<mpsc::Sender<pods::Request>>,
    read_timeout: Duration,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    if tokio::time::timeout(read_timeout, reader.read_line(&mut line))
        .await
        .is_err()
    {
        let response = refuse(format!(
            "no request within {}; closing",
            humantime::format_duration(read_timeout)
        ));
        let mut out = serde_json::to_vec(&response).expect("a response serializes");
        out.push(b'\n');
        return write.write_all(&out).await;
    }
    let response = match serde_json::from_str::<Request>(line.trim_end()) {
        Err(_) if !line.ends_with('\n') => refuse(format!(
            "request not terminated by a newline within {MAX_REQUEST} bytes"
        )),
        Err(e) => refuse(format!("malformed request: {e}")),
        Ok(request) => {
            tracing::info!(?request, "local request");
            match tokio::time::timeout(REQUEST_TIMEOUT, handle(request, pods)).await {
                Ok(response) => response,
                Err(_) => refuse(format!(
                    "no answer within {}",
                    humantime::format_duration(REQUEST_TIMEOUT)
                )),
            }
        }
    };
    let mut out = serde_json::to_vec(&response).expect("a response serializes");
    out.push(b'\n');
    write.write_all(&out).await
}

fn refuse(message: String) -> Response {
    Response { ok: false, message }
}

async fn handle(request: Request, pods: Option<mpsc::Sender<pods::Request>>) -> Response {
    let Some(pods) = pods else {
        return refuse("this edgecore runs no pods (started with --no-pod-runtime)".into());
    };
    match request {
        Request::Restart { namespace, name } => {
            let (reply, answer) = oneshot::channel();
            let sent = pods
                .send(pods::Request::Restart {
                    namespace,
                    name,
                    reply,
                })
                .await;
            if sent.is_err() {
                return refuse("the pod manager has stopped (edgecore is shutting down)".into());
            }
            match answer.await {
                Ok(Ok(message)) => Response { ok: true, message },
                Ok(Err(message)) => refuse(message),
                Err(_) => refuse("the pod's worker stopped before answering".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let request = Request::Restart {
            namespace: "default".into(),
            name: "web".into(),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"restart":{"namespace":"default","name":"web"}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        assert!(serde_json::from_str::<Request>(r#"{"reboot":{}}"#).is_err());
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_read_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let shutdown = CancellationToken::new();
        let timeout = Duration::from_millis(300);
        tokio::spawn(serve_with(listener, None, shutdown.clone(), timeout));
        let stream = UnixStream::connect(dir.path().join(SOCKET)).await.unwrap();
        let started = std::time::Instant::now();
        // Connected, never writes: the daemon answers with the reason and closes.
        let mut answer = String::new();
        let mut stream = BufReader::new(stream);
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .expect("the daemon closed the idle connection")
            .unwrap();
        assert!(started.elapsed() >= timeout);
        let response: Response = serde_json::from_str(answer.trim_end()).unwrap();
        assert!(!response.ok);
        assert!(
            response.message.contains("no request within 300ms"),
            "{response:?}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn restart_reaches_the_pod_manager_and_its_answer_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(SOCKET))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only root may use the socket");
        let (tx, mut rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, Some(tx), shutdown.clone()));
        tokio::spawn(async move {
            while let Some(pods::Request::Restart {
                namespace,
                name,
                reply,
            }) = rx.recv().await
            {
                let _ = reply.send(if name == "web" {
                    Ok(format!("restarted {namespace}/{name}"))
                } else {
                    Err(format!("pod {namespace}/{name} is not bound to this node"))
                });
            }
        });
        let ok = request(
            dir.path(),
            &Request::Restart {
                namespace: "default".into(),
                name: "web".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(
            ok,
            Response {
                ok: true,
                message: "restarted default/web".into()
            }
        );
        let missing = request(
            dir.path(),
            &Request::Restart {
                namespace: "default".into(),
                name: "db".into(),
            },
        )
        .await
        .unwrap();
        assert!(!missing.ok);
        assert!(missing.message.contains("not bound"), "{}", missing.message);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn malformed_requests_get_a_clear_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, None, shutdown.clone()));
        let mut stream = UnixStream::connect(dir.path().join(SOCKET)).await.unwrap();
        stream.write_all(b"{not json\n").await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let response: Response = serde_json::from_str(answer.trim_end()).unwrap();
        assert!(!response.ok);
        assert!(
            response.message.starts_with("malformed request"),
            "{}",
            response.message
        );
        // Without a pod manager a valid request is refused with the reason.
        let no_pods = request(
            dir.path(),
            &Request::Restart {
                namespace: "a".into(),
                name: "b".into(),
            },
        )
        .await
        .unwrap();
        assert!(
            no_pods.message.contains("--no-pod-runtime"),
            "{}",
            no_pods.message
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn no_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(
            dir.path(),
            &Request::Restart {
                namespace: "a".into(),
                name: "b".into(),
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ControlError::NotRunning { .. }));
        assert!(err.to_string().contains("edgecore.sock"), "{err}");
    }
}
