//! One task per device: one Modbus TCP connection, every property read every `collectCycle`,
//! desired values of ReadWrite properties written, twins and state reported to edgecore.
//!
//! The loop, in order, each time it wakes:
//! 1. no connection and the retry time is here: connect (at most [`IO_TIMEOUT`]);
//! 2. connected: write each ReadWrite property whose desired value has not been enforced on this
//!    connection (read it, write it only if it differs), then read the properties that are due;
//!    a transport error or a timeout drops the connection and makes the device `offline`,
//!    a success makes it `ok`; a Modbus exception is the property's problem, not the device's;
//! 3. report to edgecore the twins that changed or whose `reportCycle` elapsed since their last
//!    report (only fresh readings: an offline device reports no stale value), and the state if it
//!    changed, was not accepted yet, or [`STATE_HEARTBEAT`] passed;
//! 4. sleep until the next due time, a new plan, a resync request or shutdown.
//!
//! A report edgecore does not accept is tried again on the next wake; nothing here waits on
//! edgecore longer than its call timeout. Desired values are enforced on every new connection
//! (so a device that restarted with other values gets them back) and whenever the plan changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dmi::pb;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context as ModbusContext, Reader, Writer};
use tokio_modbus::slave::Slave;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::codec::{self, Contents, Register};
use crate::edgecore::Edgecore;
use crate::plan::{Access, DevicePlan, Endpoint, PropertyPlan};

/// The longest a connect, read or write may take before the device counts as offline.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How soon a lost device is dialled again.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// The state is re-sent this often even when it did not change (edgecore's `lastOnlineTime`
/// follows it).
pub const STATE_HEARTBEAT: Duration = Duration::from_secs(30);

/// A device's state, as KubeEdge's mappers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Ok,
    Offline,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Ok => devices::state::OK,
            DeviceState::Offline => devices::state::OFFLINE,
        }
    }
}

/// What the task last saw, for `GetDevice`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `ok`, `offline`, or `unknown` before the first attempt.
    pub state: String,
    /// Per property, the last reading and the last enforced desired value.
    pub twins: BTreeMap<String, pb::Twin>,
}

/// A running device task.
#[derive(Debug)]
pub struct DeviceHandle {
    plan: watch::Sender<Arc<DevicePlan>>,
    snapshot: Arc<Mutex<Snapshot>>,
    stop: CancellationToken,
}

impl DeviceHandle {
    /// Hands the task a new plan (a changed spec or model).
    pub fn update(&self, plan: DevicePlan) {
        self.plan.send_replace(Arc::new(plan));
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the task; its connection closes.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the task of `plan` on `tracker`. `resync` changes when edgecore must be told
/// everything again (after the mapper registered anew). The task ends on `stop` or on
/// `shutdown`.
pub fn spawn(
    plan: DevicePlan,
    edgecore: Edgecore,
    resync: watch::Receiver<u64>,
    shutdown: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> DeviceHandle {
    let (plan_tx, plan_rx) = watch::channel(Arc::new(plan));
    let snapshot = Arc::new(Mutex::new(Snapshot {
        state: devices::state::UNKNOWN.into(),
        twins: BTreeMap::new(),
    }));
    let stop = shutdown.child_token();
    let current = plan_rx.borrow().clone();
    let task = Task {
        plan: current,
        plan_rx,
        resync,
        edgecore,
        snapshot: snapshot.clone(),
        connection: None,
        next_connect: Instant::now(),
        state: None,
        state_sent: None,
        properties: BTreeMap::new(),
    };
    let span = tracing::info_span!("device", device = %task.plan.id());
    let stopped = stop.clone();
    tracker.spawn(tracing::Instrument::instrument(task.run(stopped), span));
    DeviceHandle {
        plan: plan_tx,
        snapshot,
        stop,
    }
}

/// A value read from the device.
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    value: String,
    timestamp_ms: u128,
}

/// What the task keeps per property between wakes.
#[derive(Debug, Default)]
struct PropertyState {
    next_collect: Option<Instant>,
    reading: Option<Reading>,
    /// The reading last accepted by edgecore, and when.
    sent: Option<(Reading, Instant)>,
    /// The desired value enforced on the current connection.
    enforced: Option<String>,
    /// The desired value last written or found held, as reported in `observedDesired`.
    observed_desired: Option<pb::TwinProperty>,
    /// `observed_desired` changed since the last accepted report.
    observed_unsent: bool,
    /// The last read problem logged, so a property that keeps failing logs once.
    problem: Option<String>,
}

struct Task {
    plan: Arc<DevicePlan>,
    plan_rx: watch::Receiver<Arc<DevicePlan>>,
    resync: watch::Receiver<u64>,
    edgecore: Edgecore,
    snapshot: Arc<Mutex<Snapshot>>,
    connection: Option<ModbusContext>,
    next_connect: Instant,
    state: Option<DeviceState>,
    /// The state edgecore last accepted, and when.
    state_sent: Option<(DeviceState, Instant)>,
    properties: BTreeMap<String, PropertyState>,
}

/// Why a Modbus call failed.
enum IoFailure {
    /// The connection is unusable (closed, reset, timed out): the device is offline.
    Transport(String),
    /// The device answered with an exception: the request was wrong, the device is there.
    Exception(String),
}

impl Task {
    async fn run(mut self, stop: CancellationToken) {
        info!(endpoint = %endpoint_text(&self.plan.endpoint), properties = self.plan.properties.len(), "device started");
        loop {
            let now = Instant::now();
            if self.connection.is_none() && now >= self.next_connect {
                self.connect().await;
            }
            if self.connection.is_some() {
                self.enforce_desired().await;
            }
            if self.connection.is_some() {
                self.collect().await;
            }
            self.report().await;
            self.publish_snapshot();
            let wake = self.next_wake();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                changed = self.plan_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let plan = self.plan_rx.borrow_and_update().clone();
                    self.apply(plan);
                }
                changed = self.resync.changed() => {
                    if changed.is_ok() {
                        self.resync.borrow_and_update();
                        self.forget_reports();
                    }
                }
            }
        }
        if let Some(mut connection) = self.connection.take() {
            let _ = tokio::time::timeout(IO_TIMEOUT, connection.disconnect()).await;
        }
        info!("device stopped");
    }

    /// A new plan: a changed endpoint reconnects; a changed desired value is enforced again.
    fn apply(&mut self, plan: Arc<DevicePlan>) {
        if plan.endpoint != self.plan.endpoint {
            info!(endpoint = %endpoint_text(&plan.endpoint), "device endpoint changed; reconnecting");
            self.connection = None;
            self.next_connect = Instant::now();
        }
        self.properties
            .retain(|name, _| plan.properties.iter().any(|p| &p.name == name));
        for property in &plan.properties {
            let state = self.properties.entry(property.name.clone()).or_default();
            // Read everything at once under the new plan; re-check every desired value.
            state.next_collect = None;
            state.enforced = None;
        }
        self.plan = plan;
    }

    /// edgecore must hear everything again.
    fn forget_reports(&mut self) {
        self.state_sent = None;
        for state in self.properties.values_mut() {
            state.sent = None;
            state.observed_unsent = state.observed_desired.is_some();
        }
    }

    async fn connect(&mut self) {
        let endpoint = self.plan.endpoint.clone();
        let address = (endpoint.host.as_str(), endpoint.port);
        match tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                debug!(endpoint = %endpoint_text(&endpoint), "connected");
                self.connection = Some(tokio_modbus::client::tcp::attach_slave(
                    stream,
                    Slave(endpoint.slave),
                ));
                for state in self.properties.values_mut() {
                    state.next_collect = None;
                    state.enforced = None;
                }
            }
            Ok(Err(error)) => self.went_offline(format!("connect: {error}")),
            Err(_) => self.went_offline(format!("connect: no answer within {IO_TIMEOUT:?}")),
        }
    }

    fn went_offline(&mut self, reason: String) {
        if self.state != Some(DeviceState::Offline) {
            warn!(endpoint = %endpoint_text(&self.plan.endpoint), %reason, "device offline");
        }
        self.connection = None;
        self.state = Some(DeviceState::Offline);
        self.next_connect = Instant::now() + RECONNECT_DELAY;
    }

    fn answered(&mut self) {
        if self.state != Some(DeviceState::Ok) {
            info!("device ok");
        }
        self.state = Some(DeviceState::Ok);
    }

    async fn enforce_desired(&mut self) {
        let plan = self.plan.clone();
        for property in &plan.properties {
            let Some(desired) = property.desired.clone() else {
                continue;
            };
            if property.access != Access::ReadWrite {
                continue;
            }
            let state = self.properties.entry(property.name.clone()).or_default();
            if state.enforced.as_deref() == Some(desired.as_str()) {
                continue;
            }
            let wanted = match codec::encode(&property.visitor, property.value_type, &desired) {
                Ok(contents) => contents,
                Err(error) => {
                    warn!(property = %property.name, %desired, %error, "desired value cannot be written");
                    state.enforced = Some(desired);
                    continue;
                }
            };
            let Some(connection) = self.connection.as_mut() else {
                return;
            };
            let outcome = match read(connection, property).await {
                Ok(held) if same_value(property, &held, &wanted) => Ok(false),
                Ok(_) => write(connection, property, &wanted).await.map(|()| true),
                Err(failure) => Err(failure),
            };
            if let Err(IoFailure::Transport(error)) = outcome {
                self.went_offline(format!("write {}: {error}", property.name));
                return;
            }
            self.answered();
            let state = self.properties.entry(property.name.clone()).or_default();
            match outcome {
                Ok(wrote) => {
                    if wrote {
                        info!(property = %property.name, %desired, "desired value written");
                    }
                    state.observed_desired = Some(twin_property(&desired, property, now_ms()));
                    state.observed_unsent = true;
                    // Read it back at once so the reported value follows.
                    state.next_collect = None;
                }
                Err(IoFailure::Exception(error)) | Err(IoFailure::Transport(error)) => {
                    warn!(property = %property.name, %desired, %error, "device refused the desired value");
                }
            }
            state.enforced = Some(desired);
        }
    }

    async fn collect(&mut self) {
        let plan = self.plan.clone();
        let now = Instant::now();
        for property in &plan.properties {
            let state = self.properties.entry(property.name.clone()).or_default();
            if state.next_collect.is_some_and(|due| due > now) {
                continue;
            }
            state.next_collect = Some(now + property.collect_cycle);
            let Some(connection) = self.connection.as_mut() else {
                return;
            };
            let contents = match read(connection, property).await {
                Ok(contents) => contents,
                Err(IoFailure::Transport(error)) => {
                    self.went_offline(format!("read {}: {error}", property.name));
                    return;
                }
                Err(IoFailure::Exception(error)) => {
                    self.answered();
                    self.problem(property, format!("device refused the read: {error}"));
                    continue;
                }
            };
            self.answered();
            match codec::decode(&property.visitor, property.value_type, &contents) {
                Ok(value) => {
                    let state = self.properties.entry(property.name.clone()).or_default();
                    state.problem = None;
                    state.reading = Some(Reading {
                        value,
                        timestamp_ms: now_ms(),
                    });
                }
                Err(error) => self.problem(property, format!("cannot decode: {error}")),
            }
        }
    }

    /// Logs a property's problem once, until it changes or a read succeeds.
    fn problem(&mut self, property: &PropertyPlan, problem: String) {
        let state = self.properties.entry(property.name.clone()).or_default();
        if state.problem.as_deref() != Some(problem.as_str()) {
            warn!(property = %property.name, %problem, "property not read");
            state.problem = Some(problem);
        }
    }

    async fn report(&mut self) {
        let plan = self.plan.clone();
        let now = Instant::now();
        let mut twins = Vec::new();
        let mut report_to_cloud = false;
        let mut report_cycle: Option<Duration> = None;
        for property in &plan.properties {
            let Some(state) = self.properties.get(&property.name) else {
                continue;
            };
            let fresh = match (&state.reading, &state.sent) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(reading), Some((sent, at))) => {
                    reading.value != sent.value
                        || (reading.timestamp_ms != sent.timestamp_ms
                            && now.duration_since(*at) >= report_due(property.report_cycle))
                }
            };
            if !fresh && !state.observed_unsent {
                continue;
            }
            twins.push(self.twin(property, state));
            report_to_cloud |= property.report_to_cloud;
            report_cycle =
                Some(report_cycle.map_or(property.report_cycle, |c| c.min(property.report_cycle)));
        }
        if !twins.is_empty() {
            let names: Vec<String> = twins.iter().map(|t| t.property_name.clone()).collect();
            let request = pb::ReportDeviceStatusRequest {
                device_name: plan.name.clone(),
                device_namespace: plan.namespace.clone(),
                reported_device: Some(pb::DeviceStatus {
                    twins,
                    report_to_cloud,
                    report_cycle: report_cycle.map_or(0, |c| c.as_nanos() as i64),
                }),
            };
            match self.edgecore.report_status(request).await {
                Ok(()) => {
                    for name in names {
                        if let Some(state) = self.properties.get_mut(&name) {
                            state.sent = state.reading.clone().map(|r| (r, now));
                            state.observed_unsent = false;
                        }
                    }
                }
                Err(error) => debug!(%error, "twin report not accepted; trying again"),
            }
        }
        let Some(state) = self.state else {
            return;
        };
        let due = match self.state_sent {
            None => true,
            Some((sent, at)) => sent != state || now.duration_since(at) >= STATE_HEARTBEAT,
        };
        if due {
            let request = pb::ReportDeviceStatesRequest {
                device_name: plan.name.clone(),
                device_namespace: plan.namespace.clone(),
                state: state.as_str().into(),
            };
            match self.edgecore.report_state(request).await {
                Ok(()) => self.state_sent = Some((state, now)),
                Err(error) => debug!(%error, "state report not accepted; trying again"),
            }
        }
    }

    fn twin(&self, property: &PropertyPlan, state: &PropertyState) -> pb::Twin {
        pb::Twin {
            property_name: property.name.clone(),
            reported: state
                .reading
                .as_ref()
                .map(|r| twin_property(&r.value, property, r.timestamp_ms)),
            observed_desired: state.observed_desired.clone(),
        }
    }

    fn publish_snapshot(&self) {
        let twins = self
            .plan
            .properties
            .iter()
            .filter_map(|p| Some((p.name.clone(), self.twin(p, self.properties.get(&p.name)?))))
            .collect();
        let state = self
            .state
            .map_or(devices::state::UNKNOWN, DeviceState::as_str)
            .to_string();
        if let Ok(mut snapshot) = self.snapshot.lock() {
            *snapshot = Snapshot { state, twins };
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + RECONNECT_DELAY;
        if self.connection.is_none() {
            return self.next_connect.max(now);
        }
        for property in &self.plan.properties {
            match self
                .properties
                .get(&property.name)
                .and_then(|s| s.next_collect)
            {
                Some(due) => wake = wake.min(due),
                None => return now,
            }
        }
        wake
    }
}

/// How long after a report a fresh reading of an unchanged value is reported again: the
/// `reportCycle` less a tenth, so that reading jitter never pushes a report to the next collect
/// (with equal cycles that would halve the rate).
fn report_due(report_cycle: Duration) -> Duration {
    report_cycle - report_cycle / 10
}

/// Whether the device holds what `wanted` would write (compared as values, so a boolean held
/// as 2 equals one written as 1).
fn same_value(property: &PropertyPlan, held: &Contents, wanted: &Contents) -> bool {
    let decode = |c| codec::decode(&property.visitor, property.value_type, c).ok();
    held == wanted || decode(held).is_some_and(|h| Some(h) == decode(wanted))
}

async fn read(
    connection: &mut ModbusContext,
    property: &PropertyPlan,
) -> Result<Contents, IoFailure> {
    let visitor = &property.visitor;
    let (offset, limit) = (visitor.offset, visitor.limit);
    let call = async {
        Ok(match visitor.register {
            Register::Coil => connection
                .read_coils(offset, limit)
                .await?
                .map(Contents::Bits),
            Register::DiscreteInput => connection
                .read_discrete_inputs(offset, limit)
                .await?
                .map(Contents::Bits),
            Register::Holding => connection
                .read_holding_registers(offset, limit)
                .await?
                .map(Contents::Words),
            Register::Input => connection
                .read_input_registers(offset, limit)
                .await?
                .map(Contents::Words),
        })
    };
    let contents = timed(call).await?;
    // A device may pad bits to a whole byte; keep what was asked for.
    Ok(match contents {
        Contents::Bits(mut bits) => {
            bits.truncate(usize::from(limit));
            Contents::Bits(bits)
        }
        words => words,
    })
}

async fn write(
    connection: &mut ModbusContext,
    property: &PropertyPlan,
    contents: &Contents,
) -> Result<(), IoFailure> {
    let offset = property.visitor.offset;
    let call = async {
        match contents {
            Contents::Bits(bits) if bits.len() == 1 => {
                connection.write_single_coil(offset, bits[0]).await
            }
            Contents::Bits(bits) => connection.write_multiple_coils(offset, bits).await,
            Contents::Words(words) if words.len() == 1 => {
                connection.write_single_register(offset, words[0]).await
            }
            Contents::Words(words) => connection.write_multiple_registers(offset, words).await,
        }
    };
    timed(call).await
}

async fn timed<T>(
    call: impl Future<Output = Result<Result<T, tokio_modbus::ExceptionCode>, tokio_modbus::Error>>,
) -> Result<T, IoFailure> {
    match tokio::time::timeout(IO_TIMEOUT, call).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(exception))) => Err(IoFailure::Exception(format!("{exception:?}"))),
        Ok(Err(error)) => Err(IoFailure::Transport(error.to_string())),
        Err(_) => Err(IoFailure::Transport(format!(
            "no answer within {IO_TIMEOUT:?}"
        ))),
    }
}

fn twin_property(value: &str, property: &PropertyPlan, timestamp_ms: u128) -> pb::TwinProperty {
    pb::TwinProperty {
        value: value.to_string(),
        metadata: [
            ("timestamp".to_string(), timestamp_ms.to_string()),
            (
                "type".to_string(),
                property.value_type.metadata_name().to_string(),
            ),
        ]
        .into_iter()
        .collect(),
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn endpoint_text(endpoint: &Endpoint) -> String {
    format!(
        "{}:{} unit {}",
        endpoint.host, endpoint.port, endpoint.slave
    )
}
