//! The SPDY server role against the real SPDY client: each installed kubectl (1.27 to 1.33,
//! `/usr/lib/google-cloud-sdk/bin/kubectl.1.NN`) runs `exec` and `port-forward` against a
//! small test API server whose `pods/exec` and `pods/portforward` are
//! `streaming::spdy::server`. The edge behind the tunnel is a fake, named so: it answers
//! remote-command frames by the command it was given (`cat` echoes stdin, `exit N` exits N,
//! `sizes` prints each terminal size it gets). WebSocket upgrades are refused, so the newer
//! kubectls fall back to SPDY as they do against an older server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use proto::stream::{ExitStatus, RcCodec, RcFrame};
use streaming::{BoxRead, BoxWrite, Dial, RcOptions};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};

const KUBECTL_DIR: &str = "/usr/lib/google-cloud-sdk/bin";
const VERSIONS: [&str; 7] = ["1.27", "1.28", "1.29", "1.30", "1.31", "1.32", "1.33"];

fn kubectl(version: &str) -> PathBuf {
    let path = Path::new(KUBECTL_DIR).join(format!("kubectl.{version}"));
    assert!(
        path.exists(),
        "{} is missing: these tests run every kubectl the machine has",
        path.display()
    );
    path
}

/// A body of one chunk, for the test server's plain answers.
struct Full(Option<Bytes>);

impl hyper::body::Body for Full {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn json(status: u16, value: serde_json::Value) -> http::Response<Full> {
    let mut r = http::Response::new(Full(Some(Bytes::from(value.to_string()))));
    *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn pod() -> serde_json::Value {
    serde_json::json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running"},
    })
}

fn discovery(path: &str) -> Option<serde_json::Value> {
    Some(match path {
        "/api" => serde_json::json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        "/apis" => serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        "/api/v1" => {
            serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                 "verbs": ["get", "list"], "shortNames": ["po"]},
                {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]},
                {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
            ]})
        }
        "/version" => serde_json::json!({"major": "1", "minor": "31", "gitVersion": "v1.31.0"}),
        _ => return None,
    })
}

/// The fake edge: plays a command over remote-command frames.
async fn fake_edge(command: Vec<String>, tunnel: (BoxWrite, BoxRead)) {
    let (w, r) = tunnel;
    let mut out = FramedWrite::new(w, RcCodec);
    let mut input = FramedRead::new(r, RcCodec);
    let exit = |code| {
        RcFrame::Exit(ExitStatus {
            code: Some(code),
            message: String::new(),
        })
    };
    match command.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["cat"] => {
            while let Some(Ok(frame)) = input.next().await {
                match frame {
                    RcFrame::Stdin(b) => {
                        let _ = out.send(RcFrame::Stdout(b)).await;
                    }
                    RcFrame::StdinClosed => break,
                    _ => {}
                }
            }
            let _ = out.send(exit(0)).await;
        }
        ["exit", code] => {
            let _ = out
                .send(RcFrame::Stderr(Bytes::from_static(b"to stderr\n")))
                .await;
            let _ = out.send(exit(code.parse().unwrap_or(1))).await;
        }
        ["sizes"] => {
            while let Some(Ok(frame)) = input.next().await {
                match frame {
                    RcFrame::Resize { width, height } => {
                        let line = format!("size {width}x{height}\r\n");
                        let _ = out.send(RcFrame::Stdout(Bytes::from(line))).await;
                    }
                    RcFrame::Stdin(b) if b.contains(&b'q') => break,
                    RcFrame::StdinClosed => break,
                    _ => {}
                }
            }
            let _ = out.send(exit(4)).await;
        }
        _ => {
            let _ = out.send(exit(127)).await;
        }
    }
}

/// Dials the test's echo server for port 80; nothing listens on any other port.
fn dial(echo: SocketAddr) -> Dial {
    Arc::new(move |port| {
        Box::pin(async move {
            if port != 80 {
                return Err(format!(
                    "error forwarding port {port} to pod p, uid u1: connection refused"
                ));
            }
            let tcp = tokio::net::TcpStream::connect(echo)
                .await
                .map_err(|e| e.to_string())?;
            let (r, w) = tcp.into_split();
            Ok((Box::pin(w) as BoxWrite, Box::pin(r) as BoxRead))
        })
    })
}

fn query_flag(query: &[(String, String)], name: &str) -> bool {
    query
        .iter()
        .any(|(k, v)| k == name && (v == "true" || v == "1"))
}

async fn handle(
    mut req: http::Request<hyper::body::Incoming>,
    echo: SocketAddr,
) -> Result<http::Response<Full>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(doc) = discovery(&path) {
        return Ok(json(200, doc));
    }
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%20", " ").replace('+', " ")))
        .collect();
    let base = "/api/v1/namespaces/default/pods/p";
    let upgrade = streaming::transport(&req);
    if upgrade == Some(streaming::Transport::WebSocket) {
        // Not this test's subject: kubectl falls back to SPDY.
        return Ok(json(
            400,
            serde_json::json!({"kind": "Status", "status": "Failure",
            "message": "websocket is not served by this test server", "code": 400}),
        ));
    }
    let answer = if path == base {
        return Ok(json(200, pod()));
    } else if path == format!("{base}/exec") {
        let options = RcOptions {
            stdin: query_flag(&query, "stdin"),
            stdout: query_flag(&query, "stdout"),
            stderr: query_flag(&query, "stderr"),
            tty: query_flag(&query, "tty"),
        };
        let command: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect();
        let (cloud, edge) = tokio::io::duplex(64 * 1024);
        let (edge_r, edge_w) = tokio::io::split(edge);
        tokio::spawn(fake_edge(
            command,
            (Box::pin(edge_w) as BoxWrite, Box::pin(edge_r) as BoxRead),
        ));
        let (cloud_r, cloud_w) = tokio::io::split(cloud);
        streaming::spdy::server::remotecommand(
            &mut req,
            options,
            (Box::pin(cloud_w), Box::pin(cloud_r)),
        )
    } else if path == format!("{base}/portforward") {
        streaming::spdy::server::portforward(&mut req, vec![], dial(echo))
    } else {
        return Ok(json(
            404,
            serde_json::json!({"kind": "Status", "status": "Failure",
            "message": format!("no {path} here"), "code": 404}),
        ));
    };
    Ok(match answer {
        Ok(response) => response.map(|b| Full(Some(b))),
        Err(rejection) => json(
            rejection.code,
            serde_json::json!({"kind": "Status", "status": "Failure",
                "message": rejection.message, "code": rejection.code}),
        ),
    })
}

/// The test API server and an echo server (what port-forward reaches); both on loopback.
struct Api {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    kubeconfig: tempfile::TempDir,
}

impl Api {
    fn start() -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (addr, _) = runtime.block_on(async {
            let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let echo_addr = echo.local_addr().expect("addr");
            tokio::spawn(async move {
                while let Ok((tcp, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = tcp.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
            });
            let api = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = api.local_addr().expect("addr");
            tokio::spawn(async move {
                while let Ok((tcp, _)) = api.accept().await {
                    let service = hyper::service::service_fn(move |req| handle(req, echo_addr));
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .with_upgrades(),
                    );
                }
            });
            (addr, echo_addr)
        });
        Api {
            addr,
            runtime,
            kubeconfig: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn kubectl(&self, version: &str, args: &[&str]) -> Command {
        let mut c = Command::new(kubectl(version));
        c.env("KUBECONFIG", self.kubeconfig.path().join("none"))
            .env("HOME", self.kubeconfig.path())
            .args(["--server", &format!("http://{}", self.addr)])
            .args(args);
        c
    }
}

#[test]
fn every_kubectl_execs_over_spdy() {
    let api = Api::start();
    for version in VERSIONS {
        // echo hi | kubectl exec -i p -- cat
        let mut child = api
            .kubectl(version, &["exec", "-i", "p", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"hi\n").expect("stdin");
        }
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {version} exec -i cat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hi\n",
            "kubectl {version}"
        );

        // The exit code and stderr come through.
        let out = api
            .kubectl(version, &["exec", "p", "--", "exit", "3"])
            .output()
            .expect("kubectl");
        assert_eq!(
            out.status.code(),
            Some(3),
            "kubectl {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("to stderr"),
            "kubectl {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(api.runtime);
}

#[test]
fn kubectl_port_forward_over_spdy_serves_several_connections() {
    let api = Api::start();
    for version in ["1.27", "1.33"] {
        let local = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut child = api
            .kubectl(
                version,
                &[
                    "port-forward",
                    "--address",
                    "127.0.0.1",
                    "pod/p",
                    &format!("{local}:80"),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        let started = Instant::now();
        let connect = || std::net::TcpStream::connect(("127.0.0.1", local));
        while connect().is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "kubectl {version} port-forward never listened"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Three connections open at once, each echoed on its own stream pair.
        let mut conns: Vec<std::net::TcpStream> =
            (0..3).map(|_| connect().expect("connect")).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            use std::io::Write;
            c.write_all(format!("hello {i}\n").as_bytes())
                .expect("write");
        }
        for (i, c) in conns.iter_mut().enumerate() {
            use std::io::Read;
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let want = format!("hello {i}\n");
            let mut got = vec![0u8; want.len()];
            c.read_exact(&mut got).expect("echo");
            assert_eq!(String::from_utf8_lossy(&got), want, "kubectl {version}");
        }
        drop(conns);
        let _ = child.kill();
        let _ = child.wait();
    }
    // A port nothing listens on: kubectl reports the dial error from the error stream.
    let local = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = api
        .kubectl(
            "1.27",
            &[
                "port-forward",
                "--address",
                "127.0.0.1",
                "pod/p",
                &format!("{local}:81"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    let started = Instant::now();
    let mut tcp = loop {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", local)) {
            break c;
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
    };
    {
        use std::io::{Read, Write};
        let _ = tcp.write_all(b"x");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        // The connection closes without data.
        assert!(matches!(tcp.read(&mut buf), Ok(0) | Err(_)));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let out = child.wait_with_output().expect("kubectl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("port 81") && stderr.contains("connection refused"),
        "{stderr}"
    );
    drop(api.runtime);
}

fn tmux(socket: &Path, args: &[&str]) -> String {
    let out = Command::new("tmux")
        .arg("-S")
        .arg(socket)
        .args(args)
        .output()
        .expect("tmux is installed (apt-get install tmux)");
    assert!(
        out.status.success(),
        "tmux {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl exec -it` under a real terminal: the first size and a resize reach the edge.
#[test]
fn kubectl_exec_tty_resizes_reach_the_edge() {
    let api = Api::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("tmux.sock");
    let code = dir.path().join("code");
    let cmd = api.kubectl("1.27", &["exec", "-it", "p", "--", "sizes"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let envs = cmd
        .get_envs()
        .filter_map(|(k, v)| {
            Some(format!(
                "{}='{}'",
                k.to_string_lossy(),
                v?.to_string_lossy()
            ))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!("env {envs} {line}; echo $? > {}", code.display());
    tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            &script,
        ],
    );
    let screen = || tmux(&socket, &["capture-pane", "-p", "-t", "t"]);
    let wait_for = |text: &str| {
        let started = Instant::now();
        while !screen().contains(text) {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{text:?} not on the screen:\n{}",
                screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("size 100x30");
    tmux(
        &socket,
        &["resize-window", "-t", "t", "-x", "120", "-y", "40"],
    );
    wait_for("size 120x40");
    tmux(&socket, &["send-keys", "-t", "t", "q"]);
    let started = Instant::now();
    while !std::fs::read_to_string(&code).is_ok_and(|c| !c.trim().is_empty()) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "kubectl did not end:\n{}",
            screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(&code).expect("code").trim(), "4");
    let _ = Command::new("tmux")
        .arg("-S")
        .arg(&socket)
        .arg("kill-server")
        .output();
    drop(api.runtime);
}
