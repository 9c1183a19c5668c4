#!/usr/bin/env bash
# A private containerd for edgecore, with the project's config and CNI network.
#   deploy/containerd/containerd.sh start DIR [SUBNET [BRIDGE]]   render config into DIR, start, wait until CRI is ready
#   deploy/containerd/containerd.sh stop DIR              stop it (containers keep running, as with any containerd)
# The socket is DIR/containerd.sock; pass unix://DIR/containerd.sock to edgecore --cri-endpoint.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [SUBNET]" >&2; exit 64; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

case "$cmd" in
start)
  subnet="${3:-10.88.0.0/24}"
  bridge="${4:-edge0}"
  for tool in containerd runc /usr/lib/cni/bridge /usr/lib/cni/loopback /usr/lib/cni/portmap; do
    command -v "$tool" >/dev/null || [ -x "$tool" ] || {
      echo "missing $tool: apt-get install containerd runc containernetworking-plugins iptables" >&2
      exit 69
    }
  done
  if [ -f "$dir/containerd.pid" ] && kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then
    echo "containerd already running in $dir (pid $(cat "$dir/containerd.pid"))"
    exit 0
  fi
  mkdir -p "$dir/cni/net.d" "$dir/cni/ipam"
  sed "s|@DIR@|$dir|g" "$here/config.toml.in" >"$dir/config.toml"
  # The conflist must exist before containerd starts: its watcher ignores files created later.
  sed -e "s|@DIR@|$dir|g" -e "s|@SUBNET@|$subnet|g" -e "s|@BRIDGE@|$bridge|g" "$here/edge.conflist.in" >"$dir/cni/net.d/10-edge.conflist"
  echo "$bridge" >"$dir/bridge"
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    setsid containerd --config "$dir/config.toml" >>"$dir/containerd.log" 2>&1 </dev/null &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 100); do
    if ctr -a "$dir/containerd.sock" version >/dev/null 2>&1 && grep -q "Start streaming server" "$dir/containerd.log"; then
      echo "containerd ready: unix://$dir/containerd.sock"
      exit 0
    fi
    kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "containerd did not become ready; log: $dir/containerd.log" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/containerd.pid" ]; then
    pid="$(cat "$dir/containerd.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/containerd.pid"
  fi
  # The bridge the CNI created, once no pod uses it (removed pods took their veths with them).
  if [ -f "$dir/bridge" ] && ip link show "$(cat "$dir/bridge")" >/dev/null 2>&1; then
    if ! ip -o link show master "$(cat "$dir/bridge")" 2>/dev/null | grep -q .; then
      ip link delete "$(cat "$dir/bridge")" 2>/dev/null || true
    fi
  fi
  ;;
*)
  echo "usage: $0 start|stop DIR [SUBNET]" >&2
  exit 64
  ;;
esac
