#!/bin/sh
# Runs a command as a machine without /dev/kvm, TAP or user namespaces would: in new user
# and mount namespaces (uids and gids 0-65535 mapped onto themselves, so files keep their
# owners), with /dev a tmpfs holding only the ordinary nodes (no kvm, no net/tun), and
# with no further user namespace allowed (user.max_user_namespaces = 0 inside). The
# command keeps uid 0 for file access but has no capability outside its namespaces: it
# can neither create a TAP nor open devices it cannot see.
#
# Usage: scripts/bare-machine.sh COMMAND [ARG]...   (needs root and util-linux's unshare)
# `cargo xtask ci` runs `cargo test --workspace` through it (its `test` step).
set -eu
if [ "${1:-}" != --inside ]; then
    [ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG]..." >&2; exit 2; }
    if [ "$(id -u)" -ne 0 ]; then
        echo "$0: needs root (it maps uids 0-65535 into a user namespace)" >&2
        exit 1
    fi
    command -v unshare >/dev/null || { echo "$0: needs unshare (util-linux)" >&2; exit 1; }
    # unshare(1) of util-linux 2.38 maps more than one id only through newuidmap, so a
    # helper writes the maps once this process ($$, which execs unshare) is inside.
    me=$$
    (
        mine=$(readlink /proc/self/ns/user)
        i=0
        while [ "$(readlink /proc/$me/ns/user 2>/dev/null)" = "$mine" ]; do
            i=$((i + 1))
            [ $i -lt 200 ] || exit 1
            sleep 0.05
        done
        echo "0 0 65536" >/proc/$me/uid_map
        echo "0 0 65536" >/proc/$me/gid_map
    ) &
    exec unshare --user --mount --propagation private -- "$0" --inside "$@"
fi
shift
i=0
until [ -n "$(cat /proc/self/uid_map)" ]; do
    i=$((i + 1))
    [ $i -lt 200 ] || { echo "$0: no uid map was written" >&2; exit 1; }
    sleep 0.05
done
# Capabilities are computed at exec: once more now that uid 0 is mapped.
if [ "${1:-}" != --mapped ]; then
    exec "$0" --inside --mapped "$@"
fi
shift
echo 0 >/proc/sys/user/max_user_namespaces
# The new /dev is built on a tmpfs over /mnt (in this mount namespace only), then moved.
new=/mnt
mount -t tmpfs -o mode=755 bare-dev "$new"
for node in null zero full random urandom tty; do
    touch "$new/$node"
    mount --bind "/dev/$node" "$new/$node"
done
mkdir "$new/pts" "$new/shm"
mount --bind /dev/pts "$new/pts"
mount -t tmpfs -o mode=1777 bare-shm "$new/shm"
ln -s pts/ptmx "$new/ptmx"
ln -s /proc/self/fd "$new/fd"
ln -s /proc/self/fd/0 "$new/stdin"
ln -s /proc/self/fd/1 "$new/stdout"
ln -s /proc/self/fd/2 "$new/stderr"
mount --move "$new" /dev
for gone in /dev/kvm /dev/net/tun; do
    if [ -e "$gone" ]; then
        echo "$0: $gone is still there" >&2
        exit 1
    fi
done
if unshare --user true 2>/dev/null; then
    echo "$0: a user namespace could still be created" >&2
    exit 1
fi
exec "$@"
