#!/bin/sh
# The project in /opt/venv, in two layers so a change of code does not reinstall the dependencies:
#   install-venv.sh deps EXTRA   the dependencies of one role's extra (pyproject.toml: `serve`, `serve-gpu`,
#                                `route`, `all`), every version pinned by the lock (and requirements/EXTRA.txt
#                                where the extra has pins of its own); run before the sources are copied
#   install-venv.sh project      the project itself, without dependencies; then check the environment
# Each image installs only what its role imports: the predictor `serve` (no torch), the routing worker
# and drift job `route`, the pipeline components `all`.
set -eu
case "$1" in
  deps)
    python -m venv /opt/venv
    python - "$2" > /build/requirements/role.txt <<'PY'
import sys
import tomllib

project = tomllib.load(open("/build/pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]


def requirements(extra):
    for requirement in extras[extra]:
        if requirement.startswith(project["name"] + "["):  # an extra that includes others
            for name in requirement.split("[", 1)[1].rstrip("]").split(","):
                yield from requirements(name.strip())
        else:
            yield requirement


print("\n".join([*project["dependencies"], *requirements(sys.argv[1])]))
PY
    own_pins="/build/requirements/$2.txt"  # an extra's pins beyond the lock (serve-gpu), if it has any
    [ -f "$own_pins" ] || own_pins=/build/requirements/lock.txt
    pip install -r /build/requirements/role.txt -c /build/requirements/lock.txt -c "$own_pins"
    ;;
  project)
    pip install --no-deps /build
    pip check
    ;;
  *)
    echo "usage: install-venv.sh deps EXTRA | project" >&2
    exit 64
    ;;
esac
