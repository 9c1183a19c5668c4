//! Real parts for the device tests: a private mosquitto broker ([`Mosquitto`]), a Modbus TCP
//! device simulated by pymodbus ([`ModbusSim`], `integration/scripts/modbus_sim.py`), the
//! `modbus-mapper` binary ([`Mapper`]) with a DMI client of its socket, and what
//! `edgecore ctl` shows of the devices a gateway holds ([`ctl_devices`], [`ctl_twin`]).
//!
//! Needs Debian's `mosquitto` and `mosquitto-clients` and PyPI's `pymodbus` (`.ci/run` installs
//! them); a missing one fails the test saying which and how to install it.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::netns::EdgeNet;
use crate::{bin, eventually, free_tcp_port, terminate};

/// Fails saying how to install `program` when it is not on PATH.
pub fn require_program(program: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is not installed: {install} (.ci/run does); the device tests need it"
    );
}

/// Fails saying how to install pymodbus when `python3` cannot import it.
pub fn require_pymodbus() {
    require_program("python3", "apt-get install python3");
    let out = Command::new("python3")
        .args(["-c", "import pymodbus.client, pymodbus.server"])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "pymodbus is not installed for python3: python3 -m pip install pymodbus (.ci/run does); \
         the device tests simulate their Modbus device with it: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The broker's binary: on PATH, or where Debian puts it (`/usr/sbin`, not on every PATH).
pub fn mosquitto_program() -> PathBuf {
    let on_path = Command::new("sh")
        .args(["-c", "command -v mosquitto"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let debian = Path::new("/usr/sbin/mosquitto");
    on_path
        .or_else(|| debian.is_file().then(|| debian.to_path_buf()))
        .unwrap_or_else(|| {
            panic!(
                "mosquitto is not installed: apt-get install mosquitto (.ci/run does); the device tests need it"
            )
        })
}

/// Runs `program` in `netns` (by name), or in the root namespace when `None`.
fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(name) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", name]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Whether a TCP port on 127.0.0.1 accepts connections (inside `netns` when given).
fn accepts(netns: Option<&str>, port: u16) -> bool {
    let connect = move || {
        std::net::TcpStream::connect_timeout(
            &(std::net::Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
    };
    match netns {
        Some(name) => crate::netns::run_in_namespace(name, connect).unwrap_or(false),
        None => connect(),
    }
}

fn kill_now(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A mosquitto broker of its own on 127.0.0.1 (in the root namespace or an edge's), with its
/// config and log in a directory of its own; killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    netns: Option<String>,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker in the root namespace, with its files in `dir`.
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::spawn(dir, None)
    }

    /// Starts a broker inside `net` (where an edge in that namespace reaches it on
    /// 127.0.0.1); [`Mosquitto::command`] runs the clients there too.
    pub fn start_in(net: &EdgeNet, dir: &Path) -> Mosquitto {
        Mosquitto::spawn(dir, Some(net.name().to_string()))
    }

    fn spawn(dir: &Path, netns: Option<String>) -> Mosquitto {
        let program = mosquitto_program();
        require_program("mosquitto_sub", "apt-get install mosquitto-clients");
        std::fs::create_dir_all(dir).expect("mosquitto dir");
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let port = free_tcp_port();
            let config = dir.join("mosquitto.conf");
            std::fs::write(
                &config,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_type all\n"
                ),
            )
            .expect("write mosquitto.conf");
            let log = dir.join("mosquitto.log");
            let file = std::fs::File::create(&log).expect("mosquitto log");
            let child = command_in(netns.as_deref(), &program)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("log file"))
                .stderr(file)
                .spawn()
                .expect("start mosquitto");
            let mut broker = Mosquitto {
                port,
                dir: dir.to_path_buf(),
                netns: netns.clone(),
                child: Some(child),
            };
            let up = eventually(Duration::from_secs(10), || {
                !broker.is_running() || accepts(broker.netns.as_deref(), port)
            });
            if up && broker.is_running() {
                return broker;
            }
            last_log = broker.log();
            kill_now(&mut broker.child);
        }
        panic!("mosquitto did not start; its log:\n{last_log}");
    }

    /// `tcp://127.0.0.1:PORT`, for `edgecore run --mqtt-broker`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The broker's log (every connection, subscription and publish).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// `program` (`mosquitto_pub`, `mosquitto_sub`) where the broker runs, pointed at it.
    pub fn command(&self, program: &str) -> Command {
        let mut command = command_in(self.netns.as_deref(), program);
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        command
    }

    /// `mosquitto_pub -t TOPIC -m PAYLOAD -q 1`, asserting it succeeded.
    pub fn publish(&self, topic: &str, payload: &str) {
        let out = self
            .command("mosquitto_pub")
            .args(["-q", "1", "-t", topic, "-m", payload])
            .output()
            .expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub to {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A `mosquitto_sub` on `topic` collecting every message; returns once the subscription
    /// is known to be in place (a probe published on a private topic came back).
    pub fn subscribe(&self, topic: &str) -> Subscription {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let probe = format!(
            "e2e/probe/{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut child = self
            .command("mosquitto_sub")
            .args(["-q", "1", "-F", "%j", "-t", topic, "-t", &probe])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mosquitto_sub");
        let stdout = child.stdout.take().expect("mosquitto_sub stdout");
        let messages = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let messages = messages.clone();
            move || collect_messages(stdout, &messages)
        });
        let subscription = Subscription {
            topic: topic.to_string(),
            probe,
            child: Some(child),
            messages,
        };
        let subscribed = eventually(Duration::from_secs(10), || {
            self.publish(&subscription.probe, "{}");
            std::thread::sleep(Duration::from_millis(100));
            subscription.saw_probe()
        });
        assert!(
            subscribed,
            "mosquitto_sub on {topic} did not receive its probe within 10 s; broker log:\n{}",
            self.log()
        );
        subscription
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

fn collect_messages(stdout: ChildStdout, messages: &Mutex<Vec<MqttMessage>>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let message = MqttMessage {
            topic: record["topic"].as_str().unwrap_or_default().to_string(),
            payload: record["payload"].as_str().unwrap_or_default().to_string(),
        };
        messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message);
    }
}

/// One message a [`Subscription`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttMessage {
    pub topic: String,
    /// The payload as text (KubeEdge's are JSON).
    pub payload: String,
}

impl MqttMessage {
    /// The payload parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap_or(Value::Null)
    }
}

/// A running `mosquitto_sub`; killed when dropped.
pub struct Subscription {
    topic: String,
    probe: String,
    child: Option<Child>,
    messages: Arc<Mutex<Vec<MqttMessage>>>,
}

impl Subscription {
    fn saw_probe(&self) -> bool {
        self.all().iter().any(|m| m.topic == self.probe)
    }

    fn all(&self) -> Vec<MqttMessage> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The messages received on the subscribed topic so far (the probes left out).
    pub fn messages(&self) -> Vec<MqttMessage> {
        self.all()
            .into_iter()
            .filter(|m| m.topic != self.probe)
            .collect()
    }

    /// Waits until a message satisfies `check`; the messages received so far otherwise.
    pub fn wait_for(
        &self,
        within: Duration,
        check: impl Fn(&MqttMessage) -> bool,
    ) -> Result<MqttMessage, Vec<MqttMessage>> {
        let mut found = None;
        eventually(within, || {
            found = self.messages().into_iter().find(|m| check(m));
            found.is_some()
        });
        found.ok_or_else(|| self.messages())
    }

    /// The subscribed topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

/// The repository's `integration/scripts/` directory.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// A Modbus TCP device: pymodbus's server run by `integration/scripts/modbus_sim.py --port P`
/// on 127.0.0.1, slave 1, holding and input registers, coils and discrete inputs all zero at
/// each start. Stopped when dropped.
pub struct ModbusSim {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Held open: the script may take commands there, and stops when it closes.
    stdin: Option<std::process::ChildStdin>,
    starts: usize,
}

/// pymodbus's client, for the test's own reads and writes: `op port offset [value] [deadline]`.
/// `write` prints the time (seconds since the epoch) right after the device answered; `watch`
/// prints `ready` once connected, then polls until the holding register holds `value` and
/// prints the time it saw it, or `last=V` and fails at `deadline`.
const CLIENT: &str = r#"
import sys, time
from pymodbus.client import ModbusTcpClient
op, port, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=1)
if not client.connect():
    sys.exit("cannot connect to the Modbus simulator on 127.0.0.1:%d" % port)
if op == "write":
    r = client.write_register(offset, int(sys.argv[4]), device_id=1)
    if r.isError():
        sys.exit("write of holding register %d failed: %s" % (offset, r))
    print("%.6f" % time.time())
elif op == "read":
    r = client.read_holding_registers(offset, count=1, device_id=1)
    if r.isError():
        sys.exit("read of holding register %d failed: %s" % (offset, r))
    print(r.registers[0])
elif op == "watch":
    want, deadline, last = int(sys.argv[4]), float(sys.argv[5]), None
    print("ready", flush=True)
    while True:
        r = client.read_holding_registers(offset, count=1, device_id=1)
        if not r.isError():
            last = r.registers[0]
            if last == want:
                print("%.6f" % time.time())
                sys.exit(0)
        if time.time() >= deadline:
            print("last=%s" % last)
            sys.exit(1)
        time.sleep(0.02)
"#;

fn epoch_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn from_epoch_seconds(text: &str) -> Option<SystemTime> {
    let secs: f64 = text.trim().parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
}

impl ModbusSim {
    /// Starts the simulator on a free port, with its log in `dir`.
    pub fn start(dir: &Path) -> ModbusSim {
        require_pymodbus();
        let script = scripts_dir().join("modbus_sim.py");
        assert!(
            script.is_file(),
            "{} is missing: the device tests simulate their Modbus device with it",
            script.display()
        );
        std::fs::create_dir_all(dir).expect("simulator dir");
        let mut last = String::new();
        for _attempt in 0..3 {
            let mut sim = ModbusSim {
                port: free_tcp_port(),
                dir: dir.to_path_buf(),
                child: None,
                stdin: None,
                starts: 0,
            };
            match sim.spawn() {
                Ok(()) => return sim,
                Err(log) => last = log,
            }
        }
        panic!("the Modbus simulator did not start; its log:\n{last}");
    }

    /// Starts the script; its log if it exits or is not ready within 20 s.
    fn spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("simulator log");
        let mut child = Command::new("python3")
            .arg(scripts_dir().join("modbus_sim.py"))
            .args(["--port", &self.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start python3");
        self.stdin = child.stdin.take();
        self.child = Some(child);
        // The script says `ready` once its own server listens (and exits when it cannot
        // bind): a probe of the port could reach another simulator's.
        let ready = format!("ready {}", self.port);
        eventually(Duration::from_secs(20), || {
            !self.is_running() || self.log().contains(&ready)
        });
        if self.is_running() && self.log().contains(&ready) {
            Ok(())
        } else {
            self.stdin = None;
            kill_now(&mut self.child);
            Err(self.log())
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("modbus-sim-{}.log", self.starts))
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The device goes away (SIGTERM, then SIGKILL): its port refuses connections.
    pub fn stop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// The device comes back on the same port, its registers zero again.
    pub fn start_again(&mut self) {
        self.stop();
        let mut last = String::new();
        // The port was ours a moment ago; a start that loses it to someone else is retried.
        for _attempt in 0..5 {
            match self.spawn() {
                Ok(()) => return,
                Err(log) => last = log,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "the Modbus simulator did not start again on port {}; its log:\n{last}",
            self.port
        );
    }

    fn client(&self, args: &[String]) -> Command {
        let mut command = Command::new("python3");
        command.args(["-c", CLIENT]).args(args).stdin(Stdio::null());
        command
    }

    /// Writes holding register `offset` (slave 1) through Modbus; returns when the device
    /// answered.
    pub fn write_holding(&self, offset: u16, value: u16) -> SystemTime {
        let out = self
            .client(&[
                "write".into(),
                self.port.to_string(),
                offset.to_string(),
                value.to_string(),
            ])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "writing {value} to holding register {offset} of the simulator: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        from_epoch_seconds(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(SystemTime::now)
    }

    /// Reads holding register `offset` (slave 1) through Modbus.
    pub fn read_holding(&self, offset: u16) -> u16 {
        let out = self
            .client(&["read".into(), self.port.to_string(), offset.to_string()])
            .output()
            .expect("run python3");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "reading holding register {offset} of the simulator: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("the simulator's register {offset} read as {text:?}"))
    }

    /// Starts watching holding register `offset` until it holds `value` or `deadline`
    /// passes; returns once the watcher is connected, so what the test does next is seen.
    pub fn watch_holding(&self, offset: u16, value: u16, deadline: SystemTime) -> RegisterWatch {
        let mut child = self
            .client(&[
                "watch".into(),
                self.port.to_string(),
                offset.to_string(),
                value.to_string(),
                format!("{:.3}", epoch_seconds(deadline)),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut stdout = BufReader::new(child.stdout.take().expect("watcher stdout"));
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);
        if first.trim() != "ready" {
            let out = child.wait_with_output().expect("watcher output");
            panic!(
                "the register watcher did not start: {first}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        RegisterWatch {
            child,
            stdout,
            offset,
            value,
        }
    }
}

impl Drop for ModbusSim {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

/// A running watch of one holding register ([`ModbusSim::watch_holding`]).
pub struct RegisterWatch {
    child: Child,
    stdout: BufReader<ChildStdout>,
    offset: u16,
    value: u16,
}

impl RegisterWatch {
    /// When the register was first seen holding the value; what it held last otherwise.
    pub fn wait(mut self) -> Result<SystemTime, String> {
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        let status = self.child.wait().expect("watcher exit");
        match (status.success(), from_epoch_seconds(&line)) {
            (true, Some(at)) => Ok(at),
            _ => {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                Err(format!(
                    "holding register {} never held {} ({}){}",
                    self.offset,
                    self.value,
                    line.trim(),
                    stderr.trim()
                ))
            }
        }
    }
}

/// A running `modbus-mapper`, its DMI socket toward edgecore and its own socket in a
/// directory of its own; killed when dropped.
pub struct Mapper {
    pub dir: PathBuf,
    /// edgecore's `DeviceManagerService` socket (`edgecore run --dmi-socket`).
    pub dmi_socket: PathBuf,
    /// Where the mapper serves `DeviceMapperService`.
    pub socket: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Mapper {
    /// Starts `modbus-mapper --dmi-socket DMI --socket DIR/mapper.sock` and waits until its
    /// socket accepts connections.
    pub fn start(dir: &Path, dmi_socket: &Path) -> Mapper {
        std::fs::create_dir_all(dir).expect("mapper dir");
        let mut mapper = Mapper {
            dir: dir.to_path_buf(),
            dmi_socket: dmi_socket.to_path_buf(),
            socket: dir.join("mapper.sock"),
            child: None,
            starts: 0,
        };
        mapper.spawn();
        mapper
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("mapper log");
        let child = Command::new(bin("modbus-mapper"))
            .arg("--dmi-socket")
            .arg(&self.dmi_socket)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--name", "modbus-e2e"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start modbus-mapper");
        self.child = Some(child);
        let socket = self.socket.clone();
        let up = eventually(Duration::from_secs(20), || {
            !self.is_running() || std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(
            up && self.is_running(),
            "modbus-mapper did not serve {} within 20 s; its log:\n{}",
            self.socket.display(),
            self.log()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("mapper-{}.log", self.starts))
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: no clean-up, its socket file left behind.
    pub fn kill(&mut self) {
        kill_now(&mut self.child);
    }

    /// Starts it again with the same flags (after [`Mapper::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `GetDevice` on the mapper's socket: the device as the mapper holds it, `None` when the
    /// mapper answers that it has no such device (an error status or no device).
    pub fn get_device(&self, namespace: &str, name: &str) -> Option<dmi::pb::Device> {
        let socket = self.socket.clone();
        let request = dmi::pb::GetDeviceRequest {
            device_name: name.to_string(),
            device_namespace: namespace.to_string(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_static("http://mapper.invalid")
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let socket = socket.clone();
                    async move {
                        tokio::net::UnixStream::connect(socket)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
                .await
                .unwrap_or_else(|e| panic!("cannot connect to the mapper's socket: {e}"));
            let mut client =
                dmi::pb::device_mapper_service_client::DeviceMapperServiceClient::new(channel);
            client
                .get_device(request)
                .await
                .ok()
                .and_then(|r| r.into_inner().device)
        })
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

/// One row of `edgecore ctl get devices`, by column (NAMESPACE, NAME, MODEL, PROTOCOL, STATE,
/// LAST-ONLINE).
pub type DeviceRow = std::collections::BTreeMap<String, String>;

/// What `edgecore ctl get devices --data-dir DIR` prints, parsed by the header's columns
/// (works whether or not `edgecore run` is running).
pub fn ctl_devices(dir: &Path) -> Vec<DeviceRow> {
    let out = Command::new(bin("edgecore"))
        .args(["ctl", "get", "devices", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run edgecore ctl");
    assert!(
        out.status.success(),
        "edgecore ctl get devices failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_table(&String::from_utf8_lossy(&out.stdout))
}

/// Rows of a left-aligned table whose first line is the header; a cell runs from its
/// column's start to the next column's start.
fn parse_table(text: &str) -> Vec<DeviceRow> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let mut columns: Vec<(usize, String)> = Vec::new();
    let mut previous = ' ';
    for (at, c) in header.char_indices() {
        if c != ' ' && previous == ' ' {
            columns.push((at, String::new()));
        }
        if c != ' '
            && let Some((_, name)) = columns.last_mut()
        {
            name.push(c);
        }
        previous = c;
    }
    if !columns.iter().any(|(_, name)| name == "NAME") {
        return Vec::new();
    }
    lines
        .map(|line| {
            columns
                .iter()
                .enumerate()
                .map(|(i, (start, name))| {
                    let end = columns.get(i + 1).map_or(line.len(), |(next, _)| *next);
                    let cell = line.get(*start..end.min(line.len())).unwrap_or_default();
                    (name.clone(), cell.trim().to_string())
                })
                .collect()
        })
        .collect()
}

/// `edgecore ctl twin -n NAMESPACE NAME -o json --data-dir DIR`: the twin as the gateway holds
/// it (`edgecore::devices::TwinView` in camelCase), `None` when the gateway does not hold it.
pub fn ctl_twin(dir: &Path, namespace: &str, name: &str) -> Option<Value> {
    let out = Command::new(bin("edgecore"))
        .args([
            "ctl",
            "twin",
            "-n",
            namespace,
            name,
            "-o",
            "json",
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .expect("run edgecore ctl");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// One property of a twin in `ctl twin -o json` (`Null` when absent).
pub fn twin_property<'a>(twin: &'a Value, property: &str) -> &'a Value {
    twin["properties"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == property))
        .unwrap_or(&Value::Null)
}

/// The twin of `property` in a Device's `status.twins` (`Null` when absent).
pub fn status_twin<'a>(device: &'a Value, property: &str) -> &'a Value {
    device["status"]["twins"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["propertyName"] == property))
        .unwrap_or(&Value::Null)
}

/// A `kubectl get ... -w -o json` running in the background, every object it printed kept in
/// order with the time it arrived. Killed when dropped.
pub struct KubectlWatch {
    child: Option<Child>,
    events: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl KubectlWatch {
    /// Starts `kubectl --kubeconfig K --cache-dir C ARGS -w -o json`; its first event is the
    /// current object.
    pub fn start(kubeconfig: &Path, cache: &Path, args: &[&str]) -> KubectlWatch {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(cache)
            .args(args)
            .args(["-w", "-o", "json"])
            .env("HOME", cache.parent().unwrap_or(cache))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kubectl get -w");
        let stdout = child.stdout.take().expect("kubectl stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let events = events.clone();
            move || {
                let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout))
                    .into_iter::<Value>();
                for object in stream {
                    let Ok(object) = object else { break };
                    events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), object));
                }
            }
        });
        KubectlWatch {
            child: Some(child),
            events,
        }
    }

    /// Every object printed so far, in order, with when it arrived.
    pub fn events(&self) -> Vec<(Instant, Value)> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether kubectl is still watching.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for KubectlWatch {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_tables_are_read_by_their_header_columns() {
        let text = "NAMESPACE  NAME    MODEL   PROTOCOL  STATE  LAST-ONLINE\n\
                    default    thermo  th-mod  modbus    ok     2026-12-05T10:00:00Z\n\
                    factory    panel   p-mod   virtual\n";
        let rows = parse_table(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["NAME"], "thermo");
        assert_eq!(rows[0]["LAST-ONLINE"], "2026-12-05T10:00:00Z");
        assert_eq!(rows[1]["NAMESPACE"], "factory");
        assert_eq!(rows[1]["STATE"], "");
        assert!(parse_table("").is_empty());
        assert!(parse_table("No resources found.\n").is_empty());
    }

    #[test]
    fn twins_are_found_by_property() {
        let device = serde_json::json!({"status": {"twins": [
            {"propertyName": "a", "reported": {"value": "1"}},
            {"propertyName": "b", "reported": {"value": "2"}}
        ]}});
        assert_eq!(status_twin(&device, "b")["reported"]["value"], "2");
        assert!(status_twin(&device, "c").is_null());
        let twin = serde_json::json!({"properties": [{"name": "a", "reported": {"value": "1"}}]});
        assert_eq!(twin_property(&twin, "a")["reported"]["value"], "1");
        assert!(twin_property(&twin, "b").is_null());
    }
}
