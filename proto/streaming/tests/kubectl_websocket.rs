//! The installed kubectl binaries (1.30 and later speak `v5.channel.k8s.io` over WebSocket
//! first) against `streaming::remotecommand` behind a fake API server: a hyper server on
//! 127.0.0.1 that answers kubectl's discovery and its `GET pod` with fixed documents and
//! serves `pods/exec` with the code under test. The tunnel's far end is a scripted edge that
//! plays the command kubectl asked for (`cat`, `sh -c 'exit 3'`, a write to stderr).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proto::stream::{ExitStatus, RcCodec, RcFrame};
use streaming::RcOptions;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

const KUBECTL_DIR: &str = "/usr/lib/google-cloud-sdk/bin";
/// The kubectl versions whose first try is WebSocket v5 (1.29 needs an opt-in variable).
const WEBSOCKET_KUBECTLS: [&str; 4] = ["1.30", "1.31", "1.32", "1.33"];

const POD: &str = r#"{"apiVersion":"v1","kind":"Pod",
 "metadata":{"name":"p","namespace":"default","uid":"u1"},
 "spec":{"nodeName":"edge-1","containers":[{"name":"c","image":"busybox"}]},
 "status":{"phase":"Running","containerStatuses":[{"name":"c","ready":true,"restartCount":0,
   "image":"busybox","imageID":"","state":{"running":{}}}]}}"#;
const API_VERSIONS: &str = r#"{"kind":"APIVersions","versions":["v1"],
 "serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"127.0.0.1"}]}"#;
const API_GROUPS: &str = r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#;
const CORE_RESOURCES: &str = r#"{"kind":"APIResourceList","groupVersion":"v1","resources":[
 {"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list"]},
 {"name":"pods/exec","singularName":"","namespaced":true,"kind":"PodExecOptions","verbs":["create","get"]}]}"#;

/// Starts the fake API server; every exec's tunnel end is played by [`edge`].
async fn fake_apiserver() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(handle))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn handle(
    mut req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let document = |body: &'static str| {
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a document response")
    };
    let path = req.uri().path().to_string();
    Ok(match path.as_str() {
        "/api" => document(API_VERSIONS),
        "/apis" => document(API_GROUPS),
        "/api/v1" => document(CORE_RESOURCES),
        "/api/v1/namespaces/default/pods/p" => document(POD),
        "/api/v1/namespaces/default/pods/p/exec"
            if streaming::transport(&req) != Some(streaming::Transport::WebSocket) =>
        {
            // Only WebSocket here: a fallback to SPDY would fail the test, not hide.
            hyper::Response::builder()
                .status(400)
                .body(Full::new(Bytes::from_static(
                    b"this fake API server speaks WebSocket only",
                )))
                .expect("a refusal")
        }
        "/api/v1/namespaces/default/pods/p/exec" => {
            let query: Vec<(String, String)> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect();
            let flag = |name: &str| query.iter().any(|(k, v)| k == name && v == "true");
            let options = RcOptions {
                stdin: flag("stdin"),
                stdout: flag("stdout"),
                stderr: flag("stderr"),
                tty: flag("tty"),
            };
            let command: Vec<String> = query
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect();
            let (cloud, edge_end) = tokio::io::duplex(64 * 1024);
            let (r, w) = tokio::io::split(cloud);
            match streaming::remotecommand(&mut req, options, (Box::pin(w), Box::pin(r))) {
                Ok(response) => {
                    tokio::spawn(edge(command, Framed::new(edge_end, RcCodec)));
                    response.map(Full::new)
                }
                Err(rejection) => hyper::Response::builder()
                    .status(rejection.code)
                    .body(Full::new(Bytes::from(rejection.message)))
                    .expect("a rejection response"),
            }
        }
        _ => hyper::Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .expect("a 404"),
    })
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii escape");
                out.push(u8::from_str_radix(hex, 16).expect("a hex escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8 query")
}

/// How long the scripted edge waits before its first frame. A real edge's first byte comes
/// after a QUIC round trip and a CRI exec, tens of milliseconds after the upgrade. client-go's
/// WebSocket executor (1.30 to at least 1.36) starts reading before it registers its streams,
/// and drops, with "Unknown stream id", any message that beats the registration; an edge that
/// answers in microseconds loses its output to that race, which no real edge can win.
const EDGE_FIRST_BYTE: Duration = Duration::from_millis(100);

/// The edge's side of the tunnel, playing the few commands the tests run.
async fn edge(command: Vec<String>, mut tunnel: Framed<DuplexStream, RcCodec>) {
    tokio::time::sleep(EDGE_FIRST_BYTE).await;
    let exit = |code| {
        RcFrame::Exit(ExitStatus {
            code: Some(code),
            message: String::new(),
        })
    };
    let argv: Vec<&str> = command.iter().map(String::as_str).collect();
    match argv.as_slice() {
        ["cat"] => {
            while let Some(Ok(frame)) = tunnel.next().await {
                match frame {
                    RcFrame::Stdin(data) => {
                        let _ = tunnel.send(RcFrame::Stdout(data)).await;
                    }
                    RcFrame::StdinClosed => break,
                    _ => {}
                }
            }
            let _ = tunnel.send(exit(0)).await;
        }
        ["stty", "size"] => {
            // A terminal session: answer with the first size the client reports.
            while let Some(Ok(frame)) = tunnel.next().await {
                if let RcFrame::Resize { width, height } = frame {
                    let size = format!("{height} {width}\r\n");
                    let _ = tunnel.send(RcFrame::Stdout(Bytes::from(size))).await;
                    break;
                }
            }
            let _ = tunnel.send(exit(0)).await;
        }
        ["sh", "-c", "exit 3"] => {
            let _ = tunnel.send(exit(3)).await;
        }
        ["sh", "-c", "echo oops >&2"] => {
            let _ = tunnel
                .send(RcFrame::Stderr(Bytes::from_static(b"oops\n")))
                .await;
            let _ = tunnel.send(exit(0)).await;
        }
        other => {
            let _ = tunnel
                .send(RcFrame::Exit(ExitStatus {
                    code: None,
                    message: format!("the scripted edge does not play {other:?}"),
                }))
                .await;
        }
    }
}

/// Runs `kubectl.VERSION --server ... ARGS` with `stdin` and returns (exit code, stdout, stderr).
async fn kubectl(
    version: &str,
    addr: SocketAddr,
    args: &[&str],
    stdin: &[u8],
) -> (i32, String, String) {
    let binary = format!("{KUBECTL_DIR}/kubectl.{version}");
    assert!(
        std::path::Path::new(&binary).exists(),
        "{binary} is missing: the machine image installs kubectl 1.27 to 1.33 there"
    );
    let home = std::env::temp_dir().join(format!("kubectl-ws-{}-{version}", std::process::id()));
    std::fs::create_dir_all(&home).expect("a HOME for kubectl");
    let mut child = tokio::process::Command::new(&binary)
        .arg(format!("--server=http://{addr}"))
        .args(args)
        .env("HOME", &home)
        .env("KUBECONFIG", home.join("none"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start kubectl");
    let mut input = child.stdin.take().expect("kubectl's stdin");
    input.write_all(stdin).await.expect("write kubectl's stdin");
    drop(input);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl finished within 60 s")
        .expect("kubectl's output");
    let _ = std::fs::remove_dir_all(&home);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        without_dropped_notice(&String::from_utf8_lossy(&output.stderr)),
    )
}

/// kubectl's stderr without the one line client-go may log when the server's "connection
/// established" notice (an empty message on the lowest channel, sent at once, as the kubelet
/// does) beats the registration of its streams (see [`EDGE_FIRST_BYTE`]). The notice carries no
/// bytes, so dropping it loses nothing; any other line, a dropped stderr message included, stays.
fn without_dropped_notice(stderr: &str) -> String {
    stderr
        .split_inclusive('\n')
        .filter(|line| !line.contains("] Unknown stream id 1, discarding message"))
        .collect()
}

#[tokio::test]
async fn kubectl_exec_through_a_fake_apiserver_pipes_stdin_to_its_close() {
    let addr = fake_apiserver().await;
    for version in WEBSOCKET_KUBECTLS {
        let (code, stdout, stderr) = kubectl(
            version,
            addr,
            &["exec", "-i", "p", "--", "cat"],
            b"hi\nthere\n",
        )
        .await;
        assert_eq!(code, 0, "kubectl {version}: {stderr}");
        assert_eq!(stdout, "hi\nthere\n", "kubectl {version}: {stderr}");
    }
}

#[tokio::test]
async fn kubectl_exec_through_a_fake_apiserver_exits_with_the_commands_code() {
    let addr = fake_apiserver().await;
    for version in WEBSOCKET_KUBECTLS {
        let (code, _, stderr) = kubectl(
            version,
            addr,
            &["exec", "p", "--", "sh", "-c", "exit 3"],
            b"",
        )
        .await;
        assert_eq!(code, 3, "kubectl {version}: {stderr}");
        let (code, stdout, stderr) = kubectl(
            version,
            addr,
            &["exec", "p", "--", "sh", "-c", "echo oops >&2"],
            b"",
        )
        .await;
        assert_eq!(code, 0, "kubectl {version}: {stderr}");
        assert_eq!(stdout, "", "kubectl {version}");
        assert_eq!(stderr, "oops\n", "kubectl {version}");
    }
}

#[tokio::test]
async fn kubectl_exec_through_a_fake_apiserver_sends_the_terminals_size_under_a_pty() {
    let addr = fake_apiserver().await;
    for version in WEBSOCKET_KUBECTLS {
        let home =
            std::env::temp_dir().join(format!("kubectl-ws-tty-{}-{version}", std::process::id()));
        std::fs::create_dir_all(&home).expect("a HOME for kubectl");
        // `script` gives kubectl a pseudo-terminal of 100 columns and 30 rows.
        let inner = format!(
            "stty cols 100 rows 30; HOME={home} KUBECONFIG={home}/none {KUBECTL_DIR}/kubectl.{version} \
             --server=http://{addr} exec -it p -- stty size",
            home = home.display()
        );
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("script")
                .args(["-qec", &inner, "/dev/null"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("kubectl finished within 60 s")
        .expect("run script");
        let _ = std::fs::remove_dir_all(&home);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "kubectl {version}: {stdout}");
        assert!(stdout.contains("30 100"), "kubectl {version}: {stdout:?}");
    }
}
