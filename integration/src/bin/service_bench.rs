//! `service-bench`: what the Services at the edge cost and how fast they follow readiness
//! ([docs/services.md]).
//!
//! Everything is real and on this machine: the gateway of the Services tests
//! ([`integration::gateway`]: a network namespace holding edgecore, with the Services on, and
//! its containerd), joined to `cloudcore serve` (embedded API, or `--mode kube` with a real
//! control plane started for the run). A Deployment `web` of two busybox httpd pods behind a
//! ClusterIP Service `web` (port 80 → 8080). In one run:
//!
//! 1. **Through the cluster IP vs the pod IP.** A client in the gateway's namespace (the
//!    gateway's host, where a pod's traffic is routed too) makes `--requests` sequential
//!    HTTP/1.1 requests, each on a new connection, alternating `CLUSTER_IP:80` and
//!    `POD_IP:8080` so both see the same machine; the medians and p99 of each and their
//!    difference (the added latency). Then `--concurrency` clients for `--secs` seconds against
//!    each: requests per second.
//! 2. **Unready → out of the data path.** `--rounds` times, online and then partitioned
//!    (`EdgeNet::cut`): the probe file of one pod removed through the CRI (`edgecore ctl exec`),
//!    and the time until its IP is no longer in edgecore's nftables table (`nft list table`,
//!    every 10 ms). This includes up to one probe period (1 s, failureThreshold 1): the time from
//!    the probe's failure is this minus up to 1 s. Then the file back and the time until the IP
//!    is back.
//! 3. **1,000 Services.** edgecore's `VmRSS` and `edgecore_service_rules_last_sync_seconds`
//!    before; `--services` Services (selecting the web pods) created with one `kubectl apply`;
//!    the time until the last one's cluster IP is in the table; then `VmRSS` and the metric
//!    (the last full replacement of the table, with all of them in it). Then one Service
//!    deleted: the time until its IP is gone and the metric again.
//!
//! A failure or a panic stops everything the bench started (the gateway's `Drop`) and exits 1.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use integration::bench::{self, Machine, mib, ms, percentile};
use integration::gateway::{Gateway, GatewayOptions, Mode, http_get_at, web_deployment};
use serde_json::{Value, json};

/// The gateway's node name.
const NODE: &str = "service-bench-gw";
/// How often the table is read while waiting for an endpoint to leave or come back.
const POLL: Duration = Duration::from_millis(10);
/// How long one wait (pods ready, rules programmed) may take before the bench fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout of one benchmark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "service-bench",
    about = "Services at the edge: cluster IP vs pod IP, readiness, 1,000 Services"
)]
struct Cli {
    /// `embedded` (cloudcore's own API) or `kube` (a real control plane started for the run).
    #[arg(long, default_value = "embedded")]
    mode: String,
    /// Sequential requests to each target for the latency figures.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent clients for the requests-per-second figures.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds of load per target for the requests-per-second figures.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds of unready → gone, online and offline each.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Services created for the rule update and memory figures.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--requests", c.requests),
            ("--concurrency", c.concurrency),
            ("--secs", c.secs as usize),
            ("--rounds", c.rounds),
            ("--services", c.services),
        ]
    }) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let mode = match cli.mode.as_str() {
        "embedded" => Mode::Embedded,
        "kube" => Mode::Kube,
        other => {
            eprintln!("error: --mode must be embedded or kube, not {other:?}");
            return ExitCode::from(64);
        }
    };
    let result = std::panic::catch_unwind(|| run(&cli, mode))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the bench panicked (message above)")));
    bench::finish(result, cli.json)
}

/// Latencies of one target.
#[derive(Debug, Default)]
struct Latency {
    median: Duration,
    p99: Duration,
    failed: usize,
}

#[derive(Debug)]
struct Report {
    mode: Mode,
    commit: String,
    machine: Machine,
    requests: usize,
    cluster_ip: Latency,
    pod_ip: Latency,
    concurrency: usize,
    secs: u64,
    cluster_ip_rps: f64,
    pod_ip_rps: f64,
    /// Removal of the probe file → IP gone from the table, per round.
    unready_online: Vec<Duration>,
    unready_offline: Vec<Duration>,
    /// Probe file back → IP back in the table, per round.
    ready_online: Vec<Duration>,
    services: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    programmed_all: Duration,
    sync_seconds_all: f64,
    removed_one: Duration,
    sync_seconds_one_removed: f64,
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    percentile(&sorted, 0.5)
}

fn list(values: &[Duration]) -> String {
    values
        .iter()
        .map(|d| format!("{:.0}", ms(*d)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let mut t = String::new();
        t += &format!(
            "service-bench ({:?} mode, commit {}; {} CPUs, {}, {} MiB, kernel {})\n\n",
            self.mode,
            self.commit,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_mib,
            self.machine.kernel
        );
        t += &format!(
            "latency, {} sequential requests each (new connection each), ms:\n",
            self.requests
        );
        t += "  target        median     p99   failed\n";
        for (name, l) in [("cluster IP", &self.cluster_ip), ("pod IP", &self.pod_ip)] {
            t += &format!(
                "  {name:<12} {:>7.3} {:>7.3} {:>8}\n",
                ms(l.median),
                ms(l.p99),
                l.failed
            );
        }
        t += &format!(
            "  added by the cluster IP (medians): {:.3} ms\n\n",
            ms(self.cluster_ip.median.saturating_sub(self.pod_ip.median))
        );
        t += &format!(
            "requests/s, {} clients for {} s: cluster IP {:.0}, pod IP {:.0} ({:.2}x)\n\n",
            self.concurrency,
            self.secs,
            self.cluster_ip_rps,
            self.pod_ip_rps,
            self.cluster_ip_rps / self.pod_ip_rps.max(1.0)
        );
        t +=
            "probe file removed -> IP out of the table (includes up to 1 s of probe period), ms:\n";
        t += &format!(
            "  online:  median {:.0} [{}]\n  offline: median {:.0} [{}]\n",
            ms(median(&self.unready_online)),
            list(&self.unready_online),
            ms(median(&self.unready_offline)),
            list(&self.unready_offline)
        );
        t += &format!(
            "probe file back -> IP back (online), ms: median {:.0} [{}]\n\n",
            ms(median(&self.ready_online)),
            list(&self.ready_online)
        );
        t += &format!(
            "{} Services: applied -> all programmed {:.1} s; last table sync {:.3} s; one deleted -> gone {:.0} ms, sync {:.3} s\n",
            self.services,
            self.programmed_all.as_secs_f64(),
            self.sync_seconds_all,
            ms(self.removed_one),
            self.sync_seconds_one_removed
        );
        t += &format!(
            "edgecore VmRSS: {:.1} MiB before, {:.1} MiB with them (+{:.1} MiB)\n",
            mib(self.rss_before_kib),
            mib(self.rss_after_kib),
            mib(self.rss_after_kib.saturating_sub(self.rss_before_kib))
        );
        t
    }

    fn to_json(&self) -> Value {
        let lat = |l: &Latency| json!({"median_ms": ms(l.median), "p99_ms": ms(l.p99), "failed": l.failed});
        let all = |v: &[Duration]| v.iter().map(|d| ms(*d)).collect::<Vec<_>>();
        json!({
            "mode": format!("{:?}", self.mode),
            "commit": self.commit,
            "machine": self.machine.to_json(),
            "requests": self.requests,
            "cluster_ip": lat(&self.cluster_ip),
            "pod_ip": lat(&self.pod_ip),
            "concurrency": self.concurrency,
            "secs": self.secs,
            "cluster_ip_rps": self.cluster_ip_rps,
            "pod_ip_rps": self.pod_ip_rps,
            "unready_online_ms": all(&self.unready_online),
            "unready_offline_ms": all(&self.unready_offline),
            "ready_online_ms": all(&self.ready_online),
            "services": self.services,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "programmed_all_s": self.programmed_all.as_secs_f64(),
            "sync_seconds_all": self.sync_seconds_all,
            "removed_one_ms": ms(self.removed_one),
            "sync_seconds_one_removed": self.sync_seconds_one_removed,
        })
    }
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Polls `check` every [`POLL`] until it holds; how long that took, or an error naming
/// `what` after [`STEP_TIMEOUT`].
fn until(what: &str, mut check: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > STEP_TIMEOUT {
            bail!("{what} not reached within {STEP_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
    Ok(started.elapsed())
}

fn in_table(g: &Gateway, ip: &str) -> bool {
    g.edgecore_table().is_some_and(|t| t.contains(ip))
}

fn run(cli: &Cli, mode: Mode) -> Result<Report> {
    let machine = Machine::read();
    let g = Gateway::start(GatewayOptions::new(mode, NODE));
    g.apply(&web_deployment(&g.node, 2));
    g.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n",
    );
    until("two ready web pods", || {
        let pods = g.running_pods("app=web");
        pods.len() == 2 && pods.keys().all(|p| g.pod_ready_is(p, "True"))
    })
    .with_context(|| g.context())?;
    let pods = g.running_pods("app=web");
    let (first, first_ip) = pods.iter().next().context("a web pod")?;
    let svc = g.get("service", "web").context("service web")?;
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .context("web has no clusterIP")?
        .to_string();
    let to_cluster = SocketAddr::new(cluster_ip.parse()?, 80);
    let to_pod = SocketAddr::new(first_ip.parse()?, 8080);
    until("the cluster IP answering from the gateway", || {
        g.net
            .run_in(|| http_get_at(to_cluster, "/", REQUEST_TIMEOUT))
            .is_some()
    })
    .with_context(|| g.context())?;

    // 1. Latency, alternating targets, then requests per second.
    let (cluster_times, pod_times) = g.net.run_in(|| {
        let mut times = (Vec::new(), Vec::new());
        let mut failed = (0, 0);
        for _ in 0..cli.requests {
            for (target, into, fails) in [
                (to_cluster, &mut times.0, &mut failed.0),
                (to_pod, &mut times.1, &mut failed.1),
            ] {
                let started = Instant::now();
                match http_get_at(target, "/", REQUEST_TIMEOUT) {
                    Some(_) => into.push(started.elapsed()),
                    None => *fails += 1,
                }
            }
        }
        ((times.0, failed.0), (times.1, failed.1))
    });
    let latency = |(mut times, failed): (Vec<Duration>, usize)| {
        times.sort();
        Latency {
            median: percentile(&times, 0.5),
            p99: percentile(&times, 0.99),
            failed,
        }
    };
    let (cluster_lat, pod_lat) = (latency(cluster_times), latency(pod_times));
    let rps = |target: SocketAddr| {
        g.net.run_in(|| {
            let done = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            std::thread::scope(|scope| {
                for _ in 0..cli.concurrency {
                    scope.spawn(|| {
                        while !stop.load(Ordering::Relaxed) {
                            if http_get_at(target, "/", REQUEST_TIMEOUT).is_some() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
                std::thread::sleep(Duration::from_secs(cli.secs));
                stop.store(true, Ordering::Relaxed);
            });
            done.load(Ordering::Relaxed) as f64 / cli.secs as f64
        })
    };
    let cluster_ip_rps = rps(to_cluster);
    let pod_ip_rps = rps(to_pod);

    // 2. Unready → out of the data path, online then offline.
    let mut report_unready = (Vec::new(), Vec::new());
    let mut ready_online = Vec::new();
    ensure!(
        in_table(&g, first_ip),
        "{first_ip} is not in the table\n{}",
        g.context()
    );
    for offline in [false, true] {
        if offline {
            g.net.cut()?;
            until("the edge noticing the partition", || !g.edge().connected())?;
        }
        for _ in 0..cli.rounds {
            let (code, _, err) = g.exec(first, &["rm", "-f", "/tmp/ready"]);
            ensure!(code == 0, "rm /tmp/ready in {first}: {err}");
            let gone = until("the unready pod out of the table", || {
                !in_table(&g, first_ip)
            })
            .with_context(|| g.context())?;
            let (code, _, err) = g.exec(first, &["touch", "/tmp/ready"]);
            ensure!(code == 0, "touch /tmp/ready in {first}: {err}");
            let back = until("the ready pod back in the table", || in_table(&g, first_ip))
                .with_context(|| g.context())?;
            if offline {
                report_unready.1.push(gone);
            } else {
                report_unready.0.push(gone);
                ready_online.push(back);
            }
        }
        if offline {
            g.net.heal()?;
            until("the edge reconnected", || g.edge().connected())?;
        }
    }

    // 3. Many Services.
    let pid = g.edge().pid().context("edgecore's pid")?;
    let rss_before_kib = bench::rss_kib(pid)?;
    let mut manifest = String::new();
    for i in 0..cli.services {
        manifest += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: many-{i}}}\nspec:\n  selector: {{app: web}}\n  ports:\n  - {{port: 80, targetPort: 8080}}\n"
        );
    }
    g.kubectl(&["apply", "-f", "-"], Some(&manifest));
    let applied = Instant::now();
    let last = format!("many-{}", cli.services - 1);
    let last_ip = g.get("service", &last).context("the last Service")?["spec"]["clusterIP"]
        .as_str()
        .context("no clusterIP")?
        .to_string();
    until("every Service programmed", || in_table(&g, &last_ip)).with_context(|| g.context())?;
    let programmed_all = applied.elapsed();
    // The table is replaced whole: once the last one is in, every one is.
    std::thread::sleep(Duration::from_secs(2));
    let sync_seconds_all = g.edge().metric("edgecore_service_rules_last_sync_seconds");
    let rss_after_kib = bench::rss_kib(pid)?;
    let first_many = g.get("service", "many-0").context("many-0")?["spec"]["clusterIP"]
        .as_str()
        .context("no clusterIP")?
        .to_string();
    g.kubectl(&["delete", "service", "many-0"], None);
    let deleted = Instant::now();
    until("the deleted Service gone", || !in_table(&g, &first_many))
        .with_context(|| g.context())?;
    let removed_one = deleted.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let sync_seconds_one_removed = g.edge().metric("edgecore_service_rules_last_sync_seconds");

    Ok(Report {
        mode,
        commit: commit(),
        machine,
        requests: cli.requests,
        cluster_ip: cluster_lat,
        pod_ip: pod_lat,
        concurrency: cli.concurrency,
        secs: cli.secs,
        cluster_ip_rps,
        pod_ip_rps,
        unready_online: report_unready.0,
        unready_offline: report_unready.1,
        ready_online,
        services: cli.services,
        rss_before_kib,
        rss_after_kib,
        programmed_all,
        sync_seconds_all,
        removed_one,
        sync_seconds_one_removed,
    })
}
