#!/bin/sh
# tap-up.sh NAME [ADDRESS/PREFIX]
#
# Sets up the host end of the TAP interface NAME for a guest started with
# `vmm --net tap=NAME`: waits (up to 60 s) for the interface to exist, so it can run
# beside a VMM that creates the TAP, then gives it ADDRESS/PREFIX (default 10.0.2.1/24,
# the guest being 10.0.2.2/24) and sets the link up. Needs root (CAP_NET_ADMIN) and `ip`
# (iproute2 or busybox). `cargo xtask run -- --net tap=NAME` runs it for you.
set -u
name=${1:?usage: tap-up.sh NAME [ADDRESS/PREFIX]}
addr=${2:-10.0.2.1/24}
n=0
while [ ! -e "/sys/class/net/$name" ]; do
    n=$((n + 1))
    if [ "$n" -gt 600 ]; then
        echo "tap-up: $name did not appear within 60 s" >&2
        exit 1
    fi
    sleep 0.1
done
# An address left from an earlier run is fine.
ip addr add "$addr" dev "$name" 2>/dev/null || ip addr show dev "$name" | grep -q "inet ${addr%/*}/" || {
    echo "tap-up: cannot give $name the address $addr" >&2
    exit 1
}
ip link set "$name" up
