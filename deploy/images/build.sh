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
busybox=/bin/busybox
if ! [ -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "$busybox is missing or not static: apt-get install busybox-static" >&2
  exit 69
fi
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  armv7l) arch=arm ;;
  *) arch="$(uname -m)" ;;
esac
tag="${name##*:}"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,root}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"

layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
blob() { # FILE -> moves it into the layout, prints "digest size"
  local digest size
  digest="$(sha256sum "$1" | cut -d' ' -f1)"
  size="$(stat -c %s "$1")"
  mv "$1" "$layout/blobs/sha256/$digest"
  echo "$digest $size"
}
# An uncompressed layer: its digest is also its diff_id. Reproducible: sorted, owner 0, mtime 0.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$work/layer.tar" .
read -r layer layer_size < <(blob "$work/layer.tar")
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$arch" "$entrypoint" "$cmd" "$layer" >"$work/config.json"
read -r config config_size < <(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
read -r manifest manifest_size < <(blob "$work/manifest.json")
# containerd names the image from io.containerd.image.name.
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$arch" "$name" "$tag" >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$layout" -cf "$out" .
echo "$out: $name (sha256:$config)"
