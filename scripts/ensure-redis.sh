#!/usr/bin/env bash
# Makes sure Debian's `redis-server` is installed (the Redis integration tests start their own
# throw-away server from it). Installs it with apt-get when missing and we are root (or have sudo);
# otherwise says so and lets the Redis tests skip with that message.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-redis: redis-server is missing and we cannot install it (not root); Redis tests will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-redis: redis-server is missing and apt-get is not available; Redis tests will skip" >&2
    exit 0
fi
echo "ensure-redis: installing redis-server with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package may start a system-wide instance on 6379; the tests never use it.
command -v redis-server >/dev/null
