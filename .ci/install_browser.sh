#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian packages chromium + chromium-driver) for
# tests/test_chat_browser.py. Idempotent and non-interactive; run as root or with passwordless sudo.
set -euo pipefail

packages=(chromium chromium-driver)

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo -n); fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

for bin in chromium chromedriver; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "install_browser.sh: $bin not found after install" >&2
        exit 1
    fi
done
echo "install_browser.sh: $(chromium --version 2>/dev/null || echo chromium) ready for tests/test_chat_browser.py"
