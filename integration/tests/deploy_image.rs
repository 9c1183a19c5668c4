//! cloudcore's container image as `deploy/images/build-cloudcore.sh` builds it, imported into a
//! private containerd and run there, and the manifests in `deploy/kubernetes/` checked against
//! that image and cloudcore's CLI. The image test needs root and Debian's containerd, runc,
//! containernetworking-plugins and busybox-static (`.ci/run` installs them); without them it
//! fails saying what is missing.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use integration::{Containerd, bin, deploy_dir};
use serde::Deserialize as _;
use serde_json::Value;

/// The label cloudcore puts on every edge node (`cloudcore::nodes::EDGE_ROLE_LABEL`).
const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";
/// The image's user, as its config names it.
const IMAGE_USER: &str = "65532:65532";

/// The image name the script uses when given none: the workspace version, which this crate shares.
fn default_image() -> String {
    format!("localhost/edge/cloudcore:{}", env!("CARGO_PKG_VERSION"))
}

/// Every YAML document of every `deploy/kubernetes/*.yaml`, each checked to be an object.
fn manifests() -> Vec<Value> {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut documents = Vec::new();
    for path in files {
        let file = path.file_name().expect("file name").to_string_lossy();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for (i, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let object = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            if object.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            for field in ["apiVersion", "kind"] {
                assert!(
                    object[field].is_string(),
                    "{file}: document {i} has no {field}"
                );
            }
            assert!(
                object["metadata"]["name"].is_string(),
                "{file}: document {i} has no metadata.name"
            );
            documents.push(object);
        }
    }
    documents
}

/// The manifest object of `kind` named `name`.
fn object<'a>(manifests: &'a [Value], kind: &str, name: &str) -> &'a Value {
    manifests
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes/"))
}

/// The cloudcore container of the cloudcore Deployment.
fn container(deployment: &Value) -> &Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "cloudcore"))
        .expect("the Deployment has a container named cloudcore")
}

/// The strings of a JSON array (none if it is not one).
fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn deployment_runs_the_built_image_non_root_off_edges_with_flags_cloudcore_accepts() {
    let manifests = manifests();
    let deployment = object(&manifests, "Deployment", "cloudcore");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = container(deployment);
    assert_eq!(
        container["image"],
        default_image().as_str(),
        "the Deployment must name the image build-cloudcore.sh builds by default"
    );
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");

    let args = strings(&container["args"]);
    assert_eq!(args.first(), Some(&"serve"), "args: {args:?}");
    let help = Command::new(bin("cloudcore"))
        .args(["serve", "--help"])
        .output()
        .expect("run cloudcore serve --help");
    assert!(help.status.success(), "{}", stderr(&help));
    let help = String::from_utf8_lossy(&help.stdout);
    let accepted: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .collect();
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            accepted.contains(&flag),
            "cloudcore serve does not accept {flag} (from {arg}); it accepts {accepted:?}"
        );
    }
    assert!(
        args.contains(&"--control-plane=kube"),
        "in a cluster cloudcore works against its API: {args:?}"
    );
    // The probes reach the health endpoints on the metrics port from outside the pod:
    // readiness the checks of dependencies, liveness only the process itself.
    assert!(
        args.iter()
            .any(|a| a.starts_with("--metrics-listen=0.0.0.0:")),
        "{args:?}"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // Non-root on a read-only root; only the data volume (and /tmp) written.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == "/var/lib/cloudcore" && m["readOnly"] != true),
        "the data directory must be a writable volume: {mounts:?}"
    );

    // Never on an edge node.
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    let terms = terms.as_array().expect("a required nodeAffinity");
    assert!(
        terms.iter().all(|term| {
            term["matchExpressions"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|e| e["key"] == EDGE_ROLE_LABEL && e["operator"] == "DoesNotExist")
            })
        }),
        "every nodeSelectorTerm must require {EDGE_ROLE_LABEL} DoesNotExist: {terms:?}"
    );

    // The ServiceAccount of rbac.yaml, bound to the ClusterRole.
    let namespace = &deployment["metadata"]["namespace"];
    let account = object(&manifests, "ServiceAccount", "cloudcore");
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    assert_eq!(&account["metadata"]["namespace"], namespace);
    object(
        &manifests,
        "Namespace",
        namespace.as_str().expect("namespace"),
    );
    let binding = object(&manifests, "ClusterRoleBinding", "cloudcore");
    assert!(
        binding["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == account["metadata"]["name"]
                    && &s["namespace"] == namespace
            })),
        "the ClusterRoleBinding must bind the Deployment's ServiceAccount: {binding}"
    );
}

#[test]
fn image_runs_cloudcore_as_its_user_in_containerd() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let socket = containerd.dir.join("containerd.sock");

    // The debug binary: already built for the other tests, and stripped by the script.
    let tar = tmp.path().join("cloudcore.tar");
    let out = Command::new(deploy_dir().join("images/build-cloudcore.sh"))
        .arg(&tar)
        .env("CLOUDCORE_BINARY", bin("cloudcore"))
        .output()
        .expect("run build-cloudcore.sh");
    assert!(
        out.status.success(),
        "build-cloudcore.sh failed: {}",
        stderr(&out)
    );
    // "OUT.tar: NAME (sha256:CONFIG)"
    let line = String::from_utf8_lossy(&out.stdout);
    let (name, config) = line
        .trim()
        .rsplit_once(' ')
        .and_then(|(head, config)| Some((head.rsplit_once(' ')?.1, config)))
        .map(|(name, config)| (name.to_string(), config.trim_matches(['(', ')'])))
        .unwrap_or_else(|| panic!("unexpected output of build-cloudcore.sh: {line}"));
    assert_eq!(name, default_image());

    let out = ctr(
        &socket,
        [OsStr::new("images"), OsStr::new("import"), tar.as_os_str()],
    );
    assert!(out.status.success(), "ctr import: {}", stderr(&out));

    // What containerd holds as the image's config.
    let out = ctr(&socket, ["content", "get", config]);
    assert!(out.status.success(), "ctr content get: {}", stderr(&out));
    let image: Value = serde_json::from_slice(&out.stdout).expect("image config is JSON");
    assert_eq!(image["config"]["User"], IMAGE_USER, "{image}");
    assert_eq!(
        strings(&image["config"]["Entrypoint"]),
        ["/usr/local/bin/cloudcore"],
        "{image}"
    );

    // Run as the image's user (ctr takes it from the config; no --user here).
    let version = run(&socket, &name, "version", &[], &["cloudcore", "--version"]);
    assert_eq!(
        version.trim(),
        format!("cloudcore {}", env!("CARGO_PKG_VERSION"))
    );
    // The image's own data directory is that user's.
    let id = run(
        &socket,
        &name,
        "id",
        &[],
        &["sh", "-c", "id -u && touch /var/lib/cloudcore/probe"],
    );
    assert_eq!(id.trim(), "65532");

    // As in the Deployment: a read-only root, the data directory a volume the user may write
    // (fsGroup there, chown here) and /tmp an emptyDir. cloudcore serves (embedded mode: no
    // cluster here), writes its state there and stops cleanly on SIGTERM once its kubeconfig is
    // written (polled, 10 s at most).
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::os::unix::fs::chown(&data, Some(65532), Some(65532)).expect("chown the data dir");
    let data_mount = format!(
        "type=bind,src={},dst=/var/lib/cloudcore,options=rbind:rw",
        data.display()
    );
    let serve = run(
        &socket,
        &name,
        "serve",
        &[
            "--read-only",
            "--mount",
            &data_mount,
            "--mount",
            "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev",
        ],
        &[
            "sh",
            "-c",
            "grep -q '^[^ ]* / [^ ]* ro,' /proc/mounts || echo root-writable; \
             cloudcore serve --control-plane=embedded & \
             for _ in $(seq 200); do [ -f /var/lib/cloudcore/kubeconfig ] && break; sleep 0.05; done; \
             kill -TERM $!; wait $!; echo exit=$?; ls -n /var/lib/cloudcore",
        ],
    );
    assert!(!serve.contains("root-writable"), "--read-only: {serve}");
    assert!(serve.contains("cloudcore serving"), "{serve}");
    assert!(serve.contains("exit=0"), "{serve}");
    let db = serve
        .lines()
        .find(|l| l.ends_with(" cloudcore.db"))
        .unwrap_or_else(|| panic!("no cloudcore.db in the data directory: {serve}"));
    assert_eq!(
        db.split_whitespace().nth(2),
        Some("65532"),
        "cloudcore.db is not owned by the image's user: {db}"
    );
}

/// `ctr` against the private containerd, in the namespace the kubelet uses.
fn ctr<S: AsRef<OsStr>>(socket: &Path, args: impl IntoIterator<Item = S>) -> Output {
    Command::new("ctr")
        .arg("-a")
        .arg(socket)
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .expect("run ctr")
}

/// Runs `command` in a new container of `image` (`ctr run --rm`, with `flags`) and returns its
/// output.
fn run(socket: &Path, image: &str, id: &str, flags: &[&str], command: &[&str]) -> String {
    let id = format!("deploy-image-{}-{id}", std::process::id());
    let out = ctr(
        socket,
        ["run", "--rm"]
            .iter()
            .chain(flags)
            .chain(&[image, id.as_str()])
            .chain(command),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ctr run {command:?} failed: {text}");
    text
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
