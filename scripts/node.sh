#!/usr/bin/env sh
# Node.js and Replicate's JavaScript client (pinned in tests/node/package-lock.json) for the client tests.
# Installs Debian's nodejs and npm where node is missing (needs root or sudo).
set -eu
cd "$(dirname "$0")/.."
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  SUDO=""
  [ "$(id -u)" = "0" ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
[ -f tests/node/node_modules/replicate/package.json ] || npm ci --prefix tests/node --no-audit --no-fund --silent
