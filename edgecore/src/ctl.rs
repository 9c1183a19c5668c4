//! `edgecore ctl`: local operations on the edge's store, without the cloud or a running daemon.
//!
//! `get` prints what the store holds as a kubectl-like table. Secret values never leave the
//! store this way: a Secret shows only its key names. `get devices` and `twin` show the device
//! twins the daemon keeps in the store (`edgecore::devices::twins`). `get services` and
//! `get endpointslices` print the Services and EndpointSlices the cloud relayed, in kubectl's
//! columns.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::devices::{TwinView, twins};
use crate::store::{Store, StoreError, StoredObject, StoredTwin};

/// What `edgecore ctl get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resource {
    /// Pods bound to this node.
    #[value(aliases = ["pod", "po"])]
    Pods,
    /// ConfigMaps the pods use.
    #[value(aliases = ["configmap", "cm"])]
    Configmaps,
    /// Secrets the pods use (key names only).
    #[value(alias = "secret")]
    Secrets,
    /// This node.
    #[value(aliases = ["node", "no"])]
    Nodes,
    /// Devices bound to this node, with their twin's state (`devices.kubeedge.io`).
    #[value(aliases = ["device", "dev"])]
    Devices,
    /// DeviceModels the node's devices use.
    #[value(aliases = ["devicemodel", "dm"])]
    Devicemodels,
    /// Services (every Service of the cluster; docs/services.md).
    #[value(aliases = ["service", "svc"])]
    Services,
    /// EndpointSlices (discovery.k8s.io/v1).
    #[value(aliases = ["endpointslice"])]
    Endpointslices,
    /// Everything the store holds.
    All,
}

impl Resource {
    /// The kinds stored for this resource; empty means every kind.
    fn kinds(self) -> &'static [&'static str] {
        match self {
            Resource::Pods => &["Pod"],
            Resource::Configmaps => &["ConfigMap"],
            Resource::Secrets => &["Secret"],
            Resource::Nodes => &["Node"],
            Resource::Devices => &[devices::DEVICE_KIND],
            Resource::Devicemodels => &[devices::DEVICE_MODEL_KIND],
            Resource::Services => &["Service"],
            Resource::Endpointslices => &["EndpointSlice"],
            Resource::All => &[],
        }
    }

    /// The plural for "No ... in".
    fn plural(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Configmaps => "configmaps",
            Resource::Secrets => "secrets",
            Resource::Nodes => "nodes",
            Resource::Devices => "devices",
            Resource::Devicemodels => "devicemodels",
            Resource::Services => "services",
            Resource::Endpointslices => "endpointslices",
            Resource::All => "objects",
        }
    }
}

/// A `ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The store is missing, corrupt or unreadable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the output failed (a closed pipe, for example).
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    /// No such pod or container on this gateway.
    #[error("{0}")]
    NotFound(String),
    /// The command line names no container and the pod has several.
    #[error("a container name must be specified for pod {pod}, choose one of: [{names}]")]
    ContainerNeeded { pod: String, names: String },
    /// The log file could not be read.
    #[error("cannot read {path}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The runtime refused or could not be reached.
    #[error(transparent)]
    Cri(#[from] crate::cri::CriError),
    /// The running daemon could not be asked.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The interactive session with the runtime failed, or the command could not run.
    #[error("{0}")]
    Remote(String),
    /// The terminal could not be put in raw mode.
    #[error("cannot set up the terminal")]
    Terminal(#[source] std::io::Error),
    /// The running daemon refused the request, saying why.
    #[error("{0}")]
    Refused(String),
    /// No CRI endpoint was given and the daemon recorded none that `ctl` can use.
    #[error("{0}")]
    NoCriEndpoint(String),
}

/// The file in the data dir where `edgecore run` records the runtime it uses, so `ctl` talks to
/// the same one.
pub const RUNTIME_FILE: &str = "runtime.json";

/// What `DIR/runtime.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeRecord {
    /// `unix:///PATH`; `None` when the daemon runs without a runtime (`--no-pod-runtime`).
    pub cri_endpoint: Option<String>,
}

/// Records the CRI endpoint `edgecore run` uses in `DIR/runtime.json` (0600, atomically).
pub fn record_runtime(
    data_dir: &Path,
    cri_endpoint: Option<&str>,
) -> Result<(), daemon::files::FileError> {
    let record = RuntimeRecord {
        cri_endpoint: cri_endpoint.map(str::to_string),
    };
    // Serializing a struct of strings cannot fail.
    let body = serde_json::to_vec_pretty(&record).unwrap_or_default();
    let path = data_dir.join(RUNTIME_FILE);
    // The same endpoint as at the last start: nothing to write (a full disk stays untouched).
    if std::fs::read(&path).is_ok_and(|held| held == body) {
        return Ok(());
    }
    daemon::files::write_atomic(&path, &body, 0o600)
}

/// The CRI endpoint `ctl` talks to: `flag` (`--cri-endpoint`) when given, else the one the
/// daemon of `data_dir` recorded; an error saying what to do when neither is known.
pub fn cri_endpoint(data_dir: &Path, flag: Option<&str>) -> Result<String, CtlError> {
    if let Some(endpoint) = flag {
        return Ok(endpoint.to_string());
    }
    let path = data_dir.join(RUNTIME_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CtlError::NoCriEndpoint(format!(
                "no CRI endpoint known: {} does not exist (`edgecore run --data-dir {}` writes it at start); pass --cri-endpoint unix:///PATH",
                path.display(),
                data_dir.display()
            )));
        }
        Err(e) => {
            return Err(CtlError::NoCriEndpoint(format!(
                "cannot read {}: {e}; pass --cri-endpoint unix:///PATH",
                path.display()
            )));
        }
    };
    let record: RuntimeRecord = serde_json::from_slice(&text).map_err(|e| {
        CtlError::NoCriEndpoint(format!(
            "{} is not a runtime record: {e}; pass --cri-endpoint unix:///PATH",
            path.display()
        ))
    })?;
    record.cri_endpoint.ok_or_else(|| {
        CtlError::NoCriEndpoint(format!(
            "the edgecore of {} runs without a container runtime (--no-pod-runtime, recorded in {}); pass --cri-endpoint unix:///PATH",
            data_dir.display(),
            path.display()
        ))
    })
}

/// Which container of which pod a `logs` or `exec` is about.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
}

/// The pod (from the store) and the container name a target resolves to.
fn resolve(data_dir: &Path, target: &Target) -> Result<(String, String), CtlError> {
    let store = Store::open_read_only(data_dir)?;
    let key = proto::sync::ObjectKey::new("Pod", &target.namespace, &target.pod);
    let pod = store.get(&key)?.ok_or_else(|| {
        CtlError::NotFound(format!(
            "pod {}/{} is not bound to this node (not in {})",
            target.namespace,
            target.pod,
            store.path().display()
        ))
    })?;
    let body: Value = serde_json::from_slice(&pod.body).unwrap_or(Value::Null);
    let names: Vec<String> = body["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            body["spec"]["initContainers"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let container = match &target.container {
        Some(name) if names.contains(name) => name.clone(),
        Some(name) => {
            return Err(CtlError::NotFound(format!(
                "container {name} is not valid for pod {}",
                target.pod
            )));
        }
        None => {
            let regular: Vec<&str> = body["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str())
                .collect();
            match regular.as_slice() {
                [one] => one.to_string(),
                _ => {
                    return Err(CtlError::ContainerNeeded {
                        pod: target.pod.clone(),
                        names: regular.join(" "),
                    });
                }
            }
        }
    };
    Ok((pod.uid, container))
}

/// The newest log file of a container (`<attempt>.log`, highest attempt).
fn latest_log(data_dir: &Path, uid: &str, container: &str) -> Option<std::path::PathBuf> {
    let dir = crate::pods::spec::pod_paths(data_dir, uid)
        .log_dir
        .join(container);
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let attempt: u64 = path.file_stem()?.to_str()?.parse().ok()?;
            (path.extension()? == "log").then_some((attempt, path))
        })
        .max_by_key(|(attempt, _)| *attempt)
        .map(|(_, path)| path)
}

/// The messages of CRI log lines (`<time> <stream> <P|F> <message>`), partial lines joined.
fn log_messages(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut partial = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(_time), Some(_stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        partial.push_str(parts.next().unwrap_or(""));
        if tag != "P" {
            out.push(std::mem::take(&mut partial));
        }
    }
    out
}

/// `edgecore ctl logs`: a container's log from its file on this gateway (no cloud, no
/// runtime call); `follow` keeps printing what is appended, across restarts of the container.
pub fn logs(
    data_dir: &Path,
    target: &Target,
    tail: Option<usize>,
    follow: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let (uid, container) = resolve(data_dir, target)?;
    let Some(mut path) = latest_log(data_dir, &uid, &container) else {
        return Err(CtlError::NotFound(format!(
            "container {container} of pod {} has not started yet (no log file)",
            target.pod
        )));
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CtlError::Log {
            path: path.display().to_string(),
            source,
        })
    };
    let bytes = read(&path)?;
    // Only complete lines; a partial last line is printed once it is complete.
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let messages = log_messages(&String::from_utf8_lossy(&bytes[..complete]));
    let skip = tail.map_or(0, |n| messages.len().saturating_sub(n));
    for message in &messages[skip..] {
        writeln!(out, "{message}").map_err(CtlError::Output)?;
    }
    out.flush().map_err(CtlError::Output)?;
    if !follow {
        return Ok(());
    }
    let mut offset = complete;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Some(newer) = latest_log(data_dir, &uid, &container)
            && newer != path
        {
            path = newer;
            offset = 0;
        }
        let bytes = read(&path)?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete > offset {
            for message in log_messages(&String::from_utf8_lossy(&bytes[offset..complete])) {
                writeln!(out, "{message}").map_err(CtlError::Output)?;
            }
            out.flush().map_err(CtlError::Output)?;
            offset = complete;
        }
    }
}

/// `edgecore ctl exec`: runs a command in a running container through the runtime; returns
/// its exit code.
pub async fn exec(
    data_dir: &Path,
    endpoint: &str,
    target: &Target,
    command: Vec<String>,
    stdout: &mut impl Write,
    stderr: &mut impl Write,
) -> Result<i32, CtlError> {
    let (cri, id) = running_container(data_dir, endpoint, target).await?;
    let reply = cri
        .exec_sync(&id, command, std::time::Duration::ZERO)
        .await?;
    stdout.write_all(&reply.stdout).map_err(CtlError::Output)?;
    stderr.write_all(&reply.stderr).map_err(CtlError::Output)?;
    stdout.flush().map_err(CtlError::Output)?;
    Ok(reply.exit_code)
}

/// How `ctl exec -i/-t` runs: stdin attached, a terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interactive {
    pub stdin: bool,
    pub tty: bool,
}

/// `edgecore ctl exec -i/-t`: runs a command in a running container with its stdio attached,
/// through the runtime's streaming server (CRI `Exec` and SPDY, as the cloud's `kubectl exec`
/// reaches it). With a tty, the local terminal is in raw mode for the session (restored on
/// every way out) and its size follows SIGWINCH. Returns the command's exit code.
pub async fn exec_interactive(
    data_dir: &Path,
    endpoint: &str,
    target: &Target,
    command: Vec<String>,
    mode: Interactive,
    stdout: &mut impl Write,
    stderr: &mut impl Write,
) -> Result<i32, CtlError> {
    use streaming::spdy::client;
    let mut mode = mode;
    if mode.tty && !rustix::termios::isatty(std::io::stdin()) {
        // As kubectl: a tty needs a terminal on stdin.
        let _ = writeln!(
            stderr,
            "Unable to use a TTY - input is not a terminal or the right kind of file"
        );
        mode.tty = false;
    }
    let (cri, id) = running_container(data_dir, endpoint, target).await?;
    let wanted = crate::cri::StreamsWanted {
        stdin: mode.stdin,
        stdout: true,
        stderr: !mode.tty,
        tty: mode.tty,
    };
    let url = cri.exec(&id, command, wanted).await?;
    let rc = client::remotecommand(
        &url,
        streaming::RcOptions {
            stdin: wanted.stdin,
            stdout: wanted.stdout,
            stderr: wanted.stderr,
            tty: wanted.tty,
        },
    )
    .await
    .map_err(|e| CtlError::Remote(e.to_string()))?;
    let raw = if mode.tty {
        Some(terminal::RawMode::enter().map_err(CtlError::Terminal)?)
    } else {
        None
    };
    let status = terminal::session(rc, stdout, stderr).await;
    drop(raw);
    let status = status?;
    match status.code {
        Some(code) => Ok(code),
        None => Err(CtlError::Remote(status.message)),
    }
}

/// The local terminal side of `ctl exec -i/-t`.
mod terminal {
    use std::io::{Read, Write};

    use bytes::Bytes;
    use proto::stream::ExitStatus;
    use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr};
    use streaming::spdy::RecvHalf;
    use streaming::spdy::client::{self, RcClient};
    use tokio::sync::mpsc;

    use super::CtlError;

    /// The terminal in raw mode until dropped, then as it was.
    pub(super) struct RawMode {
        saved: Termios,
    }

    impl RawMode {
        pub(super) fn enter() -> std::io::Result<RawMode> {
            let saved = tcgetattr(std::io::stdin())?;
            let mut raw = saved.clone();
            raw.make_raw();
            tcsetattr(std::io::stdin(), OptionalActions::Now, &raw)?;
            Ok(RawMode { saved })
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
        }
    }

    /// The local terminal's size (columns, rows), from stdout or stdin.
    fn size() -> Option<(u16, u16)> {
        let w = tcgetwinsize(std::io::stdout())
            .or_else(|_| tcgetwinsize(std::io::stdin()))
            .ok()?;
        (w.ws_col > 0 && w.ws_row > 0).then_some((w.ws_col, w.ws_row))
    }

    /// Local stdin in chunks, read on a thread of its own (a blocking read of a terminal
    /// cannot be cancelled; the thread ends with the process); `None` at end of input.
    fn stdin_chunks() -> mpsc::Receiver<Option<Bytes>> {
        let (tx, rx) = mpsc::channel(4);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; 8192];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(None);
                        return;
                    }
                    Ok(n) => {
                        if tx
                            .blocking_send(Some(Bytes::copy_from_slice(&buf[..n])))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        rx
    }

    async fn next_chunk(recv: &mut Option<RecvHalf>) -> Option<Bytes> {
        match recv.as_mut() {
            Some(r) => r.recv().await.ok().flatten(),
            None => std::future::pending().await,
        }
    }

    async fn error_body(mut recv: RecvHalf) -> Vec<u8> {
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = recv.recv().await {
            let room = client::MAX_ERROR_MESSAGE.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        body
    }

    /// Runs the session: local stdin and terminal size out, output in, until the command
    /// ended; its exit status.
    pub(super) async fn session(
        rc: RcClient,
        stdout: &mut impl Write,
        stderr: &mut impl Write,
    ) -> Result<ExitStatus, CtlError> {
        let RcClient {
            session,
            protocol,
            error,
            stdin,
            stdout: remote_out,
            stderr: remote_err,
            resize,
        } = rc;
        let mut stdin_tx = stdin.map(|s| s.send);
        let mut input = stdin_tx.as_ref().map(|_| stdin_chunks());
        let mut resize_tx = resize.map(|s| s.send);
        if let (Some(r), Some((w, h))) = (resize_tx.as_mut(), size()) {
            let _ = r.send(client::resize_message(w, h)).await;
        }
        let mut winch = match resize_tx {
            Some(_) => {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
            }
            None => None,
        };
        let mut out = remote_out.map(|s| s.recv);
        let mut err = remote_err.map(|s| s.recv);
        let status_body = error_body(error.recv);
        tokio::pin!(status_body);
        let mut status = None;
        while out.is_some() || err.is_some() || status.is_none() {
            tokio::select! {
                chunk = async { input.as_mut()?.recv().await }, if input.is_some() => {
                    match (chunk.flatten(), stdin_tx.as_mut()) {
                        (Some(data), Some(tx)) => {
                            if tx.send(data).await.is_err() {
                                input = None;
                            }
                        }
                        _ => {
                            input = None;
                            if let Some(mut tx) = stdin_tx.take() {
                                let _ = tx.finish().await;
                            }
                        }
                    }
                }
                Some(()) = async { winch.as_mut()?.recv().await }, if winch.is_some() => {
                    if let (Some(r), Some((w, h))) = (resize_tx.as_mut(), size()) {
                        let _ = r.send(client::resize_message(w, h)).await;
                    }
                }
                chunk = next_chunk(&mut out), if out.is_some() => match chunk {
                    Some(data) => {
                        stdout.write_all(&data).map_err(CtlError::Output)?;
                        stdout.flush().map_err(CtlError::Output)?;
                    }
                    None => out = None,
                },
                chunk = next_chunk(&mut err), if err.is_some() => match chunk {
                    Some(data) => {
                        stderr.write_all(&data).map_err(CtlError::Output)?;
                        stderr.flush().map_err(CtlError::Output)?;
                    }
                    None => err = None,
                },
                body = &mut status_body, if status.is_none() => {
                    status = Some(client::exit_status(&protocol, &body));
                }
            }
        }
        session
            .close_and_wait(std::time::Duration::from_secs(1))
            .await;
        Ok(status.unwrap_or(ExitStatus {
            code: None,
            message: "the session ended without an exit status".into(),
        }))
    }
}

/// The runtime and the id of the running container a target names.
async fn running_container(
    data_dir: &Path,
    endpoint: &str,
    target: &Target,
) -> Result<(crate::cri::Cri, String), CtlError> {
    use crate::pods::spec::{LABEL_CONTAINER_NAME, LABEL_MANAGED_BY, LABEL_POD_UID, MANAGED_BY};
    let (uid, container) = resolve(data_dir, target)?;
    let cri = crate::cri::Cri::new(endpoint)?;
    let labels = std::collections::HashMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_POD_UID.to_string(), uid),
        (LABEL_CONTAINER_NAME.to_string(), container.clone()),
    ]);
    let running = cri
        .list_containers(labels)
        .await?
        .into_iter()
        .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
        .max_by_key(|c| c.created_at)
        .ok_or_else(|| {
            CtlError::NotFound(format!(
                "container {container} of pod {} is not running",
                target.pod
            ))
        })?;
    Ok((cri, running.id))
}

const HEADER: [&str; 6] = [
    "KIND",
    "NAMESPACE",
    "NAME",
    "RESOURCE-VERSION",
    "UID",
    "DETAIL",
];

/// How `get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// An aligned table with a detail column.
    #[default]
    Table,
    /// A JSON array of identities and versions (no bodies, so no Secret data).
    Json,
}

/// Prints the objects of `what` in the store in `data_dir` as a table.
pub fn get(data_dir: &Path, what: Resource, out: &mut impl Write) -> Result<(), CtlError> {
    get_as(data_dir, what, Output::Table, out)
}

/// Prints the objects of `what` in the store in `data_dir` in the `format` asked for.
pub fn get_as(
    data_dir: &Path,
    what: Resource,
    format: Output,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let store = Store::open_read_only(data_dir)?;
    if what == Resource::Devices {
        return get_devices(&store, format, out);
    }
    let objects = store.list(what.kinds())?;
    let local = local_pod_statuses(&store);
    if format == Output::Json {
        let items: Vec<serde_json::Value> = objects
            .iter()
            .map(|o| {
                let mut item = serde_json::json!({
                    "kind": o.key.kind,
                    "namespace": o.key.namespace,
                    "name": o.key.name,
                    "uid": o.uid,
                    "resourceVersion": o.resource_version.to_string(),
                });
                if let Some(summary) = local.get(&(o.key.namespace.clone(), o.uid.clone())) {
                    item["status"] = summary.status.clone().into();
                    item["ready"] = summary.ready.clone().into();
                    item["restarts"] = summary.restarts.into();
                    item["reported"] = summary.reported.into();
                }
                item
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &items).map_err(|e| CtlError::Output(e.into()))?;
        writeln!(out).map_err(CtlError::Output)?;
        return out.flush().map_err(CtlError::Output);
    }
    if objects.is_empty() {
        writeln!(out, "No {} in {}.", what.plural(), store.path().display())
            .map_err(CtlError::Output)?;
        return out.flush().map_err(CtlError::Output);
    }
    match what {
        Resource::Services => {
            let rows: Vec<[String; 5]> = objects.iter().map(service_row).collect();
            return write_table(out, SERVICE_HEADER, &rows).map_err(CtlError::Output);
        }
        Resource::Endpointslices => {
            let rows: Vec<[String; 5]> = objects.iter().map(endpoint_slice_row).collect();
            return write_table(out, ENDPOINT_SLICE_HEADER, &rows).map_err(CtlError::Output);
        }
        _ => {}
    }
    let rows: Vec<[String; 6]> = objects
        .iter()
        .map(|o| {
            let mut row = row(o);
            if let Some(summary) = local.get(&(o.key.namespace.clone(), o.uid.clone())) {
                row[5] = format!(
                    "status={} ready={} restarts={}{}",
                    cell(&summary.status),
                    summary.ready,
                    summary.restarts,
                    if summary.reported {
                        ""
                    } else {
                        " (not yet reported)"
                    }
                );
            }
            row
        })
        .collect();
    write_table(out, HEADER, &rows).map_err(CtlError::Output)
}

/// The columns of `ctl get services` (kubectl's, without EXTERNAL-IP and AGE).
const SERVICE_HEADER: [&str; 5] = ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT(S)"];

/// The columns of `ctl get endpointslices` (kubectl's, without AGE).
const ENDPOINT_SLICE_HEADER: [&str; 5] = ["NAMESPACE", "NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"];

/// A Service as `kubectl get services` shows it: type, cluster IP (`None` when headless),
/// ports as `PORT[:NODEPORT]/PROTOCOL`.
fn service_row(object: &StoredObject) -> [String; 5] {
    let body: Value = serde_json::from_slice(&object.body).unwrap_or_default();
    let spec = &body["spec"];
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p["port"].as_i64().unwrap_or_default();
            let protocol = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(node_port) => format!("{port}:{node_port}/{}", cell(protocol)),
                None => format!("{port}/{}", cell(protocol)),
            }
        })
        .collect();
    [
        cell(&object.key.namespace),
        cell(&object.key.name),
        cell(spec["type"].as_str().unwrap_or("ClusterIP")),
        cell(spec["clusterIP"].as_str().unwrap_or_default()),
        if ports.is_empty() {
            "<none>".to_string()
        } else {
            ports.join(",")
        },
    ]
}

/// An EndpointSlice as `kubectl get endpointslices` shows it: the ports, and the first three
/// addresses with how many more.
fn endpoint_slice_row(object: &StoredObject) -> [String; 5] {
    let body: Value = serde_json::from_slice(&object.body).unwrap_or_default();
    let ports: Vec<String> = body["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64().map(|n| n.to_string()))
        .collect();
    let addresses: Vec<String> = body["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str().map(cell))
        .collect();
    let endpoints = match addresses.len() {
        0 => "<unset>".to_string(),
        1..=3 => addresses.join(","),
        n => format!("{} + {} more...", addresses[..3].join(","), n - 3),
    };
    [
        cell(&object.key.namespace),
        cell(&object.key.name),
        cell(body["addressType"].as_str().unwrap_or_default()),
        if ports.is_empty() {
            "<unset>".to_string()
        } else {
            ports.join(",")
        },
        endpoints,
    ]
}

/// The columns of `ctl get devices`.
const DEVICE_HEADER: [&str; 6] = [
    "NAMESPACE",
    "NAME",
    "MODEL",
    "PROTOCOL",
    "STATE",
    "LAST-ONLINE",
];

/// The twins of the Devices in the store, by namespace and name, as `Devices::twin` would
/// give them (a body that does not parse is left out, with a warning on stderr).
fn local_twins(store: &Store) -> Result<Vec<TwinView>, CtlError> {
    let objects = store.list(&[devices::DEVICE_KIND, devices::DEVICE_MODEL_KIND])?;
    let models: HashMap<(String, String), devices::DeviceModel> = objects
        .iter()
        .filter(|o| o.key.kind == devices::DEVICE_MODEL_KIND)
        .filter_map(|o| twins::parse_model(o).ok())
        .map(|m| ((m.namespace().to_string(), m.name().to_string()), m))
        .collect();
    let stored: HashMap<(String, String), StoredTwin> = store
        .device_twins()?
        .into_iter()
        .map(|t| ((t.namespace.clone(), t.name.clone()), t))
        .collect();
    let mut views = Vec::new();
    for object in objects
        .iter()
        .filter(|o| o.key.kind == devices::DEVICE_KIND)
    {
        let device = match twins::parse_device(object) {
            Ok(device) => device,
            Err(e) => {
                eprintln!(
                    "warning: device {}/{} in the store cannot be read: {e}",
                    object.key.namespace, object.key.name
                );
                continue;
            }
        };
        let model = device
            .model_name()
            .and_then(|m| models.get(&(object.key.namespace.clone(), m.to_string())));
        let twin = stored
            .get(&(object.key.namespace.clone(), object.key.name.clone()))
            .filter(|t| t.uid == object.uid);
        views.push(twins::view(&device, model, twin));
    }
    Ok(views)
}

/// `edgecore ctl get devices`: the Devices and their twin's state, from the store.
fn get_devices(store: &Store, format: Output, out: &mut impl Write) -> Result<(), CtlError> {
    let views = local_twins(store)?;
    if format == Output::Json {
        let items: Vec<TwinView> = views
            .into_iter()
            .map(|v| TwinView {
                properties: Vec::new(),
                ..v
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &items).map_err(|e| CtlError::Output(e.into()))?;
        writeln!(out).map_err(CtlError::Output)?;
        return out.flush().map_err(CtlError::Output);
    }
    if views.is_empty() {
        writeln!(out, "No devices in {}.", store.path().display()).map_err(CtlError::Output)?;
        return out.flush().map_err(CtlError::Output);
    }
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|v| {
            [
                cell(&v.namespace),
                cell(&v.name),
                cell(&v.model),
                cell(&v.protocol),
                cell(&v.state),
                cell(&v.last_online_time),
            ]
        })
        .collect();
    write_table(out, DEVICE_HEADER, &rows).map_err(CtlError::Output)
}

/// The columns of `ctl twin`.
const TWIN_HEADER: [&str; 7] = [
    "PROPERTY",
    "TYPE",
    "ACCESS",
    "DESIRED",
    "REPORTED",
    "REPORTED-AT",
    "OBSERVED-DESIRED",
];

/// `edgecore ctl twin`: one device's twin from the store (desired values from the spec,
/// reported and observed desired values as the mapper last gave them).
pub fn twin(
    data_dir: &Path,
    namespace: &str,
    name: &str,
    format: Output,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let store = Store::open_read_only(data_dir)?;
    let Some(view) = local_twins(&store)?
        .into_iter()
        .find(|v| v.namespace == namespace && v.name == name)
    else {
        return Err(CtlError::NotFound(format!(
            "device {namespace}/{name} is not bound to this node (not in {})",
            store.path().display()
        )));
    };
    if format == Output::Json {
        serde_json::to_writer_pretty(&mut *out, &view).map_err(|e| CtlError::Output(e.into()))?;
        writeln!(out).map_err(CtlError::Output)?;
        return out.flush().map_err(CtlError::Output);
    }
    let or_none = |text: &str| if text.is_empty() { "<none>" } else { text }.to_string();
    writeln!(
        out,
        "Device {}/{}: model {}, protocol {}, state {}, last online {}",
        cell(&view.namespace),
        cell(&view.name),
        cell(&view.model),
        cell(&view.protocol),
        cell(&view.state),
        cell(&view.last_online_time),
    )
    .map_err(CtlError::Output)?;
    let value = |p: &Option<devices::TwinProperty>| {
        p.as_ref()
            .map_or_else(|| "<none>".to_string(), |p| or_none(&cell_value(&p.value)))
    };
    let rows: Vec<[String; 7]> = view
        .properties
        .iter()
        .map(|p| {
            let at = p
                .reported
                .as_ref()
                .and_then(|r| r.metadata.get("timestamp"))
                .map_or_else(|| "<none>".to_string(), |t| reported_at(t));
            [
                cell(&p.name),
                cell(&p.type_),
                cell(&p.access_mode),
                value(&p.desired),
                value(&p.reported),
                at,
                value(&p.observed_desired),
            ]
        })
        .collect();
    write_table(out, TWIN_HEADER, &rows).map_err(CtlError::Output)
}

/// A twin value for the table: like [`cell`], but an empty value stays empty (`""`).
fn cell_value(text: &str) -> String {
    if text.is_empty() {
        "\"\"".to_string()
    } else {
        cell(text)
    }
}

/// A reported value's `metadata.timestamp` (ms since the epoch) as RFC 3339 UTC; the text as
/// it is when it is not a number.
fn reported_at(timestamp: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    timestamp
        .parse::<i64>()
        .ok()
        .and_then(|ms| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        })
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| cell(timestamp))
}

/// A pod as this gateway last saw it (its latest status report), in kubectl's words.
#[derive(Debug, Clone, PartialEq)]
struct LocalPod {
    /// kubectl's STATUS column: a container's waiting or terminated reason, else the phase.
    status: String,
    /// Ready containers / containers.
    ready: String,
    restarts: u64,
    /// The cloud acknowledged this report.
    reported: bool,
}

/// The latest local status of each pod, by (namespace, uid). An unreadable outbox is left out:
/// the objects are still listed.
fn local_pod_statuses(store: &Store) -> HashMap<(String, String), LocalPod> {
    let Ok(reports) = store.reports() else {
        return HashMap::new();
    };
    reports
        .reports
        .into_iter()
        .filter(|r| r.object.kind == "Pod")
        .filter_map(|r| {
            let status = r.status.as_ref()?;
            let mut summary = summarize(status);
            summary.reported = r.acknowledged;
            if r.pod_deleted {
                summary.status = "Terminated".into();
            }
            Some(((r.object.namespace, r.object.uid), summary))
        })
        .collect()
}

fn summarize(status: &Value) -> LocalPod {
    let containers: Vec<&Value> = status["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let ready = containers.iter().filter(|c| c["ready"] == true).count();
    let restarts = containers
        .iter()
        .filter_map(|c| c["restartCount"].as_u64())
        .sum();
    let reason = containers.iter().find_map(|c| {
        c["state"]["waiting"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty() && *r != "ContainerCreating")
            .or_else(|| c["state"]["terminated"]["reason"].as_str())
    });
    let phase = status["phase"].as_str().unwrap_or("Pending");
    LocalPod {
        status: reason.unwrap_or(phase).to_string(),
        ready: format!("{ready}/{}", containers.len()),
        restarts,
        reported: false,
    }
}

fn row(object: &StoredObject) -> [String; 6] {
    let namespace = if object.key.namespace.is_empty() {
        "<none>"
    } else {
        &object.key.namespace
    };
    [
        cell(&object.key.kind),
        cell(namespace),
        cell(&object.key.name),
        object.resource_version.to_string(),
        cell(&object.uid),
        detail(&object.key.kind, &object.body),
    ]
}

/// A value for the table: whitespace and control characters (which would break the columns or
/// reach the terminal) become `?`, an empty value `<none>`.
fn cell(text: &str) -> String {
    if text.is_empty() {
        return "<none>".to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The DETAIL column: a few facts from the body. Never a Secret's values.
fn detail(kind: &str, body: &[u8]) -> String {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return "<unreadable body>".to_string();
    };
    let text = |pointer: &str| body.pointer(pointer).and_then(Value::as_str).map(cell);
    match kind {
        "Pod" => format!(
            "phase={} node={}",
            text("/status/phase").unwrap_or_else(|| "Pending".to_string()),
            text("/spec/nodeName").unwrap_or_else(|| "<none>".to_string())
        ),
        "ConfigMap" => format!("keys={}", key_names(&body, &["data", "binaryData"])),
        "Secret" => format!(
            "keys={} (values hidden)",
            key_names(&body, &["data", "stringData"])
        ),
        "Device" => match serde_json::from_value::<devices::Device>(body.clone()) {
            Ok(device) => format!(
                "model={} node={}",
                cell(device.model_name().unwrap_or_default()),
                cell(&device.spec.node_name)
            ),
            Err(_) => "<unreadable body>".to_string(),
        },
        "DeviceModel" => format!(
            "protocol={} properties={}",
            text("/spec/protocol").unwrap_or_else(|| "<none>".to_string()),
            body.pointer("/spec/properties")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        ),
        "Node" => {
            let ready = body
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                .and_then(|c| c.get("status"))
                .and_then(Value::as_str)
                .map_or_else(|| "Unknown".to_string(), cell);
            format!("ready={ready}")
        }
        _ => String::new(),
    }
}

/// The sorted key names of the maps `fields` of `body`, comma-separated; only the names.
fn key_names(body: &Value, fields: &[&str]) -> String {
    let names: BTreeSet<String> = fields
        .iter()
        .filter_map(|field| body.get(*field).and_then(Value::as_object))
        .flat_map(|map| map.keys().map(|k| cell(k)))
        .collect();
    if names.is_empty() {
        return "<none>".to_string();
    }
    names.into_iter().collect::<Vec<_>>().join(",")
}

/// Writes rows under `header` in columns three spaces apart, as kubectl does.
fn write_table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let header = header.map(str::to_string);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (value, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(value);
            } else {
                line.push_str(&format!("{value:<width$}   "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    out.flush()
}

/// `edgecore ctl restart`: asks the running daemon to restart the pod's containers now (the
/// pod keeps its sandbox, IP and volumes; each container's restartCount grows by one).
pub async fn restart(
    data_dir: &Path,
    namespace: &str,
    pod: &str,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let response = crate::control::request(
        data_dir,
        &crate::control::Request::Restart {
            namespace: namespace.to_string(),
            name: pod.to_string(),
        },
    )
    .await?;
    if !response.ok {
        return Err(CtlError::Refused(response.message));
    }
    writeln!(out, "{}", response.message).map_err(CtlError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;
    use proto::sync::{ObjectKey, StoreOp};

    fn put(kind: &str, namespace: &str, name: &str, rv: u64, body: &str) -> StoreOp {
        StoreOp::Put {
            key: ObjectKey::new(kind, namespace, name),
            uid: format!("uid-{name}"),
            resource_version: rv,
            body: body.as_bytes().to_vec(),
        }
    }

    fn output(dir: &Path, what: Resource) -> String {
        let mut out = Vec::new();
        get(dir, what, &mut out).expect("get");
        String::from_utf8(out).expect("utf-8")
    }

    fn filled_store() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[
                put(
                    "Pod",
                    "default",
                    "web",
                    42,
                    r#"{"spec":{"nodeName":"gw-1"},"status":{"phase":"Running"}}"#,
                ),
                put("Pod", "default", "new", 43, r#"{"spec":{}}"#),
                put(
                    "ConfigMap",
                    "default",
                    "settings",
                    7,
                    r#"{"data":{"b":"2","a":"1"},"binaryData":{"blob":"AAE="}}"#,
                ),
                put(
                    "Node",
                    "",
                    "gw-1",
                    3,
                    r#"{"status":{"conditions":[{"type":"MemoryPressure","status":"False"},{"type":"Ready","status":"True"}]}}"#,
                ),
                put("Node", "", "gw-2", 4, "{}"),
                put("ConfigMap", "default", "broken", 8, "{not json"),
            ])
            .expect("apply");
        dir
    }

    #[test]
    fn get_all_prints_an_aligned_table_with_details() {
        let dir = filled_store();
        let text = output(dir.path(), Resource::All);
        let expected = "\
KIND        NAMESPACE   NAME       RESOURCE-VERSION   UID            DETAIL
ConfigMap   default     broken     8                  uid-broken     <unreadable body>
ConfigMap   default     settings   7                  uid-settings   keys=a,b,blob
Node        <none>      gw-1       3                  uid-gw-1       ready=True
Node        <none>      gw-2       4                  uid-gw-2       ready=Unknown
Pod         default     new        43                 uid-new        phase=Pending node=<none>
Pod         default     web        42                 uid-web        phase=Running node=gw-1
";
        assert_eq!(text, expected);
    }

    #[test]
    fn services_and_endpoint_slices_print_kubectls_columns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[
                put(
                    "Service",
                    "default",
                    "web",
                    5,
                    r#"{"spec":{"type":"NodePort","clusterIP":"10.96.0.20","ports":[{"port":80,"nodePort":30080,"protocol":"TCP"},{"port":53,"protocol":"UDP"}]}}"#,
                ),
                put(
                    "Service",
                    "default",
                    "db",
                    6,
                    r#"{"spec":{"clusterIP":"None","ports":[{"port":5432}]}}"#,
                ),
                put(
                    "EndpointSlice",
                    "default",
                    "web-abc",
                    7,
                    r#"{"addressType":"IPv4","ports":[{"port":8080}],"endpoints":[{"addresses":["10.0.0.1"]},{"addresses":["10.0.0.2"]},{"addresses":["10.0.0.3"]},{"addresses":["10.0.0.4"]}]}"#,
                ),
                put(
                    "EndpointSlice",
                    "default",
                    "db-xyz",
                    8,
                    r#"{"addressType":"IPv4","endpoints":[]}"#,
                ),
            ])
            .expect("apply");
        assert_eq!(
            output(dir.path(), Resource::Services),
            "\
NAMESPACE   NAME   TYPE        CLUSTER-IP   PORT(S)
default     db     ClusterIP   None         5432/TCP
default     web    NodePort    10.96.0.20   80:30080/TCP,53/UDP
"
        );
        assert_eq!(
            output(dir.path(), Resource::Endpointslices),
            "\
NAMESPACE   NAME      ADDRESSTYPE   PORTS     ENDPOINTS
default     db-xyz    IPv4          <unset>   <unset>
default     web-abc   IPv4          8080      10.0.0.1,10.0.0.2,10.0.0.3 + 1 more...
"
        );
    }

    #[test]
    fn get_filters_by_resource() {
        let dir = filled_store();
        let text = output(dir.path(), Resource::Nodes);
        let names: Vec<&str> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        assert_eq!(names, ["gw-1", "gw-2"]);
        assert_eq!(
            output(dir.path(), Resource::Secrets),
            format!("No secrets in {}.\n", dir.path().join("edge.db").display())
        );
    }

    #[test]
    fn cri_log_lines_become_messages_with_partials_joined() {
        let text = "2026-11-24T05:31:04.809839837Z stdout F tick\n\
                    2026-11-24T05:31:05.000000000Z stderr P par\n\
                    2026-11-24T05:31:05.000000001Z stderr F tial line\n\
                    2026-11-24T05:31:06.000000000Z stdout F \n";
        assert_eq!(log_messages(text), ["tick", "partial line", ""]);
    }

    #[test]
    fn json_lists_identities_and_versions_only() {
        let dir = filled_store();
        let mut out = Vec::new();
        get_as(dir.path(), Resource::All, Output::Json, &mut out).expect("get");
        let items: Vec<serde_json::Value> = serde_json::from_slice(&out).expect("json");
        assert!(!items.is_empty());
        for item in &items {
            let keys: Vec<&str> = item
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                keys,
                ["kind", "name", "namespace", "resourceVersion", "uid"]
            );
        }
    }

    #[test]
    fn secret_values_are_never_printed() {
        const VALUE: &str = "sentinel-secret-value";
        // base64 of VALUE, as a Secret's `data` holds it.
        const VALUE_BASE64: &str = "c2VudGluZWwtc2VjcmV0LXZhbHVl";
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let body = format!(
            r#"{{"kind":"Secret","metadata":{{"name":"db","annotations":{{"note":"{VALUE}"}}}},
                "data":{{"password":"{VALUE_BASE64}"}},"stringData":{{"token":"{VALUE}"}},
                "type":"Opaque"}}"#
        );
        store
            .apply(&[
                put("Secret", "default", "db", 5, &body),
                put(
                    "Secret",
                    "default",
                    "garbled",
                    6,
                    &format!("{VALUE_BASE64}{{"),
                ),
            ])
            .expect("apply");
        for what in [Resource::Secrets, Resource::All] {
            let text = output(dir.path(), what);
            assert!(
                text.contains("keys=password,token (values hidden)"),
                "{text}"
            );
            assert!(text.contains("<unreadable body>"), "{text}");
            assert!(!text.contains(VALUE_BASE64), "{text}");
            assert!(!text.contains(VALUE), "{text}");
            assert!(!text.contains("sentinel"), "{text}");
        }
    }

    #[test]
    fn an_empty_store_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        assert_eq!(
            output(dir.path(), Resource::All),
            format!("No objects in {}.\n", dir.path().join("edge.db").display())
        );
    }

    #[test]
    fn a_missing_store_is_a_store_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = get(dir.path(), Resource::All, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, CtlError::Store(StoreError::Missing { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("edge.db"), "{err}");
    }

    #[test]
    fn resources_accept_kubectl_names() {
        for (name, resource) in [
            ("pods", Resource::Pods),
            ("pod", Resource::Pods),
            ("po", Resource::Pods),
            ("configmaps", Resource::Configmaps),
            ("configmap", Resource::Configmaps),
            ("cm", Resource::Configmaps),
            ("secrets", Resource::Secrets),
            ("secret", Resource::Secrets),
            ("nodes", Resource::Nodes),
            ("node", Resource::Nodes),
            ("no", Resource::Nodes),
            ("devices", Resource::Devices),
            ("device", Resource::Devices),
            ("devicemodels", Resource::Devicemodels),
            ("services", Resource::Services),
            ("svc", Resource::Services),
            ("endpointslices", Resource::Endpointslices),
            ("endpointslice", Resource::Endpointslices),
            ("all", Resource::All),
        ] {
            assert_eq!(Resource::from_str(name, false), Ok(resource), "{name}");
        }
    }

    #[test]
    fn the_cri_endpoint_is_the_flag_else_the_daemons_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = cri_endpoint(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("runtime.json does not exist"), "{err}");
        assert!(err.contains("--cri-endpoint"), "{err}");
        record_runtime(dir.path(), Some("unix:///run/k3s/containerd.sock")).expect("record");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(RUNTIME_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            cri_endpoint(dir.path(), None).expect("recorded"),
            "unix:///run/k3s/containerd.sock"
        );
        assert_eq!(
            cri_endpoint(dir.path(), Some("unix:///flag.sock")).expect("flag"),
            "unix:///flag.sock"
        );
        record_runtime(dir.path(), None).expect("record");
        let err = cri_endpoint(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("--no-pod-runtime"), "{err}");
        std::fs::write(dir.path().join(RUNTIME_FILE), "{not json").expect("write");
        let err = cri_endpoint(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("is not a runtime record"), "{err}");
    }

    /// A store with a device twin as the daemon leaves it.
    fn device_store() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[
                put(
                    "DeviceModel",
                    "default",
                    "thermo",
                    1,
                    r#"{"spec":{"protocol":"modbus","properties":[{"name":"setpoint","type":"INT","accessMode":"ReadWrite"}]}}"#,
                ),
                put(
                    "Device",
                    "default",
                    "sensor",
                    2,
                    r#"{"spec":{"deviceModelRef":{"name":"thermo"},"nodeName":"gw-1",
                        "protocol":{"protocolName":"modbus"},
                        "properties":[{"name":"setpoint","desired":{"value":"20"}},{"name":"raw"}]}}"#,
                ),
                put("Device", "default", "bare", 3, r#"{"spec":{}}"#),
            ])
            .expect("apply");
        let value = |v: &str, ts: &str| devices::TwinProperty {
            value: v.into(),
            metadata: [("timestamp".to_string(), ts.to_string())].into(),
        };
        store
            .write_twins(&crate::store::TwinsWrite {
                devices: vec![StoredTwin {
                    namespace: "default".into(),
                    name: "sensor".into(),
                    uid: "uid-sensor".into(),
                    state: "ok".into(),
                    last_online_time: "2026-12-05T10:00:00Z".into(),
                    ..StoredTwin::default()
                }],
                properties: vec![(
                    "default".into(),
                    "sensor".into(),
                    "setpoint".into(),
                    crate::store::StoredProperty {
                        desired: None,
                        reported: Some(value("19", "1764928800000")),
                        observed_desired: Some(value("20", "1764928800000")),
                    },
                )],
                ..Default::default()
            })
            .expect("twins");
        dir
    }

    #[test]
    fn get_devices_shows_model_protocol_state_and_last_online() {
        let dir = device_store();
        let text = output(dir.path(), Resource::Devices);
        let expected = "\
NAMESPACE   NAME     MODEL    PROTOCOL   STATE    LAST-ONLINE
default     bare     <none>   <none>     <none>   <none>
default     sensor   thermo   modbus     ok       2026-12-05T10:00:00Z
";
        assert_eq!(text, expected);
        let mut out = Vec::new();
        get_as(dir.path(), Resource::Devices, Output::Json, &mut out).expect("get");
        let items: Vec<TwinView> = serde_json::from_slice(&out).expect("json");
        assert_eq!(items[1].state, "ok");
        assert!(items[1].properties.is_empty());
        let all = output(dir.path(), Resource::All);
        assert!(all.contains("model=thermo node=gw-1"), "{all}");
        assert!(all.contains("protocol=modbus properties=1"), "{all}");
    }

    #[test]
    fn twin_shows_desired_reported_and_observed_values() {
        let dir = device_store();
        let mut out = Vec::new();
        twin(dir.path(), "default", "sensor", Output::Table, &mut out).expect("twin");
        let expected = "\
Device default/sensor: model thermo, protocol modbus, state ok, last online 2026-12-05T10:00:00Z
PROPERTY   TYPE     ACCESS      DESIRED   REPORTED   REPORTED-AT            OBSERVED-DESIRED
setpoint   INT      ReadWrite   20        19         2025-12-05T10:00:00Z   20
raw        <none>   <none>      <none>    <none>     <none>                 <none>
";
        assert_eq!(String::from_utf8(out).expect("utf-8"), expected);
        let mut out = Vec::new();
        twin(dir.path(), "default", "sensor", Output::Json, &mut out).expect("twin");
        let view: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(view["properties"][0]["desired"]["value"], "20");
        assert_eq!(view["properties"][0]["reported"]["value"], "19");
        assert_eq!(view["properties"][0]["observedDesired"]["value"], "20");
        assert_eq!(view["properties"][0]["accessMode"], "ReadWrite");
        assert!(view["properties"][1].get("reported").is_none(), "{view}");
        let err = twin(
            dir.path(),
            "other",
            "sensor",
            Output::Table,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("device other/sensor is not bound to this node"),
            "{err}"
        );
    }

    #[test]
    fn cells_cannot_break_the_table() {
        assert_eq!(cell("a b\tc\nd\u{1b}[31m"), "a?b?c?d?[31m");
        assert_eq!(cell(""), "<none>");
    }

    #[test]
    fn local_status_reads_like_kubectl() {
        let crashing = serde_json::json!({
            "phase": "Running",
            "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 3,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            ],
        });
        assert_eq!(
            summarize(&crashing),
            LocalPod {
                status: "CrashLoopBackOff".into(),
                ready: "1/2".into(),
                restarts: 3,
                reported: false,
            }
        );
        let done = serde_json::json!({
            "phase": "Succeeded",
            "containerStatuses": [{"name": "a", "ready": false, "restartCount": 0,
                "state": {"terminated": {"reason": "Completed", "exitCode": 0}}}],
        });
        assert_eq!(summarize(&done).status, "Completed");
        let starting = serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{"name": "a", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}],
        });
        assert_eq!(summarize(&starting).status, "Pending");
    }
}
