#!/usr/bin/env bash
# One command to try the system on one machine: builds, starts cloudcore, joins one edge with a
# fresh token and starts edgecore, all on loopback, state under ./.quickstart.
#   deploy/quickstart.sh        set up and start
#   deploy/quickstart.sh stop   stop everything it started
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.quickstart"
bin="$PWD/target/release"

stop() {
  for name in edgecore cloudcore; do
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
  done
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi

# What a fresh Debian machine may lack for building (the Rust toolchain itself comes from rustup).
missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

cargo build --release --bins
stop >/dev/null 2>&1 || true
mkdir -p "$root"

"$bin/cloudcore" serve --data-dir "$root/cloud" --listen 127.0.0.1:10000 \
  --advertise-address 127.0.0.1 --metrics-listen 127.0.0.1:10350 \
  --control-plane embedded --api-listen 127.0.0.1:6443 >"$root/cloudcore.log" 2>&1 &
echo $! >"$root/cloudcore.pid"
for _ in $(seq 100); do curl -fs 127.0.0.1:10350/healthz >/dev/null && break; sleep 0.1; done

if [ ! -f "$root/edge-1/node.pem" ]; then
  join=$("$bin/cloudcore" token create --data-dir "$root/cloud" --node edge-1 --ttl 10m)
  echo "join command: $join"
  # The printed command names `edgecore`; run it from the build directory.
  # shellcheck disable=SC2086 # the command is split into words on purpose
  $bin/$join --data-dir "$root/edge-1"
fi
"$bin/edgecore" run --data-dir "$root/edge-1" --metrics-listen 127.0.0.1:10351 >"$root/edgecore.log" 2>&1 &
echo $! >"$root/edgecore.pid"
for _ in $(seq 100); do
  curl -fs 127.0.0.1:10351/metrics 2>/dev/null | grep -q '^edgecore_cloud_connected 1' && break
  sleep 0.1
done

for _ in $(seq 100); do
  kubectl --kubeconfig "$root/cloud/kubeconfig" --cache-dir "$root/kubectl-cache" get node edge-1 2>/dev/null | grep -q ' Ready ' && break
  sleep 0.1
done
kubectl --kubeconfig "$root/cloud/kubeconfig" --cache-dir "$root/kubectl-cache" get nodes
cat <<EOT

cloudcore and one edgecore are running (logs in $root).
  kubectl:      kubectl --kubeconfig $root/cloud/kubeconfig get nodes
  nodes:        $bin/cloudcore node list --data-dir $root/cloud
  tokens:       $bin/cloudcore token list --data-dir $root/cloud
  metrics:      curl -s 127.0.0.1:10350/metrics   (edge: 127.0.0.1:10351)
  stop all:     deploy/quickstart.sh stop
EOT
