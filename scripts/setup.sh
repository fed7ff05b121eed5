#!/usr/bin/env bash
# One-time set-up on Debian/Ubuntu: system packages (DICOM peers and validators) and a Python
# virtual environment in .venv with the CPU build of PyTorch 2.13.0 installed first.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dcmtk dicom3tools libpixelmed-java default-jdk-headless orthanc)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    # policy-rc.d keeps the packaged Orthanc service from starting on its default ports.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 "${sudo_cmd[@]}" apt-get install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: apt-get not found; install ${missing[*]} yourself (tests needing them are skipped)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC (CPU build) first"
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
stamp=.venv/.dicomai-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing dicomai and its dependencies into .venv"
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi

# The PostgreSQL tests (marker `postgres`) use the server on 127.0.0.1:5432 when there is one;
# start a locally installed cluster that is down. Without PostgreSQL those tests are skipped.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    for version in /etc/postgresql/*; do
      "${sudo_cmd[@]}" pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start \
        >/dev/null 2>&1 || true
    done
  fi
fi
