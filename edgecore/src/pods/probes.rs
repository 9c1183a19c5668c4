//! Liveness, readiness and startup probes with the kubelet's semantics: an initial delay,
//! a period, a timeout, and success/failure thresholds before the result flips.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cri::Cri;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

/// One probe of one container and its running tally.
#[derive(Debug, Clone)]
pub struct Prober {
    pub kind: ProbeKind,
    probe: Probe,
    last_run: Option<Instant>,
    successes: i32,
    failures: i32,
    /// The current verdict; `None` until a threshold is reached.
    pub verdict: Option<bool>,
    /// Why the last run failed.
    pub last_failure: Option<String>,
}

fn seconds(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(value.unwrap_or(default).max(0) as u64)
}

impl Prober {
    /// A prober for `probe`.
    pub fn new(kind: ProbeKind, probe: Probe) -> Self {
        Prober {
            kind,
            probe,
            last_run: None,
            successes: 0,
            failures: 0,
            verdict: None,
            last_failure: None,
        }
    }

    /// Whether the probe should run now, for a container started at `started`.
    pub fn due(&self, now: Instant, started: Instant) -> bool {
        now >= self.next_due(started)
    }

    /// When the probe should run next, for a container started at `started`: after the
    /// initial delay, then once per period (at least 1 s).
    pub fn next_due(&self, started: Instant) -> Instant {
        let first = started + seconds(self.probe.initial_delay_seconds, 0);
        match self.last_run {
            None => first,
            Some(last) => (last
                + seconds(self.probe.period_seconds, 10).max(Duration::from_secs(1)))
            .max(first),
        }
    }

    /// Records one result; returns whether the verdict changed.
    pub fn record(&mut self, now: Instant, result: Result<(), String>) -> bool {
        self.last_run = Some(now);
        let before = self.verdict;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                self.last_failure = None;
                if self.successes >= self.probe.success_threshold.unwrap_or(1).max(1) {
                    self.verdict = Some(true);
                }
            }
            Err(why) => {
                self.successes = 0;
                self.failures += 1;
                self.last_failure = Some(why);
                if self.failures >= self.probe.failure_threshold.unwrap_or(3).max(1) {
                    self.verdict = Some(false);
                }
            }
        }
        before != self.verdict
    }

    /// Forgets the tally (the container restarted).
    pub fn reset(&mut self) {
        *self = Prober::new(self.kind, self.probe.clone());
    }

    /// Runs the probe once against a container.
    pub async fn run(&self, cri: &Cri, container_id: &str, pod_ip: &str) -> Result<(), String> {
        let timeout = seconds(self.probe.timeout_seconds, 1).max(Duration::from_secs(1));
        if let Some(exec) = &self.probe.exec {
            let command = exec.command.clone().unwrap_or_default();
            let reply = cri
                .exec_sync(container_id, command, timeout)
                .await
                .map_err(|e| e.to_string())?;
            return if reply.exit_code == 0 {
                Ok(())
            } else {
                Err(format!(
                    "command exited with {}: {}",
                    reply.exit_code,
                    String::from_utf8_lossy(&reply.stdout).trim()
                ))
            };
        }
        if let Some(http) = &self.probe.http_get {
            let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let port = port_number(&http.port)?;
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            return tokio::time::timeout(timeout, http_get(&host, port, &path))
                .await
                .map_err(|_| format!("GET http://{host}:{port}{path}: timed out"))?;
        }
        if let Some(tcp) = &self.probe.tcp_socket {
            let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let port = port_number(&tcp.port)?;
            return match tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
                Err(_) => Err(format!("dial tcp {host}:{port}: timed out")),
            };
        }
        Err("the probe has no handler (exec, httpGet or tcpSocket)".into())
    }
}

pub(crate) fn port_number(port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
        IntOrString::String(name) => Err(format!(
            "named port {name:?} is not supported by edgecore probes; use a number"
        )),
    }
}

/// A minimal HTTP/1.1 GET: success is a status from 200 to 399, as the kubelet's.
pub(crate) async fn http_get(host: &str, port: u16, path: &str) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("GET http://{host}:{port}{path}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: edgecore-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET http://{host}:{port}{path}: {e}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < head.len() {
        let n = stream
            .read(&mut head[read..])
            .await
            .map_err(|e| format!("GET http://{host}:{port}{path}: {e}"))?;
        if n == 0 {
            break;
        }
        read += n;
        if head[..read].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET http://{host}:{port}{path}: not an HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET http://{host}:{port}{path}: HTTP {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(json: serde_json::Value) -> Probe {
        serde_json::from_value(json).expect("probe")
    }

    #[test]
    fn thresholds_flip_the_verdict_as_the_kubelet_does() {
        let mut p = Prober::new(
            ProbeKind::Liveness,
            probe(
                serde_json::json!({"exec": {"command": ["true"]}, "failureThreshold": 2, "successThreshold": 1}),
            ),
        );
        let now = Instant::now();
        assert!(p.record(now, Ok(())));
        assert_eq!(p.verdict, Some(true));
        assert!(
            !p.record(now, Err("no".into())),
            "one failure is under the threshold"
        );
        assert!(p.record(now, Err("no".into())));
        assert_eq!(p.verdict, Some(false));
        assert_eq!(p.last_failure.as_deref(), Some("no"));
    }

    #[test]
    fn initial_delay_and_period_decide_when_it_runs() {
        let mut p = Prober::new(
            ProbeKind::Readiness,
            probe(
                serde_json::json!({"tcpSocket": {"port": 80}, "initialDelaySeconds": 5, "periodSeconds": 2}),
            ),
        );
        let started = Instant::now();
        assert!(!p.due(started + Duration::from_secs(4), started));
        assert!(p.due(started + Duration::from_secs(5), started));
        p.record(started + Duration::from_secs(5), Ok(()));
        assert!(!p.due(started + Duration::from_secs(6), started));
        assert!(p.due(started + Duration::from_secs(7), started));
    }

    #[tokio::test]
    async fn http_get_succeeds_on_2xx_and_fails_on_5xx() {
        for (status, ok) in [("200 OK", true), ("302 Found", true), ("500 Oops", false)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(reply.as_bytes()).await;
            });
            let result = http_get("127.0.0.1", port, "/healthz").await;
            assert_eq!(result.is_ok(), ok, "{status}: {result:?}");
        }
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_a_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let p = Prober::new(
            ProbeKind::Liveness,
            probe(serde_json::json!({"tcpSocket": {"port": port}})),
        );
        let cri = Cri::new("unix:///nonexistent.sock").expect("client");
        assert!(p.run(&cri, "x", "127.0.0.1").await.is_err());
    }
}
