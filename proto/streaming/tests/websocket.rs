//! The WebSocket server role end to end: a real hyper HTTP/1.1 server on 127.0.0.1 answering
//! with `streaming::remotecommand` / `streaming::portforward`, a real WebSocket client
//! (tokio-tungstenite) speaking what kubectl and the kubelet's other clients speak, and the
//! tunnel's far end (the edge's side) as `tokio::io::duplex` pairs driven by each test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proto::stream::{ExitStatus, MAX_RC_FRAME, RcCodec, RcFrame};
use streaming::{BoxRead, BoxWrite, Dial, RcOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::codec::Framed;

/// Buffer of each tunnel pair: small, so that flow control shows within a few frames.
const TUNNEL_BUFFER: usize = 64 * 1024;
/// A port whose dial fails.
const REFUSED_PORT: u16 = 9;
const STEP: Duration = Duration::from_secs(5);

/// The edge's end of a tunnel the server opened.
enum EdgeEnd {
    Exec(Framed<DuplexStream, RcCodec>),
    Port(u16, DuplexStream),
}

struct Server {
    addr: SocketAddr,
    edges: mpsc::UnboundedReceiver<EdgeEnd>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("bound address");
        let (tx, edges) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.expect("accept");
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, tx.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Server { addr, edges }
    }

    async fn exec_edge(&mut self) -> Framed<DuplexStream, RcCodec> {
        match within(self.edges.recv())
            .await
            .expect("the server opened a tunnel")
        {
            EdgeEnd::Exec(edge) => edge,
            EdgeEnd::Port(port, _) => panic!("expected an exec tunnel, got port {port}"),
        }
    }

    async fn port_edge(&mut self) -> (u16, DuplexStream) {
        match within(self.edges.recv())
            .await
            .expect("the server opened a tunnel")
        {
            EdgeEnd::Port(port, edge) => (port, edge),
            EdgeEnd::Exec(_) => panic!("expected a port tunnel, got an exec"),
        }
    }

    /// Connects a WebSocket client offering `protocols`; returns the negotiated one.
    async fn connect(
        &self,
        path: &str,
        protocols: &[&str],
    ) -> Result<(WebSocketStream<TcpStream>, Option<String>), WsError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .expect("connect to the server");
        self.connect_on(tcp, path, protocols).await
    }

    async fn connect_on(
        &self,
        tcp: TcpStream,
        path: &str,
        protocols: &[&str],
    ) -> Result<(WebSocketStream<TcpStream>, Option<String>), WsError> {
        let mut request = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .expect("a valid ws:// URL");
        if !protocols.is_empty() {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                protocols.join(", ").parse().expect("a header value"),
            );
        }
        let (ws, response) = tokio_tungstenite::client_async(request, tcp).await?;
        let negotiated = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().expect("an ASCII protocol").to_string());
        Ok((ws, negotiated))
    }
}

async fn handle(
    mut req: hyper::Request<Incoming>,
    tx: mpsc::UnboundedSender<EdgeEnd>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let flag = |name: &str| {
        query
            .iter()
            .any(|(k, v)| k == name && (v == "1" || v == "true"))
    };
    let answer = match req.uri().path() {
        "/exec" => {
            let options = RcOptions {
                stdin: flag("stdin"),
                stdout: flag("stdout"),
                stderr: flag("stderr"),
                tty: flag("tty"),
            };
            let (cloud, edge) = tokio::io::duplex(TUNNEL_BUFFER);
            let (r, w) = tokio::io::split(cloud);
            let _ = tx.send(EdgeEnd::Exec(Framed::new(edge, RcCodec)));
            streaming::remotecommand(&mut req, options, (Box::pin(w), Box::pin(r)))
        }
        "/portforward" => {
            let ports = query
                .iter()
                .filter(|(k, _)| k == "ports")
                .map(|(_, v)| v.parse().expect("a port number"))
                .collect();
            let dial: Dial = Arc::new(move |port| {
                let tx = tx.clone();
                Box::pin(async move {
                    if port == REFUSED_PORT {
                        return Err("connect: connection refused".to_string());
                    }
                    let (cloud, edge) = tokio::io::duplex(TUNNEL_BUFFER);
                    let (r, w) = tokio::io::split(cloud);
                    let _ = tx.send(EdgeEnd::Port(port, edge));
                    Ok((Box::pin(w) as BoxWrite, Box::pin(r) as BoxRead))
                })
            });
            streaming::portforward(&mut req, ports, dial)
        }
        other => panic!("no route {other}"),
    };
    Ok(match answer {
        Ok(response) => response.map(Full::new),
        Err(rejection) => hyper::Response::builder()
            .status(rejection.code)
            .body(Full::new(Bytes::from(rejection.message)))
            .expect("a rejection response"),
    })
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("timed out")
}

/// The next data message's channel and bytes (binary protocols), skipping control frames.
async fn next_data(ws: &mut WebSocketStream<TcpStream>) -> (u8, Bytes) {
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Binary(b))) => return (b[0], b.slice(1..)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a binary data message, got {other:?}"),
        }
    }
}

/// The close frame the server sends next.
async fn next_close(ws: &mut WebSocketStream<TcpStream>) -> CloseFrame {
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => return frame,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn next_frame(edge: &mut Framed<DuplexStream, RcCodec>) -> Option<RcFrame> {
    within(edge.next())
        .await
        .map(|f| f.expect("a remote command frame from the server"))
}

fn exit(code: i32) -> RcFrame {
    RcFrame::Exit(ExitStatus {
        code: Some(code),
        message: String::new(),
    })
}

fn binary(channel: u8, data: &[u8]) -> Message {
    let mut b = vec![channel];
    b.extend_from_slice(data);
    Message::binary(b)
}

#[tokio::test]
async fn v5_exec_carries_stdin_its_close_output_and_exit_code_3() {
    let mut server = Server::start().await;
    let (mut ws, negotiated) = server
        .connect(
            "/exec?stdin=true&stdout=true&stderr=true",
            &["v5.channel.k8s.io", "v4.channel.k8s.io"],
        )
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some("v5.channel.k8s.io"));
    let mut edge = server.exec_edge().await;
    // The kubelet's "established" notice: an empty message on stdout.
    assert_eq!(next_data(&mut ws).await, (1, Bytes::new()));

    ws.send(binary(0, b"hello\n")).await.unwrap();
    assert_eq!(
        next_frame(&mut edge).await,
        Some(RcFrame::Stdin(Bytes::from_static(b"hello\n")))
    );
    ws.send(binary(255, &[0])).await.unwrap();
    assert_eq!(next_frame(&mut edge).await, Some(RcFrame::StdinClosed));

    edge.send(RcFrame::Stdout(Bytes::from_static(b"out")))
        .await
        .unwrap();
    edge.send(RcFrame::Stderr(Bytes::from_static(b"err")))
        .await
        .unwrap();
    edge.send(exit(3)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, (1, Bytes::from_static(b"out")));
    assert_eq!(next_data(&mut ws).await, (2, Bytes::from_static(b"err")));
    let (channel, status) = next_data(&mut ws).await;
    assert_eq!(channel, 3);
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
    assert_eq!(next_close(&mut ws).await.code, CloseCode::Normal);
    // The tunnel is finished towards the edge once the session is over.
    assert_eq!(next_frame(&mut edge).await, None);
}

#[tokio::test]
async fn v4_tty_resizes_reports_success_and_has_no_close_signal() {
    let mut server = Server::start().await;
    let (mut ws, negotiated) = server
        .connect("/exec?stdin=1&stdout=1&tty=1", &["v4.channel.k8s.io"])
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some("v4.channel.k8s.io"));
    let mut edge = server.exec_edge().await;
    assert_eq!(next_data(&mut ws).await, (1, Bytes::new()));

    ws.send(binary(4, b"not json")).await.unwrap();
    ws.send(binary(4, b"{\"Width\":120,\"Height\":40}\n"))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut edge).await,
        Some(RcFrame::Resize {
            width: 120,
            height: 40
        })
    );
    // 255 is no close signal before v5: it is a channel nobody has, and is ignored.
    ws.send(binary(255, &[0])).await.unwrap();
    ws.send(binary(0, b"x")).await.unwrap();
    assert_eq!(
        next_frame(&mut edge).await,
        Some(RcFrame::Stdin(Bytes::from_static(b"x")))
    );

    edge.send(exit(0)).await.unwrap();
    let (channel, status) = next_data(&mut ws).await;
    assert_eq!(channel, 3);
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["status"], "Success");
    assert_eq!(next_close(&mut ws).await.code, CloseCode::Normal);
}

#[tokio::test]
async fn base64_protocol_speaks_text_messages_and_text_status() {
    let mut server = Server::start().await;
    let (mut ws, negotiated) = server
        .connect("/exec?stdin=1&stdout=1", &["base64.channel.k8s.io"])
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some("base64.channel.k8s.io"));
    let mut edge = server.exec_edge().await;
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("1")
    );
    ws.send(Message::text("0aGk=")).await.unwrap();
    assert_eq!(
        next_frame(&mut edge).await,
        Some(RcFrame::Stdin(Bytes::from_static(b"hi")))
    );
    edge.send(RcFrame::Stdout(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    edge.send(exit(2)).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("1aGk=")
    );
    // Before v4 the error channel carries the message text (here in base64).
    let Some(Ok(Message::Text(status))) = within(ws.next()).await else {
        panic!("expected the error channel");
    };
    let (channel, body) = status.split_at(1);
    assert_eq!(channel, "3");
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    assert_eq!(body, b"command terminated with non-zero exit code: 2");
    assert_eq!(next_close(&mut ws).await.code, CloseCode::Normal);

    // Bad base64 closes with a reason naming the channel.
    let (mut ws, _) = server
        .connect("/exec?stdin=1&stdout=1", &["base64.channel.k8s.io"])
        .await
        .unwrap();
    let mut edge = server.exec_edge().await;
    let _notice = within(ws.next()).await;
    ws.send(Message::text("0!!not base64")).await.unwrap();
    let close = next_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Invalid);
    assert!(close.reason.contains("channel 0"), "{}", close.reason);
    assert_eq!(next_frame(&mut edge).await, None);
}

#[tokio::test]
async fn protocols_are_negotiated_from_the_clients_list_or_refused_with_400() {
    let server = Server::start().await;
    let (_ws, negotiated) = server
        .connect(
            "/exec?stdout=1",
            &[
                "v9.channel.k8s.io",
                "v4.base64.channel.k8s.io",
                "v5.channel.k8s.io",
            ],
        )
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some("v4.base64.channel.k8s.io"));

    // No subprotocol offered: channel.k8s.io, and no protocol header in the answer.
    let (_ws, negotiated) = server.connect("/exec?stdout=1", &[]).await.unwrap();
    assert_eq!(negotiated, None);

    let refused = server
        .connect("/exec?stdout=1", &["v9.channel.k8s.io"])
        .await
        .unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(response.status(), 400);
    let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
    assert!(body.contains("v9.channel.k8s.io"), "{body}");
    assert!(body.contains("v5.channel.k8s.io"), "{body}");

    let refused = server
        .connect("/exec", &["v5.channel.k8s.io"])
        .await
        .unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(response.status(), 400);
    let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
    assert!(
        body.contains("at least 1 of stdin, stdout, stderr"),
        "{body}"
    );
}

#[tokio::test]
async fn a_plain_request_and_a_bad_version_are_refused_before_any_upgrade() {
    let server = Server::start().await;
    for (headers, needle) in [
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Version",
        ),
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Key",
        ),
        ("", "Upgrade request required"),
    ] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let request =
            format!("GET /exec?stdout=1 HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        within(tcp.read_to_string(&mut answer)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(needle), "{needle}: {answer}");
    }
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009_and_ends_the_tunnel() {
    let mut server = Server::start().await;
    let (mut ws, _) = server
        .connect("/exec?stdin=1&stdout=1", &["v5.channel.k8s.io"])
        .await
        .unwrap();
    let mut edge = server.exec_edge().await;
    assert_eq!(next_data(&mut ws).await, (1, Bytes::new()));
    let big = vec![b'a'; streaming::websocket::MAX_MESSAGE_SIZE + 10];
    // The server may close before it read the whole message: a failed send is fine.
    let _ = ws.send(binary(0, &big)).await;
    let close = next_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size);
    assert!(close.reason.contains("limit"), "{}", close.reason);
    assert_eq!(next_frame(&mut edge).await, None);
}

#[tokio::test]
async fn the_edge_ending_without_an_exit_is_reported_on_the_error_channel() {
    let mut server = Server::start().await;
    let (mut ws, _) = server
        .connect("/exec?stdout=1", &["v5.channel.k8s.io"])
        .await
        .unwrap();
    let edge = server.exec_edge().await;
    assert_eq!(next_data(&mut ws).await, (1, Bytes::new()));
    drop(edge);
    let (channel, status) = next_data(&mut ws).await;
    assert_eq!(channel, 3);
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["status"], "Failure");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("without an exit status"),
        "{status}"
    );
    assert_eq!(next_close(&mut ws).await.code, CloseCode::Normal);
}

#[tokio::test]
async fn the_clients_close_finishes_the_tunnel() {
    let mut server = Server::start().await;
    let (mut ws, _) = server
        .connect("/exec?stdin=1&stdout=1", &["v5.channel.k8s.io"])
        .await
        .unwrap();
    let mut edge = server.exec_edge().await;
    assert_eq!(next_data(&mut ws).await, (1, Bytes::new()));
    ws.close(None).await.unwrap();
    assert_eq!(next_frame(&mut edge).await, None);
}

#[tokio::test]
async fn a_stalled_client_leaves_the_tunnel_unread() {
    let mut server = Server::start().await;
    // A client that does not read, with a small receive buffer.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut ws, _) = server
        .connect_on(tcp, "/exec?stdout=1", &["v5.channel.k8s.io"])
        .await
        .unwrap();
    let mut edge = server.exec_edge().await;

    const ATTEMPT: usize = 64 << 20;
    let mut written = 0usize;
    let mut stalled = false;
    while written < ATTEMPT {
        let chunk: Vec<u8> = (written..written + MAX_RC_FRAME).map(|i| i as u8).collect();
        let send = edge.send(RcFrame::Stdout(Bytes::from(chunk)));
        match tokio::time::timeout(Duration::from_secs(1), send).await {
            Ok(sent) => sent.unwrap(),
            Err(_) => {
                stalled = true;
                break;
            }
        }
        written += MAX_RC_FRAME;
    }
    assert!(
        stalled,
        "the edge wrote all {written} bytes to a stalled client"
    );
    assert!(
        written < 16 << 20,
        "{written} bytes were taken from the tunnel for a stalled client"
    );

    // The frame whose send stalled is in the edge's own buffer: flush it while reading.
    let reader = async {
        let mut received = Vec::new();
        let (channel, notice) = next_data(&mut ws).await;
        assert_eq!((channel, notice.len()), (1, 0));
        while received.len() < written + MAX_RC_FRAME {
            let (channel, data) = next_data(&mut ws).await;
            assert_eq!(channel, 1);
            received.extend_from_slice(&data);
        }
        received
    };
    let (received, flushed) = tokio::join!(reader, within(edge.flush()));
    flushed.unwrap();
    assert_eq!(received.len(), written + MAX_RC_FRAME);
    assert!(
        received.iter().enumerate().all(|(i, b)| *b == i as u8),
        "stdout arrived out of order"
    );
}

#[tokio::test]
async fn a_stalled_edge_leaves_the_client_unread() {
    let mut server = Server::start().await;
    let (mut ws, _) = server
        .connect("/exec?stdin=1&stdout=1", &["v5.channel.k8s.io"])
        .await
        .unwrap();
    let mut edge = server.exec_edge().await;
    assert_eq!(next_data(&mut ws).await, (1, Bytes::new()));

    const CHUNK: usize = 256 * 1024;
    const ATTEMPT: usize = 128 << 20;
    let mut sent = 0usize;
    let mut stalled = false;
    while sent < ATTEMPT {
        let chunk: Vec<u8> = (sent..sent + CHUNK).map(|i| (i % 251) as u8).collect();
        match tokio::time::timeout(Duration::from_secs(1), ws.send(binary(0, &chunk))).await {
            Ok(result) => result.unwrap(),
            Err(_) => {
                stalled = true;
                sent += CHUNK; // queued in the client's buffer, flushed below
                break;
            }
        }
        sent += CHUNK;
    }
    assert!(
        stalled,
        "the client sent all {sent} bytes to a stalled edge"
    );
    assert!(
        sent < 48 << 20,
        "{sent} bytes were taken from the client for a stalled edge"
    );

    let reader = async {
        let mut received = Vec::new();
        while received.len() < sent {
            match next_frame(&mut edge).await {
                Some(RcFrame::Stdin(data)) => {
                    assert!(data.len() <= MAX_RC_FRAME);
                    received.extend_from_slice(&data);
                }
                other => panic!("expected stdin, got {other:?}"),
            }
        }
        received
    };
    let (received, flushed) = tokio::join!(reader, within(ws.flush()));
    flushed.unwrap();
    assert_eq!(received.len(), sent);
    assert!(
        received
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8),
        "stdin arrived out of order"
    );
}

#[tokio::test]
async fn v4_portforward_prefixes_ports_forwards_bytes_and_reports_a_failed_dial() {
    let mut server = Server::start().await;
    let (mut ws, negotiated) = server
        .connect(
            &format!("/portforward?ports=8080&ports={REFUSED_PORT}"),
            &["v4.channel.k8s.io"],
        )
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some("v4.channel.k8s.io"));
    let port = 8080u16.to_le_bytes();
    let refused = REFUSED_PORT.to_le_bytes();
    assert_eq!(next_data(&mut ws).await, (0, Bytes::copy_from_slice(&port)));
    assert_eq!(next_data(&mut ws).await, (1, Bytes::copy_from_slice(&port)));
    assert_eq!(
        next_data(&mut ws).await,
        (2, Bytes::copy_from_slice(&refused))
    );
    assert_eq!(
        next_data(&mut ws).await,
        (3, Bytes::copy_from_slice(&refused))
    );
    let (dialed, mut edge) = server.port_edge().await;
    assert_eq!(dialed, 8080);
    let (channel, error) = next_data(&mut ws).await;
    assert_eq!(channel, 3);
    let error = String::from_utf8(error.to_vec()).unwrap();
    assert!(
        error.contains("port 9") && error.contains("connection refused"),
        "{error}"
    );

    ws.send(binary(0, b"GET / HTTP/1.0\r\n\r\n")).await.unwrap();
    let mut request = [0u8; 18];
    within(edge.read_exact(&mut request)).await.unwrap();
    assert_eq!(&request, b"GET / HTTP/1.0\r\n\r\n");
    edge.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        (0, Bytes::from_static(b"HTTP/1.0 200 OK\r\n\r\nhello"))
    );
    // The pod closing its side ends the only forwarded connection, and the session.
    drop(edge);
    assert_eq!(next_close(&mut ws).await.code, CloseCode::Normal);
}

#[tokio::test]
async fn portforward_without_ports_is_refused() {
    let server = Server::start().await;
    let refused = server
        .connect("/portforward", &["v4.channel.k8s.io"])
        .await
        .unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(response.status(), 400);
    let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
    assert!(body.contains("\"ports\" is required"), "{body}");
}

#[tokio::test]
async fn the_spdy_tunnel_subprotocol_is_accepted_without_ports() {
    let server = Server::start().await;
    let (mut ws, negotiated) = server
        .connect(
            "/portforward",
            &["SPDY/3.1+portforward.k8s.io", "v4.channel.k8s.io"],
        )
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some("SPDY/3.1+portforward.k8s.io"));
    // The SPDY session itself is `spdy::server::serve_portforward`'s; here the connection
    // only has to end once the client closes.
    let _ = ws.close(None).await;
    within(async { while let Some(Ok(_)) = ws.next().await {} }).await;
}
