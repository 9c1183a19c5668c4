#!/usr/bin/env bash
# One command to try the system on one machine: installs what is missing (apt, pip), builds,
# starts a private containerd with the project's config, cloudcore with the embedded control
# plane, and one edgecore joined with a fresh token; imports a sample image and runs a sample pod
# on the edge; starts an MQTT broker (mosquitto), a simulated Modbus TCP thermometer (pymodbus)
# and our modbus-mapper beside edgecore, and applies a sample Device read through them. State
# lives under ./.quickstart. Run as root (containerd needs it).
#   deploy/quickstart.sh        set up and start
#   deploy/quickstart.sh stop   delete the sample pods, stop everything it started
set -euo pipefail
cd "$(dirname "$0")/.."
# QUICKSTART_ROOT and QUICKSTART_BIN (binaries already built: skips the release build) let the
# tests run it with their own builds.
root="${QUICKSTART_ROOT:-$PWD/.quickstart}"
bin="${QUICKSTART_BIN:-$PWD/target/release}"
# edgecore as a gateway runs it (deploy/build-edgecore.sh), smaller than `release`.
edgecore="${QUICKSTART_BIN:+$QUICKSTART_BIN/edgecore}"
kubectl_q() { kubectl --kubeconfig "$root/cloud/kubeconfig" --cache-dir "$root/kubectl-cache" "$@"; }

stop_pid() {
  local name=$1
  if [ -f "$root/$name.pid" ]; then
    pid=$(cat "$root/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$root/$name.pid"
    echo "stopped $name"
  fi
}

# stop_group NAME: like stop_pid for a process group (the simulator and what keeps its stdin open).
stop_group() {
  local name=$1
  if [ -f "$root/$name.pid" ]; then
    pid=$(cat "$root/$name.pid")
    # The whole group, even when its leader is gone already.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$root/$name.pid"
    echo "stopped $name"
  fi
}

stop() {
  # Pods first, while cloudcore and edgecore run: the edge stops them gracefully, cleans up and
  # confirms, so no container, sandbox or network is left behind.
  if [ -f "$root/cloudcore.pid" ] && kill -0 "$(cat "$root/cloudcore.pid")" 2>/dev/null; then
    kubectl_q delete pods --all --all-namespaces --timeout=60s >/dev/null 2>&1 || true
  fi
  stop_pid modbus-mapper
  stop_group modbus-sim
  stop_pid edgecore
  stop_pid cloudcore
  stop_pid mosquitto
  if [ -f "$root/containerd/containerd.pid" ]; then
    deploy/containerd/containerd.sh stop "$root/containerd"
    echo "stopped containerd"
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "run as root: containerd and pod networking need it" >&2
  exit 1
fi

# What a fresh Debian machine may lack (the Rust toolchain itself comes from rustup).
missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
# cloudcore's allocator (tikv-jemalloc-sys) builds jemalloc with its configure script and make.
command -v make >/dev/null || missing+=(make)
command -v curl >/dev/null || missing+=(curl)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
command -v python3 >/dev/null || missing+=(python3)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# The sample device is simulated by pymodbus's Modbus TCP server (PyPI).
if ! python3 -c 'import pymodbus.server; from pymodbus.simulator import SimData, SimDevice' 2>/dev/null; then
  echo "installing: pymodbus (pip)"
  python3 -m pip install --quiet 'pymodbus==3.16.1' ||
    python3 -m pip install --quiet --break-system-packages 'pymodbus==3.16.1'
fi
deploy/install-kubectl.sh

# wait_for SECONDS WHAT NAME COMMAND...: runs COMMAND until it succeeds. If process NAME (its pid
# in $root/NAME.pid) exits, or after SECONDS, says what did not happen, shows the end of NAME's
# log and stops the quick start with an error.
wait_for() {
  local seconds=$1 what=$2 name=$3
  shift 3
  local deadline=$((SECONDS + seconds)) why=""
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$root/$name.pid")" 2>/dev/null; then
      why="$name exited"
    elif [ "$SECONDS" -ge "$deadline" ]; then
      why="not within ${seconds} s"
    fi
    if [ -n "$why" ]; then
      echo "quickstart: FAILED: $what ($why); the end of $root/$name.log:" >&2
      tail -n 30 "$root/$name.log" >&2 || true
      echo "quickstart: 'deploy/quickstart.sh stop' stops what it started" >&2
      exit 1
    fi
    sleep 0.2
  done
}

if [ -z "${QUICKSTART_BIN:-}" ]; then
  cargo build --release --bins
  edgecore=$(deploy/build-edgecore.sh)
fi
stop >/dev/null 2>&1 || true
mkdir -p "$root"

deploy/containerd/containerd.sh start "$root/containerd" 10.88.0.0/24 edge0
cri="unix://$root/containerd/containerd.sock"
mkdir -p "$root/images"
deploy/images/build.sh "$root/images/pause.tar" localhost/edge/pause:1 '["/bin/busybox","sleep","2147483647"]' null >/dev/null
deploy/images/build.sh "$root/images/busybox.tar" localhost/edge/busybox:1 >/dev/null
"$edgecore" images import --cri-endpoint "$cri" "$root/images/pause.tar" "$root/images/busybox.tar"

"$bin/cloudcore" serve --data-dir "$root/cloud" --listen 127.0.0.1:10000 \
  --advertise-address 127.0.0.1 --metrics-listen 127.0.0.1:10350 \
  --control-plane embedded --api-listen 127.0.0.1:6443 >"$root/cloudcore.log" 2>&1 &
echo $! >"$root/cloudcore.pid"
wait_for 30 "cloudcore did not answer on 127.0.0.1:10350/healthz" cloudcore \
  curl -fs 127.0.0.1:10350/healthz

# KubeEdge's MQTT broker address: a broker already there is used, otherwise a private one starts.
if mosquitto_pub -h 127.0.0.1 -p 1883 -t quickstart/probe -n >/dev/null 2>&1; then
  echo "using the MQTT broker already listening on 127.0.0.1:1883"
else
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\n' >"$root/mosquitto.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$root/mosquitto.conf" >"$root/mosquitto.log" 2>&1 &
  echo $! >"$root/mosquitto.pid"
  wait_for 10 "mosquitto did not listen on 127.0.0.1:1883" mosquitto \
    mosquitto_pub -h 127.0.0.1 -p 1883 -t quickstart/probe -n
fi

if [ ! -f "$root/edge-1/node.pem" ]; then
  join=$("$bin/cloudcore" token create --data-dir "$root/cloud" --node edge-1 --ttl 10m)
  echo "join command: $join"
  # The printed command names `edgecore`; run it from the build directory.
  # shellcheck disable=SC2086 # the command is split into words on purpose
  $bin/$join --data-dir "$root/edge-1"
fi
"$edgecore" run --data-dir "$root/edge-1" --metrics-listen 127.0.0.1:10351 \
  --cri-endpoint "$cri" --dmi-socket "$root/dmi.sock" --mqtt-broker tcp://127.0.0.1:1883 \
  >"$root/edgecore.log" 2>&1 &
echo $! >"$root/edgecore.pid"
# Output captured first: with pipefail, grep -q quitting early could fail the pipeline.
edge_connected() { local m; m=$(curl -fs 127.0.0.1:10351/metrics) && grep -q '^edgecore_cloud_connected 1' <<<"$m"; }
node_ready() { local o; o=$(kubectl_q get node edge-1) && grep -q ' Ready ' <<<"$o"; }
pod_running() { local o; o=$(kubectl_q get pod hello) && grep -q ' Running ' <<<"$o"; }
wait_for 30 "edgecore did not connect to cloudcore" edgecore edge_connected
wait_for 30 "node edge-1 did not become Ready" cloudcore node_ready

kubectl_q apply -f deploy/examples/hello.yaml
wait_for 60 "the sample pod hello did not reach Running" edgecore pod_running

# The sample device: a Modbus TCP thermometer simulated on 127.0.0.1:5020. The simulator takes
# commands on stdin and stops when it closes, so `tail` holds it open; both run in a session of
# their own (the simulator's pid is the session's), which `stop` ends as a group.
rm -f "$root/modbus-sim.pid"
setsid bash -c 'echo $$ >"$1/modbus-sim.pid"; exec python3 integration/scripts/modbus_sim.py --port 5020 < <(exec tail -f /dev/null)' \
  bash "$root" >"$root/modbus-sim.log" 2>&1 &
for _ in $(seq 50); do [ -s "$root/modbus-sim.pid" ] && break; sleep 0.1; done
sim_up() { (exec 3<>/dev/tcp/127.0.0.1/5020) 2>/dev/null; }
wait_for 30 "the Modbus simulator did not listen on 127.0.0.1:5020" modbus-sim sim_up
"$bin/modbus-mapper" --dmi-socket "$root/dmi.sock" --socket "$root/modbus-mapper.sock" \
  >"$root/modbus-mapper.log" 2>&1 &
echo $! >"$root/modbus-mapper.pid"
kubectl_q apply -f deploy/examples/thermometer.yaml
# The mapper wrote the desired setpoint to the device and read it back; edgecore reported it.
setpoint_reported() {
  local o
  o=$(kubectl_q get device thermometer -o 'jsonpath={.status.twins[?(@.propertyName=="setpoint")].reported.value}') &&
    [ "$o" = 215 ]
}
wait_for 60 "the sample device did not report its setpoint (215)" modbus-mapper setpoint_reported

kubectl_q get nodes
kubectl_q get pods -o wide
kubectl_q get devices
cat <<EOT

containerd, cloudcore and one edgecore are running, with the sample pod "hello" and the sample
device "thermometer" (a simulated Modbus TCP device read by modbus-mapper; MQTT on
127.0.0.1:1883; logs in $root).
  kubectl:      kubectl --kubeconfig $root/cloud/kubeconfig get pods -o wide
  pod log:      kubectl --kubeconfig $root/cloud/kubeconfig logs hello
  exec:         kubectl --kubeconfig $root/cloud/kubeconfig exec -it hello -- sh
  usage:        kubectl --kubeconfig $root/cloud/kubeconfig top pod
  on the edge:  $edgecore ctl logs hello --data-dir $root/edge-1   (also offline; ctl exec -it too)
  edge store:   $edgecore ctl get all --data-dir $root/edge-1
  devices:      kubectl --kubeconfig $root/cloud/kubeconfig get devices
  twin:         $edgecore ctl twin thermometer --data-dir $root/edge-1   (also offline)
  set a value:  kubectl --kubeconfig $root/cloud/kubeconfig patch device thermometer --type json \\
                  -p '[{"op":"replace","path":"/spec/properties/1/desired/value","value":"230"}]'
  MQTT:         mosquitto_sub -v -t '\$hw/events/device/default/thermometer/#'
  nodes:        $bin/cloudcore node list --data-dir $root/cloud
  metrics:      curl -s 127.0.0.1:10350/metrics   (edge: 127.0.0.1:10351)
  stop all:     deploy/quickstart.sh stop
EOT
