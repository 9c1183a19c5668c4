#!/usr/bin/env bash
# Builds cloudcore's container image as an OCI image-layout tarball, without Docker: Debian's
# busybox-static, cloudcore at /usr/local/bin/cloudcore with the shared libraries `ldd` names and
# the dynamic loader, run as uid 65532 with a writable /var/lib/cloudcore. Load it into a node's
# containerd with `ctr -n k8s.io images import OUT.tar` (docs/deploy.md).
#   deploy/images/build-cloudcore.sh OUT.tar [NAME]
# NAME defaults to localhost/edge/cloudcore:<workspace version>, the image that
# deploy/kubernetes/cloudcore.yaml names. The binary is built with `cargo build --release -p
# cloudcore` unless CLOUDCORE_BINARY=PATH names one; its debug info is stripped in the image.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
version="$(awk '/^\[workspace\.package\]/ { p = 1; next } /^\[/ { p = 0 }
  p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' "$repo/Cargo.toml")"
out="${1:-}"
name="${2:-localhost/edge/cloudcore:$version}"
[ -n "$out" ] && [ -n "$version" ] || { echo "usage: $0 OUT.tar [NAME]   (CLOUDCORE_BINARY=PATH to skip cargo build)" >&2; exit 64; }
# shellcheck source=deploy/images/oci-layout.sh
. "$here/oci-layout.sh"

binary="${CLOUDCORE_BINARY:-}"
if [ -z "$binary" ]; then
  cargo build --release -p cloudcore --bin cloudcore --manifest-path "$repo/Cargo.toml" >&2
  target="$(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  binary="$target/release/cloudcore"
fi
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 66; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
busybox_rootfs "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/var/lib/cloudcore"
if command -v strip >/dev/null; then
  strip --strip-debug -o "$rootfs/usr/local/bin/cloudcore" "$binary"
else
  cp "$binary" "$rootfs/usr/local/bin/cloudcore"
fi
chmod 0755 "$rootfs/usr/local/bin/cloudcore"
# The loader and libraries at the paths ldd resolves them to (a static binary has none).
if libs="$(ldd "$binary" 2>/dev/null)"; then
  while read -r first arrow path _; do
    if [ "$arrow" = "=>" ]; then
      [ "$path" != "not" ] || { echo "ldd: $first not found for $binary" >&2; exit 69; }
      [ -n "$path" ] && [ "${path#/}" != "$path" ] || continue
    elif [ "${first#/}" != "$first" ]; then
      path="$first"
    else
      continue # linux-vdso.so.1 lives in the kernel
    fi
    mkdir -p "$rootfs$(dirname "$path")"
    cp -L "$path" "$rootfs$path"
  done <<<"$libs"
fi
printf 'cloudcore:x:65532:65532:cloudcore:/var/lib/cloudcore:/bin/false\n' >>"$rootfs/etc/passwd"
printf 'cloudcore:x:65532:\n' >>"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
chmod 0750 "$rootfs/var/lib/cloudcore"
oci_layout "$rootfs" "$out" "$name" \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":["/usr/local/bin/cloudcore"],"Cmd":["serve"],"User":"65532:65532","WorkingDir":"/var/lib/cloudcore"}' \
  65532:65532:var/lib/cloudcore
