// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `/machine-config`: vCPUs, memory and the options this VMM refuses for now.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most vCPUs this VMM builds (Firecracker stops at 32; the x86 APIC id space here at 254).
pub const MAX_VCPUS: u8 = 254;
/// Firecracker's default vCPU count.
pub const DEFAULT_VCPU_COUNT: u8 = 1;
/// Firecracker's default guest memory, in MiB.
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;
/// Largest `mem_size_mib` whose byte count fits in a `u64`.
pub const MAX_MEM_SIZE_MIB: usize = (u64::MAX >> 20) as usize;

/// Firecracker's static CPU templates. Only `None` is accepted here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Intel C3 instance features.
    C3,
    /// Intel T2 instance features.
    T2,
    /// T2 with SPR-safe features.
    T2S,
    /// T2 for Cascade Lake.
    T2CL,
    /// T2 for AMD.
    T2A,
    /// Graviton 2 (aarch64).
    V1N1,
    /// No template: the host's CPUID, filtered.
    None,
}

/// How guest memory is backed. Only `None` (4 KiB pages) is accepted here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Regular 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for HugePages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HugePages::None => f.write_str("None"),
            HugePages::Transparent => f.write_str("Transparent"),
            HugePages::Hugetlbfs2M => f.write_str("2M"),
        }
    }
}

/// Body of `PUT /machine-config` and of `GET /machine-config`; the `machine-config` section
/// of a config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading: two vCPUs per core.
    #[serde(default)]
    pub smt: bool,
    /// Deprecated in Firecracker; only `None` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Guest memory backing; only `None` is accepted.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB, no SMT, no template, no tracking, 4 KiB pages.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// Body of `PATCH /machine-config`: every field optional, at least one given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// New memory size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    /// New SMT setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// New CPU template (only `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// New dirty page tracking setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// New memory backing (only `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// Whether the update names no field at all.
    pub fn is_empty(&self) -> bool {
        self == &MachineConfigUpdate::default()
    }
}

impl From<MachineConfig> for MachineConfigUpdate {
    /// A PUT is an update of every field (Firecracker keeps an absent `cpu_template`).
    fn from(cfg: MachineConfig) -> Self {
        MachineConfigUpdate {
            vcpu_count: Some(cfg.vcpu_count),
            mem_size_mib: Some(cfg.mem_size_mib),
            smt: Some(cfg.smt),
            cpu_template: cfg.cpu_template,
            track_dirty_pages: Some(cfg.track_dirty_pages),
            huge_pages: Some(cfg.huge_pages),
        }
    }
}

impl MachineConfig {
    /// This configuration with `update` applied, or why the result would be invalid. All
    /// fields are checked together, so a rejected update changes nothing.
    pub fn updated(&self, update: &MachineConfigUpdate) -> Result<MachineConfig> {
        let vcpu_count = update.vcpu_count.unwrap_or(self.vcpu_count);
        let smt = update.smt.unwrap_or(self.smt);
        if vcpu_count == 0
            || vcpu_count > MAX_VCPUS
            || (smt && vcpu_count > 1 && vcpu_count % 2 == 1)
        {
            return Err(Error::InvalidVcpuCount {
                count: vcpu_count,
                smt,
            });
        }
        let mem_size_mib = update.mem_size_mib.unwrap_or(self.mem_size_mib);
        if mem_size_mib == 0 || mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(Error::InvalidMemorySize(mem_size_mib));
        }
        match update.cpu_template {
            None | Some(CpuTemplate::None) => {}
            Some(other) => return Err(Error::CpuTemplateNotSupported(other.to_string())),
        }
        let huge_pages = update.huge_pages.unwrap_or(self.huge_pages);
        if huge_pages != HugePages::None {
            return Err(Error::HugePagesNotSupported(huge_pages.to_string()));
        }
        Ok(MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt,
            // `None` and absent both mean "no template", which is all we support.
            cpu_template: None,
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(body: &str) -> MachineConfigUpdate {
        MachineConfigUpdate::from(serde_json::from_str::<MachineConfig>(body).unwrap())
    }

    #[test]
    fn defaults_match_firecracker() {
        let d = MachineConfig::default();
        assert_eq!((d.vcpu_count, d.mem_size_mib), (1, 128));
        assert!(!d.smt && !d.track_dirty_pages);
        assert_eq!(d.cpu_template, None);
        assert_eq!(d.huge_pages, HugePages::None);
    }

    #[test]
    fn optional_fields_default_when_absent() {
        let cfg: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
        assert_eq!(
            cfg,
            MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..MachineConfig::default()
            }
        );
    }

    #[test]
    fn full_openapi_shape_parses() {
        let cfg: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": true, "cpu_template": "None",
                "track_dirty_pages": true, "huge_pages": "None"}"#,
        )
        .unwrap();
        assert!(cfg.smt && cfg.track_dirty_pages);
        assert_eq!(cfg.cpu_template, Some(CpuTemplate::None));
        for (text, value) in [
            ("\"2M\"", HugePages::Hugetlbfs2M),
            ("\"Transparent\"", HugePages::Transparent),
        ] {
            assert_eq!(serde_json::from_str::<HugePages>(text).unwrap(), value);
        }
    }

    #[test]
    fn required_and_unknown_fields() {
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 2}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(r#"{"mem_size_mib": 2}"#).is_err());
        let unknown = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 2, "mem_size_mib": 2, "ht_enabled": true}"#,
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("ht_enabled"), "{unknown}");
        assert!(
            serde_json::from_str::<MachineConfigUpdate>(r#"{"vcpus": 2}"#).is_err(),
            "PATCH rejects unknown fields too"
        );
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 2, "mem_size_mib": 2, "huge_pages": "7M"}"#
        )
        .is_err());
    }

    #[test]
    fn serialization_skips_an_absent_template() {
        let text = serde_json::to_string(&MachineConfig::default()).unwrap();
        assert_eq!(
            text,
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#
        );
    }

    #[test]
    fn vcpu_range_is_ours() {
        let base = MachineConfig::default();
        assert_eq!(
            base.updated(&put(r#"{"vcpu_count": 254, "mem_size_mib": 128}"#))
                .unwrap()
                .vcpu_count,
            254
        );
        // 33 is over Firecracker's limit but within ours.
        assert!(base
            .updated(&put(r#"{"vcpu_count": 33, "mem_size_mib": 128}"#))
            .is_ok());
        for count in [0, 255] {
            let err = base
                .updated(&MachineConfigUpdate {
                    vcpu_count: Some(count),
                    ..Default::default()
                })
                .unwrap_err();
            assert!(
                matches!(err, Error::InvalidVcpuCount { count: c, .. } if c == count),
                "{err}"
            );
            assert!(err.to_string().contains("1 to 254"), "{err}");
        }
    }

    #[test]
    fn smt_needs_one_or_an_even_count() {
        let base = MachineConfig::default();
        for (count, ok) in [(1, true), (2, true), (3, false), (4, true), (253, false)] {
            let r = base.updated(&MachineConfigUpdate {
                vcpu_count: Some(count),
                smt: Some(true),
                ..Default::default()
            });
            assert_eq!(r.is_ok(), ok, "count {count}");
        }
        // Turning SMT on later is checked against the current count.
        let three = base
            .updated(&MachineConfigUpdate {
                vcpu_count: Some(3),
                ..Default::default()
            })
            .unwrap();
        let err = three
            .updated(&MachineConfigUpdate {
                smt: Some(true),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidVcpuCount {
                    count: 3,
                    smt: true
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn memory_must_be_positive_and_addressable() {
        let base = MachineConfig::default();
        for mib in [0, MAX_MEM_SIZE_MIB + 1] {
            let err = base
                .updated(&MachineConfigUpdate {
                    mem_size_mib: Some(mib),
                    ..Default::default()
                })
                .unwrap_err();
            assert!(
                matches!(err, Error::InvalidMemorySize(m) if m == mib),
                "{err}"
            );
        }
        assert_eq!(
            base.updated(&MachineConfigUpdate {
                mem_size_mib: Some(1),
                ..Default::default()
            })
            .unwrap()
            .mem_size_mib,
            1
        );
    }

    #[test]
    fn templates_and_huge_pages_other_than_none_are_refused() {
        let base = MachineConfig::default();
        let err = base
            .updated(&put(
                r#"{"vcpu_count": 2, "mem_size_mib": 128, "cpu_template": "T2"}"#,
            ))
            .unwrap_err();
        assert!(
            matches!(err, Error::CpuTemplateNotSupported(ref t) if t == "T2"),
            "{err}"
        );
        assert!(err.to_string().contains("not supported"), "{err}");
        let err = base
            .updated(&put(
                r#"{"vcpu_count": 2, "mem_size_mib": 128, "huge_pages": "2M"}"#,
            ))
            .unwrap_err();
        assert!(
            err.to_string().contains("huge_pages 2M is not supported"),
            "{err}"
        );
        let ok = base
            .updated(&put(
                r#"{"vcpu_count": 2, "mem_size_mib": 128, "cpu_template": "None", "huge_pages": "None"}"#,
            ))
            .unwrap();
        assert_eq!(ok.cpu_template, None, "None is stored as no template");
    }

    #[test]
    fn a_failed_update_changes_nothing_and_patch_keeps_other_fields() {
        let base = MachineConfig::default()
            .updated(&put(
                r#"{"vcpu_count": 4, "mem_size_mib": 512, "track_dirty_pages": true}"#,
            ))
            .unwrap();
        let patched = base
            .updated(&MachineConfigUpdate {
                mem_size_mib: Some(1024),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (
                patched.vcpu_count,
                patched.mem_size_mib,
                patched.track_dirty_pages
            ),
            (4, 1024, true)
        );
        // A PUT resets the optional fields to their defaults.
        let reput = patched
            .updated(&put(r#"{"vcpu_count": 4, "mem_size_mib": 512}"#))
            .unwrap();
        assert!(!reput.track_dirty_pages);
        assert!(MachineConfigUpdate::default().is_empty());
        assert!(!put(r#"{"vcpu_count": 1, "mem_size_mib": 1}"#).is_empty());
    }
}
