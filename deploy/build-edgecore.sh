#!/usr/bin/env bash
# Builds edgecore as a gateway runs it and prints the binary's path: the `edge` profile
# (Cargo.toml) with glibc linked in statically, a static-pie with no libc.so, libm.so or ld.so
# mapped beside it (docs/benchmarks.md, "The edge build"). `--target` keeps the static flag off
# build scripts and proc macros, which must stay dynamic. `-z pack-relative-relocs` stores the
# static-pie's relocations as RELR (a bitmap) instead of 24 bytes each: 0.5 MB less that the
# start-up code reads and keeps resident (needs binutils >= 2.38 and glibc >= 2.36 where it is
# built; nothing on the gateway, the binary carries its own start-up code).
#   deploy/build-edgecore.sh            for this machine (rustc's host target)
#   deploy/build-edgecore.sh TARGET     e.g. aarch64-unknown-linux-gnu, with its linker set up
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-$(rustc -vV | sed -n 's/^host: //p')}"
case "$target" in
  *-linux-gnu*) ;;
  *) echo "build-edgecore: $target is not a glibc Linux target" >&2; exit 64 ;;
esac
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs" \
  cargo build --profile edge -p edgecore --bin edgecore --target "$target" >&2
echo "${CARGO_TARGET_DIR:-$PWD/target}/$target/edge/edgecore"
