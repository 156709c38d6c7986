#!/usr/bin/env bash
# The machine tools the tests drive, installed from Debian's packages only when missing (a second run
# calls no package manager): chromium for the fleet page's browser test, docker-compose to validate
# docker-compose.yaml without an engine, iptables for the partitions of the multi-host tests.
set -euo pipefail

missing=()
command -v chromium >/dev/null || missing+=(chromium chromium-driver)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v iptables >/dev/null || missing+=(iptables)
if ((${#missing[@]})); then
  echo "tools: installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}"
fi
