//! The edge's side of `kubectl exec`, `attach` and `port-forward`: `edgecore::streams::remote`
//! against a real containerd's CRI streaming server (SPDY/3.1), with the test playing the
//! cloud's end of the tunnel stream; and `edgecore ctl exec -i/-t` through the same client,
//! under a real pseudo-terminal (tmux). Needs root and Debian's containerd, runc,
//! containernetworking-plugins and busybox-static (`.ci/run` installs them); tmux for the
//! terminal test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgecore::cri::Cri;
use edgecore::pods::spec::{self, ContainerKind};
use edgecore::streams::remote;
use futures::{SinkExt, StreamExt};
use integration::{Cloud, Containerd, Edge, eventually, join};
use proto::stream::{
    AttachRequest, ExecRequest, MAX_HEADER_SIZE, RcCodec, RcFrame, RefusalCode, StreamReply,
    read_header,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{FramedRead, FramedWrite};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts a sandbox with the given containers (name, command, stdin) straight through the
/// CRI; returns the sandbox id and the container ids.
async fn start_pod(
    cri: &Cri,
    dir: &Path,
    name: &str,
    containers: &[(&str, &[&str], bool)],
) -> (String, Vec<String>) {
    let uid = format!("{name}-{}", std::process::id());
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": {"containers": containers.iter().map(|(n, command, stdin)| serde_json::json!({
            "name": n, "image": integration::BUSYBOX, "command": command, "stdin": stdin,
        })).collect::<Vec<_>>()},
    }))
    .expect("pod");
    let paths = spec::pod_paths(dir, &uid);
    std::fs::create_dir_all(&paths.log_dir).expect("log dir");
    let sandbox_config = spec::sandbox_config(&pod, &paths, 0, None).expect("sandbox config");
    let sandbox = cri
        .run_pod_sandbox(sandbox_config.clone())
        .await
        .expect("RunPodSandbox");
    let mut ids = Vec::new();
    for c in pod.spec.as_ref().expect("spec").containers.iter() {
        let config = spec::container_config(&pod, c, ContainerKind::Regular, 0, vec![], vec![])
            .expect("container config");
        let id = cri
            .create_container(&sandbox, config, sandbox_config.clone())
            .await
            .expect("CreateContainer");
        cri.start_container(&id).await.expect("StartContainer");
        ids.push(id);
    }
    (sandbox, ids)
}

/// What the cloud's end of a remote-command stream saw.
#[derive(Debug, Default)]
struct Seen {
    reply: Option<StreamReply>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exits: Vec<proto::stream::ExitStatus>,
}

impl Seen {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// The cloud's end of a tunnel stream that carries nothing and fails with a reset when told
/// (what a QUIC stream the cloud reset looks like to the edge).
struct ResetReader(tokio::sync::mpsc::Receiver<()>);

impl tokio::io::AsyncRead for ResetReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.poll_recv(cx) {
            std::task::Poll::Ready(_) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "stream reset by the cloud",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

enum Kind {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

/// Plays the cloud: runs `remote::exec`/`attach` on one end of a duplex pipe, reads its reply,
/// sends `input` (a pause before each frame, so a resize lands before the next stdin) and
/// collects the output until the stream ends.
async fn remote_command(cri: &Cri, container: &str, kind: Kind, input: Vec<RcFrame>) -> Seen {
    let (cloud, edge) = tokio::io::duplex(64 * 1024);
    let (edge_r, edge_w) = tokio::io::split(edge);
    let (cri, container) = (cri.clone(), container.to_string());
    let served = tokio::spawn(async move {
        match kind {
            Kind::Exec(r) => remote::exec(&cri, &container, &r, edge_w, edge_r).await,
            Kind::Attach(r) => remote::attach(&cri, &container, &r, edge_w, edge_r).await,
        }
    });
    let (mut cloud_r, cloud_w) = tokio::io::split(cloud);
    let reply: StreamReply = read_header(&mut cloud_r, MAX_HEADER_SIZE)
        .await
        .expect("reply header");
    let mut seen = Seen {
        reply: Some(reply.clone()),
        ..Default::default()
    };
    if reply != StreamReply::Accepted {
        served.await.expect("task").expect("refusal written");
        return seen;
    }
    let writer = tokio::spawn(async move {
        let mut w = FramedWrite::new(cloud_w, RcCodec);
        for frame in input {
            tokio::time::sleep(Duration::from_millis(300)).await;
            w.send(frame).await.expect("send frame");
        }
        // Keep our side open until the edge is done.
        w
    });
    let mut frames = FramedRead::new(cloud_r, RcCodec);
    let read = async {
        while let Some(frame) = frames.next().await {
            match frame.expect("frame from the edge") {
                RcFrame::Stdout(b) => seen.stdout.extend_from_slice(&b),
                RcFrame::Stderr(b) => seen.stderr.extend_from_slice(&b),
                RcFrame::Exit(status) => seen.exits.push(status),
                other => panic!("the edge sent {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the session ends within 30 s");
    served.await.expect("task").expect("session");
    drop(writer.await);
    seen
}

fn exec(command: &[&str], stdin: bool, tty: bool) -> Kind {
    Kind::Exec(ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        stdin,
        stdout: true,
        stderr: !tty,
        tty,
        ..Default::default()
    })
}

#[test]
fn exec_and_attach_through_the_runtime_streaming_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let rt = runtime();
    rt.block_on(async {
        let cri = Cri::new(&containerd.endpoint).expect("cri");
        let (_sandbox, ids) = start_pod(
            &cri,
            tmp.path(),
            "shell",
            &[
                ("main", &["sleep", "3600"], false),
                (
                    "reader",
                    &["sh", "-c", "read line; echo \"got $line\""],
                    true,
                ),
            ],
        )
        .await;
        let (main, reader) = (&ids[0], &ids[1]);

        // echo hi | exec cat
        let started = Instant::now();
        let seen = remote_command(
            &cri,
            main,
            exec(&["cat"], true, false),
            vec![
                RcFrame::Stdin(Bytes::from_static(b"hi\n")),
                RcFrame::StdinClosed,
            ],
        )
        .await;
        assert_eq!(seen.reply, Some(StreamReply::Accepted));
        assert_eq!(seen.stdout(), "hi\n");
        assert_eq!(seen.exits.len(), 1, "{seen:?}");
        assert_eq!(seen.exits[0].code, Some(0), "{seen:?}");
        eprintln!("exec cat: {:?}", started.elapsed());

        // A non-zero exit code comes back as it is.
        let seen = remote_command(
            &cri,
            main,
            exec(&["sh", "-c", "exit 3"], false, false),
            vec![],
        )
        .await;
        assert_eq!(seen.exits.len(), 1, "{seen:?}");
        assert_eq!(seen.exits[0].code, Some(3), "{seen:?}");

        // stdout and stderr stay apart.
        let seen = remote_command(
            &cri,
            main,
            exec(&["sh", "-c", "echo out; echo err >&2"], false, false),
            vec![],
        )
        .await;
        assert_eq!(seen.stdout(), "out\n");
        assert_eq!(String::from_utf8_lossy(&seen.stderr), "err\n");
        assert_eq!(seen.exits[0].code, Some(0));

        // A tty follows the client's size.
        let seen = remote_command(
            &cri,
            main,
            exec(&["sh"], true, true),
            vec![
                RcFrame::Resize {
                    width: 123,
                    height: 45,
                },
                RcFrame::Stdin(Bytes::from_static(b"stty size; exit 7\n")),
            ],
        )
        .await;
        assert!(seen.stdout().contains("45 123"), "{:?}", seen.stdout());
        assert!(seen.stderr.is_empty());
        assert_eq!(seen.exits.len(), 1, "{seen:?}");
        assert_eq!(seen.exits[0].code, Some(7), "{seen:?}");

        // A command that cannot start is an exit without a code, with the runtime's reason.
        let seen = remote_command(&cri, main, exec(&["/nope"], false, false), vec![]).await;
        assert_eq!(seen.exits.len(), 1, "{seen:?}");
        assert_ne!(seen.exits[0].code, Some(0), "{seen:?}");
        assert!(
            seen.exits[0].message.contains("nope") || seen.exits[0].code.is_some(),
            "{seen:?}"
        );

        // Attach reaches the main process's stdin and stdout.
        let seen = remote_command(
            &cri,
            reader,
            Kind::Attach(AttachRequest {
                stdin: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
            vec![RcFrame::Stdin(Bytes::from_static(b"hello\n"))],
        )
        .await;
        assert_eq!(seen.reply, Some(StreamReply::Accepted));
        assert_eq!(seen.stdout(), "got hello\n");
        assert_eq!(seen.exits.len(), 1, "{seen:?}");

        // The cloud resetting its stream (kubectl went away) ends a silent session at once.
        let (reset_tx, reset_rx) = tokio::sync::mpsc::channel(1);
        let (cloud, edge_w) = tokio::io::duplex(64 * 1024);
        let (cri2, main2) = (cri.clone(), main.clone());
        let served = tokio::spawn(async move {
            let request = ExecRequest {
                command: vec!["sleep".into(), "3600".into()],
                stdout: true,
                ..Default::default()
            };
            remote::exec(&cri2, &main2, &request, edge_w, ResetReader(reset_rx)).await
        });
        let mut cloud = cloud;
        let reply: StreamReply = read_header(&mut cloud, MAX_HEADER_SIZE)
            .await
            .expect("reply header");
        assert_eq!(reply, StreamReply::Accepted);
        reset_tx.send(()).await.expect("reset");
        let ended = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the session ends within 5 s of the reset")
            .expect("task");
        let err = ended.expect_err("a reset is an error");
        assert!(err.to_string().contains("reset"), "{err}");

        // A container the runtime does not have: refused, naming the runtime's reason.
        let seen = remote_command(
            &cri,
            "no-such-container",
            exec(&["true"], false, false),
            vec![],
        )
        .await;
        match seen.reply {
            Some(StreamReply::Refused(r)) => {
                assert_eq!(r.code, RefusalCode::Runtime);
                assert!(r.message.contains("Exec"), "{}", r.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
    drop(rt);
    drop(containerd);
}

/// One forwarded connection: an HTTP/1.0 GET through `remote::port_forward`; the reply and
/// what came back.
async fn fetch(cri: &Cri, sandbox: &str, port: u16) -> (StreamReply, String) {
    let (cloud, edge) = tokio::io::duplex(64 * 1024);
    let (edge_r, edge_w) = tokio::io::split(edge);
    let (cri, sandbox) = (cri.clone(), sandbox.to_string());
    let served =
        tokio::spawn(
            async move { remote::port_forward(&cri, &sandbox, port, edge_w, edge_r).await },
        );
    let (mut cloud_r, mut cloud_w) = tokio::io::split(cloud);
    let reply: StreamReply = read_header(&mut cloud_r, MAX_HEADER_SIZE)
        .await
        .expect("reply header");
    if reply != StreamReply::Accepted {
        let _ = served.await;
        return (reply, String::new());
    }
    cloud_w
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    cloud_w.shutdown().await.expect("half-close");
    let mut page = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), cloud_r.read_to_end(&mut page))
        .await
        .expect("the response ends within 20 s")
        .expect("read");
    let _ = served.await;
    (reply, String::from_utf8_lossy(&page).into_owned())
}

#[test]
fn port_forward_through_the_runtime_streaming_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let rt = runtime();
    rt.block_on(async {
        let cri = Cri::new(&containerd.endpoint).expect("cri");
        let (sandbox, _) = start_pod(
            &cri,
            tmp.path(),
            "web",
            &[(
                "httpd",
                &[
                    "sh",
                    "-c",
                    "mkdir -p /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 80 -h /www",
                ],
                false,
            )],
        )
        .await;
        // httpd listens a moment after the container starts.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (reply, page) = fetch(&cri, &sandbox, 80).await;
            if reply == StreamReply::Accepted && page.contains("hello-from-pod") {
                break;
            }
            assert!(Instant::now() < deadline, "no page: {reply:?} {page:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Several connections at once, each its own stream pair.
        let started = Instant::now();
        let (a, b, c) = tokio::join!(
            fetch(&cri, &sandbox, 80),
            fetch(&cri, &sandbox, 80),
            fetch(&cri, &sandbox, 80)
        );
        for (reply, page) in [a, b, c] {
            assert_eq!(reply, StreamReply::Accepted);
            assert!(page.starts_with("HTTP/1."), "{page:?}");
            assert!(page.contains("hello-from-pod"), "{page:?}");
        }
        eprintln!("three concurrent fetches: {:?}", started.elapsed());
        // Nothing listens on 81: refused with the runtime's message.
        let (reply, _) = fetch(&cri, &sandbox, 81).await;
        match reply {
            StreamReply::Refused(r) => {
                assert_eq!(r.code, RefusalCode::Runtime);
                assert!(r.message.contains("81"), "{}", r.message);
                assert!(r.message.contains("refused"), "{}", r.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
    drop(rt);
    drop(containerd);
}

/// Fields drop in order: edgecore, containerd (removing its pods), cloudcore, the directory.
struct Site {
    edge: Edge,
    containerd: Containerd,
    _cloud: Cloud,
    edge_dir: PathBuf,
    tmp: tempfile::TempDir,
}

fn site_with_pod() -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let edge_dir = tmp.path().join("edge-1");
    let out = join(&edge_dir, &token, "edge-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "{}",
        edge.log()
    );
    cloud.kubectl_ok(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: box}\nspec:\n  nodeName: edge-1\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: localhost/edge/busybox:1\n    command: [\"sleep\", \"3600\"]\n"),
    );
    cloud.wait_pod(
        "box",
        Duration::from_secs(60),
        "Running",
        |p| p["status"]["phase"] == "Running",
        || edge.log(),
    );
    Site {
        edge,
        containerd,
        _cloud: cloud,
        edge_dir,
        tmp,
    }
}

impl Site {
    fn ctl_exec(&self, flags: &[&str], command: &[&str]) -> Command {
        let mut c = Command::new(integration::bin("edgecore"));
        c.args(["ctl", "exec", "box"])
            .args(flags)
            .arg("--data-dir")
            .arg(&self.edge_dir)
            .args(["--cri-endpoint", &self.containerd.endpoint, "--"])
            .args(command);
        c
    }
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

#[test]
fn ctl_exec_with_stdin_and_a_terminal() {
    let site = site_with_pod();

    // echo hi | edgecore ctl exec -i box -- cat
    let mut child = site
        .ctl_exec(&["-i"], &["cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctl exec");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hi\n").expect("write stdin");
    }
    let out = child.wait_with_output().expect("ctl exec");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    // The exit code comes through, stderr apart from stdout.
    let out = site
        .ctl_exec(&["-i"], &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .stdin(Stdio::null())
        .output()
        .expect("ctl exec");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // -t under a real terminal: raw mode, the size, a resize, the exit code, the terminal
    // restored afterwards.
    let socket = site.tmp.path().join("tmux.sock");
    let code_file = site.tmp.path().join("code");
    let stty_file = site.tmp.path().join("stty-after");
    let ctl = site.ctl_exec(&["-i", "-t"], &["sh"]);
    let line = std::iter::once(ctl.get_program())
        .chain(ctl.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        // The code is written last: the test reads both files once it is there.
        "stty -a > {before}; {line}; rc=$?; stty -a > {after}; echo $rc > {code}",
        before = site.tmp.path().join("stty-before").display(),
        code = code_file.display(),
        after = stty_file.display(),
    );
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
    let screen = |socket: &Path| tmux(socket, &["capture-pane", "-p", "-t", "t"]);
    let send = |keys: &str| tmux(&socket, &["send-keys", "-t", "t", keys, "Enter"]);
    let wait_for = |text: &str| {
        assert!(
            eventually(Duration::from_secs(15), || screen(&socket).contains(text)),
            "{text:?} not on the screen:\n{}\nedge log:\n{}",
            screen(&socket),
            site.edge.log()
        );
    };
    // A prompt from the container's shell (its hostname is the pod's).
    wait_for("#");
    send("stty size");
    wait_for("30 100");
    tmux(
        &socket,
        &["resize-window", "-t", "t", "-x", "120", "-y", "40"],
    );
    // Let SIGWINCH reach edgecore and the resize the container.
    std::thread::sleep(Duration::from_millis(500));
    send("stty size");
    wait_for("40 120");
    send("exit 5");
    assert!(
        eventually(Duration::from_secs(15), || code_file.exists()
            && std::fs::read_to_string(&code_file)
                .is_ok_and(|c| !c.trim().is_empty())),
        "ctl exec -t did not end:\n{}",
        screen(&socket)
    );
    assert_eq!(std::fs::read_to_string(&code_file).unwrap().trim(), "5");
    let before = std::fs::read_to_string(site.tmp.path().join("stty-before")).expect("stty before");
    let after = std::fs::read_to_string(&stty_file).expect("stty after");
    // The size line differs after the resize; every mode is as it was.
    let modes = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(
        modes(&before),
        modes(&after),
        "the terminal was not restored"
    );
    assert!(
        after.contains(" icanon") && after.contains(" echo "),
        "{after}"
    );
    let _ = Command::new("tmux")
        .arg("-S")
        .arg(&socket)
        .arg("kill-server")
        .output();
}
