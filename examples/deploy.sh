#!/bin/sh
# Deploy a new server binary with zero downtime, and fail the deploy if grace rolls it back.
#
#   examples/deploy.sh NEW_BINARY INSTALLED_PATH [grace restart options...]
#   examples/deploy.sh ./target/release/examples/server /usr/local/bin/grace-demo-server --pid-file /run/grace-demo.pid
#
# The new binary is renamed over the installed one (atomic: a generation starting meanwhile sees
# either the old or the new file, never half of one); grace re-resolves the command at each
# restart, so the next generation runs it. If the new generation is rolled back, the previous
# binary is put back, so that the file on disk matches what is serving, and the deploy fails.
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: $0 NEW_BINARY INSTALLED_PATH [grace restart options...]" >&2
    exit 2
fi
new=$1
installed=$2
shift 2
grace=${GRACE:-grace}

dir=$(dirname "$installed")
staged="$dir/.$(basename "$installed").new.$$"
backup="$dir/.$(basename "$installed").previous"

cp "$new" "$staged"
chmod 755 "$staged"
if [ -e "$installed" ]; then
    cp -p "$installed" "$backup"
fi
mv -f "$staged" "$installed"

if "$grace" restart "$@"; then
    rm -f "$backup"
    echo "deploy: $installed is serving"
else
    status=$?
    if [ -e "$backup" ]; then
        mv -f "$backup" "$installed"
        echo "deploy: rolled back; $installed restored" >&2
    fi
    exit "$status"
fi
