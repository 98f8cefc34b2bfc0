#!/usr/bin/env bash
# Set up (or refresh) the environment, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests/test_serve_browser.py drives the system's Chromium (Debian's package; nothing is downloaded
# by the test itself): install it when missing and apt-get is at hand. PEFTMM_SKIP_BROWSER=1 skips
# both this install and that test.
if [ "${PEFTMM_SKIP_BROWSER:-}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium for the browser test (apt-get, about a minute)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    log="${TMPDIR:-/tmp}/peftmm-apt-chromium.log"
    apt_install() { apt-get install -y -q chromium >>"$log" 2>&1; }
    apt_install || { apt-get update -q >>"$log" 2>&1 && apt_install; } ||
      echo "could not install chromium (see $log): the browser test will fail (PEFTMM_SKIP_BROWSER=1 skips it)" >&2
  else
    echo "chromium is missing (needs root and apt-get to install): the browser test will fail" >&2
  fi
fi
# Lint and layering first: fast, and a failure here names the file and line.
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
