#!/bin/sh
# Install the project with one role's extra (`serve`, `route`, `all`) into /opt/venv, every version
# pinned by the lock, then check the environment is consistent. Each image installs only what its role
# imports: the predictor `serve` (no torch), the routing worker and drift job `route`, the pipeline
# components `all`.
set -eu
extra="$1"
python -m venv /opt/venv
pip install -c /build/requirements/lock.txt "/build[${extra}]"
pip check
