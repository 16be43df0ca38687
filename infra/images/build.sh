#!/usr/bin/env bash
# Build the platform's container images with buildah, from infra/docker/Dockerfile as it is, on a machine
# without a Docker engine and without access to an image registry (Debian bookworm, root).
#
# Usage:
#   infra/images/build.sh [--save DIR] [--rebuild-bases] TARGET...
#     TARGET           one or more Dockerfile targets: predictor predictor-gpu worker components mlflow evidently orthanc
#     --save DIR       also write each image as an OCI archive DIR/TARGET.tar (podman save --format oci-archive),
#                      e.g. for `ctr -n k8s.io images import DIR/TARGET.tar` on a containerd node
#     --rebuild-bases  recreate the stand-in base images even if they exist in local storage
#   Environment: REGISTRY (default ghcr.io/dicom-router), VERSION (default: pyproject.toml's version).
#
# What it does:
#   1. installs podman, buildah, runc, mmdebstrap and friends from Debian if they are missing;
#   2. creates stand-ins for the Dockerfile's base images once (no registry is reachable, so
#      python:3.11.13-slim-bookworm and debian:12.11-slim cannot be pulled): Debian bookworm root
#      filesystems made with mmdebstrap from this machine's own Debian sources, imported with
#      `podman import` under the exact FROM names (docker.io/library/...), so `--pull=never` finds them;
#   3. builds each target with layer caching and prints one line per image: name, size, build time.
#
# Sandbox quirks handled here (see also shared/FACTS.md, "Containers"):
#   - crun fails ("cgroups in hybrid mode not supported")      -> --runtime runc
#   - no full container isolation available                     -> --isolation chroot
#   - pip/apt inside RUN need the network                       -> --network host
#   - TLS to PyPI goes through an egress proxy with its own CA  -> the host's CA bundle, its extra CAs
#     (/usr/local/share/ca-certificates) and /etc/pip.conf are copied into the stand-in bases
#   - the repository has no .dockerignore and a 7 GB .venv      -> infra/images/containerignore is passed
#     with --ignorefile (only if the repository root has no .dockerignore/.containerignore of its own),
#     which also keeps __pycache__/*.egg-info out of COPY src, so the layer cache stays valid.
# The stand-ins are Debian's Python 3.11 (3.11.2), not python.org's 3.11.13: good enough for local builds
# and tests, not for release images, which must be built from the real, digest-pinned bases.
# mmdebstrap hooks are single-quoted on purpose: mmdebstrap, not this shell, expands their "$1" (the root).
# shellcheck disable=SC2016
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/infra/images"
DOCKERFILE="$ROOT/infra/docker/Dockerfile"
REGISTRY="${REGISTRY:-ghcr.io/dicom-router}"
SUITE=bookworm

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '5,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 64; }

# --- arguments -----------------------------------------------------------------------------------------
SAVE_DIR=
REBUILD_BASES=0
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --save) [ $# -ge 2 ] || usage; SAVE_DIR="$2"; shift 2 ;;
    --save=*) SAVE_DIR="${1#--save=}"; shift ;;
    --rebuild-bases) REBUILD_BASES=1; shift ;;
    -h|--help) usage ;;
    -*) log "unknown option $1"; usage ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || usage
[ "$(id -u)" -eq 0 ] || die "run as root (rootful podman/buildah storage, apt-get, mmdebstrap)"

# Every requested target must be a stage of the Dockerfile (fail before spending minutes on the others).
for t in "${TARGETS[@]}"; do
  grep -qiE "^FROM[[:space:]]+[^[:space:]]+[[:space:]]+AS[[:space:]]+${t}[[:space:]]*$" "$DOCKERFILE" \
    || die "no stage '$t' in ${DOCKERFILE#"$ROOT"/}"
done

# VERSION: the static version of pyproject.toml ([project] version); __init__.py reads it from the
# installed package's metadata, so pyproject.toml is the source of truth.
if [ -z "${VERSION:-}" ]; then
  VERSION="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$ROOT/pyproject.toml" 2>/dev/null || true)"
  if [ -z "$VERSION" ]; then   # fallback: a literal __version__ = "x.y.z" in the package
    VERSION="$(sed -nE 's/^__version__[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' \
      "$ROOT/src/dicom_router/__init__.py" | head -n1)"
  fi
  [ -n "$VERSION" ] || die "cannot determine the version (set VERSION=...)"
fi

# Scratch space for the root filesystem tarballs (a few hundred MB), removed on exit, failed or not.
WORK=
trap '[ -z "$WORK" ] || rm -rf "$WORK"' EXIT

# --- 1. tools ------------------------------------------------------------------------------------------
PACKAGES=(podman buildah runc mmdebstrap fuse-overlayfs uidmap slirp4netns containernetworking-plugins)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. stand-in base images -----------------------------------------------------------------------------
# This machine's Debian sources, passed to mmdebstrap as files (it accepts one-line and deb822 files and
# writes them into the image's apt sources): every enabled *.list/*.sources whose URIs point at a Debian
# archive. Other vendors' repositories (nodesource, Google Cloud) are left out.
debian_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] || continue
    if grep -qE '^[[:space:]]*(URIs:|deb )[^#]*(debian\.org|/debian(-security)?/?([[:space:]]|$))' "$f"; then
      echo "$f"
    fi
  done
}

# make_base KIND IMAGE: KIND is python or debian; IMAGE is the fully qualified name to tag.
make_base() {
  local kind="$1" image="$2" include sources
  mapfile -t sources < <(debian_sources)
  [ ${#sources[@]} -gt 0 ] || die "no Debian sources found under /etc/apt"
  [ -n "$WORK" ] || WORK="$(mktemp -d /var/tmp/dicom-router-base.XXXXXX)"

  # passwd: groupadd/useradd (every stage creates uid/gid 1000); the official images have it.
  include=passwd
  local hooks=()
  if [ "$kind" = python ]; then
    # The python image has python/pip on PATH and `python -m venv` works; pip is usable outside a venv
    # there too, hence EXTERNALLY-MANAGED (PEP 668 marker of Debian's Python) is removed.
    include+=",python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
    hooks+=(--customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED')
  fi
  # Extra CAs of this machine (the egress proxy's): into /usr/local/share/ca-certificates so that any
  # later update-ca-certificates in a build (e.g. installing ca-certificates) keeps them.
  local ca
  for ca in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$ca" ] || continue
    hooks+=(--customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"")
    hooks+=(--customize-hook="upload $ca /usr/local/share/ca-certificates/$(basename "$ca")")
  done
  if [ "$kind" = python ]; then
    # The host's whole CA bundle and pip configuration, as pip inside the builds needs them.
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
      hooks+=(--customize-hook='upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt')
    fi
    if [ -f /etc/pip.conf ]; then hooks+=(--customize-hook='upload /etc/pip.conf /etc/pip.conf'); fi
  fi
  # The host's apt sets Check-Valid-Until "false" (its mirror may serve a snapshot): same inside.
  # The dpkg path excludes are those of the official "slim" images (no docs, man pages, translations);
  # they stay in /etc/dpkg/dpkg.cfg.d/ and apply to packages that the Dockerfile installs, as there.
  log "creating $image ($kind, mmdebstrap from ${sources[*]})"
  # The merged-usr hook sets up merged /usr with directory symlinks as debootstrap (and so the official
  # images) do; without it mmdebstrap installs the usrmerge package, which drags in the whole of perl.
  mmdebstrap --quiet --variant=minbase --include="$include" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/groff/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "${hooks[@]}" \
    "$SUITE" "$WORK/rootfs.tar" "${sources[@]}"

  local changes=(--change 'ENV LANG=C.UTF-8'
                 --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
  if [ "$kind" = python ]; then changes+=(--change 'CMD ["python3"]'); else changes+=(--change 'CMD ["bash"]'); fi
  local old_id
  old_id="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  podman import --quiet "${changes[@]}" "$WORK/rootfs.tar" "$image" >/dev/null
  # A replaced stand-in is dropped unless cached build layers still use it.
  [ -z "$old_id" ] || podman rmi "$old_id" >/dev/null 2>&1 || true
  log "imported $image ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# The base images named by the Dockerfile's FROM lines (not stage names), qualified as Docker Hub's
# library images: buildah resolves the short names through the short-name aliases of
# /etc/containers/registries.conf.d/shortnames.conf ("python" = "docker.io/library/python", ...).
mapfile -t stages < <(sed -nE 's/^FROM[[:space:]]+[^[:space:]]+[[:space:]]+AS[[:space:]]+([^[:space:]]+).*/\1/Ip' "$DOCKERFILE")
mapfile -t froms < <(sed -nE 's/^FROM[[:space:]]+([^[:space:]]+).*/\1/Ip' "$DOCKERFILE" | sort -u)
for ref in "${froms[@]}"; do
  printf '%s\n' "${stages[@]}" | grep -qxF "$ref" && continue        # FROM an earlier stage
  name="${ref%%:*}"
  case "$ref" in */*) full="$ref" ;; *) full="docker.io/library/$ref" ;; esac
  case "$name" in
    python|*/python) kind=python ;;
    debian|*/debian) kind=debian ;;
    *) die "no stand-in recipe for base image $ref" ;;
  esac
  if [ "$REBUILD_BASES" -eq 1 ] || ! podman image exists "$full"; then
    make_base "$kind" "$full"
  fi
done

# --- 3. build ------------------------------------------------------------------------------------------
ignore=()
if [ ! -e "$ROOT/.dockerignore" ] && [ ! -e "$ROOT/.containerignore" ]; then
  ignore=(--ignorefile "$HERE/containerignore")
fi
[ -z "$SAVE_DIR" ] || mkdir -p "$SAVE_DIR"

results=()
cd "$ROOT"
for t in "${TARGETS[@]}"; do
  image="$REGISTRY/$t:$VERSION"
  log "building $image"
  start=$SECONDS
  buildah bud --isolation chroot --network host --runtime runc --pull=never --layers \
    "${ignore[@]}" -f infra/docker/Dockerfile --target "$t" -t "$image" .
  secs=$((SECONDS - start))
  size_mb="$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f", $1/1e6}')"
  if [ -n "$SAVE_DIR" ]; then
    rm -f "$SAVE_DIR/$t.tar"
    podman save --quiet --format oci-archive -o "$SAVE_DIR/$t.tar" "$image"
    log "saved $SAVE_DIR/$t.tar"
  fi
  results+=("$(printf '%-45s %8s MB %6s s' "$image" "$size_mb" "$secs")")
done

printf '%s\n' "${results[@]}"
