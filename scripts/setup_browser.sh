#!/usr/bin/env bash
# Installs Debian's chromium for the web-chat-page test (tests/interop/test_web_page.py drives it
# with the playwright Python package pointed at /usr/bin/chromium: no browser download).
# Skips when chromium is already there or when not root / no apt-get (the test then skips).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  echo "chromium already installed: $(command -v chromium || command -v chromium-browser)"
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: not root or no apt-get; skipping chromium (the web page test will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends chromium
echo "chromium installed: $(command -v chromium)"
