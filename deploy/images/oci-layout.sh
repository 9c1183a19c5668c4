# Shared by the image scripts in this folder (sourced, not run): a busybox-static root filesystem,
# and a root filesystem directory packed into an OCI image-layout tarball that containerd imports
# (`ctr images import`, `edgecore images import`) with no registry and no Docker.
#   busybox_rootfs ROOTFS
#   oci_layout ROOTFS OUT.tar NAME CONFIG_JSON [UID:GID:PATH ...]
# CONFIG_JSON is the image config's "config" object (Env, Entrypoint, Cmd, User, WorkingDir).
# The one layer is uncompressed and reproducible: entries sorted, mtime 0, owned by 0:0 except
# each PATH (relative to ROOTFS, with everything under it), owned by UID:GID.

# Debian's busybox-static with its applets as symlinks, /etc/passwd and /etc/group with root
# and nobody, and a sticky /tmp. Exits 69 if busybox is missing or not static.
busybox_rootfs() {
  local rootfs="$1" busybox=/bin/busybox applet
  if ! [ -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
    echo "$busybox is missing or not static: apt-get install busybox-static" >&2
    exit 69
  fi
  mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,root}
  cp "$busybox" "$rootfs/bin/busybox"
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' >"$rootfs/etc/group"
  chmod 1777 "$rootfs/tmp"
}

# Writes OUT.tar and prints "OUT.tar: NAME (sha256:CONFIG_DIGEST)".
# A subshell, so its temporary directory goes on any exit.
oci_layout() (
  set -euo pipefail
  rootfs="$1" out="$2" name="$3" config_json="$4"
  shift 4
  excludes=()
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
  layout="$work/layout"
  mkdir -p "$layout/blobs/sha256"
  _oci_blob() { # FILE -> moves it into the layout, prints "digest size"
    local digest size
    digest="$(sha256sum "$1" | cut -d' ' -f1)"
    size="$(stat -c %s "$1")"
    mv "$1" "$layout/blobs/sha256/$digest"
    echo "$digest $size"
  }
  for owned in "$@"; do
    excludes+=("--exclude=./${owned#*:*:}")
  done
  # An uncompressed layer: its digest is also its diff_id. Owned paths are appended after the rest.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 "${excludes[@]}" -C "$rootfs" -cf "$work/layer.tar" .
  for owned in "$@"; do
    tar --sort=name --owner="${owned%%:*}" --group="$(echo "$owned" | cut -d: -f2)" --numeric-owner --mtime=@0 \
      -C "$rootfs" -rf "$work/layer.tar" "./${owned#*:*:}"
  done
  read -r layer layer_size < <(_oci_blob "$work/layer.tar")
  printf '{"architecture":"%s","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$arch" "$config_json" "$layer" >"$work/config.json"
  read -r config config_size < <(_oci_blob "$work/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
  read -r manifest manifest_size < <(_oci_blob "$work/manifest.json")
  # containerd names the image from io.containerd.image.name.
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$arch" "$name" "$tag" >"$layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$layout" -cf "$out" .
  echo "$out: $name (sha256:$config)"
)
