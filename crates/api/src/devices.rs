// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device bodies: drives, network interfaces, the entropy device, rate limiters, and the
//! per-value checks they share (ids, MAC addresses, token buckets).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// Longest resource id (drive, network interface).
pub const MAX_ID_LEN: usize = 64;
/// Longest TAP name: `IFNAMSIZ` (16) less the terminating NUL.
pub const MAX_HOST_DEV_NAME_LEN: usize = 15;
/// Largest `refill_time` (ms) whose nanosecond count fits in a `u64`.
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / 1_000_000;

/// Checks a resource id: 1 to [`MAX_ID_LEN`] ASCII letters, digits or underscores.
///
/// Firecracker's `checked_id` allows any Unicode alphanumeric character and any length; ids
/// end up in thread names and logs here, so we keep them short and ASCII.
pub fn validate_id(kind: &'static str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::EmptyId(kind));
    }
    if id.len() > MAX_ID_LEN || !id.bytes().all(|b| b == b'_' || b.is_ascii_alphanumeric()) {
        return Err(Error::InvalidId {
            kind,
            id: id.to_string(),
        });
    }
    Ok(())
}

/// A field holding a host path must not be an empty string.
pub(crate) fn non_empty_path(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::EmptyPath(field));
    }
    Ok(())
}

/// A guest MAC address: unicast and not all zeros. It parses from and prints as
/// `aa:bb:cc:dd:ee:ff` (hex digits of either case; printed lowercase).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// A MAC address from its six bytes, if it is unicast and not all zeros.
    pub fn from_bytes(bytes: [u8; 6]) -> Result<MacAddr> {
        let bad = |why| Error::InvalidMac {
            value: MacAddr(bytes).to_string(),
            why,
        };
        if bytes[0] & 1 != 0 {
            return Err(bad("the multicast bit is set; a guest MAC must be unicast"));
        }
        if bytes == [0; 6] {
            return Err(bad("the address is all zeros"));
        }
        Ok(MacAddr(bytes))
    }

    /// The six bytes, most significant first.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<MacAddr> {
        let bad = |why| Error::InvalidMac {
            value: s.to_string(),
            why,
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| bad("expected six hex bytes like 06:00:ac:10:00:02"))?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("expected six hex bytes like 06:00:ac:10:00:02"));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| bad("expected six hex bytes like 06:00:ac:10:00:02"))?;
        }
        if parts.next().is_some() {
            return Err(bad("expected six hex bytes like 06:00:ac:10:00:02"));
        }
        MacAddr::from_bytes(bytes).map_err(|e| match e {
            Error::InvalidMac { why, .. } => bad(why),
            other => other,
        })
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One token bucket: `size` tokens, refilled completely every `refill_time` ms, plus an
/// initial `one_time_burst`. A bucket with `size` or `refill_time` 0 is disabled, as in
/// Firecracker (and dropped when stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Total number of tokens the bucket holds.
    pub size: u64,
    /// Initial extra tokens, used up before the refill starts.
    pub one_time_burst: Option<u64>,
    /// Milliseconds for a complete refill.
    pub refill_time: u64,
}

impl TokenBucket {
    /// Whether the bucket limits anything (`size` and `refill_time` both non-zero).
    pub fn is_enabled(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self.refill_time > MAX_REFILL_TIME_MS {
            return Err(Error::InvalidTokenBucket {
                what: what.to_string(),
                why: format!(
                    "refill_time {} ms is larger than {MAX_REFILL_TIME_MS} ms",
                    self.refill_time
                ),
            });
        }
        Ok(())
    }
}

/// An I/O rate limiter: independent bandwidth (bytes) and operations buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Token bucket with bytes as tokens.
    pub bandwidth: Option<TokenBucket>,
    /// Token bucket with operations as tokens.
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Checks both buckets; `what` names the limiter in messages ("rx_rate_limiter").
    pub(crate) fn validate(&self, what: &str) -> Result<()> {
        if let Some(b) = &self.bandwidth {
            b.validate(&format!("{what}.bandwidth"))?;
        }
        if let Some(b) = &self.ops {
            b.validate(&format!("{what}.ops"))?;
        }
        Ok(())
    }

    /// The limiter as stored: disabled buckets dropped, `None` when nothing limits.
    pub(crate) fn normalized(self) -> Option<RateLimiter> {
        let keep = |b: Option<TokenBucket>| b.filter(TokenBucket::is_enabled);
        let rl = RateLimiter {
            bandwidth: keep(self.bandwidth),
            ops: keep(self.ops),
        };
        (rl.bandwidth.is_some() || rl.ops.is_some()).then_some(rl)
    }

    /// Validates and normalizes an optional limiter from a PUT body.
    pub(crate) fn checked(limiter: Option<RateLimiter>, what: &str) -> Result<Option<RateLimiter>> {
        match limiter {
            None => Ok(None),
            Some(rl) => {
                rl.validate(what)?;
                Ok(rl.normalized())
            }
        }
    }

    /// `current` with a PATCH applied: a bucket given replaces the old one (a disabled bucket
    /// removes it), a bucket absent keeps the old one.
    pub(crate) fn patched(
        current: Option<RateLimiter>,
        update: &RateLimiter,
    ) -> Option<RateLimiter> {
        let current = current.unwrap_or_default();
        RateLimiter {
            bandwidth: update.bandwidth.or(current.bandwidth),
            ops: update.ops.or(current.ops),
        }
        .normalized()
    }
}

/// How the block device treats flush requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush is not advertised to the guest.
    #[default]
    Unsafe,
    /// Flush is advertised and performed with `fsync`.
    Writeback,
}

/// The host I/O engine a block device uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking system calls.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// Body of `PUT /drives/{drive_id}`; an entry of the config file's `drives`.
///
/// Stored drives (see [`crate::VmResources::drives`]) always have `path_on_host`,
/// `is_read_only` and `io_engine` set, and no `socket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id of the drive.
    pub drive_id: String,
    /// Unique id of the boot partition; used only for the root device.
    pub partuuid: Option<String>,
    /// Whether the guest mounts this drive as `/`.
    pub is_root_device: bool,
    /// Flush behaviour.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Whether the guest may only read the drive (default false).
    pub is_read_only: Option<bool>,
    /// Host file backing the drive.
    pub path_on_host: Option<String>,
    /// I/O rate limiter.
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine (default `Sync`).
    pub io_engine: Option<IoEngine>,
    /// vhost-user-blk backend socket; not supported by this VMM yet.
    pub socket: Option<String>,
}

impl Drive {
    /// Whether the guest may only read the drive.
    pub fn read_only(&self) -> bool {
        self.is_read_only.unwrap_or(false)
    }

    /// The host file (always present on a stored drive; empty otherwise).
    pub fn path(&self) -> &str {
        self.path_on_host.as_deref().unwrap_or("")
    }

    /// Checks the drive on its own and fills in the defaults Firecracker reports back.
    pub(crate) fn validated(self) -> Result<Drive> {
        validate_id("drive", &self.drive_id)?;
        if self.socket.is_some() {
            return Err(Error::VhostUserNotSupported(self.drive_id));
        }
        match self.path_on_host.as_deref() {
            None => return Err(Error::MissingDrivePath(self.drive_id)),
            Some(path) => non_empty_path("path_on_host", path)?,
        }
        if let Some(partuuid) = &self.partuuid {
            // It becomes one `root=PARTUUID=...` word of the kernel command line.
            if partuuid.is_empty()
                || partuuid
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"')
            {
                return Err(Error::InvalidPartuuid {
                    drive: self.drive_id.clone(),
                    partuuid: partuuid.clone(),
                });
            }
        }
        let rate_limiter = RateLimiter::checked(self.rate_limiter, "rate_limiter")?;
        Ok(Drive {
            is_read_only: Some(self.is_read_only.unwrap_or(false)),
            io_engine: Some(self.io_engine.unwrap_or_default()),
            rate_limiter,
            ..self
        })
    }
}

/// Body of `PATCH /drives/{drive_id}` (after start): a new backing file and/or rate limiter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive to update.
    pub drive_id: String,
    /// New host file.
    pub path_on_host: Option<String>,
    /// New rate limiter buckets.
    pub rate_limiter: Option<RateLimiter>,
}

/// Body of `PUT /network-interfaces/{iface_id}`; an entry of the config file's
/// `network-interfaces`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id of the interface.
    pub iface_id: String,
    /// Host TAP device.
    pub host_dev_name: String,
    /// Guest MAC address; the VMM picks one when absent.
    pub guest_mac: Option<MacAddr>,
    /// Rate limiter for received packets.
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Rate limiter for transmitted packets.
    pub tx_rate_limiter: Option<RateLimiter>,
    /// MTU advertised with `VIRTIO_NET_F_MTU`; not supported by this VMM yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl NetworkInterface {
    /// Checks the interface on its own and normalizes its rate limiters.
    pub(crate) fn validated(self) -> Result<NetworkInterface> {
        validate_id("network interface", &self.iface_id)?;
        let name = &self.host_dev_name;
        if name.is_empty()
            || name.len() > MAX_HOST_DEV_NAME_LEN
            || name
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(Error::InvalidHostDevName(name.clone()));
        }
        if self.mtu.is_some() {
            return Err(Error::MtuNotSupported(self.iface_id));
        }
        let rx_rate_limiter = RateLimiter::checked(self.rx_rate_limiter, "rx_rate_limiter")?;
        let tx_rate_limiter = RateLimiter::checked(self.tx_rate_limiter, "tx_rate_limiter")?;
        Ok(NetworkInterface {
            rx_rate_limiter,
            tx_rate_limiter,
            ..self
        })
    }
}

/// Body of `PATCH /network-interfaces/{iface_id}` (after start): new rate limiters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface to update.
    pub iface_id: String,
    /// New RX buckets.
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New TX buckets.
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// Body of `PUT /vsock`; the config file's `vsock`: a virtio-vsock device whose host side
/// is the Unix socket `uds_path` (Firecracker's hybrid vsock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id: at least 3 (0 to 2 are reserved), below `u32::MAX`.
    pub guest_cid: u32,
    /// Where the host side listens; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: String,
    /// Deprecated in Firecracker and ignored there too; accepted and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// The smallest guest context id (0 to 2 are the hypervisor, local and host).
pub const MIN_GUEST_CID: u32 = 3;

impl Vsock {
    /// Checks the context id and the path.
    pub(crate) fn validated(self) -> Result<Vsock> {
        if self.guest_cid < MIN_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(Error::InvalidGuestCid(self.guest_cid));
        }
        if self.uds_path.is_empty() {
            return Err(Error::EmptyPath("uds_path"));
        }
        Ok(self)
    }
}

/// Body of `PUT /entropy`; the config file's `entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter for the bytes handed to the guest.
    pub rate_limiter: Option<RateLimiter>,
}

impl EntropyDevice {
    /// Checks and normalizes the rate limiter.
    pub(crate) fn validated(self) -> Result<EntropyDevice> {
        Ok(EntropyDevice {
            rate_limiter: RateLimiter::checked(self.rate_limiter, "rate_limiter")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "rootfs", "eth_0", "A1", &"x".repeat(MAX_ID_LEN)] {
            validate_id("drive", good).unwrap();
        }
        assert!(matches!(
            validate_id("drive", ""),
            Err(Error::EmptyId("drive"))
        ));
        for bad in ["a-b", "a b", "a/b", "é", "a.b", &"x".repeat(MAX_ID_LEN + 1)] {
            let err = validate_id("drive", bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidId { kind: "drive", .. }),
                "{bad}: {err}"
            );
            assert!(
                err.to_string().contains("letters, digits or underscores"),
                "{err}"
            );
        }
    }

    #[test]
    fn mac_parsing() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac.bytes(), [0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "06:00:ac:10:00:2",
            "06:00:ac:10:00:0g",
            "06-00-ac-10-00-02",
            "06:00:ac:10:00:+2",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert!(err.to_string().contains("six hex bytes"), "{bad}: {err}");
        }
        let err = "01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err();
        assert!(err.to_string().contains("unicast"), "{err}");
        let err = "00:00:00:00:00:00".parse::<MacAddr>().unwrap_err();
        assert!(err.to_string().contains("all zeros"), "{err}");
        assert!(MacAddr::from_bytes([0xff; 6]).is_err());
    }

    #[test]
    fn mac_serde() {
        let mac: MacAddr = serde_json::from_str("\"aa:bb:cc:dd:ee:f0\"").unwrap();
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"aa:bb:cc:dd:ee:f0\""
        );
        let err = serde_json::from_str::<MacAddr>("\"ab:bb:cc:dd:ee:f0\"").unwrap_err();
        assert!(err.to_string().contains("unicast"), "{err}");
    }

    #[test]
    fn token_buckets() {
        let rl: RateLimiter = serde_json::from_str(
            r#"{"bandwidth": {"size": 5000, "refill_time": 100},
                "ops": {"size": 500, "one_time_burst": 10, "refill_time": 100}}"#,
        )
        .unwrap();
        assert_eq!(rl.bandwidth.unwrap().one_time_burst, None);
        assert_eq!(rl.ops.unwrap().one_time_burst, Some(10));
        // refill_time is required.
        assert!(serde_json::from_str::<RateLimiter>(r#"{"ops": {"size": 100}}"#).is_err());
        assert!(serde_json::from_str::<RateLimiter>(r#"{"iops": {}}"#).is_err());
        assert!(
            serde_json::from_str::<RateLimiter>(r#"{"ops": {"size": -1, "refill_time": 1}}"#)
                .is_err()
        );

        // Zero size or refill time disables a bucket, as in Firecracker.
        let zeros: RateLimiter = serde_json::from_str(
            r#"{"bandwidth": {"size": 0, "one_time_burst": 0, "refill_time": 0},
                "ops": {"size": 10, "refill_time": 0}}"#,
        )
        .unwrap();
        assert_eq!(
            RateLimiter::checked(Some(zeros), "rate_limiter").unwrap(),
            None
        );
        let half = RateLimiter {
            ops: Some(TokenBucket {
                size: 0,
                one_time_burst: None,
                refill_time: 1,
            }),
            ..rl
        };
        assert_eq!(
            RateLimiter::checked(Some(half), "rate_limiter").unwrap(),
            Some(RateLimiter {
                bandwidth: rl.bandwidth,
                ops: None
            })
        );

        let huge = RateLimiter {
            bandwidth: None,
            ops: Some(TokenBucket {
                size: 1,
                one_time_burst: None,
                refill_time: MAX_REFILL_TIME_MS + 1,
            }),
        };
        let err = RateLimiter::checked(Some(huge), "rx_rate_limiter").unwrap_err();
        assert!(err.to_string().contains("rx_rate_limiter.ops"), "{err}");
        assert!(err.to_string().contains("refill_time"), "{err}");
    }

    #[test]
    fn rate_limiter_patch_semantics() {
        let bucket = |size| TokenBucket {
            size,
            one_time_burst: None,
            refill_time: 100,
        };
        let current = Some(RateLimiter {
            bandwidth: Some(bucket(1)),
            ops: Some(bucket(2)),
        });
        // An absent bucket keeps the old one.
        let only_ops = RateLimiter {
            bandwidth: None,
            ops: Some(bucket(3)),
        };
        assert_eq!(
            RateLimiter::patched(current, &only_ops),
            Some(RateLimiter {
                bandwidth: Some(bucket(1)),
                ops: Some(bucket(3))
            })
        );
        // A disabled bucket removes it; removing both leaves no limiter.
        let off = RateLimiter {
            bandwidth: Some(bucket(0)),
            ops: Some(bucket(0)),
        };
        assert_eq!(RateLimiter::patched(current, &off), None);
        assert_eq!(
            RateLimiter::patched(None, &only_ops),
            Some(only_ops),
            "a PATCH can add a limiter"
        );
    }

    fn drive(body: &str) -> Drive {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn drive_defaults_are_filled_in() {
        let d = drive(r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true}"#)
            .validated()
            .unwrap();
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(d.is_read_only, Some(false));
        assert_eq!(d.io_engine, Some(IoEngine::Sync));
        assert!(!d.read_only());
        assert_eq!(d.path(), "/img");
    }

    #[test]
    fn drive_full_openapi_shape() {
        let d = drive(
            r#"{"drive_id": "d1", "partuuid": "0eaa91a0-01", "is_root_device": true,
                "cache_type": "Writeback", "is_read_only": true, "path_on_host": "/img",
                "rate_limiter": {"bandwidth": {"size": 1, "one_time_burst": 2, "refill_time": 3},
                                 "ops": {"size": 4, "refill_time": 5}},
                "io_engine": "Async"}"#,
        )
        .validated()
        .unwrap();
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert_eq!(d.io_engine, Some(IoEngine::Async));
        assert!(d.read_only());
        assert_eq!(d.partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!(d.rate_limiter.unwrap().ops.unwrap().size, 4);
    }

    #[test]
    fn drive_errors() {
        let err = serde_json::from_str::<Drive>(r#"{"drive_id": "a", "path_on_host": "/x"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("is_root_device"), "{err}");
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "readonly": true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "cache_type": "None"}"#
        )
        .is_err());

        let err = drive(r#"{"drive_id": "a", "is_root_device": false, "socket": "/s"}"#)
            .validated()
            .unwrap_err();
        assert!(matches!(err, Error::VhostUserNotSupported(_)), "{err}");
        assert!(err.to_string().contains("vhost-user"), "{err}");
        let err = drive(r#"{"drive_id": "a", "is_root_device": false}"#)
            .validated()
            .unwrap_err();
        assert!(
            matches!(err, Error::MissingDrivePath(ref id) if id == "a"),
            "{err}"
        );
        let err = drive(r#"{"drive_id": "a", "path_on_host": "", "is_root_device": false}"#)
            .validated()
            .unwrap_err();
        assert!(matches!(err, Error::EmptyPath("path_on_host")), "{err}");
        let err = drive(r#"{"drive_id": "a-b", "path_on_host": "/x", "is_root_device": false}"#)
            .validated()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidId { .. }), "{err}");
        for bad in ["", "a b", "a\nb"] {
            let mut d = drive(r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": true}"#);
            d.partuuid = Some(bad.into());
            let err = d.validated().unwrap_err();
            assert!(
                matches!(err, Error::InvalidPartuuid { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn partial_drive_shape() {
        let p: PartialDrive = serde_json::from_str(
            r#"{"drive_id": "a", "path_on_host": "/new",
                "rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        )
        .unwrap();
        assert_eq!(p.path_on_host.as_deref(), Some("/new"));
        let only_id: PartialDrive = serde_json::from_str(r#"{"drive_id": "a"}"#).unwrap();
        assert_eq!(only_id.path_on_host, None);
        // Only the path and the limiter can change after boot.
        assert!(serde_json::from_str::<PartialDrive>(
            r#"{"drive_id": "a", "is_read_only": false}"#
        )
        .is_err());
        assert!(serde_json::from_str::<PartialDrive>(r#"{"path_on_host": "/x"}"#).is_err());
    }

    fn net(body: &str) -> NetworkInterface {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn network_interface_shapes() {
        let n = net(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                "rx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}},
                "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        )
        .validated()
        .unwrap();
        assert_eq!(n.guest_mac.unwrap().bytes()[5], 2);
        assert!(n.rx_rate_limiter.unwrap().bandwidth.is_some());
        let minimal = net(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#);
        assert_eq!(minimal.guest_mac, None);
        assert!(serde_json::from_str::<NetworkInterface>(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "allow_mmds_requests": true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<NetworkInterface>(r#"{"iface_id": "eth0"}"#).is_err());
        let err = serde_json::from_str::<NetworkInterface>(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("guest_mac"), "{err}");
        let p: PartialNetworkInterface = serde_json::from_str(
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        )
        .unwrap();
        assert!(p.tx_rate_limiter.is_none());
        assert!(serde_json::from_str::<PartialNetworkInterface>(
            r#"{"iface_id": "eth0", "host_dev_name": "tap1"}"#
        )
        .is_err());
    }

    #[test]
    fn network_interface_errors() {
        for bad in ["", "0123456789abcdef", "a/b", "a b"] {
            let mut n = net(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#);
            n.host_dev_name = bad.into();
            let err = n.validated().unwrap_err();
            assert!(
                matches!(err, Error::InvalidHostDevName(_)),
                "{bad:?}: {err}"
            );
        }
        let mut n = net(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#);
        n.host_dev_name = "0123456789abcde".into();
        n.clone().validated().unwrap();
        let err = net(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1500}"#)
            .validated()
            .unwrap_err();
        assert!(matches!(err, Error::MtuNotSupported(_)), "{err}");
        let err = net(r#"{"iface_id": "", "host_dev_name": "tap0"}"#)
            .validated()
            .unwrap_err();
        assert!(matches!(err, Error::EmptyId("network interface")), "{err}");
    }

    #[test]
    fn vsock_shape_and_checks() {
        let v: Vsock = serde_json::from_str(r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#).unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path.as_str(), v.vsock_id.as_deref()),
            (3, "/v.sock", None)
        );
        assert_eq!(v.clone().validated().unwrap(), v);
        let with_id: Vsock = serde_json::from_str(
            r#"{"vsock_id": "vsock0", "guest_cid": 52, "uds_path": "/v.sock"}"#,
        )
        .unwrap();
        assert_eq!(with_id.vsock_id.as_deref(), Some("vsock0"));
        for bad in [
            r#"{"guest_cid": 3}"#,
            r#"{"uds_path": "/v"}"#,
            r#"{"guest_cid": -1, "uds_path": "/v"}"#,
            r#"{"guest_cid": 3, "uds_path": "/v", "port": 1}"#,
        ] {
            assert!(serde_json::from_str::<Vsock>(bad).is_err(), "{bad}");
        }
        for cid in [0, 1, 2, u32::MAX] {
            let v = Vsock {
                guest_cid: cid,
                ..v.clone()
            };
            assert!(matches!(v.validated(), Err(Error::InvalidGuestCid(c)) if c == cid));
        }
        let empty = Vsock {
            uds_path: String::new(),
            ..v
        };
        assert!(matches!(
            empty.validated(),
            Err(Error::EmptyPath("uds_path"))
        ));
    }

    #[test]
    fn entropy_shape() {
        let e: EntropyDevice = serde_json::from_str("{}").unwrap();
        assert_eq!(e, EntropyDevice::default());
        let e: EntropyDevice = serde_json::from_str(
            r#"{"rate_limiter": {"bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 100}}}"#,
        )
        .unwrap();
        assert!(e.validated().unwrap().rate_limiter.is_some());
        assert!(serde_json::from_str::<EntropyDevice>(r#"{"device": "/dev/urandom"}"#).is_err());
    }
}
