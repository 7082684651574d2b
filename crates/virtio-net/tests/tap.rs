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

/// Whether the interface is gone within a second (unregistering a netdev finishes
/// asynchronously after the last descriptor closes).
fn gone(name: &str) -> bool {
    for _ in 0..100 {
        if !exists(name) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

#[test]
#[ignore = "needs CAP_NET_ADMIN and /dev/net/tun"]
fn tap_open_offload_busy_and_drop() {
    let name = format!("tvmt{}", std::process::id());
    assert!(gone(&name));
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
    assert!(gone(&name), "dropping the Tap deletes the interface");
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
    assert!(gone(&name));
}

fn stat(name: &str, counter: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{counter}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Traffic through a live TAP: the kernel's own IPv6 frames (router solicitation, MLD)
/// arrive behind a 12-byte vnet header, and frames we write are parsed with one.
#[test]
#[ignore = "needs CAP_NET_ADMIN and /dev/net/tun"]
fn tap_moves_frames_with_a_vnet_header() {
    let name = format!("tvmv{}", std::process::id());
    let mut tap = Tap::open(&name).unwrap();
    let up = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status()
        .unwrap();
    assert!(up.success());

    // The kernel sends IPv6 multicast (MLD reports, router solicitations) on a new link.
    let mut buf = vec![0u8; 65536];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let n = loop {
        match tap.read_frame(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no frame from the kernel"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("read: {e}"),
        }
    };
    assert!(n >= 12 + 14 + 40, "{n} bytes");
    // vnet header (offloads off: no GSO, no NEEDS_CSUM), then 33:33:xx:xx:xx:xx and IPv6.
    assert_eq!(buf[1], 0, "gso_type");
    assert_eq!(buf[0] & 1, 0, "flags: no NEEDS_CSUM without offloads");
    assert_eq!(&buf[12..14], &[0x33, 0x33], "IPv6 multicast destination");
    assert_eq!(&buf[24..26], &[0x86, 0xdd], "ethertype IPv6");

    // A broadcast ARP request from the "guest": plain vnet header, accepted.
    let before = stat(&name, "rx_packets");
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 10, 0, 0, 2]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    let n = tap.write_frame(&[io::IoSlice::new(&frame)]).unwrap();
    assert_eq!(n, frame.len());
    assert_eq!(stat(&name, "rx_packets"), before + 1);
    // The same frame with a gso_type the kernel does not know: refused, which shows the
    // first bytes are read as a vnet header.
    frame[1] = 0x42;
    assert!(tap.write_frame(&[io::IoSlice::new(&frame)]).is_err());
    drop(tap);
    assert!(gone(&name));
}
