//! The snapshot file of a tvm VM.
//!
//! A snapshot is two files: this crate's *state file* (everything but guest RAM) and a
//! *memory file* (guest RAM, one region after the other, written sparsely by the VMM).
//! The state file is a fixed 24-byte header followed by a JSON payload:
//!
//! | offset | size | what |
//! | --- | --- | --- |
//! | 0 | 8 | magic `TVMSNAP\0` |
//! | 8 | 4 | format version, little endian ([`FORMAT_VERSION`]) |
//! | 12 | 4 | CRC-32 (IEEE) of the payload, little endian |
//! | 16 | 8 | payload length in bytes, little endian |
//! | 24 | n | the payload: a [`Snapshot`] as JSON |
//!
//! [`decode`] checks all of it before anything is built from the file: a file that is not
//! a snapshot, one of another format version, a truncated or damaged one, or one whose
//! contents do not hang together ([`Snapshot::validate`]) each give their own [`Error`].
//! Nothing here needs KVM, so the parser is unit-tested and fuzzed on its own.
//!
//! ```
//! use tvm_snapshot::{decode, encode, Snapshot};
//! let bytes = encode(&Snapshot::example()).unwrap();
//! let back = decode(&bytes).unwrap();
//! assert_eq!(back.machine, Snapshot::example().machine);
//! assert_eq!(encode(&back).unwrap(), bytes);
//! ```

#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod state;

pub use state::*;

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"TVMSNAP\0";
/// The format this build writes and the only one it reads. It moves on whenever the
/// payload's meaning changes.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted (the state of 254 vCPUs is a few MiB of JSON).
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shorter than its header says.
    #[error("the snapshot file is truncated: {have} bytes, {need} expected")]
    Truncated {
        /// Bytes there are.
        have: u64,
        /// Bytes the header announces.
        need: u64,
    },
    /// Not a snapshot at all.
    #[error("not a tvm snapshot file (bad magic)")]
    BadMagic,
    /// A snapshot of another format.
    #[error(
        "snapshot format version {found} is not supported (this vmm reads version {supported})"
    )]
    Version {
        /// The file's version.
        found: u32,
        /// The one this build reads.
        supported: u32,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("the snapshot payload of {0} bytes is larger than the limit")]
    TooLarge(u64),
    /// The payload does not match its checksum.
    #[error("the snapshot file is damaged: checksum {found:#010x}, {expected:#010x} expected")]
    Checksum {
        /// The header's checksum.
        expected: u32,
        /// The payload's.
        found: u32,
    },
    /// Trailing bytes after the payload.
    #[error("the snapshot file has {0} bytes after its payload")]
    TrailingBytes(u64),
    /// The payload is not a snapshot of this format.
    #[error("the snapshot payload cannot be read")]
    Payload(#[source] serde_json::Error),
    /// The payload reads, but does not describe a machine this VMM can rebuild.
    #[error("the snapshot is inconsistent: {0}")]
    Invalid(String),
    /// The saved vCPUs have CPU features this host's KVM cannot give.
    #[error("the snapshot was taken on a cpu with features this host cannot give: cpuid leaf {leaf:#x} index {index} {register} bits {missing:#x}")]
    CpuFeatures {
        /// CPUID function.
        leaf: u32,
        /// Its index.
        index: u32,
        /// `eax`, `ebx`, `ecx` or `edx`.
        register: &'static str,
        /// The bits the host lacks.
        missing: u32,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The state file for `snapshot`: header and payload.
///
/// # Errors
///
/// [`Error::Payload`] if serialisation fails (it does not for a [`Snapshot`]).
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(snapshot).map_err(Error::Payload)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Reads and checks a state file: header, version, length, checksum, payload and its
/// consistency ([`Snapshot::validate`]).
///
/// # Errors
///
/// One [`Error`] per way a file can be wrong; see the variants.
pub fn decode(bytes: &[u8]) -> Result<Snapshot> {
    let have = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        // A file shorter than the magic that starts like one is a truncated snapshot.
        if bytes.len() < MAGIC.len() && !bytes.is_empty() && MAGIC.starts_with(bytes) {
            return Err(Error::Truncated {
                have,
                need: HEADER_LEN as u64,
            });
        }
        return Err(Error::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(Error::Truncated {
            have,
            need: HEADER_LEN as u64,
        });
    }
    let version = le_u32(&bytes[8..12]);
    if version != FORMAT_VERSION {
        return Err(Error::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let expected = le_u32(&bytes[12..16]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    let need = HEADER_LEN as u64 + len;
    if have < need {
        return Err(Error::Truncated { have, need });
    }
    if have > need {
        return Err(Error::TrailingBytes(have - need));
    }
    let payload = &bytes[HEADER_LEN..];
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(Error::Checksum { expected, found });
    }
    let snapshot: Snapshot = serde_json::from_slice(payload).map_err(Error::Payload)?;
    snapshot.validate()?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_comes_back_as_it_went_in() {
        let s = Snapshot::example();
        let bytes = encode(&s).unwrap();
        assert_eq!(&bytes[..8], b"TVMSNAP\0");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.devices, s.devices);
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(encode(&back).unwrap(), bytes);
    }

    #[test]
    fn each_kind_of_damage_has_its_own_error() {
        let good = encode(&Snapshot::example()).unwrap();

        // Truncated anywhere: in the magic, in the header, in the payload.
        for cut in [3, 8, 20, HEADER_LEN, good.len() - 1] {
            let e = decode(&good[..cut]).unwrap_err();
            assert!(matches!(e, Error::Truncated { .. }), "cut at {cut}: {e}");
        }
        assert!(matches!(decode(&[]), Err(Error::BadMagic)));
        assert!(matches!(decode(b"ELF\x7fwhatever"), Err(Error::BadMagic)));

        let mut other = good.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = decode(&other).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Version {
                    found: 2,
                    supported: 1
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("version 2"), "{e}");

        // One flipped bit anywhere in the payload.
        for at in [HEADER_LEN, HEADER_LEN + 100, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let e = decode(&bad).unwrap_err();
            assert!(matches!(e, Error::Checksum { .. }), "flip at {at}: {e}");
        }

        let mut longer = good.clone();
        longer.push(b' ');
        assert!(matches!(decode(&longer), Err(Error::TrailingBytes(1))));

        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(Error::TooLarge(_))));
    }

    #[test]
    fn a_well_framed_payload_that_is_not_a_snapshot_is_refused() {
        let payload = br#"{"hello": "world"}"#;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(payload);
        assert!(matches!(decode(&bytes), Err(Error::Payload(_))));
    }
}
