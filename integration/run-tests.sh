#!/usr/bin/env bash
# Every test of the workspace, the ones `cargo build --workspace --bins && cargo test --workspace`
# runs, in two lanes at once: the README's test command and what CI runs.
#
# Most integration tests spend their time waiting (a two-minute partition, grace periods, a
# control plane starting), so running one test binary at a time left the machine idle through
# most of a 48-minute run. Lane 1 runs the long, mostly waiting binaries named below; lane 2 runs
# all the others in cargo's order, the CPU-heavy ones (fuzz_smoke's build, scale) among them. A
# test file not named here goes to lane 2. The few binaries whose tests hold a daemon to a time
# or a throughput (`alone` below) run after both lanes, with the machine to themselves: in a
# lane, a loaded machine failed them (kubectl's own start pushed "fails within a second" to
# 1.08 s; a fast writer printed 1.4 of the 4 MB asked for in 20 s). Tests isolate themselves
# per process (free ports, namespaces, bridges and subnets named after the pid, a private
# containerd each; control planes start one at a time machine-wide); only the quick start uses
# fixed ports, and no other test does.
#
# The binaries are built once by `cargo test --workspace --no-run` and then run directly, from
# their package's directory as cargo runs them (a `cargo test -p` per lane would resolve other
# features and rebuild half the dependencies). Doc tests run last, in lane 2. Lane 1's output
# goes to a file printed when it ends, so the two never interleave. Every binary runs whatever
# failed before it; the command fails if any did.
#
#   integration/run-tests.sh              the whole suite
#   LANES=1 integration/run-tests.sh      one lane: every binary in turn, as cargo test does
set -euo pipefail
cd "$(dirname "$0")/.."

lane1=(offline services kube_mode devices devices_cloud workloads_deployments fence streams_kube
  pods events ha workloads_sets api_semantics)
alone=(streams_embedded streams_load hostile)

for name in "${lane1[@]}" "${alone[@]}"; do
  [ -f "integration/tests/$name.rs" ] || {
    echo "run-tests.sh: integration/tests/$name.rs is named here but does not exist" >&2
    exit 2
  }
done
command -v python3 >/dev/null || {
  echo "run-tests.sh: python3 is missing (apt-get install python3; .ci/run does)" >&2
  exit 2
}

cargo build --workspace --bins
# One line per test binary: lane, package directory, executable, what cargo would call it.
plan="$(cargo test --workspace --no-run --message-format=json-render-diagnostics |
  LANE1="${lane1[*]}" ALONE="${alone[*]}" LANES="${LANES:-2}" python3 -c '
import json, os, sys
lane1 = set(os.environ["LANE1"].split())
alone = set(os.environ["ALONE"].split())
one_lane = os.environ["LANES"] == "1"
runs = []
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg["profile"]["test"]:
        continue
    target = msg["target"]
    package_dir = os.path.dirname(msg["manifest_path"])
    package = msg["package_id"]
    source = os.path.relpath(target["src_path"], package_dir)
    integration_test = "test" in target["kind"]
    name = os.path.basename(package_dir)
    label = f"{name}: {source}" if integration_test else f"{name}: unittests {source}"
    named = target["name"] if integration_test and name == "integration" else None
    if one_lane:
        lane = "2"
    elif named in lane1:
        lane = "1"
    elif named in alone:
        lane = "3"
    else:
        lane = "2"
    runs.append((lane, package_dir, integration_test, source, msg["executable"], label))
for lane, package_dir, _, _, executable, label in sorted(runs):
    print("\t".join([lane, package_dir, executable, label]))
')"
[ -n "$plan" ] || {
  echo "run-tests.sh: cargo listed no test binaries" >&2
  exit 2
}

# Runs the binaries of lane $1 in turn; prints the labels of those that failed on fd 3.
run_lane() {
  local lane="$1" dir exe label failed=0
  while IFS=$'\t' read -r l dir exe label; do
    [ "$l" = "$lane" ] || continue
    echo "     Running $label (${exe#"$PWD/"})"
    if ! (cd "$dir" && "$exe"); then
      echo "$label" >&3
      failed=1
    fi
  done <<<"$plan"
  return $failed
}

started=$SECONDS
lane1_log="$(mktemp "${TMPDIR:-/tmp}/run-tests-lane1.XXXXXX")"
failures="$(mktemp "${TMPDIR:-/tmp}/run-tests-failed.XXXXXX")"
trap 'rm -f "$lane1_log" "$failures"' EXIT

run_lane 1 >"$lane1_log" 2>&1 3>>"$failures" &
lane1_pid=$!

run_lane 2 3>>"$failures" || true
cargo test --workspace --doc || echo "doc tests" >>"$failures"
echo "run-tests.sh: lane 2 ended after $((SECONDS - started)) s" >&2

wait "$lane1_pid" || true
if [ -s "$lane1_log" ]; then
  echo "run-tests.sh: lane 1 (${lane1[*]}) ended after $((SECONDS - started)) s; its output:" >&2
  cat "$lane1_log"
fi

# Alone: the binaries that time a daemon.
run_lane 3 3>>"$failures" || true

if [ -s "$failures" ]; then
  echo "run-tests.sh: FAILED after $((SECONDS - started)) s:" >&2
  sed 's/^/  /' "$failures" >&2
  exit 1
fi
echo "run-tests.sh: every test passed in $((SECONDS - started)) s" >&2
