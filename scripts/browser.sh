#!/usr/bin/env sh
# Debian's chromium and chromedriver for the browser tests (a test tool's own browser download cannot work
# offline). Needs root or sudo; does nothing where /usr/bin/chromium already exists.
set -eu
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0
SUDO=""
[ "$(id -u)" = "0" ] || SUDO="sudo"
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
