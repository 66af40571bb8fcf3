#!/usr/bin/env bash
# Install headless Chromium from Debian's packages for tests/test_viewer.py (the trajectory viewer is checked in a real
# browser: it renders, and moving the step slider changes the shown step). Idempotent: does nothing when a chromium
# binary is already on PATH (or at $HYBRID_CHROMIUM). Needs root (or sudo) and apt; ~1 min the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
found=""
for c in "${HYBRID_CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then found=$(command -v "$c"); break; fi
done
if [ -z "$found" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo ".ci/prepare_chromium.sh: no chromium and no apt-get; install Chromium and set HYBRID_CHROMIUM" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  found=$(command -v chromium)
fi
# the launcher prints a harmless shell warning on some images; the version line is what matters
version=$("$found" --version 2>/dev/null | tail -n 1)
echo ".ci/prepare_chromium.sh: $version at $found ($(( $(date +%s) - start )) s)"
