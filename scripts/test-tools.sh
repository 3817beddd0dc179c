#!/bin/sh
# Provides the outside tools the test suite drives, so `make test` works on a fresh machine:
#   swaks           an SMTP client nobody here wrote (with libnet-ssleay-perl for STARTTLS)
#   docker-compose  validates docker-compose.yml exactly as operators will run it
# On Debian/Ubuntu they are installed with apt-get (as root, or with passwordless sudo);
# anywhere else this prints one line saying what to install, and make stops.
set -eu

missing=""
packages=""
if ! command -v swaks >/dev/null 2>&1; then
  missing="$missing swaks"
  packages="$packages swaks libnet-ssleay-perl"
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  missing="$missing docker-compose"
  packages="$packages docker-compose"
fi
[ -z "$missing" ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  runner=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then runner="sudo -n"; else runner="none"; fi
  fi
  if [ "$runner" != "none" ]; then
    echo "==> installing test tools:$missing (apt-get install$packages)"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    if $runner apt-get update -qq >/dev/null && $runner apt-get install -y -qq --no-install-recommends $packages >/dev/null; then
      exit 0
    fi
  fi
fi
echo "make test needs$missing: install it (Debian/Ubuntu: sudo apt-get install$packages; macOS: brew install$missing), then run make test again" >&2
exit 1
