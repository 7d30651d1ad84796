#!/bin/bash
# A real systemd user manager for the tests, on a machine whose PID 1 is not systemd.
#
#   manager.sh fetch              download systemd 254 (bookworm-backports) into $CACHE (.ci/deps)
#   manager.sh start DIR VERSION  start a manager (254, or 252: the host's /lib/systemd/systemd)
#                                 with its state under DIR; prints its PID
#   manager.sh ctl DIR ARGS...    systemctl --user ARGS for that manager
#   manager.sh stop DIR           stop it by PID, remove its cgroup and DIR's mounts
#
# Confinement, which is what makes this safe: the manager is moved into a cgroup of its own
# (/sys/fs/cgroup/unified/NAME) *before* it gets a cgroup namespace rooted there, so the only
# hierarchy it can see and manage is that subtree. A manager that saw the root cgroup would move
# every process on the machine into its own scopes. It also gets a mount namespace of its own, in
# which /run/systemd/system exists (so it believes it was booted with systemd) and systemd 254's
# libraries are where its binaries look for them; nothing outside changes. Units go in
# DIR/config/systemd/user; the manager logs to DIR/manager.log.
set -euo pipefail

CACHE=${GRACE_SYSTEMD_CACHE:-/var/cache/grace-tests/systemd-254}
LIBDIR=/usr/lib/x86_64-linux-gnu/systemd

fetch() {
    [ -x "$CACHE/root/lib/systemd/systemd" ] && return 0
    local work
    work=$(mktemp -d)
    chmod 755 "$work" # apt downloads as user _apt
    trap 'rm -rf "$work"' RETURN
    # bookworm-backports from the mirror apt already uses, with a private apt state: nothing is
    # installed, the two packages are only unpacked.
    local mirror
    mirror=$(sed -n 's|^URIs: *\(.*/debian\)/*$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { sub(/\/$/, "", $2); print $2; exit }' /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    mkdir -p "$work"/state/lists/partial "$work"/cache/archives/partial "$work"/debs
    echo "deb $mirror bookworm-backports main" > "$work/sources.list"
    cat > "$work/apt.conf" <<CONF
Dir::Etc::SourceList "$work/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::State "$work/state";
Dir::State::status "/var/lib/dpkg/status";
Dir::Cache "$work/cache";
CONF
    export APT_CONFIG="$work/apt.conf"
    apt-get -qq update
    local version
    version=$(apt-cache madison systemd | awk -F'|' '/bookworm-backports/ { gsub(/ /, "", $2); print $2; exit }')
    case "$version" in
        254*) ;;
        *) echo "manager.sh: bookworm-backports has systemd '${version}', not 254" >&2; return 1 ;;
    esac
    chown _apt "$work/debs" 2> /dev/null || true
    (cd "$work/debs" && apt-get -qq download "systemd=$version" "libsystemd-shared=$version")
    rm -rf "$CACHE.new" && mkdir -p "$CACHE.new/root"
    for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$CACHE.new/root"; done
    # The 254 binaries find libsystemd-shared-254 through their RUNPATH ($LIBDIR); the host's
    # generators the manager runs need the host's 252 one there too.
    mkdir -p "$CACHE.new/lib"
    cp -a "$LIBDIR/." "$CACHE.new/lib/"
    cp -a "$CACHE.new/root$LIBDIR/." "$CACHE.new/lib/"
    rm -rf "$CACHE" && mv "$CACHE.new" "$CACHE"
}

# Where a version's binaries are: VERSION -> "systemd systemctl libdir-or-empty".
binaries() {
    case "$1" in
        254) echo "$CACHE/root/lib/systemd/systemd $CACHE/root/bin/systemctl $CACHE/lib" ;;
        252) echo "/lib/systemd/systemd /bin/systemctl -" ;;
        *) echo "manager.sh: no systemd $1 (254 or 252)" >&2; return 1 ;;
    esac
}

start() {
    local dir version
    dir=$(realpath -m "$1") version=$2
    read -r systemd systemctl libs < <(binaries "$version")
    [ -x "$systemd" ] || { echo "manager.sh: $systemd is missing (run .ci/deps)" >&2; return 1; }
    mkdir -p "$dir"/{run,config/systemd/user,state,cache,data}
    chmod 700 "$dir/run"
    # A cgroup2 hierarchy to make the cgroup in: the unified one of a hybrid layout, or the root.
    local parent
    for parent in /sys/fs/cgroup/unified /sys/fs/cgroup ""; do
        [ -n "$parent" ] && [ "$(stat -fc %T "$parent" 2> /dev/null)" = cgroup2fs ] && break
    done
    [ -n "$parent" ] || { echo "manager.sh: no cgroup2 hierarchy to confine a manager in" >&2; return 1; }
    local cgroup
    cgroup=$parent/grace-test-$(basename "$dir")-$$
    mkdir "$cgroup"
    echo "$cgroup" > "$dir/cgroup"
    echo "$systemctl $libs" > "$dir/systemctl"
    cat > "$dir/inner.sh" <<INNER
#!/bin/bash
set -e
# Only ever as the root of our own cgroup: anything else and this manager could see them all.
[ "\$(cat /proc/self/cgroup | sed -n 's/^0:://p')" = / ] || { echo "not in a cgroup namespace of our own" >&2; exit 1; }
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind "$dir/kmsg" /dev/kmsg
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system
if [ "$libs" != - ]; then mount --bind "$libs" "$LIBDIR"; fi
export XDG_RUNTIME_DIR="$dir/run" XDG_CONFIG_HOME="$dir/config" XDG_STATE_HOME="$dir/state"
export XDG_CACHE_HOME="$dir/cache" XDG_DATA_HOME="$dir/data"
unset DBUS_SESSION_BUS_ADDRESS NOTIFY_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES
exec "$systemd" --user --log-target=kmsg --log-level=info
INNER
    chmod +x "$dir/inner.sh"
    # The manager logs to "/dev/kmsg", which in its namespace is this fifo; a reader in the same
    # cgroup (so that stopping the cgroup stops it) appends it to manager.log.
    rm -f "$dir/kmsg"
    mkfifo "$dir/kmsg"
    : > "$dir/manager.log"
    setsid bash -c "echo \$\$ > '$cgroup/cgroup.procs' && exec cat '$dir/kmsg'" < /dev/null >> "$dir/manager.log" 2>&1 &
    # Into the cgroup first, then the namespaces: the manager never sees the root cgroup.
    setsid bash -c "echo \$\$ > '$cgroup/cgroup.procs' && exec unshare --mount --propagation private --cgroup '$dir/inner.sh'" \
        < /dev/null >> "$dir/manager.log" 2>&1 &
    echo $! > "$dir/manager.pid"
    local i
    for i in $(seq 100); do
        ctl "$dir" is-system-running > /dev/null 2>&1 && break
        kill -0 "$(cat "$dir/manager.pid")" 2> /dev/null || break
        sleep 0.1
    done
    if ! ctl "$dir" is-system-running > /dev/null 2>&1; then
        echo "manager.sh: systemd $version did not come up; its log:" >&2
        cat "$dir/manager.log" >&2
        stop "$dir"
        return 1
    fi
    cat "$dir/manager.pid"
}

ctl() {
    local dir
    dir=$(realpath -m "$1")
    shift
    read -r systemctl _ < "$dir/systemctl"
    # In the manager's mount namespace: there /run/systemd/system exists and the libraries match.
    nsenter -t "$(cat "$dir/manager.pid")" -m env XDG_RUNTIME_DIR="$dir/run" "$systemctl" --user "$@"
}

# Every process in the cgroup subtree $1.
procs() {
    find "$1" -name cgroup.procs -exec cat {} + 2> /dev/null
}

stop() {
    local dir cgroup i
    dir=$(realpath -m "$1")
    cgroup=$(cat "$dir/cgroup" 2> /dev/null) || return 0
    [ -d "$cgroup" ] || return 0
    # Only what is in the manager's cgroup is signalled, never a remembered PID (which, once its
    # process is gone, may be anyone's): the manager first, so that it stops its units, then
    # whatever is left.
    local manager
    manager=$(cat "$dir/manager.pid" 2> /dev/null) || manager=
    if [ -n "$manager" ] && procs "$cgroup" | grep -qx "$manager"; then
        kill -TERM "$manager" 2> /dev/null || true
        for i in $(seq 100); do procs "$cgroup" | grep -qx "$manager" || break; sleep 0.1; done
    fi
    for i in $(seq 50); do
        [ -z "$(procs "$cgroup")" ] && break
        if [ -e "$cgroup/cgroup.kill" ]; then
            echo 1 > "$cgroup/cgroup.kill"
        else
            procs "$cgroup" | xargs -r kill -KILL 2> /dev/null || true
        fi
        sleep 0.1
    done
    # The subtree, deepest first.
    find "$cgroup" -depth -type d -exec rmdir {} + 2> /dev/null || true
    if [ -d "$cgroup" ]; then
        echo "manager.sh: $cgroup is left, with processes $(procs "$cgroup" | tr '\n' ' ')" >&2
        return 1
    fi
}

command=${1:-}
shift || true
case "$command" in
    fetch) fetch ;;
    start) start "$@" ;;
    ctl) ctl "$@" ;;
    stop) stop "$@" ;;
    *) echo "usage: manager.sh fetch | start DIR 254|252 | ctl DIR ARGS... | stop DIR" >&2; exit 2 ;;
esac
