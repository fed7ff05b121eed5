#!/usr/bin/env bash
# Copy the README's screenshots from the last viewer-test run (make test, or
# .venv/bin/python -m pytest tests/viewers) into docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${DICOMAI_VIEWER_ARTEFACTS:-build/viewer-screenshots}
dst=docs/screenshots
mkdir -p "$dst"
copy() {  # test folder, series step, target name
  local file
  file=$(ls "$src/$1"/[0-9][0-9]-series-"$2".png 2>/dev/null | head -n 1 || true)
  if [ -z "$file" ]; then
    echo "update-screenshots: no screenshot for $1 / $2 in $src (run the viewer tests)" >&2
    exit 1
  fi
  cp "$file" "$dst/$3"
  echo "$dst/$3 <- $file"
}
for test in chest_xray:chest head_ct:ct; do
  folder="test_${test%%:*}_results_in_ohif"
  name=${test##*:}
  copy "$folder" "AI_RESULT_-_NOT_FOR_DIAGNOSTIC_USE" "$name-sr.png"
  copy "$folder" "AI_REGIONS_-_NOT_FOR_DIAGNOSTIC_USE" "$name-seg.png"
  copy "$folder" "AI_OVERLAY_-_NOT_FOR_DIAGNOSTIC_USE" "$name-sc.png"
done
