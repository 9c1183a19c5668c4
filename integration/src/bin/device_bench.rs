//! `device-bench`: a load generator for devices: twin reports per second from mappers to the
//! API through one cloudcore, the latency of one reported value from a mapper to the API, and
//! the memory of edgecore and of the Modbus mapper holding 100 devices.
//!
//! Everything runs on 127.0.0.1 with real parts: `cloudcore serve` as a child process (its
//! embedded API, or with `--control-plane kube` a real kube-apiserver from
//! `integration::cluster` with the CRDs of `deploy/kubernetes/devices-crds.yaml` applied), the
//! Devices and the DeviceModel created through kube-rs, the edges joined with tokens. The bench
//! itself is the mappers: per edge, a DMI client (`dmi::pb`, tonic over the edge's Unix socket)
//! that registers (`MapperRegister`, protocol `bench`) and serves a `DeviceMapperService` on a
//! socket of its own that accepts whatever edgecore sends it. The API side is a kube-rs watch on
//! the Devices: a property's value "reached the API" when a watch event shows it in
//! `status.twins[].reported`.
//!
//! Per round, three parts, each on a fresh cloudcore and data dir:
//!
//! - **One edge** (`--solo-devices` × `--solo-properties`, 1,000 properties by default): one
//!   in-process edge (`edgecore::run`, its own data dir and DMI socket, no pod runtime, no MQTT).
//!   The Devices are created and timed until the edge hands all of them to its mapper
//!   (`MapperRegister` with `withData`). Then *throughput*: for `--load-secs`, `--in-flight`
//!   `ReportDeviceStatus` calls at once per edge, round robin over every (device, property), each
//!   a new value (a per-property counter) with its timestamp in milliseconds, one twin per call
//!   as KubeEdge's mapper framework sends them; then timed until the API shows every
//!   property's last value. Values sent per second and values that reached the API per second
//!   are both reported: the edge coalesces per property (the latest value wins) and paces each
//!   device by its `reportCycle` (`--report-cycle-ms`), so fewer values reach the API than were
//!   sent. Then *latency*: `--latency-samples` single reports one after the other (the load
//!   stopped), each timed from the call until the watch shows the value.
//! - **Fleet** (`--edges` × `--devices-per-edge` × `--properties-per-device`): the same load
//!   from every edge's mapper at once, all edges in this process.
//! - **Memory**: one real `edgecore run` process (so its RSS is its own), connected, its
//!   `VmRSS` read after `--quiet-secs` with no devices, then with `--memory-devices` Devices of
//!   `--memory-properties` properties, every property reported at least once and the API
//!   caught up. Then the Modbus mapper: `modbus-mapper` registers with that edge and reads
//!   `--modbus-devices` Devices (protocol `modbus`) from pymodbus's simulator
//!   (`integration/scripts/modbus_sim.py`); once the API shows every one `ok` with its twins,
//!   the mapper's `VmRSS` (and edgecore's again). Skipped, saying so, when the script is
//!   missing or `--modbus-devices 0`.
//!
//! A failure, Ctrl-C or `--timeout-secs` stops everything this bench started and keeps the temp
//! dir (logs, stores) for inspection.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use dmi::pb;
use dmi::pb::device_manager_service_client::DeviceManagerServiceClient;
use dmi::pb::device_mapper_service_server::{DeviceMapperService, DeviceMapperServiceServer};
use futures::StreamExt;
use integration::Cloud;
use integration::bench::{self, Failures, Machine, Spread, mib, ms, percentile};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The namespace of every Device and DeviceModel.
const NAMESPACE: &str = "device-bench";
/// The protocol of the bench's devices, and of the mappers the bench plays.
const PROTOCOL: &str = "bench";
/// The DeviceModel of the bench's devices.
const MODEL: &str = "bench-model";
/// The DeviceModel of the Modbus devices.
const MODBUS_MODEL: &str = "modbus-model";
/// The node of the one-edge and memory parts.
const SOLO_NODE: &str = "device-solo";
/// How long the API may take to answer after cloudcore reports healthy.
const API_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the Device CRD may take to be served after the API answers.
const CRD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an edge may take to connect, and its DMI socket to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the Devices may take to reach their edges' mappers once created.
const RELAY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the API may take to show every last value once the load stopped. Far above any
/// healthy figure: reaching it means reports are lost, which is a failure.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one latency sample may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tool (join, token, kubectl) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the Modbus devices may take to be read and shown `ok` in the API.
const MODBUS_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// API requests (creates) in flight at once.
const CREATE_CONCURRENCY: usize = 16;
/// The pymodbus simulator, written for the tests (`--port P`, slave 1, registers all zero).
const MODBUS_SIM: &str = "scripts/modbus_sim.py";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ControlPlane {
    /// cloudcore's own API (`--control-plane embedded`).
    Embedded,
    /// A real kube-apiserver (`integration::cluster`, needs root and ../shared/k8s).
    Kube,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Part {
    Solo,
    Fleet,
    Memory,
}

#[derive(Parser, Debug)]
#[command(
    name = "device-bench",
    about = "Measures twin reports per second from mappers to the API (1 edge and a fleet), the \
             latency of one reported value to the API, and edgecore's and the Modbus mapper's \
             memory with 100 devices"
)]
struct Cli {
    /// Which API cloudcore uses.
    #[arg(long, value_enum, default_value_t = ControlPlane::Embedded)]
    control_plane: ControlPlane,
    /// The parts to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Solo, Part::Fleet, Part::Memory])]
    parts: Vec<Part>,
    /// Devices of the one-edge part.
    #[arg(long, default_value_t = 100)]
    solo_devices: usize,
    /// Properties per device of the one-edge part.
    #[arg(long, default_value_t = 10)]
    solo_properties: usize,
    /// Edges of the fleet part.
    #[arg(long, default_value_t = 100)]
    edges: usize,
    /// Devices per edge of the fleet part.
    #[arg(long, default_value_t = 10)]
    devices_per_edge: usize,
    /// Properties per device of the fleet part.
    #[arg(long, default_value_t = 4)]
    properties_per_device: usize,
    /// Seconds of load per throughput measurement.
    #[arg(long, default_value_t = 10)]
    load_secs: u64,
    /// `ReportDeviceStatus` calls in flight at once per edge.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Every property's `reportCycle` (and `collectCycle`), in milliseconds; 1000 is what a
    /// property without one gets.
    #[arg(long, default_value_t = 1)]
    report_cycle_ms: u64,
    /// Single reports timed one after the other (one-edge part).
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Devices of the memory part (real edgecore process).
    #[arg(long, default_value_t = 100)]
    memory_devices: usize,
    /// Properties per device of the memory part.
    #[arg(long, default_value_t = 10)]
    memory_properties: usize,
    /// Modbus devices read by `modbus-mapper` in the memory part; 0 skips the mapper.
    #[arg(long, default_value_t = 100)]
    modbus_devices: usize,
    /// Properties (holding registers) per Modbus device, each read every second.
    #[arg(long, default_value_t = 10)]
    modbus_properties: usize,
    /// Quiet seconds before each memory reading.
    #[arg(long, default_value_t = 3)]
    quiet_secs: u64,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 16)]
    join_concurrency: usize,
    /// Rounds, each on fresh cloudcores and data dirs; figures are medians across rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// The edgecore binary [default: `edgecore` next to this executable].
    #[arg(long)]
    edgecore: Option<PathBuf>,
    /// The Modbus mapper binary [default: `modbus-mapper` next to this executable].
    #[arg(long)]
    modbus_mapper: Option<PathBuf>,
    /// Give up (and stop everything) after this many seconds in total.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--solo-devices", c.solo_devices),
            ("--solo-properties", c.solo_properties),
            ("--edges", c.edges),
            ("--devices-per-edge", c.devices_per_edge),
            ("--properties-per-device", c.properties_per_device),
            ("--load-secs", c.load_secs as usize),
            ("--in-flight", c.in_flight),
            ("--report-cycle-ms", c.report_cycle_ms as usize),
            ("--latency-samples", c.latency_samples),
            ("--memory-devices", c.memory_devices),
            ("--memory-properties", c.memory_properties),
            ("--modbus-properties", c.modbus_properties),
            ("--join-concurrency", c.join_concurrency),
            ("--rounds", c.rounds),
        ]
    }) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    bench::init_tracing();
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(&cli)));
    bench::finish(result, cli.json)
}

/// The binaries the bench starts.
struct Binaries {
    cloudcore: PathBuf,
    edgecore: PathBuf,
    /// `None` when the Modbus part is skipped, with why.
    modbus: Result<(PathBuf, PathBuf), String>,
}

impl Binaries {
    fn find(cli: &Cli) -> Result<Binaries> {
        let memory = cli.parts.contains(&Part::Memory);
        let modbus = if !memory || cli.modbus_devices == 0 {
            Err("--modbus-devices 0".to_string())
        } else {
            modbus_parts(cli)?
        };
        Ok(Binaries {
            cloudcore: bench::cloudcore_binary(cli.cloudcore.as_ref())?,
            edgecore: if memory {
                bench::edgecore_binary(cli.edgecore.as_ref())?
            } else {
                PathBuf::new()
            },
            modbus,
        })
    }
}

/// The mapper binary and the simulator script; `Err(why)` when the script is missing (the
/// part is skipped, saying so), an error when the mapper or Python's pymodbus is.
fn modbus_parts(cli: &Cli) -> Result<Result<(PathBuf, PathBuf), String>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(MODBUS_SIM);
    if !script.is_file() {
        return Ok(Err(format!("{} is missing", script.display())));
    }
    let mapper = match &cli.modbus_mapper {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable's path")?
            .with_file_name("modbus-mapper"),
    };
    ensure!(
        mapper.is_file(),
        "{} is missing: build it with `cargo build --release -p mapper-modbus` or pass \
         --modbus-mapper PATH (or --modbus-devices 0 to skip the Modbus mapper)",
        mapper.display()
    );
    let pymodbus = Command::new("python3")
        .args(["-c", "import pymodbus"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        pymodbus,
        "python3 with pymodbus is needed for the Modbus simulator: pip install pymodbus (or \
         --modbus-devices 0 to skip the Modbus mapper)"
    );
    Ok(Ok((mapper, script)))
}

/// Runs the rounds under the overall timeout; on failure keeps the temp dir and says where.
async fn run(cli: &Cli) -> Result<Report> {
    let binaries = Binaries::find(cli)?;
    let dir = tempfile::Builder::new()
        .prefix("device-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let work = async {
        let mut rounds = Vec::with_capacity(cli.rounds);
        for index in 1..=cli.rounds {
            let round = run_round(cli, &binaries, &dir.path().join(format!("round-{index}")))
                .await
                .with_context(|| format!("round {index}"))?;
            eprintln!("round {index}/{}: {}", cli.rounds, round.line());
            rounds.push(round);
        }
        anyhow::Ok(rounds)
    };
    let limit = Duration::from_secs(cli.timeout_secs);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(limit, work) => outcome
            .unwrap_or_else(|_| Err(anyhow!("gave up after {} s (--timeout-secs)", cli.timeout_secs))),
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(rounds) => Ok(Report {
            settings: Settings::of(cli),
            machine: Machine::read(),
            modbus_skipped: binaries.modbus.err(),
            rounds,
        }),
        Err(e) => {
            let kept = dir.keep();
            eprintln!("logs and data dirs are kept in {}", kept.display());
            Err(e)
        }
    }
}

/// One round's figures; a part not run is `None`.
struct Round {
    solo: Option<Throughput>,
    latencies: Vec<Duration>,
    fleet: Option<Throughput>,
    memory: Option<Memory>,
}

impl Round {
    fn line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.solo {
            parts.push(format!(
                "one edge {:.0} values/s sent, {:.0}/s reached the API (latency p50 {:.1} ms, \
                 p99 {:.1} ms)",
                t.sent_per_sec(),
                t.api_values_per_sec(),
                ms(percentile(&self.latencies, 0.5)),
                ms(percentile(&self.latencies, 0.99)),
            ));
        }
        if let Some(t) = &self.fleet {
            parts.push(format!(
                "fleet {:.0} values/s sent, {:.0}/s reached the API",
                t.sent_per_sec(),
                t.api_values_per_sec()
            ));
        }
        if let Some(m) = &self.memory {
            parts.push(format!(
                "edgecore {:.1} -> {:.1} MiB with {} devices",
                mib(m.edge_empty_kib),
                mib(m.edge_devices_kib),
                m.devices
            ));
            if let Some(modbus) = &m.modbus {
                parts.push(format!(
                    "modbus-mapper {:.1} MiB with {} devices",
                    mib(modbus.mapper_kib),
                    modbus.devices
                ));
            }
        }
        parts.join("; ")
    }
}

async fn run_round(cli: &Cli, binaries: &Binaries, dir: &Path) -> Result<Round> {
    let mut round = Round {
        solo: None,
        latencies: Vec::new(),
        fleet: None,
        memory: None,
    };
    if cli.parts.contains(&Part::Solo) {
        let shape = Shape {
            edges: 1,
            devices: cli.solo_devices,
            properties: cli.solo_properties,
        };
        eprintln!("one edge: {}", shape.describe());
        let dir = dir.join("one-edge");
        let mut api = start_api(cli.control_plane, &binaries.cloudcore, &dir).await?;
        let outcome = measure_load(
            cli,
            &mut api,
            &binaries.cloudcore,
            &dir,
            shape,
            cli.latency_samples,
        )
        .await;
        let (throughput, latencies) = stop_api(api, outcome).context("one edge")?;
        round.solo = Some(throughput);
        round.latencies = latencies;
    }
    if cli.parts.contains(&Part::Fleet) {
        let shape = Shape {
            edges: cli.edges,
            devices: cli.devices_per_edge,
            properties: cli.properties_per_device,
        };
        eprintln!("fleet: {}", shape.describe());
        let dir = dir.join("fleet");
        let mut api = start_api(cli.control_plane, &binaries.cloudcore, &dir).await?;
        let outcome = measure_load(cli, &mut api, &binaries.cloudcore, &dir, shape, 0).await;
        let (throughput, _) = stop_api(api, outcome).context("fleet")?;
        round.fleet = Some(throughput);
    }
    if cli.parts.contains(&Part::Memory) {
        eprintln!(
            "memory: edgecore with {} x {} properties",
            cli.memory_devices, cli.memory_properties
        );
        let dir = dir.join("memory");
        let mut api = start_api(cli.control_plane, &binaries.cloudcore, &dir).await?;
        let outcome = measure_memory(cli, &mut api, binaries, &dir).await;
        round.memory = Some(stop_api(api, outcome).context("memory")?);
    }
    Ok(round)
}

// ---------------------------------------------------------------------------------------------
// The cloud side: cloudcore, its API, the Device watch

/// A cloudcore and the API the bench writes Devices to and watches.
struct CloudApi {
    cloud: Cloud,
    client: kube::Client,
    /// The real control plane in kube mode; dropped (stopped, wiped) after cloudcore.
    cluster: Option<KubeCluster>,
}

impl CloudApi {
    fn devices(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), NAMESPACE, &device_resource())
    }

    fn models(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), NAMESPACE, &model_resource())
    }
}

fn device_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(devices::GROUP, devices::VERSION, devices::DEVICE_KIND);
    ApiResource::from_gvk_with_plural(&gvk, devices::DEVICES)
}

fn model_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(devices::GROUP, devices::VERSION, devices::DEVICE_MODEL_KIND);
    ApiResource::from_gvk_with_plural(&gvk, devices::DEVICE_MODELS)
}

/// Stops cloudcore (and in kube mode its control plane) after a measurement, first printing
/// cloudcore's log tail if the measurement failed.
fn stop_api<T>(api: CloudApi, outcome: Result<T>) -> Result<T> {
    if outcome.is_err() {
        let log = api.cloud.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "last lines of the cloudcore log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let CloudApi {
        mut cloud, cluster, ..
    } = api;
    tokio::task::block_in_place(|| {
        cloud.stop();
        drop(cluster);
    });
    outcome
}

async fn start_api(control_plane: ControlPlane, binary: &Path, dir: &Path) -> Result<CloudApi> {
    let (binary, dir) = (binary.to_path_buf(), dir.to_path_buf());
    let (cloud, cluster) = tokio::task::spawn_blocking(move || match control_plane {
        ControlPlane::Embedded => Cloud::start_binary(&binary, &dir, &[]).map(|c| (c, None)),
        ControlPlane::Kube => {
            // KubeCluster panics saying what is missing; the panic becomes this task's error.
            let cluster = KubeCluster::start(
                &dir,
                &ClusterOptions {
                    components: Components::ApiServerOnly,
                    ..ClusterOptions::default()
                },
            );
            let crds = integration::deploy_dir().join("kubernetes/devices-crds.yaml");
            let crds = crds.to_string_lossy().into_owned();
            cluster.kubectl_ok(&["apply", "-f", &crds], None);
            let credentials = cluster.cloudcore_credentials(|rbac| rbac);
            let cloud = Cloud::start_kube_binary(
                &binary,
                &dir,
                &cluster,
                &credentials,
                Ipv4Addr::LOCALHOST.into(),
                &[],
            )?;
            Ok((cloud, Some(cluster)))
        }
    })
    .await
    .map_err(|e| anyhow!("starting the control plane failed: {e}"))??;
    let client = bench::api_client(NAMESPACE, API_READY_TIMEOUT, &cloud).await?;
    let api = CloudApi {
        cloud,
        client,
        cluster,
    };
    let deadline = Instant::now() + CRD_TIMEOUT;
    loop {
        match api.devices().list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(api),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context(format!(
                    "the API does not serve devices.{} within {CRD_TIMEOUT:?} (an embedded \
                     cloudcore creates the CRDs at start; kube mode applies \
                     deploy/kubernetes/devices-crds.yaml)",
                    devices::GROUP
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What the watch has seen of the Devices' status.
#[derive(Debug, Default)]
struct ApiView {
    /// Per (device, property): the highest numeric reported value seen, and when.
    values: HashMap<(String, String), (u64, Instant)>,
    /// Per device: twins with a reported value (numeric or not).
    reported: HashMap<String, usize>,
    /// Per device: `status.state`.
    states: HashMap<String, String>,
    /// Property values that rose (each a value that reached the API).
    changes: u64,
    /// Device events that carried at least one new value (each a status write that landed).
    events: u64,
}

impl ApiView {
    /// Takes in one Device as the watch delivered it at `at`.
    fn apply(&mut self, device: &str, status: &Value, at: Instant) {
        let twins = status["twins"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let mut changed = false;
        let mut reported = 0;
        for twin in twins {
            let Some(property) = twin["propertyName"].as_str() else {
                continue;
            };
            let Some(value) = twin["reported"]["value"].as_str() else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            reported += 1;
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            let key = (device.to_string(), property.to_string());
            if self.values.get(&key).is_none_or(|(held, _)| value > *held) {
                self.values.insert(key, (value, at));
                self.changes += 1;
                changed = true;
            }
        }
        self.events += u64::from(changed);
        self.reported.insert(device.to_string(), reported);
        if let Some(state) = status["state"].as_str() {
            self.states.insert(device.to_string(), state.to_string());
        }
    }

    /// When the API held every wanted value (the latest arrival), if it does.
    fn reached(&self, want: &HashMap<(String, String), u64>) -> Option<Instant> {
        let mut latest: Option<Instant> = None;
        for (key, value) in want {
            let (held, at) = self.values.get(key)?;
            if held < value {
                return None;
            }
            latest = Some(latest.map_or(*at, |l| l.max(*at)));
        }
        latest
    }

    /// The wanted values the API lacks, for an error message (at most 5).
    fn missing(&self, want: &HashMap<(String, String), u64>) -> String {
        let mut missing: Vec<String> = want
            .iter()
            .filter_map(|((device, property), value)| {
                let held = self.values.get(&(device.clone(), property.clone()));
                match held {
                    Some((held, _)) if held >= value => None,
                    Some((held, _)) => Some(format!("{device}/{property} at {held}, sent {value}")),
                    None => Some(format!("{device}/{property} absent, sent {value}")),
                }
            })
            .collect();
        missing.sort();
        let total = missing.len();
        missing.truncate(5);
        format!("{total} values missing, e.g. {}", missing.join(", "))
    }
}

/// A kube-rs watch on the bench's Devices, feeding an [`ApiView`].
struct ApiWatch {
    view: Arc<Mutex<ApiView>>,
    /// Woken after each event, for the waiters.
    seen: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(view: &Mutex<ApiView>) -> std::sync::MutexGuard<'_, ApiView> {
    view.lock().unwrap_or_else(|p| p.into_inner())
}

impl ApiWatch {
    fn start(api: &CloudApi) -> ApiWatch {
        let view = Arc::new(Mutex::new(ApiView::default()));
        let seen = Arc::new(Notify::new());
        let stream = watcher(api.devices(), watcher::Config::default()).default_backoff();
        let task = tokio::spawn({
            let (view, seen) = (view.clone(), seen.clone());
            async move {
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    let at = Instant::now();
                    match event {
                        Ok(watcher::Event::Apply(device) | watcher::Event::InitApply(device)) => {
                            let name = device.metadata.name.clone().unwrap_or_default();
                            let status = device.data.get("status").cloned().unwrap_or_default();
                            lock(&view).apply(&name, &status, at);
                            seen.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "device watch failed; retrying"),
                    }
                }
            }
        });
        ApiWatch { view, seen, task }
    }

    /// Waits until `check` gives a value, or `timeout`.
    async fn until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&ApiView) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let seen = self.seen.notified();
            futures::pin_mut!(seen);
            seen.as_mut().enable();
            if let Some(done) = check(&lock(&self.view)) {
                return Some(done);
            }
            if tokio::time::timeout_at(deadline, seen).await.is_err() {
                return check(&lock(&self.view));
            }
        }
    }

    /// (changes, events) so far.
    fn counts(&self) -> (u64, u64) {
        let view = lock(&self.view);
        (view.changes, view.events)
    }
}

// ---------------------------------------------------------------------------------------------
// Devices and models

/// How many edges, devices per edge and properties per device.
#[derive(Debug, Clone, Copy)]
struct Shape {
    edges: usize,
    devices: usize,
    properties: usize,
}

impl Shape {
    fn describe(&self) -> String {
        format!(
            "{} edge(s) x {} devices x {} properties = {} properties",
            self.edges,
            self.devices,
            self.properties,
            self.edges * self.devices * self.properties
        )
    }
}

fn property_name(index: usize) -> String {
    format!("p{index:03}")
}

fn device_name(node: &str, index: usize) -> String {
    format!("{node}-d{index:03}")
}

/// A DeviceModel of `properties` INT properties (ReadOnly: the bench's values come from the
/// mapper only).
fn model_manifest(name: &str, protocol: &str, properties: usize) -> Value {
    let properties: Vec<Value> = (0..properties)
        .map(|i| json!({"name": property_name(i), "type": "INT", "accessMode": "ReadOnly"}))
        .collect();
    json!({
        "apiVersion": devices::API_VERSION,
        "kind": devices::DEVICE_MODEL_KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"protocol": protocol, "properties": properties},
    })
}

/// How a Device's protocol and properties are configured.
struct DeviceKind<'a> {
    model: &'a str,
    protocol: &'a str,
    properties: usize,
    /// `reportCycle` and `collectCycle`, in nanoseconds.
    cycle_ns: i64,
    config: Value,
    visitor: &'a dyn Fn(usize) -> Value,
}

fn device_manifest(name: &str, node: &str, kind: &DeviceKind<'_>) -> Value {
    let properties: Vec<Value> = (0..kind.properties)
        .map(|i| {
            json!({
                "name": property_name(i),
                "visitors": {"protocolName": kind.protocol, "configData": (kind.visitor)(i)},
                "reportCycle": kind.cycle_ns,
                "collectCycle": kind.cycle_ns,
                "reportToCloud": true,
            })
        })
        .collect();
    json!({
        "apiVersion": devices::API_VERSION,
        "kind": devices::DEVICE_KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "deviceModelRef": {"name": kind.model},
            "nodeName": node,
            "protocol": {"protocolName": kind.protocol, "configData": kind.config},
            "properties": properties,
        },
    })
}

/// Creates `objects` through `api`, [`CREATE_CONCURRENCY`] at once.
async fn create_all(api: &Api<DynamicObject>, objects: Vec<Value>) -> Result<()> {
    let results: Vec<Result<(), String>> = futures::stream::iter(objects)
        .map(|object| async move {
            let object: DynamicObject =
                serde_json::from_value(object).map_err(|e| format!("bad manifest: {e}"))?;
            api.create(&PostParams::default(), &object)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    let mut failures = Failures::default();
    for result in results {
        if let Err(why) = result {
            failures.add(why);
        }
    }
    failures.check("creates")
}

/// The bench's model and `shape.devices` Devices bound to each of `nodes`; the device names
/// per node.
async fn create_bench_devices(
    api: &CloudApi,
    nodes: &[String],
    shape: Shape,
    cycle_ns: i64,
) -> Result<Vec<Vec<String>>> {
    create_all(
        &api.models(),
        vec![model_manifest(MODEL, PROTOCOL, shape.properties)],
    )
    .await?;
    let visitor = |i: usize| json!({"index": i});
    let kind = DeviceKind {
        model: MODEL,
        protocol: PROTOCOL,
        properties: shape.properties,
        cycle_ns,
        config: json!({}),
        visitor: &visitor,
    };
    let names: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| (0..shape.devices).map(|d| device_name(node, d)).collect())
        .collect();
    let manifests = nodes
        .iter()
        .zip(&names)
        .flat_map(|(node, devices)| devices.iter().map(|d| device_manifest(d, node, &kind)))
        .collect();
    create_all(&api.devices(), manifests).await?;
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// The mappers the bench plays

/// A `DeviceMapperService` that accepts whatever edgecore sends and counts the calls: the
/// bench plays the mapper, so what edgecore pushes down is part of the load, not checked.
#[derive(Clone, Default)]
struct AcceptingMapper {
    calls: Arc<AtomicU64>,
}

impl AcceptingMapper {
    fn call<T>(&self, answer: T) -> Result<tonic::Response<T>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(answer))
    }
}

#[tonic::async_trait]
impl DeviceMapperService for AcceptingMapper {
    async fn register_device(
        &self,
        request: tonic::Request<pb::RegisterDeviceRequest>,
    ) -> Result<tonic::Response<pb::RegisterDeviceResponse>, tonic::Status> {
        let device = request.into_inner().device.unwrap_or_default();
        self.call(pb::RegisterDeviceResponse {
            device_name: device.name,
            device_namespace: device.namespace,
        })
    }

    async fn remove_device(
        &self,
        _request: tonic::Request<pb::RemoveDeviceRequest>,
    ) -> Result<tonic::Response<pb::RemoveDeviceResponse>, tonic::Status> {
        self.call(pb::RemoveDeviceResponse {})
    }

    async fn update_device(
        &self,
        _request: tonic::Request<pb::UpdateDeviceRequest>,
    ) -> Result<tonic::Response<pb::UpdateDeviceResponse>, tonic::Status> {
        self.call(pb::UpdateDeviceResponse {})
    }

    async fn create_device_model(
        &self,
        request: tonic::Request<pb::CreateDeviceModelRequest>,
    ) -> Result<tonic::Response<pb::CreateDeviceModelResponse>, tonic::Status> {
        let model = request.into_inner().model.unwrap_or_default();
        self.call(pb::CreateDeviceModelResponse {
            device_model_name: model.name,
            device_model_namespace: model.namespace,
        })
    }

    async fn remove_device_model(
        &self,
        _request: tonic::Request<pb::RemoveDeviceModelRequest>,
    ) -> Result<tonic::Response<pb::RemoveDeviceModelResponse>, tonic::Status> {
        self.call(pb::RemoveDeviceModelResponse {})
    }

    async fn update_device_model(
        &self,
        _request: tonic::Request<pb::UpdateDeviceModelRequest>,
    ) -> Result<tonic::Response<pb::UpdateDeviceModelResponse>, tonic::Status> {
        self.call(pb::UpdateDeviceModelResponse {})
    }

    async fn get_device(
        &self,
        _request: tonic::Request<pb::GetDeviceRequest>,
    ) -> Result<tonic::Response<pb::GetDeviceResponse>, tonic::Status> {
        self.call(pb::GetDeviceResponse { device: None })
    }
}

/// A tonic channel to a Unix socket, connecting on first use.
fn unix_channel(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    let endpoint = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .context("cannot build the DMI endpoint")?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}

/// One mapper the bench plays toward one edge: a DMI client of the edge, and an
/// [`AcceptingMapper`] on a socket of its own.
struct BenchMapper {
    name: String,
    socket: PathBuf,
    client: DeviceManagerServiceClient<Channel>,
    calls: Arc<AtomicU64>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for BenchMapper {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.server.abort();
    }
}

impl BenchMapper {
    /// Serves the mapper side on `socket` and connects (lazily) to the edge's `dmi_socket`.
    fn start(name: String, dmi_socket: &Path, socket: PathBuf) -> Result<BenchMapper> {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("cannot bind {}", socket.display()))?;
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        let service = AcceptingMapper::default();
        let calls = service.calls.clone();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let served = tonic::transport::Server::builder()
                    .add_service(DeviceMapperServiceServer::new(service))
                    .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                    .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "the bench's mapper stopped serving");
                }
            }
        });
        Ok(BenchMapper {
            name,
            socket,
            client: DeviceManagerServiceClient::new(unix_channel(dmi_socket)?),
            calls,
            shutdown,
            server,
        })
    }

    /// `MapperRegister` with `withData`: the names of the devices the edge gave this mapper.
    async fn register(&self) -> Result<BTreeSet<String>, tonic::Status> {
        let request = pb::MapperRegisterRequest {
            with_data: true,
            mapper: Some(pb::MapperInfo {
                name: self.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                api_version: dmi::API_VERSION.to_string(),
                protocol: PROTOCOL.to_string(),
                address: self.socket.to_string_lossy().as_bytes().to_vec(),
                state: devices::state::OK.to_string(),
            }),
        };
        let answer = self.client.clone().mapper_register(request).await?;
        Ok(answer
            .into_inner()
            .device_list
            .into_iter()
            .map(|d| d.name)
            .collect())
    }

    /// Registers until the edge answers with every device of `want`.
    async fn wait_for_devices(&self, want: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.register().await {
                Ok(held) if want.iter().all(|d| held.contains(d)) => return Ok(()),
                Ok(held) => format!("the edge gave {} of {} devices", held.len(), want.len()),
                Err(status) => format!("MapperRegister failed: {status}"),
            };
            ensure!(
                Instant::now() < deadline,
                "mapper {}: {last} within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One `ReportDeviceStatus` of one twin.
    async fn report(
        &self,
        device: &str,
        property: &str,
        value: u64,
        timestamp_ms: i64,
    ) -> Result<(), tonic::Status> {
        let reported = pb::TwinProperty {
            value: value.to_string(),
            metadata: HashMap::from([
                ("timestamp".to_string(), timestamp_ms.to_string()),
                ("type".to_string(), "integer".to_string()),
            ]),
        };
        let request = pb::ReportDeviceStatusRequest {
            device_name: device.to_string(),
            device_namespace: NAMESPACE.to_string(),
            reported_device: Some(pb::DeviceStatus {
                twins: vec![pb::Twin {
                    property_name: property.to_string(),
                    observed_desired: None,
                    reported: Some(reported),
                }],
                report_to_cloud: true,
                report_cycle: 0,
            }),
        };
        self.client.clone().report_device_status(request).await?;
        Ok(())
    }
}

/// What one edge's mapper reports: every (device, property), round robin, each a new value.
struct EdgeLoad {
    mapper: BenchMapper,
    targets: Vec<(String, String)>,
    next: AtomicUsize,
    /// Per target: the last value sent and its timestamp (ms), so both only rise.
    sent: Mutex<Vec<(u64, i64)>>,
}

impl EdgeLoad {
    fn new(mapper: BenchMapper, devices: &[String], properties: usize) -> EdgeLoad {
        let targets: Vec<(String, String)> = (0..properties)
            .flat_map(|p| devices.iter().map(move |d| (d.clone(), property_name(p))))
            .collect();
        EdgeLoad {
            sent: Mutex::new(vec![(0, 0); targets.len()]),
            mapper,
            targets,
            next: AtomicUsize::new(0),
        }
    }

    /// The next report: target index, its new value and timestamp.
    fn next_report(&self, now_ms: i64) -> (usize, u64, i64) {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let (value, at) = &mut sent[index];
        *value += 1;
        *at = next_timestamp(*at, now_ms);
        (index, *value, *at)
    }

    /// Sends reports from `workers` tasks until `deadline`; the number sent.
    async fn drive(self: &Arc<Self>, workers: usize, deadline: Instant) -> Result<u64> {
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Failures::default()));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (load, sent, failures) = (self.clone(), sent.clone(), failures.clone());
            tasks.spawn(async move {
                while Instant::now() < deadline {
                    let (index, value, at) = load.next_report(now_ms());
                    let (device, property) = &load.targets[index];
                    match load.mapper.report(device, property, value, at).await {
                        Ok(()) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            failures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .add(format!("{:?}: {}", status.code(), status.message()));
                            // A failing edge is not hammered in a tight loop.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("a report task panicked")?;
        }
        failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check("ReportDeviceStatus calls")?;
        Ok(sent.load(Ordering::Relaxed))
    }

    /// The last value sent per (device, property).
    fn last_values(&self) -> HashMap<(String, String), u64> {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        self.targets
            .iter()
            .zip(sent.iter())
            .filter(|(_, (value, _))| *value > 0)
            .map(|(target, (value, _))| (target.clone(), *value))
            .collect()
    }
}

/// A timestamp after `last` (so a property's timestamps only rise), `now` if it is.
fn next_timestamp(last: i64, now: i64) -> i64 {
    now.max(last + 1)
}

fn now_ms() -> i64 {
    (bench::wall_ns() / 1_000_000) as i64
}

fn devices_config(data_dir: &Path) -> edgecore::devices::DevicesConfig {
    edgecore::devices::DevicesConfig {
        dmi_socket: Some(data_dir.join("dmi.sock")),
        mqtt_broker: None,
        ..edgecore::devices::DevicesConfig::disabled()
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput and latency

/// One throughput measurement.
#[derive(Debug, Clone)]
struct Throughput {
    shape: Shape,
    /// From the first create until every edge handed its mapper all its devices.
    relay: Duration,
    /// `ReportDeviceStatus` calls answered (one value each).
    sent: u64,
    /// The load's wall time (until the last call was answered).
    load: Duration,
    /// From the load's start until the API showed every last value.
    converged: Duration,
    /// Property values that reached the API (rose in a watch event).
    api_values: u64,
    /// Device status writes that reached the API (watch events with a new value).
    api_events: u64,
    /// Calls edgecore made to the bench's mappers during the whole part.
    mapper_calls: u64,
    cloud_cpu: Duration,
    bench_cpu: Duration,
}

impl Throughput {
    fn sent_per_sec(&self) -> f64 {
        self.sent as f64 / self.load.as_secs_f64().max(1e-9)
    }

    fn api_values_per_sec(&self) -> f64 {
        self.api_values as f64 / self.converged.as_secs_f64().max(1e-9)
    }

    fn api_events_per_sec(&self) -> f64 {
        self.api_events as f64 / self.converged.as_secs_f64().max(1e-9)
    }

    /// After the load stopped, until the API caught up.
    fn tail(&self) -> Duration {
        self.converged.saturating_sub(self.load)
    }

    fn cores(&self) -> (f64, f64) {
        let wall = self.converged.as_secs_f64().max(1e-9);
        (
            self.cloud_cpu.as_secs_f64() / wall,
            self.bench_cpu.as_secs_f64() / wall,
        )
    }

    fn to_json(&self) -> Value {
        let (cloud, bench) = self.cores();
        json!({
            "edges": self.shape.edges,
            "devices_per_edge": self.shape.devices,
            "properties_per_device": self.shape.properties,
            "relay_s": self.relay.as_secs_f64(),
            "values_sent": self.sent,
            "load_s": self.load.as_secs_f64(),
            "values_sent_per_sec": self.sent_per_sec(),
            "values_reached_api": self.api_values,
            "values_reached_api_per_sec": self.api_values_per_sec(),
            "status_writes_reached_api": self.api_events,
            "status_writes_per_sec": self.api_events_per_sec(),
            "converged_s": self.converged.as_secs_f64(),
            "tail_ms": ms(self.tail()),
            "mapper_calls_from_edgecore": self.mapper_calls,
            "cloudcore_cores": cloud,
            "bench_cores": bench,
        })
    }
}

/// CPU time cloudcore and this process have used so far.
fn cpu_now(cloud: &Cloud) -> Result<(Duration, Duration)> {
    Ok((
        bench::cpu_time(cloud.pid().context("cloudcore is not running")?)?,
        bench::cpu_time(std::process::id())?,
    ))
}

/// Joins and runs `shape.edges` in-process edges, plays their mappers, creates the Devices,
/// drives the load, and then takes `latency_samples` single reports on the first edge.
async fn measure_load(
    cli: &Cli,
    api: &mut CloudApi,
    cloudcore: &Path,
    dir: &Path,
    shape: Shape,
    latency_samples: usize,
) -> Result<(Throughput, Vec<Duration>)> {
    let nodes: Vec<String> = if shape.edges == 1 {
        vec![SOLO_NODE.to_string()]
    } else {
        (0..shape.edges)
            .map(|i| bench::node_name(shape.edges, i))
            .collect()
    };
    let token = bench::create_token(cloudcore, &api.cloud, shape.edges).await?;
    let dirs = bench::join_edges(&token, &nodes, &dir.join("edges"), cli.join_concurrency).await?;
    let edges = bench::run_edges(&dirs, &api.cloud.address(), devices_config).await?;
    let watch = ApiWatch::start(api);

    let cycle_ns = (cli.report_cycle_ms * 1_000_000) as i64;
    let started = Instant::now();
    let names = create_bench_devices(api, &nodes, shape, cycle_ns).await?;
    let mut loads = Vec::with_capacity(dirs.len());
    for ((node, dir), devices) in nodes.iter().zip(&dirs).zip(&names) {
        let mapper = BenchMapper::start(
            format!("bench-{node}"),
            &dir.join("dmi.sock"),
            dir.join("mapper.sock"),
        )?;
        loads.push(Arc::new(EdgeLoad::new(mapper, devices, shape.properties)));
    }
    let waits = loads
        .iter()
        .zip(&names)
        .map(|(load, devices)| load.mapper.wait_for_devices(devices, RELAY_TIMEOUT));
    let mut failures = Failures::default();
    for result in futures::future::join_all(waits).await {
        if let Err(e) = result {
            failures.add(format!("{e:#}"));
        }
    }
    failures.check("relays")?;
    let relay = started.elapsed();
    eprintln!(
        "  {} devices at their edges' mappers in {:.2} s",
        shape.edges * shape.devices,
        relay.as_secs_f64()
    );

    let throughput = drive_load(
        Duration::from_secs(cli.load_secs),
        cli.in_flight,
        api,
        &watch,
        &loads,
        shape,
        relay,
    )
    .await?;
    eprintln!(
        "  {} values sent in {:.1} s ({:.0}/s), {} reached the API ({:.0}/s) in {} status \
         writes; caught up {:.0} ms after the load",
        throughput.sent,
        throughput.load.as_secs_f64(),
        throughput.sent_per_sec(),
        throughput.api_values,
        throughput.api_values_per_sec(),
        throughput.api_events,
        ms(throughput.tail())
    );

    let mut latencies = Vec::with_capacity(latency_samples);
    if latency_samples > 0 {
        // Past any report cycle of the load, so the first sample is not paced.
        tokio::time::sleep(Duration::from_millis(cli.report_cycle_ms.max(500))).await;
        let load = &loads[0];
        for sample in 0..latency_samples {
            let (index, value, at) = load.next_report(now_ms());
            let target = load.targets[index].clone();
            let sent = Instant::now();
            load.mapper
                .report(&target.0, &target.1, value, at)
                .await
                .map_err(|s| anyhow!("latency sample {sample}: {s}"))?;
            let want = HashMap::from([(target.clone(), value)]);
            let seen = watch
                .until(SAMPLE_TIMEOUT, |view| view.reached(&want))
                .await
                .with_context(|| {
                    format!(
                        "latency sample {sample}: {}/{} = {value} not in the API within \
                         {SAMPLE_TIMEOUT:?}",
                        target.0, target.1
                    )
                })?;
            latencies.push(seen.saturating_duration_since(sent));
            // Past the device's report cycle, so each sample is a leading-edge report.
            tokio::time::sleep(Duration::from_millis(cli.report_cycle_ms)).await;
        }
        latencies.sort();
    }
    drop(loads);
    bench::stop_edges(edges).await?;
    Ok((throughput, latencies))
}

/// `load_for` of reports from every edge's mapper at once (`in_flight` calls each), then until
/// the API shows every last value.
async fn drive_load(
    load_for: Duration,
    in_flight: usize,
    api: &CloudApi,
    watch: &ApiWatch,
    loads: &[Arc<EdgeLoad>],
    shape: Shape,
    relay: Duration,
) -> Result<Throughput> {
    let (changes0, events0) = watch.counts();
    let cpu0 = cpu_now(&api.cloud)?;
    let started = Instant::now();
    let deadline = started + load_for;
    let drives = loads.iter().map(|load| load.drive(in_flight, deadline));
    let mut sent = 0;
    let mut failures = Failures::default();
    for result in futures::future::join_all(drives).await {
        match result {
            Ok(n) => sent += n,
            Err(e) => failures.add(format!("{e:#}")),
        }
    }
    failures.check("edges' loads")?;
    let load = started.elapsed();
    let want: HashMap<(String, String), u64> =
        loads.iter().flat_map(|load| load.last_values()).collect();
    let reached = watch
        .until(CONVERGE_TIMEOUT, |view| view.reached(&want))
        .await;
    let Some(reached) = reached else {
        bail!(
            "the API did not show every last value within {CONVERGE_TIMEOUT:?} after the load: {}",
            lock(&watch.view).missing(&want)
        );
    };
    let cpu1 = cpu_now(&api.cloud)?;
    let (changes1, events1) = watch.counts();
    Ok(Throughput {
        shape,
        relay,
        sent,
        load,
        converged: reached.saturating_duration_since(started),
        api_values: changes1 - changes0,
        api_events: events1 - events0,
        mapper_calls: loads
            .iter()
            .map(|l| l.mapper.calls.load(Ordering::Relaxed))
            .sum(),
        cloud_cpu: cpu1.0.saturating_sub(cpu0.0),
        bench_cpu: cpu1.1.saturating_sub(cpu0.1),
    })
}

// ---------------------------------------------------------------------------------------------
// Memory: a real edgecore process, and the Modbus mapper

#[derive(Debug, Clone)]
struct Memory {
    devices: usize,
    properties: usize,
    edge_empty_kib: u64,
    edge_devices_kib: u64,
    edge_peak_kib: u64,
    modbus: Option<ModbusMemory>,
}

impl Memory {
    /// edgecore's memory per device (KiB).
    fn kib_per_device(&self) -> f64 {
        self.edge_devices_kib.saturating_sub(self.edge_empty_kib) as f64 / self.devices as f64
    }
}

#[derive(Debug, Clone)]
struct ModbusMemory {
    devices: usize,
    properties: usize,
    /// From starting the mapper until the API showed every device `ok` with its twins.
    ready: Duration,
    mapper_kib: u64,
    mapper_peak_kib: u64,
    /// edgecore with the bench's devices and the Modbus ones.
    edge_kib: u64,
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        integration::terminate(&mut self.0);
    }
}

impl ChildGuard {
    fn spawn(command: &mut Command, log: &Path) -> Result<ChildGuard> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("cannot share the log file")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        Ok(ChildGuard(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

async fn quiet(cli: &Cli) {
    tokio::time::sleep(Duration::from_secs(cli.quiet_secs)).await;
}

async fn measure_memory(
    cli: &Cli,
    api: &mut CloudApi,
    binaries: &Binaries,
    dir: &Path,
) -> Result<Memory> {
    let edge_dir = dir.join("edge");
    let dmi_socket = edge_dir.join("dmi.sock");
    let mut edge = tokio::task::block_in_place(|| -> Result<integration::Edge> {
        bench::join_edge(
            &binaries.cloudcore,
            &binaries.edgecore,
            &api.cloud,
            &edge_dir,
            SOLO_NODE,
            TOOL_TIMEOUT,
        )?;
        let socket = dmi_socket.to_string_lossy().into_owned();
        let extra = [
            "--no-pod-runtime",
            "--dmi-socket",
            socket.as_str(),
            "--mqtt-broker",
            "none",
        ];
        let edge = bench::start_edge(&binaries.edgecore, &edge_dir, &extra)?;
        ensure!(
            integration::eventually(CONNECT_TIMEOUT, || edge.connected()),
            "edgecore did not connect within {CONNECT_TIMEOUT:?}; log:\n{}",
            edge.log()
        );
        Ok(edge)
    })?;
    let pid = edge.pid().context("edgecore is not running")?;
    quiet(cli).await;
    let edge_empty_kib = bench::rss_kib(pid)?;

    let shape = Shape {
        edges: 1,
        devices: cli.memory_devices,
        properties: cli.memory_properties,
    };
    let watch = ApiWatch::start(api);
    let cycle_ns = (cli.report_cycle_ms * 1_000_000) as i64;
    let started = Instant::now();
    let names = create_bench_devices(api, &[SOLO_NODE.to_string()], shape, cycle_ns).await?;
    let mapper = BenchMapper::start("bench-memory".into(), &dmi_socket, dir.join("mapper.sock"))?;
    mapper.wait_for_devices(&names[0], RELAY_TIMEOUT).await?;
    let load = Arc::new(EdgeLoad::new(mapper, &names[0], shape.properties));
    // Every property reported at least once: the load goes round robin over all of them.
    let load_secs = cli.load_secs.min(5);
    let loaded = drive_load(
        Duration::from_secs(load_secs),
        cli.in_flight,
        api,
        &watch,
        std::slice::from_ref(&load),
        shape,
        started.elapsed(),
    )
    .await?;
    let targets = load.targets.len() as u64;
    ensure!(
        loaded.sent >= targets,
        "only {} reports in {load_secs} s, fewer than the {targets} properties",
        loaded.sent
    );
    quiet(cli).await;
    ensure!(edge.is_running(), "edgecore exited; log:\n{}", edge.log());
    let edge_devices_kib = bench::rss_kib(pid)?;
    let edge_peak_kib = bench::status_kib(pid, "VmHWM")?;
    eprintln!(
        "  edgecore {:.1} MiB connected, {:.1} MiB with {} devices (peak {:.1} MiB)",
        mib(edge_empty_kib),
        mib(edge_devices_kib),
        shape.devices,
        mib(edge_peak_kib)
    );

    let modbus = match &binaries.modbus {
        Ok((mapper, script)) => {
            Some(measure_modbus(cli, api, &watch, pid, &dmi_socket, mapper, script, dir).await?)
        }
        Err(why) => {
            eprintln!("  modbus-mapper: skipped ({why})");
            None
        }
    };
    tokio::task::block_in_place(|| edge.stop());
    Ok(Memory {
        devices: shape.devices,
        properties: shape.properties,
        edge_empty_kib,
        edge_devices_kib,
        edge_peak_kib,
        modbus,
    })
}

/// pymodbus's simulator on a free port, `modbus-mapper` registered with the edge, and
/// `--modbus-devices` Devices it reads; its memory once the API shows them all `ok`.
#[allow(clippy::too_many_arguments)]
async fn measure_modbus(
    cli: &Cli,
    api: &CloudApi,
    watch: &ApiWatch,
    edge_pid: u32,
    dmi_socket: &Path,
    mapper: &Path,
    script: &Path,
    dir: &Path,
) -> Result<ModbusMemory> {
    let port = integration::free_tcp_port();
    let mut sim = ChildGuard::spawn(
        Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string()]),
        &dir.join("modbus-sim.log"),
    )?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Some(status) = sim.exited() {
            bail!(
                "the Modbus simulator exited ({status}); log:\n{}",
                std::fs::read_to_string(dir.join("modbus-sim.log")).unwrap_or_default()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the Modbus simulator did not listen on {port} within {CONNECT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    create_all(
        &api.models(),
        vec![model_manifest(
            MODBUS_MODEL,
            "modbus",
            cli.modbus_properties,
        )],
    )
    .await?;
    let visitor = |i: usize| {
        json!({"register": "HoldingRegister", "offset": i, "limit": 1, "scale": 1,
               "isSwap": false, "isRegisterSwap": false})
    };
    let kind = DeviceKind {
        model: MODBUS_MODEL,
        protocol: "modbus",
        properties: cli.modbus_properties,
        cycle_ns: 1_000_000_000,
        config: json!({"ip": "127.0.0.1", "port": port, "slaveID": 1}),
        visitor: &visitor,
    };
    let names: Vec<String> = (0..cli.modbus_devices)
        .map(|i| format!("modbus-{i:03}"))
        .collect();
    create_all(
        &api.devices(),
        names
            .iter()
            .map(|n| device_manifest(n, SOLO_NODE, &kind))
            .collect(),
    )
    .await?;

    let started = Instant::now();
    let log = dir.join("modbus-mapper.log");
    let mut process = ChildGuard::spawn(
        Command::new(mapper)
            .arg("--dmi-socket")
            .arg(dmi_socket)
            .arg("--socket")
            .arg(dir.join("modbus.sock"))
            .args(["--name", "modbus-bench"])
            .env("RUST_LOG", "info"),
        &log,
    )?;
    let ready = |view: &ApiView| {
        names
            .iter()
            .all(|n| {
                view.states
                    .get(n)
                    .is_some_and(|s| s == devices::state::OK || s == devices::state::ONLINE)
                    && view.reported.get(n).copied().unwrap_or(0) >= cli.modbus_properties
            })
            .then_some(())
    };
    if watch.until(MODBUS_READY_TIMEOUT, ready).await.is_none() {
        let view = lock(&watch.view);
        let ok = names
            .iter()
            .filter(|n| {
                view.states
                    .get(*n)
                    .is_some_and(|s| s == devices::state::OK || s == devices::state::ONLINE)
            })
            .count();
        let twins = names
            .iter()
            .filter(|n| view.reported.get(*n).copied().unwrap_or(0) >= cli.modbus_properties)
            .count();
        bail!(
            "within {MODBUS_READY_TIMEOUT:?} the API showed {ok} of {} Modbus devices ok and {twins} \
             with every twin; modbus-mapper log:\n{}",
            names.len(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let ready = started.elapsed();
    quiet(cli).await;
    if let Some(status) = process.exited() {
        bail!("modbus-mapper exited ({status})");
    }
    let memory = ModbusMemory {
        devices: names.len(),
        properties: cli.modbus_properties,
        ready,
        mapper_kib: bench::rss_kib(process.pid())?,
        mapper_peak_kib: bench::status_kib(process.pid(), "VmHWM")?,
        edge_kib: bench::rss_kib(edge_pid)?,
    };
    eprintln!(
        "  modbus-mapper {:.1} MiB with {} devices (all ok in the API after {:.1} s); edgecore \
         {:.1} MiB",
        mib(memory.mapper_kib),
        memory.devices,
        ready.as_secs_f64(),
        mib(memory.edge_kib)
    );
    drop(process);
    drop(sim);
    Ok(memory)
}

// ---------------------------------------------------------------------------------------------
// The report

/// The settings, as printed.
#[derive(Debug)]
struct Settings {
    control_plane: ControlPlane,
    load_secs: u64,
    in_flight: usize,
    report_cycle_ms: u64,
    latency_samples: usize,
    quiet_secs: u64,
}

impl Settings {
    fn of(cli: &Cli) -> Settings {
        Settings {
            control_plane: cli.control_plane,
            load_secs: cli.load_secs,
            in_flight: cli.in_flight,
            report_cycle_ms: cli.report_cycle_ms,
            latency_samples: cli.latency_samples,
            quiet_secs: cli.quiet_secs,
        }
    }
}

/// One summary figure of a round, if the round has it.
type Figure = Box<dyn Fn(&Round) -> Option<f64>>;

struct Report {
    settings: Settings,
    machine: Machine,
    modbus_skipped: Option<String>,
    rounds: Vec<Round>,
}

impl Report {
    fn spread(&self, figure: impl Fn(&Round) -> Option<f64>) -> Option<Spread> {
        let values: Vec<f64> = self.rounds.iter().filter_map(figure).collect();
        (!values.is_empty()).then(|| Spread::of(values.into_iter()))
    }

    fn summary(&self) -> Vec<(&'static str, Spread, &'static str)> {
        let latency =
            |p: f64| move |r: &Round| r.solo.as_ref().map(|_| ms(percentile(&r.latencies, p)));
        let figures: Vec<(&'static str, Figure, &'static str)> = vec![
            (
                "1 edge: values sent/s",
                Box::new(|r| r.solo.as_ref().map(Throughput::sent_per_sec)),
                "/s ",
            ),
            (
                "1 edge: values to the API/s",
                Box::new(|r| r.solo.as_ref().map(Throughput::api_values_per_sec)),
                "/s ",
            ),
            (
                "1 edge: status writes/s",
                Box::new(|r| r.solo.as_ref().map(Throughput::api_events_per_sec)),
                "/s ",
            ),
            (
                "1 edge: API caught up after",
                Box::new(|r| r.solo.as_ref().map(|t| ms(t.tail()))),
                "ms ",
            ),
            ("1 edge: latency p50", Box::new(latency(0.5)), "ms "),
            ("1 edge: latency p90", Box::new(latency(0.9)), "ms "),
            ("1 edge: latency p99", Box::new(latency(0.99)), "ms "),
            (
                "fleet: values sent/s",
                Box::new(|r| r.fleet.as_ref().map(Throughput::sent_per_sec)),
                "/s ",
            ),
            (
                "fleet: values to the API/s",
                Box::new(|r| r.fleet.as_ref().map(Throughput::api_values_per_sec)),
                "/s ",
            ),
            (
                "fleet: status writes/s",
                Box::new(|r| r.fleet.as_ref().map(Throughput::api_events_per_sec)),
                "/s ",
            ),
            (
                "fleet: API caught up after",
                Box::new(|r| r.fleet.as_ref().map(|t| ms(t.tail()))),
                "ms ",
            ),
            (
                "edgecore RSS, no devices",
                Box::new(|r| r.memory.as_ref().map(|m| mib(m.edge_empty_kib))),
                "MiB",
            ),
            (
                "edgecore RSS, with devices",
                Box::new(|r| r.memory.as_ref().map(|m| mib(m.edge_devices_kib))),
                "MiB",
            ),
            (
                "edgecore KiB per device",
                Box::new(|r| r.memory.as_ref().map(Memory::kib_per_device)),
                "KiB",
            ),
            (
                "modbus-mapper RSS",
                Box::new(|r| {
                    r.memory
                        .as_ref()?
                        .modbus
                        .as_ref()
                        .map(|m| mib(m.mapper_kib))
                }),
                "MiB",
            ),
        ];
        figures
            .into_iter()
            .filter_map(|(name, figure, unit)| Some((name, self.spread(figure)?, unit)))
            .collect()
    }
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let s = &self.settings;
        let m = &self.machine;
        let mut out = format!(
            "device-bench: control plane {:?}, {} s of load, {} reports in flight per edge, \
             reportCycle {} ms, {} latency samples, {} rounds\n\
             machine: {} CPUs ({}), {} MiB, Linux {}\n\n",
            s.control_plane,
            s.load_secs,
            s.in_flight,
            s.report_cycle_ms,
            s.latency_samples,
            self.rounds.len(),
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel,
        );
        out.push_str(&format!(
            "{:<16} {:>7} {:>8} {:>9} {:>8} {:>9} {:>8} {:>8} {:>7} {:>6} {:>6}\n",
            "throughput",
            "relay s",
            "sent",
            "sent/s",
            "to API",
            "to API/s",
            "writes/s",
            "tail ms",
            "calls",
            "cloud",
            "bench"
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            for (name, t) in [("1 edge", &r.solo), ("fleet", &r.fleet)] {
                let Some(t) = t else { continue };
                let (cloud, bench) = t.cores();
                out.push_str(&format!(
                    "{:<16} {:>7.2} {:>8} {:>9.0} {:>8} {:>9.0} {:>8.0} {:>8.0} {:>7} {:>6.2} {:>6.2}\n",
                    format!("{} {name} ({}x{}x{})", i + 1, t.shape.edges, t.shape.devices, t.shape.properties),
                    t.relay.as_secs_f64(),
                    t.sent,
                    t.sent_per_sec(),
                    t.api_values,
                    t.api_values_per_sec(),
                    t.api_events_per_sec(),
                    ms(t.tail()),
                    t.mapper_calls,
                    cloud,
                    bench,
                ));
            }
        }
        out.push_str(
            "(relay: Devices created until every edge gave its mapper all of them; sent: \
             ReportDeviceStatus calls answered, one value each; to API: values that reached the \
             API (rose in the Device watch), fewer than sent as the edge keeps only a property's \
             latest value and paces each device by its reportCycle; writes: Device status writes \
             that carried a new value; tail: the API caught up after the load stopped; calls: \
             edgecore's calls to the bench's mappers; cloud, bench: CPUs kept busy by cloudcore \
             and by this process with its edges)\n\n",
        );
        if self.rounds.iter().any(|r| r.solo.is_some()) {
            out.push_str(&format!(
                "{:<8} {:>7} {:>7} {:>7} {:>7}\n",
                "latency", "p50 ms", "p90 ms", "p99 ms", "max ms"
            ));
            for (i, r) in self.rounds.iter().enumerate() {
                out.push_str(&format!(
                    "{:<8} {:>7.2} {:>7.2} {:>7.2} {:>7.2}\n",
                    i + 1,
                    ms(percentile(&r.latencies, 0.5)),
                    ms(percentile(&r.latencies, 0.9)),
                    ms(percentile(&r.latencies, 0.99)),
                    ms(r.latencies.last().copied().unwrap_or_default()),
                ));
            }
            out.push_str(
                "(one value at a time on the idle edge: ReportDeviceStatus sent until the \
                 Device watch showed it)\n\n",
            );
        }
        if self.rounds.iter().any(|r| r.memory.is_some()) {
            out.push_str(&format!(
                "{:<8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8}\n",
                "memory",
                "empty",
                "devices",
                "peak",
                "KiB/dev",
                "mapper",
                "m. peak",
                "ready s",
                "edge+mb"
            ));
            for (i, r) in self.rounds.iter().enumerate() {
                let Some(m) = &r.memory else { continue };
                let modbus = m.modbus.as_ref();
                out.push_str(&format!(
                    "{:<8} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>8} {:>8} {:>8}\n",
                    i + 1,
                    mib(m.edge_empty_kib),
                    mib(m.edge_devices_kib),
                    mib(m.edge_peak_kib),
                    m.kib_per_device(),
                    modbus.map_or("-".into(), |b| format!("{:.1}", mib(b.mapper_kib))),
                    modbus.map_or("-".into(), |b| format!("{:.1}", mib(b.mapper_peak_kib))),
                    modbus.map_or("-".into(), |b| format!("{:.1}", b.ready.as_secs_f64())),
                    modbus.map_or("-".into(), |b| format!("{:.1}", mib(b.edge_kib))),
                ));
            }
            let first = self.rounds.iter().find_map(|r| r.memory.as_ref());
            if let Some(m) = first {
                out.push_str(&format!(
                    "(MiB VmRSS of one edgecore process, connected: empty, then with {} devices \
                     x {} properties each reported; peak: VmHWM; mapper: modbus-mapper with {} \
                     devices x {} holding registers read every second from pymodbus, all ok in \
                     the API after ready s; edge+mb: edgecore with both sets)\n",
                    m.devices,
                    m.properties,
                    m.modbus.as_ref().map_or(0, |b| b.devices),
                    m.modbus.as_ref().map_or(0, |b| b.properties),
                ));
            }
            if let Some(why) = &self.modbus_skipped {
                out.push_str(&format!("modbus-mapper: skipped ({why})\n"));
            }
        }
        out.push_str("\nmedian across rounds (min .. max)\n");
        for (name, s, unit) in self.summary() {
            out.push_str(&format!(
                "{name:<30} {:>9.1} {unit}  ({:.1} .. {:.1})\n",
                s.median, s.min, s.max
            ));
        }
        out
    }

    fn to_json(&self) -> Value {
        let s = &self.settings;
        json!({
            "settings": {
                "control_plane": format!("{:?}", s.control_plane).to_lowercase(),
                "load_secs": s.load_secs,
                "in_flight_per_edge": s.in_flight,
                "report_cycle_ms": s.report_cycle_ms,
                "latency_samples": s.latency_samples,
                "quiet_secs": s.quiet_secs,
            },
            "machine": self.machine.to_json(),
            "modbus_skipped": self.modbus_skipped,
            "rounds": self.rounds.iter().map(|r| json!({
                "one_edge": r.solo.as_ref().map(Throughput::to_json),
                "latency": r.solo.as_ref().map(|_| json!({
                    "samples": r.latencies.len(),
                    "p50_ms": ms(percentile(&r.latencies, 0.5)),
                    "p90_ms": ms(percentile(&r.latencies, 0.9)),
                    "p99_ms": ms(percentile(&r.latencies, 0.99)),
                    "max_ms": ms(r.latencies.last().copied().unwrap_or_default()),
                })),
                "fleet": r.fleet.as_ref().map(Throughput::to_json),
                "memory": r.memory.as_ref().map(|m| json!({
                    "devices": m.devices,
                    "properties_per_device": m.properties,
                    "edgecore_rss_kib_empty": m.edge_empty_kib,
                    "edgecore_rss_kib_devices": m.edge_devices_kib,
                    "edgecore_peak_kib": m.edge_peak_kib,
                    "edgecore_kib_per_device": m.kib_per_device(),
                    "modbus": m.modbus.as_ref().map(|b| json!({
                        "devices": b.devices,
                        "properties_per_device": b.properties,
                        "ready_s": b.ready.as_secs_f64(),
                        "mapper_rss_kib": b.mapper_kib,
                        "mapper_peak_kib": b.mapper_peak_kib,
                        "edgecore_rss_kib": b.edge_kib,
                    })),
                })),
            })).collect::<Vec<_>>(),
            "summary": self.summary().into_iter().map(|(name, spread, unit)| json!({
                "figure": name,
                "unit": unit.trim(),
                "spread": spread.to_json(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_counts_values_that_rise_and_events_that_carry_one() {
        let t0 = Instant::now();
        let mut view = ApiView::default();
        let status = |a: &str, b: &str| {
            json!({"state": "ok", "twins": [
                {"propertyName": "p000", "reported": {"value": a}},
                {"propertyName": "p001", "reported": {"value": b}},
            ]})
        };
        view.apply("d", &status("1", "1"), t0);
        assert_eq!((view.changes, view.events), (2, 1));
        // Nothing new (a write of the state only, or a resent status): no change.
        view.apply("d", &status("1", "1"), t0);
        assert_eq!((view.changes, view.events), (2, 1));
        // An older value never replaces a newer one.
        let later = t0 + Duration::from_millis(5);
        view.apply("d", &status("0", "3"), later);
        assert_eq!((view.changes, view.events), (3, 2));
        assert_eq!(view.values[&("d".into(), "p000".into())].0, 1);
        assert_eq!(view.states["d"], "ok");
        assert_eq!(view.reported["d"], 2);

        let want = HashMap::from([(("d".to_string(), "p001".to_string()), 3)]);
        assert_eq!(view.reached(&want), Some(later));
        let more = HashMap::from([(("d".to_string(), "p000".to_string()), 2)]);
        assert_eq!(view.reached(&more), None);
        assert!(view.missing(&more).contains("d/p000 at 1, sent 2"));
    }

    /// A test double of edgecore's `DeviceManagerService`: gives every mapper the devices it
    /// holds and records the reports.
    #[derive(Clone, Default)]
    struct FakeEdgeDmi {
        reports: Arc<Mutex<Vec<pb::ReportDeviceStatusRequest>>>,
    }

    #[tonic::async_trait]
    impl pb::device_manager_service_server::DeviceManagerService for FakeEdgeDmi {
        async fn mapper_register(
            &self,
            _request: tonic::Request<pb::MapperRegisterRequest>,
        ) -> Result<tonic::Response<pb::MapperRegisterResponse>, tonic::Status> {
            let device = pb::Device {
                name: "d0".into(),
                namespace: NAMESPACE.into(),
                ..pb::Device::default()
            };
            Ok(tonic::Response::new(pb::MapperRegisterResponse {
                model_list: Vec::new(),
                device_list: vec![device],
            }))
        }

        async fn report_device_status(
            &self,
            request: tonic::Request<pb::ReportDeviceStatusRequest>,
        ) -> Result<tonic::Response<pb::ReportDeviceStatusResponse>, tonic::Status> {
            self.reports
                .lock()
                .expect("reports")
                .push(request.into_inner());
            Ok(tonic::Response::new(pb::ReportDeviceStatusResponse {}))
        }

        async fn report_device_states(
            &self,
            _request: tonic::Request<pb::ReportDeviceStatesRequest>,
        ) -> Result<tonic::Response<pb::ReportDeviceStatesResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::ReportDeviceStatesResponse {}))
        }
    }

    #[tokio::test]
    async fn the_bench_mapper_registers_reports_and_answers_over_unix_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let edge_socket = dir.path().join("dmi.sock");
        let edge = FakeEdgeDmi::default();
        let listener = tokio::net::UnixListener::bind(&edge_socket).expect("bind");
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    pb::device_manager_service_server::DeviceManagerServiceServer::new(
                        edge.clone(),
                    ),
                )
                .serve_with_incoming(incoming),
        );

        let mapper = BenchMapper::start(
            "bench-test".into(),
            &edge_socket,
            dir.path().join("mapper.sock"),
        )
        .expect("mapper");
        mapper
            .wait_for_devices(&["d0".to_string()], Duration::from_secs(5))
            .await
            .expect("registered");
        let load = Arc::new(EdgeLoad::new(mapper, &["d0".to_string()], 2));
        let deadline = Instant::now() + Duration::from_millis(200);
        let sent = load.drive(2, deadline).await.expect("reports");
        let reports = edge.reports.lock().expect("reports").clone();
        assert!(sent > 0);
        assert_eq!(reports.len() as u64, sent);
        let twin = &reports[0].reported_device.as_ref().expect("status").twins[0];
        assert_eq!(reports[0].device_namespace, NAMESPACE);
        assert!(twin.property_name.starts_with('p'));
        let reported = twin.reported.as_ref().expect("reported");
        assert_eq!(reported.value, "1");
        assert!(reported.metadata.contains_key("timestamp"));
        let last = load.last_values();
        assert_eq!(last.len(), 2);
        assert_eq!(last.values().sum::<u64>(), sent);

        // What edgecore sends down is accepted and counted.
        let mut client = pb::device_mapper_service_client::DeviceMapperServiceClient::new(
            unix_channel(&dir.path().join("mapper.sock")).expect("channel"),
        );
        client
            .remove_device(pb::RemoveDeviceRequest::default())
            .await
            .expect("accepted");
        assert_eq!(load.mapper.calls.load(Ordering::Relaxed), 1);
        server.abort();
    }

    #[test]
    fn a_property_timestamp_always_rises() {
        assert_eq!(next_timestamp(0, 1_000), 1_000);
        assert_eq!(next_timestamp(1_000, 1_000), 1_001);
        assert_eq!(next_timestamp(1_005, 1_000), 1_006);
    }

    #[test]
    fn manifests_are_kubeedge_devices_bound_to_their_node() {
        let visitor = |i: usize| json!({"index": i});
        let kind = DeviceKind {
            model: MODEL,
            protocol: PROTOCOL,
            properties: 3,
            cycle_ns: 1_000_000,
            config: json!({}),
            visitor: &visitor,
        };
        let device: devices::Device =
            serde_json::from_value(device_manifest("d", "node-1", &kind)).expect("a Device");
        assert_eq!(device.spec.node_name, "node-1");
        assert_eq!(device.model_name(), Some(MODEL));
        assert_eq!(device.spec.properties.len(), 3);
        assert!(device.spec.properties.iter().all(|p| p.report_to_cloud));
        assert_eq!(device.spec.properties[2].name, "p002");
        assert_eq!(device.spec.properties[2].report_cycle, 1_000_000);
        let model: devices::DeviceModel =
            serde_json::from_value(model_manifest(MODEL, PROTOCOL, 3)).expect("a DeviceModel");
        assert_eq!(model.spec.protocol, PROTOCOL);
        assert_eq!(model.spec.properties[1].name, "p001");
    }
}
