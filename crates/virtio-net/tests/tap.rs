// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A real TAP interface: needs CAP_NET_ADMIN and /dev/net/tun, so ignored by default
//! (`cargo test -p tvm-virtio-net -- --ignored`).

#![allow(clippy::unwrap_used)]

use std::io;
use std::path::Path;

use tvm_virtio::VirtioDevice;
use tvm_virtio_net::{generated_mac, Error, Net, NetBackend, NetConfig, Tap};

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
#[ignore = "needs CAP_NET_ADMIN and /dev/net/tun"]
fn tap_open_offload_busy_and_drop() {
    let name = format!("tvmt{}", std::process::id());
    assert!(!exists(&name));
    let mut tap = Tap::open(&name).unwrap();
    assert_eq!(tap.name(), name);
    assert!(exists(&name), "the interface was created");
    // The kernel knows the interface as a TAP with a vnet header: tun_flags in sysfs.
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
    let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    let want = i64::from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    assert_eq!(flags & want, want, "tun_flags {flags:#x}");

    // Every offload combination the device can ask for is accepted.
    for f in [
        0,
        libc::TUN_F_CSUM,
        libc::TUN_F_CSUM | libc::TUN_F_TSO4,
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
    ] {
        NetBackend::set_offload(&mut tap, f).unwrap();
    }
    // TSO without CSUM is refused by the kernel; offload_flags never asks for it.
    assert!(tap.set_offload(libc::TUN_F_TSO4).is_err());

    // The interface is down: nothing to read, and the descriptor is non-blocking.
    let mut buf = vec![0u8; 2048];
    let err = tap.read_frame(&mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

    // A second attach to a single-queue TAP in use is refused as busy.
    match Tap::open(&name) {
        Err(Error::TapBusy { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected TapBusy, got {other:?}"),
    }

    drop(tap);
    assert!(!exists(&name), "dropping the Tap deletes the interface");
}

#[test]
#[ignore = "needs CAP_NET_ADMIN and /dev/net/tun"]
fn net_open_on_a_tap() {
    let name = format!("tvmu{}", std::process::id());
    let net = Net::open(&NetConfig {
        tap: name.clone(),
        mac: None,
    })
    .unwrap();
    assert_eq!(net.tap_name(), name);
    assert_eq!(net.mac(), generated_mac(&name));
    let sources = net.extra_event_sources();
    assert_eq!(sources.len(), 1);
    assert!(sources[0].0 >= 0);
    drop(net);
    assert!(!exists(&name));
}
