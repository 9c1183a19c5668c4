//! The README's quick start, `deploy/quickstart.sh`, run as a user would on this machine, with
//! the test build's binaries instead of a release build (`QUICKSTART_BIN`): it ends with the
//! sample pod running and its banner, or fails loudly naming the step that did not happen.
//!
//! It uses the quick start's fixed ports (10000/udp, 10350, 10351, 6443, MQTT on 1883, the
//! simulated Modbus device on 5020) and bridge `edge0`, so this file holds one test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::{bin, deploy_dir};

fn quickstart(root: &Path, args: &[&str]) -> Output {
    let bin_dir: PathBuf = bin("cloudcore").parent().expect("bin dir").to_path_buf();
    Command::new(deploy_dir().join("quickstart.sh"))
        .args(args)
        .env("QUICKSTART_ROOT", root)
        .env("QUICKSTART_BIN", bin_dir)
        .output()
        .expect("run deploy/quickstart.sh")
}

/// Stops whatever the quick start started, even when an assertion fails.
struct Stop<'a>(&'a Path);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let out = quickstart(self.0, &["stop"]);
        if !out.status.success() {
            eprintln!("quickstart stop: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

const BANNER: &str = "containerd, cloudcore and one edgecore are running";

#[test]
fn the_quick_start_fails_loudly_when_a_step_does_not_happen_and_runs_the_sample_pod_otherwise() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("qs");
    let _stop = Stop(&root);

    // The tunnel's port taken by someone else: cloudcore cannot start. The quick start must
    // stop there with an error naming the step, not print its success banner.
    let blocker = std::net::UdpSocket::bind("0.0.0.0:10000")
        .expect("UDP port 10000 must be free for the quick start test");
    let out = quickstart(&root, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the quick start succeeded without cloudcore:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("quickstart: FAILED: cloudcore did not answer")
            && stderr.contains("cloudcore exited"),
        "no error naming the failed step:\n{stderr}"
    );
    assert!(
        !stdout.contains(BANNER),
        "success banner printed:\n{stdout}"
    );
    drop(blocker);

    // With the port free, the same command brings everything up and the sample pod runs.
    let out = quickstart(&root, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quick start failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(BANNER), "{stdout}");
    let pods = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(root.join("cloud/kubeconfig"))
        .args(["get", "pod", "hello", "--no-headers"])
        .output()
        .expect("kubectl");
    let pods = String::from_utf8_lossy(&pods.stdout);
    assert!(pods.contains("Running"), "sample pod: {pods}");
    // What the banner tells a new user to try: kubectl exec and logs through the cloud.
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(root.join("cloud/kubeconfig"))
            .args(args)
            .output()
            .expect("kubectl")
    };
    let out = kubectl(&["exec", "hello", "--", "cat", "/etc/hello/greeting"]);
    assert!(
        out.status.success() && out.stdout == b"hello from the edge",
        "kubectl exec: {:?} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(&["logs", "hello"]);
    assert!(
        out.status.success(),
        "kubectl logs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The sample device: the mapper set the desired setpoint on the simulated device, read it
    // back, and the edge reported it; the gateway shows the same twin locally.
    let out = kubectl(&["get", "device", "thermometer", "-o", "json"]);
    let device: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        integration::devices::status_twin(&device, "setpoint")["reported"]["value"],
        "215",
        "the sample device's status: {}",
        device["status"]
    );
    let twin = integration::devices::ctl_twin(&root.join("edge-1"), "default", "thermometer")
        .expect("edgecore ctl twin thermometer");
    assert_eq!(
        integration::devices::twin_property(&twin, "setpoint")["reported"]["value"],
        "215",
        "ctl twin: {twin}"
    );
}
