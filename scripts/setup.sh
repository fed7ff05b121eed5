#!/usr/bin/env bash
# One-time set-up on Debian/Ubuntu: system packages (DICOM peers and validators) and a Python
# virtual environment in .venv with the CPU build of PyTorch 2.13.0 installed first.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# orthanc-dicomweb, chromium and fonts-dejavu-core: the viewer tests (tests/viewers) show our
# objects to OHIF in a headless Chromium, through Orthanc's DICOMweb API.
APT_PACKAGES=(dcmtk dicom3tools libpixelmed-java default-jdk-headless orthanc orthanc-dicomweb
              chromium fonts-dejavu-core)
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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/pyproject.toml -nt "$stamp" ]; then
  # The daemon (with the test tools), and dicomai-tools beside it: synthetic studies, model
  # evaluation and the demo's samples, which a production install of the daemon leaves out.
  echo "setup: installing dicomai, dicomai-tools and their dependencies into .venv"
  .venv/bin/pip install -q -e '.[test]' -e ./tools
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

# The viewer tests (marker `viewers`): OHIF's prebuilt viewer from npm, cached per user (not per
# checkout) so that later runs on this machine skip the 50 MB download and unpacking, and
# playwright-core (tests/viewers/package-lock.json), which drives the system Chromium and
# downloads no browser. Without node >= 20 and npm those tests are skipped, with the reason.
OHIF_VERSION=3.13.2
viewer_cache=${DICOMAI_VIEWER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dicomai/viewers}
fetch_ohif() {  # npm pack verifies the tarball against the registry's integrity hash
  local dest=$1 tmp
  mkdir -p "$viewer_cache"
  tmp=$(mktemp -d "$viewer_cache/.fetch.XXXXXX")
  if (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null &&
      tar -xzf "ohif-app-$OHIF_VERSION.tgz" package/dist package/package.json); then
    rm -rf "$dest" && mv "$tmp/package" "$dest" && touch "$dest/.complete"
  fi
  rm -rf "$tmp"
  [ -f "$dest/.complete" ]
}
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if ! command -v npm >/dev/null 2>&1 || [ "$node_major" -lt 20 ]; then
  echo "setup: node >= 20 with npm not found; the OHIF viewer tests will be skipped" >&2
else
  ohif_dir="$viewer_cache/ohif-$OHIF_VERSION"
  if [ ! -f "$ohif_dir/.complete" ]; then
    echo "setup: fetching @ohif/app@$OHIF_VERSION (prebuilt viewer) into $ohif_dir"
    fetch_ohif "$ohif_dir" ||
      echo "setup: could not fetch @ohif/app; the OHIF viewer tests will be skipped" >&2
  fi
  stamp=tests/viewers/node_modules/.dicomai-installed
  if [ ! -f "$stamp" ] || [ tests/viewers/package-lock.json -nt "$stamp" ]; then
    echo "setup: installing the viewer test driver (playwright-core, no browser download)"
    if PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/viewers --silent --no-audit \
        --no-fund >/dev/null; then
      touch "$stamp"
    else
      echo "setup: npm ci failed in tests/viewers; the OHIF viewer tests will be skipped" >&2
    fi
  fi
fi
