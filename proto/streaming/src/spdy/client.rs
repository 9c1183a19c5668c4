//! The client role, as kubectl speaks it, toward a CRI streaming server: containerd's
//! `Exec`, `Attach` and `PortForward` answer with a URL (`http://127.0.0.1:PORT/exec/TOKEN`)
//! on its streaming server, the kubelet's own code, which upgrades a `POST` to SPDY/3.1.
//!
//! [`connect`] does the HTTP/1.1 upgrade over a TCP connection by hand (the request is one
//! fixed form, and the answer's head is capped at [`MAX_RESPONSE_HEAD`]), then runs a
//! [`Session`] on it. [`remotecommand`] and [`forward`] create the streams as kubectl does.

use std::time::Duration;

use bytes::Bytes;
use proto::stream::ExitStatus;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame::{Headers, SpdyError};
use super::session::{Role, Session, Stream};
use super::{PORTFORWARD_PROTOCOL, PROTOCOL_HEADER, RC_PROTOCOLS, UPGRADE};
use crate::RcOptions;

/// Largest response head read before the upgrade.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Deadline for the TCP connect and the upgrade's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest error-stream message kept.
pub const MAX_ERROR_MESSAGE: usize = 64 * 1024;

/// Reaching the streaming server or upgrading failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("streaming URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to the streaming server at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the streaming server at {0} did not answer the upgrade within {CONNECT_TIMEOUT:?}")]
    Timeout(String),
    #[error("the streaming server refused the upgrade: {status} {message}")]
    Refused { status: u16, message: String },
    #[error("malformed upgrade response from the streaming server: {0}")]
    Malformed(String),
    #[error("creating the {stream} stream: {source}")]
    Stream {
        stream: &'static str,
        #[source]
        source: SpdyError,
    },
}

/// An upgraded connection: the session and the protocol the server chose.
#[derive(Debug)]
pub struct Connected {
    pub session: Session,
    pub protocol: String,
}

/// Connects to `url` (`http://HOST:PORT/PATH`), asks for SPDY/3.1 with `protocols` (most
/// preferred first) and starts the client session.
pub async fn connect(url: &str, protocols: &[&str]) -> Result<Connected, ClientError> {
    let bad = |reason: &str| ClientError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// streaming URLs are supported"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    let addr = match authority.port_u16() {
        Some(_) => authority.to_string(),
        None => format!("{}:80", authority.host()),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let attempt = async {
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        upgrade(tcp, authority.as_ref(), path, protocols).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| ClientError::Timeout(addr.clone()))?
}

async fn upgrade(
    mut tcp: TcpStream,
    host: &str,
    path: &str,
    protocols: &[&str],
) -> Result<Connected, ClientError> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\nContent-Length: 0\r\n"
    );
    for p in protocols {
        head.push_str(&format!("{PROTOCOL_HEADER}: {p}\r\n"));
    }
    head.push_str("\r\n");
    let io = |e: std::io::Error| ClientError::Malformed(format!("i/o during the upgrade: {e}"));
    tcp.write_all(head.as_bytes()).await.map_err(io)?;
    // Read the response head; what follows it already belongs to the session.
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(ClientError::Malformed(format!(
                "no end of the response head in {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        let mut chunk = [0u8; 2048];
        let n = tcp.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(ClientError::Malformed(
                "the connection closed before the response head ended".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let response = Response::parse(&buf[..end])?;
    let rest = Bytes::copy_from_slice(&buf[end..]);
    if response.status != 101 {
        let body = read_body(&mut tcp, &response, rest).await;
        return Err(ClientError::Refused {
            status: response.status,
            message: format!("{} {}", response.reason, body.trim())
                .trim()
                .to_string(),
        });
    }
    if !response
        .header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case(UPGRADE))
    {
        return Err(ClientError::Malformed(format!(
            "101 without Upgrade: {UPGRADE}"
        )));
    }
    let protocol = response
        .header(PROTOCOL_HEADER)
        .unwrap_or_default()
        .to_string();
    if !protocols.contains(&protocol.as_str()) {
        return Err(ClientError::Malformed(format!(
            "the server chose protocol {protocol:?}, not one of {protocols:?}"
        )));
    }
    let (r, w) = tcp.into_split();
    let reader = std::io::Cursor::new(rest).chain(r);
    let (session, incoming) = Session::new(reader, w, Role::Client);
    // Servers open no streams toward a client; any they try is refused.
    drop(incoming);
    Ok(Connected { session, protocol })
}

async fn read_body(tcp: &mut TcpStream, response: &Response, rest: Bytes) -> String {
    let want = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(MAX_ERROR_MESSAGE)
        .min(MAX_ERROR_MESSAGE);
    let mut body = rest.to_vec();
    let mut chunk = [0u8; 2048];
    while body.len() < want {
        match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    body.truncate(want);
    String::from_utf8_lossy(&body).into_owned()
}

struct Response {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
}

impl Response {
    fn parse(head: &[u8]) -> Result<Response, ClientError> {
        let text = std::str::from_utf8(head)
            .map_err(|_| ClientError::Malformed("the response head is not UTF-8".into()))?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(ClientError::Malformed(format!(
                "status line {status_line:?}"
            )));
        }
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| ClientError::Malformed(format!("status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_string();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.split_once(':')
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .ok_or_else(|| ClientError::Malformed(format!("header line {l:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Response {
            status,
            reason,
            headers,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn stream_headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The client's end of a remote command: the streams the server expects for `options`.
#[derive(Debug)]
pub struct RcClient {
    pub session: Session,
    pub protocol: String,
    pub error: Stream,
    pub stdin: Option<Stream>,
    pub stdout: Option<Stream>,
    pub stderr: Option<Stream>,
    pub resize: Option<Stream>,
}

/// Upgrades `url` for an exec or attach and creates its streams, in kubectl's order: error,
/// stdin, stdout, stderr (not with a tty), resize (with a tty).
pub async fn remotecommand(url: &str, options: RcOptions) -> Result<RcClient, ClientError> {
    let Connected { session, protocol } = connect(url, &RC_PROTOCOLS).await?;
    let open = |kind: &'static str| {
        let session = session.clone();
        async move {
            session
                .open(stream_headers(&[("streamtype", kind)]))
                .await
                .map_err(|source| ClientError::Stream {
                    stream: kind,
                    source,
                })
        }
    };
    let error = open("error").await?;
    let stdin = if options.stdin {
        Some(open("stdin").await?)
    } else {
        None
    };
    let stdout = if options.stdout {
        Some(open("stdout").await?)
    } else {
        None
    };
    let stderr = if options.stderr && !options.tty {
        Some(open("stderr").await?)
    } else {
        None
    };
    let resize = if options.tty && protocol != "v2.channel.k8s.io" && protocol != "channel.k8s.io" {
        Some(open("resize").await?)
    } else {
        None
    };
    Ok(RcClient {
        session,
        protocol,
        error,
        stdin,
        stdout,
        stderr,
        resize,
    })
}

/// A resize message as the server reads it.
pub fn resize_message(width: u16, height: u16) -> Bytes {
    Bytes::from(format!("{{\"Width\":{width},\"Height\":{height}}}\n"))
}

/// How the command ended, from what the server wrote on the error stream: a v4 `Status`
/// (`Success`, or `NonZeroExitCode` with an `ExitCode` cause), or before v4 a message
/// (nothing for success).
pub fn exit_status(protocol: &str, body: &[u8]) -> ExitStatus {
    let failure = |message: String| ExitStatus {
        code: None,
        message,
    };
    if protocol != "v4.channel.k8s.io" {
        if body.is_empty() {
            return ExitStatus {
                code: Some(0),
                message: String::new(),
            };
        }
        let text = String::from_utf8_lossy(body).into_owned();
        let code = text
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
            .filter(|_| text.contains("exit code"));
        return ExitStatus {
            code,
            message: text,
        };
    }
    if body.is_empty() {
        return failure("the runtime's session ended without an exit status".into());
    }
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(body) else {
        return failure(String::from_utf8_lossy(body).into_owned());
    };
    if status["status"] == "Success" {
        return ExitStatus {
            code: Some(0),
            message: String::new(),
        };
    }
    let message = status["message"].as_str().unwrap_or_default().to_string();
    if status["reason"] == "NonZeroExitCode" {
        let code = status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse::<i32>().ok());
        if let Some(code) = code {
            return ExitStatus {
                code: Some(code),
                message,
            };
        }
    }
    failure(message)
}

/// Upgrades `url` for a port-forward session (`portforward.k8s.io`).
pub async fn portforward(url: &str) -> Result<Session, ClientError> {
    Ok(connect(url, &[PORTFORWARD_PROTOCOL]).await?.session)
}

/// Opens one forwarded connection to `port` on a port-forward session: its error stream (the
/// client never writes to it, so its half is closed at once), then its data stream.
pub async fn forward(
    session: &Session,
    port: u16,
    request_id: u32,
) -> Result<(Stream, Stream), ClientError> {
    let port = port.to_string();
    let request = request_id.to_string();
    let mut error = session
        .open(stream_headers(&[
            ("streamtype", "error"),
            ("port", &port),
            ("requestid", &request),
        ]))
        .await
        .map_err(|source| ClientError::Stream {
            stream: "error",
            source,
        })?;
    let _ = error.send.finish().await;
    let data = session
        .open(stream_headers(&[
            ("streamtype", "data"),
            ("port", &port),
            ("requestid", &request),
        ]))
        .await
        .map_err(|source| ClientError::Stream {
            stream: "data",
            source,
        })?;
    Ok((error, data))
}

/// Reads a stream's whole content as text (for error streams), bounded.
pub async fn read_message<R: AsyncRead + Unpin>(mut r: R) -> String {
    let mut buf = Vec::new();
    let _ = (&mut r)
        .take(MAX_ERROR_MESSAGE as u64)
        .read_to_end(&mut buf)
        .await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::exit_status_json;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn exit_statuses_read_back_as_written() {
        for code in [Some(0), Some(3), Some(137)] {
            let body = exit_status_json(&ExitStatus {
                code,
                message: String::new(),
            });
            assert_eq!(exit_status("v4.channel.k8s.io", &body).code, code);
        }
        let failed = exit_status(
            "v4.channel.k8s.io",
            br#"{"status":"Failure","message":"boom"}"#,
        );
        assert_eq!((failed.code, failed.message.as_str()), (None, "boom"));
        assert_eq!(exit_status("v4.channel.k8s.io", b"").code, None);
        assert_eq!(exit_status("v3.channel.k8s.io", b"").code, Some(0));
        assert_eq!(
            exit_status(
                "v3.channel.k8s.io",
                b"command terminated with non-zero exit code: exit code 3"
            )
            .code,
            Some(3)
        );
    }

    #[test]
    fn response_heads_parse_and_garbage_is_named() {
        let r = Response::parse(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 101);
        assert_eq!(r.header(PROTOCOL_HEADER), Some("v4.channel.k8s.io"));
        assert!(Response::parse(b"SSH-2.0\r\n\r\n").is_err());
        assert!(Response::parse(b"HTTP/1.1 101 x\r\nno colon\r\n\r\n").is_err());
    }

    /// The client and this crate's server over a real TCP connection through hyper: the
    /// upgrade, the version negotiation and a port-forward echo.
    #[tokio::test]
    async fn client_upgrades_against_the_server_role_over_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dial: crate::Dial = Arc::new(|_port| {
            Box::pin(async move {
                let (near, far) = tokio::io::duplex(4096);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(far);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                let (r, w) = tokio::io::split(near);
                Ok((
                    Box::pin(w) as crate::BoxWrite,
                    Box::pin(r) as crate::BoxRead,
                ))
            })
        });
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    let dial = dial.clone();
                    async move {
                        let response = match crate::portforward(&mut req, vec![], dial) {
                            Ok(r) => r,
                            Err(rejection) => {
                                let mut r = http::Response::new(Bytes::from(rejection.message));
                                *r.status_mut() =
                                    http::StatusCode::from_u16(rejection.code).unwrap();
                                r
                            }
                        };
                        Ok::<_, std::convert::Infallible>(response.map(http_body_full))
                    }
                });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades()
                .await
                .unwrap();
        });
        let url = format!("http://{addr}/portforward/token");
        let session = portforward(&url).await.unwrap();
        let (mut error, mut data) = forward(&session, 8080, 0).await.unwrap();
        data.send
            .send(Bytes::from_static(b"echo me"))
            .await
            .unwrap();
        data.send.finish().await.unwrap();
        assert_eq!(data.recv.read_to_end(1024).await.unwrap(), b"echo me");
        assert_eq!(error.recv.read_to_end(1024).await.unwrap(), b"");
    }

    fn http_body_full(b: Bytes) -> http_body_util_full::Full {
        http_body_util_full::Full(Some(b))
    }

    /// A one-shot body for the test server (hyper wants a `Body`).
    mod http_body_util_full {
        use bytes::Bytes;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        pub struct Full(pub Option<Bytes>);

        impl hyper::body::Body for Full {
            type Data = Bytes;
            type Error = std::convert::Infallible;

            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
                Poll::Ready(self.0.take().map(|b| Ok(hyper::body::Frame::data(b))))
            }
        }
    }

    #[tokio::test]
    async fn a_refused_upgrade_names_the_status_and_message() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            tcp.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\n\r\nunknown token")
                .await
                .unwrap();
        });
        let err = connect(&format!("http://{addr}/exec/x"), &RC_PROTOCOLS)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("404 Not Found unknown token"),
            "{err}"
        );
        let err = connect("https://127.0.0.1:1/exec/x", &RC_PROTOCOLS)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
    }
}
