// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The bodies of `PUT /snapshot/create` and `PUT /snapshot/load`, as Firecracker's
//! OpenAPI file (1.17) defines them, and their checks.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Full or diff (`snapshot_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot.
    Diff,
}

/// Body of `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// Where the microVM state goes.
    pub snapshot_path: String,
    /// Full (the default) or diff.
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
}

impl SnapshotCreateParams {
    /// Checks the paths are there.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSnapshotParams`] naming an empty path.
    pub fn validate(&self) -> Result<()> {
        if self.snapshot_path.is_empty() || self.mem_file_path.is_empty() {
            return Err(Error::InvalidSnapshotParams(
                "snapshot_path and mem_file_path may not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// How guest memory is loaded (`mem_backend.backend_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Mapped from a file.
    File,
    /// Served by a user-space page-fault handler over userfaultfd.
    Uffd,
}

/// `mem_backend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the Unix socket of the page-fault handler.
    pub backend_path: String,
}

/// One `network_overrides` entry: an interface moved to another TAP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as it was configured.
    pub iface_id: String,
    /// The TAP to use now.
    pub host_dev_name: String,
}

/// `vsock_override`: the vsock device's Unix socket somewhere else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new socket path.
    pub uds_path: String,
}

/// Body of `PUT /snapshot/load`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The microVM state.
    pub snapshot_path: String,
    /// Deprecated: the memory file (only without `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// How memory is loaded (only without `mem_file_path`).
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages for later diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Resume the microVM once loaded (otherwise it stays paused).
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// Interfaces moved to other TAPs.
    #[serde(default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// The vsock device's socket somewhere else.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot (`KVM_CLOCK_REALTIME`);
    /// otherwise it goes on from its saved value.
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

impl SnapshotLoadParams {
    /// The memory file: `mem_backend`'s File path or `mem_file_path`, exactly one of them.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSnapshotParams`] with both, neither, or an empty path;
    /// [`Error::UffdNotSupported`] for a Uffd backend.
    pub fn mem_file(&self) -> Result<&str> {
        let path = match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidSnapshotParams(
                    "either mem_backend or mem_file_path may be given, not both".into(),
                ))
            }
            (None, None) => {
                return Err(Error::InvalidSnapshotParams(
                    "mem_backend or mem_file_path is needed".into(),
                ))
            }
            (Some(p), None) => p.as_str(),
            (None, Some(b)) => match b.backend_type {
                MemoryBackendType::File => b.backend_path.as_str(),
                MemoryBackendType::Uffd => return Err(Error::UffdNotSupported),
            },
        };
        if path.is_empty() || self.snapshot_path.is_empty() {
            return Err(Error::InvalidSnapshotParams(
                "snapshot_path and the memory file path may not be empty".into(),
            ));
        }
        Ok(path)
    }

    /// Whether dirty pages are tracked after the load (either spelling).
    pub fn track_dirty_pages(&self) -> bool {
        self.track_dirty_pages
            .or(self.enable_diff_snapshots)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_shapes_parse_and_their_rules_hold() {
        let create: SnapshotCreateParams = serde_json::from_str(
            r#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        )
        .unwrap();
        assert_eq!(create.snapshot_type, Some(SnapshotType::Diff));
        create.validate().unwrap();
        let empty: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path": "", "mem_file_path": "/m"}"#).unwrap();
        assert!(empty.validate().is_err());
        assert!(serde_json::from_str::<SnapshotCreateParams>(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "version": "1.0"}"#
        )
        .is_err());

        let load: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File",
                "backend_path": "/m"}, "track_dirty_pages": true, "resume_vm": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                "vsock_override": {"uds_path": "/v"}, "clock_realtime": true}"#,
        )
        .unwrap();
        assert_eq!(load.mem_file().unwrap(), "/m");
        assert!(load.track_dirty_pages());
        assert_eq!(
            load.network_overrides.as_ref().unwrap()[0].host_dev_name,
            "tap9"
        );

        let old: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
        )
        .unwrap();
        assert_eq!(old.mem_file().unwrap(), "/m");
        assert!(old.track_dirty_pages());

        let both = SnapshotLoadParams {
            mem_file_path: Some("/m".into()),
            ..load.clone()
        };
        assert!(matches!(
            both.mem_file(),
            Err(Error::InvalidSnapshotParams(_))
        ));
        let neither = SnapshotLoadParams {
            mem_backend: None,
            ..load.clone()
        };
        assert!(matches!(
            neither.mem_file(),
            Err(Error::InvalidSnapshotParams(_))
        ));
        let uffd = SnapshotLoadParams {
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/sock".into(),
            }),
            ..load
        };
        assert!(matches!(uffd.mem_file(), Err(Error::UffdNotSupported)));
    }
}
