#!/usr/bin/env bash
# Installs the peers that `cargo bench --bench restart` compares grace with: gunicorn (a real
# server that speaks socket activation), start_server (Server::Starter, the classic hot-restart
# tool), wrk (an independent load generator, used as a cross-check), and the servers whose own
# drain is imperfect (Go, Node, python3). Debian packages only; does nothing when they are all
# present.
set -euo pipefail

packages=(gunicorn libserver-starter-perl wrk procps golang-go nodejs python3)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "benches/setup.sh: missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
