// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! MAC addresses: parsing, checking, and the default address derived from the TAP name.

use crate::{Error, Result};

/// Bit 0 of the first octet: a group (multicast) address.
const MULTICAST_BIT: u8 = 0x01;
/// Bit 1 of the first octet: a locally administered address.
const LOCAL_BIT: u8 = 0x02;

/// Why `mac` cannot be a NIC's own address, if it cannot.
pub(crate) fn mac_problem(mac: &[u8; 6]) -> Option<&'static str> {
    if mac[0] & MULTICAST_BIT != 0 {
        Some("a multicast address cannot be a NIC's address")
    } else if mac.iter().all(|&b| b == 0) {
        Some("the all-zero address is not valid")
    } else {
        None
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`: six groups of exactly two hex digits (either case)
/// separated by `:`. The address must be unicast and not all zeros.
///
/// # Errors
///
/// [`Error::InvalidMac`] saying what is wrong.
///
/// # Example
///
/// ```
/// assert_eq!(
///     tvm_virtio_net::parse_mac("52:54:00:AB:cd:01").unwrap(),
///     [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]
/// );
/// assert!(tvm_virtio_net::parse_mac("01:00:5e:00:00:01").is_err()); // multicast
/// ```
pub fn parse_mac(input: &str) -> Result<[u8; 6]> {
    let err = |reason| Error::InvalidMac {
        input: input.to_string(),
        reason,
    };
    let mut mac = [0u8; 6];
    let mut groups = input.split(':');
    for byte in &mut mac {
        let group = groups
            .next()
            .ok_or_else(|| err("expected six groups separated by ':'"))?;
        if group.len() != 2 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err("each group must be two hex digits"));
        }
        *byte =
            u8::from_str_radix(group, 16).map_err(|_| err("each group must be two hex digits"))?;
    }
    if groups.next().is_some() {
        return Err(err("expected six groups separated by ':'"));
    }
    if let Some(reason) = mac_problem(&mac) {
        return Err(err(reason));
    }
    Ok(mac)
}

/// Formats `mac` as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// The MAC address a device on TAP `tap` gets when none is configured: `02:` followed by
/// 40 bits of the 64-bit FNV-1a hash of the name, i.e. a locally administered unicast
/// address (first octet 0x02) that is the same for the same name on every run and every
/// host, and differs between names (up to hash collisions, about one in 2^40 per pair).
///
/// FNV-1a is spelled out here rather than taken from `std::hash`, whose `DefaultHasher`
/// output may change between Rust releases.
pub fn generated_mac(tap: &str) -> [u8; 6] {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = tap.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    let h = hash.to_be_bytes();
    [LOCAL_BIT, h[0], h[1], h[2], h[3], h[4]]
}
