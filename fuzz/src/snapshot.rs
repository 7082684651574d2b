// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The snapshot state file: `tvm_snapshot::decode`, what `vmm --restore` and
//! `PUT /snapshot/load` read before anything is built.
//!
//! Input: a flag byte (bit 0: make the header's length and checksum match the payload,
//! so that mutations reach the JSON and the consistency checks instead of stopping at the
//! checksum), then the file.
//!
//! Invariants:
//! - no panic, whatever the bytes;
//! - a file that decodes is consistent ([`tvm_snapshot::Snapshot::validate`] holds), and
//!   encodes back to a file that decodes to the same encoding (nothing is lost or
//!   invented between the file and the state a restore uses);
//! - a file whose bytes change after the header without the checksum following is
//!   refused.

use tvm_snapshot::{decode, encode, Error, HEADER_LEN};

use crate::{logger, Input};

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let fixup = input.bool();
    let mut file = input.rest().to_vec();
    if fixup && file.len() >= HEADER_LEN {
        let payload_len = (file.len() - HEADER_LEN) as u64;
        let crc = crc32fast::hash(&file[HEADER_LEN..]);
        file[12..16].copy_from_slice(&crc.to_le_bytes());
        file[16..24].copy_from_slice(&payload_len.to_le_bytes());
    }
    let Ok(snapshot) = decode(&file) else {
        return;
    };
    snapshot
        .validate()
        .expect("a decoded snapshot is consistent");
    let again = encode(&snapshot).expect("a decoded snapshot encodes");
    let back = decode(&again).expect("an encoded snapshot decodes");
    assert_eq!(
        encode(&back).expect("encodes"),
        again,
        "the encoding changed on a round trip"
    );
    // One flipped payload bit without a new checksum is caught.
    if again.len() > HEADER_LEN {
        let mut bad = again.clone();
        let at = HEADER_LEN + (file.len() % (again.len() - HEADER_LEN));
        bad[at] ^= 0x01;
        assert!(
            matches!(decode(&bad), Err(Error::Checksum { .. })),
            "a damaged payload at {at} was not refused"
        );
    }
}
