#!/usr/bin/env bash
# Render an `sae-e2e inspect` site in headless Chromium (Debian's package: apt-get install -y
# chromium) and save screenshots of its index and of one feature page. Not a default test: it
# needs the browser. Usage:
#   scripts/inspect_screenshots.sh SITE_FOLDER OUT_FOLDER [FEATURE_ID]
# FEATURE_ID defaults to the first feature page of the site.
set -euo pipefail
site=$(realpath "${1:?site folder}")
out=${2:?folder for the screenshots}
browser=${CHROMIUM:-/usr/bin/chromium}
[ -x "$browser" ] || { echo "no browser at $browser: apt-get install -y chromium" >&2; exit 1; }
[ -f "$site/index.html" ] || { echo "$site has no index.html: not an inspect site" >&2; exit 1; }
feature=${3:-$(find "$site/features" -name '*.html' -printf '%f\n' | sort -n | head -1 | cut -d. -f1)}
[ -f "$site/features/$feature.html" ] || { echo "no page for feature $feature" >&2; exit 1; }
mkdir -p "$out"
shoot() {  # page, png, height
  # A fresh profile each time; no network is needed (the site loads nothing from outside).
  profile=$(mktemp -d)
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --window-size=1200,"$3" --virtual-time-budget=3000 \
    --screenshot="$2" "file://$1" >/dev/null 2>&1
  rm -rf "$profile"
  [ -s "$2" ] || { echo "no screenshot written for $1" >&2; exit 1; }
  echo "$2"
}
shoot "$site/index.html" "$out/inspect_index.png" 1500
shoot "$site/features/$feature.html" "$out/inspect_feature.png" 1700
