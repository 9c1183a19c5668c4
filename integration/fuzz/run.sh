#!/usr/bin/env bash
# Builds the fuzz targets with coverage instrumentation on stable Rust (libFuzzer through
# libfuzzer-sys, rustc's SanitizerCoverage pass) and runs one or all of them.
#
#   integration/fuzz/run.sh TARGET|all SECONDS
#
# TARGET is one of: frame message api_request api_selector api_patch stream. Each target starts from
# its committed seed corpus (integration/fuzz/corpus/TARGET, never written to) plus the inputs
# earlier runs found (WORK/corpus/TARGET). WORK is $FUZZ_WORK_DIR, else $CARGO_TARGET_DIR/fuzz-work,
# else target/fuzz-work in the repository; the instrumented build goes to $CARGO_TARGET_DIR/fuzz-build
# (or target/fuzz-build). Exits non-zero on the first crash, hang (-timeout) or memory blow-up
# (-rss_limit_mb, -malloc_limit_mb), printing the path of the input that caused it.
#
# FUZZ_PROFILE=dev builds unoptimized (a third of the build time, several times fewer inputs
# per second): what the test suite's smoke run uses. The default, release, is for real runs.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
targets=(frame message api_request api_selector api_patch stream)

usage() {
  echo "usage: $0 TARGET|all SECONDS   (TARGET: ${targets[*]})" >&2
  exit 64
}
[ $# -eq 2 ] || usage
which="$1"
seconds="$2"
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "$0: SECONDS must be a positive integer, got '$seconds'" >&2; exit 64; }
if [ "$which" = all ]; then
  selected=("${targets[@]}")
else
  case " ${targets[*]} " in
    *" $which "*) selected=("$which") ;;
    *) echo "$0: unknown target '$which'" >&2; usage ;;
  esac
fi

base="${CARGO_TARGET_DIR:-$repo/target}"
build_dir="$base/fuzz-build"
work="${FUZZ_WORK_DIR:-$base/fuzz-work}"
host="$(rustc -vV | sed -n 's/^host: //p')"
profile="${FUZZ_PROFILE:-release}"
case "$profile" in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) echo "$0: FUZZ_PROFILE must be release or dev, got '$profile'" >&2; exit 64 ;;
esac

# The flags cargo-fuzz uses, minus the sanitizer (which needs nightly). `--target` keeps them
# off build scripts and proc macros, which are not linked with libFuzzer.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
echo "fuzz: building ${selected[*]} ($profile) in $build_dir" >&2
(cd "$here" && CARGO_TARGET_DIR="$build_dir" cargo build --locked --profile "$profile" --target "$host" \
  $(printf -- '--bin %s ' "${selected[@]}"))

status=0
for target in "${selected[@]}"; do
  binary="$build_dir/$host/$profile_dir/$target"
  corpus="$work/corpus/$target"
  artifacts="$work/artifacts/$target"
  log="$work/$target.log"
  mkdir -p "$corpus" "$artifacts"
  echo "fuzz: running $target for ${seconds}s (log: $log)" >&2
  set +e
  "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts/" \
    "$corpus" "$here/corpus/$target" >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^(stat::|Done )' "$log" | sed "s/^/fuzz: $target: /" >&2 || true
  if [ $rc -ne 0 ]; then
    status=1
    tail -n 40 "$log" >&2
    input="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    echo "fuzz: $target FAILED (exit $rc); crashing input: ${input:-unknown, see $log}" >&2
    echo "fuzz: reproduce with: $binary ${input:-INPUT}" >&2
    break
  fi
  echo "fuzz: $target ok" >&2
done
exit $status
