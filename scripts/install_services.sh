#!/usr/bin/env bash
# Debian packages the runtime's real-service tests use: a Mosquitto broker binary (the MQTT sink
# test starts its own broker on a free loopback port with a temporary config) and headless
# Chromium + chromedriver (the live-page test). Idempotent: installs only what is missing, and
# does not start or enable mosquitto as a system service (the tests never rely on one).
# Without root (or without apt-get) it only says what is missing; those tests then skip with a reason.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)

if [ "${#need[@]}" -eq 0 ]; then
  echo "install_services: mosquitto, chromium, chromium-driver already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_services: missing ${need[*]} (needs root and apt-get); the tests that use them will skip" >&2
  exit 0
fi
echo "install_services: installing ${need[*]}"
# policy-rc.d exit 101: the package's maintainer scripts must not start the mosquitto daemon.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
# A distribution whose package started the broker anyway: stop it (the tests start their own).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
fi
