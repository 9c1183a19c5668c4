#!/usr/bin/env bash
# Builds an OCI image-layout tarball from Debian's busybox-static, for gateways and tests with
# no registry; load it with `edgecore images import OUT.tar`.
#   deploy/images/build.sh OUT.tar NAME [ENTRYPOINT_JSON] [CMD_JSON]
# e.g. deploy/images/build.sh busybox.tar localhost/edge/busybox:1
#      deploy/images/build.sh pause.tar localhost/edge/pause:1 '["/bin/busybox","sleep","2147483647"]' null
set -euo pipefail
out="${1:-}"
name="${2:-}"
entrypoint="${3:-null}"
cmd="${4:-[\"/bin/sh\"]}"
[ -n "$out" ] && [ -n "$name" ] || { echo "usage: $0 OUT.tar NAME [ENTRYPOINT_JSON] [CMD_JSON]" >&2; exit 64; }
# shellcheck source=deploy/images/oci-layout.sh
. "$(dirname "$0")/oci-layout.sh"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
busybox_rootfs "$work/rootfs"
oci_layout "$work/rootfs" "$out" "$name" \
  "$(printf '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"}' "$entrypoint" "$cmd")"
