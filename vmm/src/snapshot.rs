//! Snapshots of a paused VM, and the VM configuration a restore rebuilds.
//!
//! A snapshot is written on the event loop while the vCPUs are parked ([`crate::pause`]): each
//! parked vCPU thread saves its own state ([`crate::vcpu::VcpuMonitor::request_save`]),
//! the loop saves the VM's in-kernel devices and clock, the UART, the CMOS and every
//! virtio transport (each disk first completes what it has in flight and takes no more,
//! each worker is paused), then writes guest RAM to the memory file
//! ([`tvm_memory::save_memory`]) and the state to the state file ([`tvm_snapshot`]'s
//! format). Both files were opened by whoever asked (the event loop opens nothing).
//!
//! [`load`] reads and checks a state file and opens its memory file; [`restore_config`]
//! turns the snapshot into the [`VmConfig`] that [`crate::Vmm::restore`] builds, with the
//! network interfaces a caller moves to other TAPs.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::info;
use tvm_snapshot::{Snapshot, SnapshotType, VirtioKind};
use tvm_virtio_blk::{CacheMode, IoEngine};

use crate::config::{DiskConfig, NetConfig, VmConfig, VsockOptions};
use crate::{Error, Result};

/// How long a snapshot waits for each parked vCPU thread to save its state.
pub const VCPU_SAVE_GRACE: Duration = Duration::from_secs(2);

/// Where a snapshot goes: its two files, opened for writing by whoever asked.
pub struct SnapshotFiles {
    /// The state file (truncated and written).
    pub state: File,
    /// The memory file (truncated and written, sparsely).
    pub mem: File,
    /// Full or diff.
    pub kind: SnapshotType,
}

impl std::fmt::Debug for SnapshotFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::fd::AsRawFd;
        // std's File looks its path up in /proc, which the API thread may not do.
        write!(
            f,
            "SnapshotFiles(state fd {}, mem fd {}, {:?})",
            self.state.as_raw_fd(),
            self.mem.as_raw_fd(),
            self.kind
        )
    }
}

/// Creates (or truncates) the two files of a snapshot, for writing. The memory file is
/// opened for reading too: a restore maps it.
///
/// # Errors
///
/// [`Error::OpenFile`] naming the file that could not be opened.
pub fn open_files(state: &Path, mem: &Path, kind: SnapshotType) -> Result<SnapshotFiles> {
    let open = |what, path: &Path| {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::OpenFile {
                what,
                path: path.to_path_buf(),
                source,
            })
    };
    Ok(SnapshotFiles {
        state: open("snapshot file", state)?,
        mem: open("snapshot memory file", mem)?,
        kind,
    })
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of page data in the memory file (the rest is holes).
    pub mem_bytes: u64,
    /// Pausing excluded, from the first vCPU asked to the state file written.
    pub took: Duration,
}

/// Writes `snapshot` as the state file into `file` (truncated first).
pub(crate) fn write_state(file: &File, snapshot: &Snapshot) -> std::result::Result<u64, String> {
    let bytes = tvm_snapshot::encode(snapshot).map_err(|e| crate::error_chain(&e))?;
    file.set_len(0)
        .and_then(|()| file.write_all_at(&bytes, 0))
        .and_then(|()| (&*file).flush())
        .map_err(|e| format!("failed to write the snapshot file: {e}"))?;
    Ok(bytes.len() as u64)
}

/// A loaded snapshot and its memory file, ready for [`crate::Vmm::restore`].
pub struct Restore {
    /// The checked state.
    pub snapshot: Snapshot,
    /// The memory file, mapped privately at restore.
    pub mem: File,
    /// Whether kvmclock goes on by the wall-clock time since the snapshot
    /// (`KVM_CLOCK_REALTIME`) rather than from its saved value.
    pub clock_realtime: bool,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("machine", &self.snapshot.machine)
            .finish_non_exhaustive()
    }
}

/// Reads and checks the state file at `state` and opens the memory file at `mem`.
///
/// # Errors
///
/// [`Error::OpenFile`] for a file that cannot be opened or read, [`Error::Snapshot`] for a
/// state file that is not a snapshot this VMM can restore (damaged, truncated, another
/// format version, inconsistent).
pub fn load(state: &Path, mem: &Path) -> Result<Restore> {
    let open_err = |source| Error::OpenFile {
        what: "snapshot file",
        path: state.to_path_buf(),
        source,
    };
    // A state file is never larger than its header and the largest payload: a larger
    // file is refused before it is read into memory.
    let file = File::open(state).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    let limit = tvm_snapshot::HEADER_LEN as u64 + tvm_snapshot::MAX_PAYLOAD;
    if len > limit {
        return Err(Error::Snapshot {
            path: state.to_path_buf(),
            source: tvm_snapshot::Error::TooLarge(len),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // Through `take`: bounded even if the file grows meanwhile, and plain reads (std's
    // read_to_end on a File asks lseek for its position, which the API thread's seccomp
    // filter does not allow).
    std::io::Read::read_to_end(&mut std::io::Read::take(&file, limit + 1), &mut bytes)
        .map_err(open_err)?;
    let snapshot = tvm_snapshot::decode(&bytes).map_err(|source| Error::Snapshot {
        path: state.to_path_buf(),
        source,
    })?;
    let mem = File::open(mem).map_err(|source| Error::OpenFile {
        what: "snapshot memory file",
        path: mem.to_path_buf(),
        source,
    })?;
    Ok(Restore {
        snapshot,
        mem,
        clock_realtime: false,
    })
}

/// A network interface a restore moves to another TAP (Firecracker's
/// `network_overrides`): by index in the snapshot's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOverride {
    /// The interface, in the order the guest sees them (eth0 is 0).
    pub index: usize,
    /// The TAP to use instead.
    pub tap: String,
}

/// The configuration a restore of `snapshot` builds: the saved machine and devices, with
/// `overrides` applied. The kernel fields stay empty (nothing is loaded).
///
/// # Errors
///
/// [`Error::InvalidSnapshotConfig`] for an override naming an interface the snapshot does
/// not have, or a saved device setting this VMM does not know.
pub fn restore_config(
    snapshot: &Snapshot,
    overrides: &[NetOverride],
    vsock_uds: Option<&Path>,
    seccomp: crate::seccomp::SeccompLevel,
) -> Result<VmConfig> {
    let m = &snapshot.machine;
    let cpus = tvm_arch_x86::CpuTopology::new(m.threads_per_core, m.cores_per_socket, m.sockets)
        .map_err(|e| Error::InvalidSnapshotConfig(format!("topology: {e}")))?;
    let mut cfg = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        mem_size: m.mem_size,
        cpus,
        disks: Vec::new(),
        nets: Vec::new(),
        rng: false,
        vsock: None,
        seccomp,
        system_map: None,
        track_dirty_pages: false,
    };
    let mut kinds_in_order = Vec::new();
    for d in &snapshot.devices.virtio {
        let rank = match &d.kind {
            VirtioKind::Block {
                path,
                read_only,
                id,
                cache,
                io_engine,
                num_queues,
                name,
            } => {
                cfg.disks.push(DiskConfig {
                    path: path.clone(),
                    read_only: *read_only,
                    id: id.clone(),
                    cache: parse_cache(cache)?,
                    num_queues: *num_queues,
                    engine: parse_engine(io_engine)?,
                    name: name.clone(),
                });
                0
            }
            VirtioKind::Net { tap, mac, name } => {
                cfg.nets.push(NetConfig {
                    tap: tap.clone(),
                    mac: Some(*mac),
                    name: name.clone(),
                });
                1
            }
            VirtioKind::Rng => {
                if cfg.rng {
                    return Err(Error::InvalidSnapshotConfig("two entropy devices".into()));
                }
                cfg.rng = true;
                2
            }
            VirtioKind::Vsock { cid, uds } => {
                if cfg.vsock.is_some() {
                    return Err(Error::InvalidSnapshotConfig("two vsock devices".into()));
                }
                let cid = u32::try_from(*cid)
                    .map_err(|_| Error::InvalidSnapshotConfig(format!("vsock cid {cid}")))?;
                cfg.vsock = Some(VsockOptions {
                    cid,
                    uds: uds.clone(),
                });
                3
            }
        };
        kinds_in_order.push(rank);
    }
    // The VMM puts disks, then interfaces, then the entropy device, then vsock on the bus.
    if kinds_in_order.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::InvalidSnapshotConfig(
            "the virtio devices are not in the order this vmm places them".into(),
        ));
    }
    for o in overrides {
        let net = cfg.nets.get_mut(o.index).ok_or_else(|| {
            Error::InvalidSnapshotConfig(format!(
                "network override for interface {}: the snapshot has {} interface(s)",
                o.index,
                snapshot
                    .devices
                    .virtio
                    .iter()
                    .filter(|d| matches!(d.kind, VirtioKind::Net { .. }))
                    .count()
            ))
        })?;
        tvm_virtio_net::validate_tap_name(&o.tap)
            .map_err(|e| Error::InvalidSnapshotConfig(format!("network override: {e}")))?;
        net.tap = o.tap.clone();
    }
    if let Some(uds) = vsock_uds {
        let vsock = cfg.vsock.as_mut().ok_or_else(|| {
            Error::InvalidSnapshotConfig("a vsock override, but the snapshot has no vsock".into())
        })?;
        vsock.uds = uds.to_path_buf();
    }
    Ok(cfg)
}

fn parse_cache(text: &str) -> Result<CacheMode> {
    match text {
        "writeback" => Ok(CacheMode::Writeback),
        "none" => Ok(CacheMode::None),
        other => Err(Error::InvalidSnapshotConfig(format!(
            "disk cache mode {other:?}"
        ))),
    }
}

fn parse_engine(text: &str) -> Result<IoEngine> {
    match text {
        "auto" => Ok(IoEngine::Auto),
        "io_uring" => Ok(IoEngine::Uring),
        "sync" => Ok(IoEngine::Sync),
        other => Err(Error::InvalidSnapshotConfig(format!(
            "disk io engine {other:?}"
        ))),
    }
}

/// The saved form of a disk's cache mode.
pub(crate) fn cache_name(c: CacheMode) -> &'static str {
    match c {
        CacheMode::Writeback => "writeback",
        CacheMode::None => "none",
    }
}

/// The saved form of a disk's engine.
pub(crate) fn engine_name(e: IoEngine) -> &'static str {
    match e {
        IoEngine::Auto => "auto",
        IoEngine::Uring => "io_uring",
        IoEngine::Sync => "sync",
    }
}

/// The device kinds of `cfg` in the order the VMM puts them on the bus: `disk_queues` is
/// each disk's queue count as built (`num_queues=0` means one per vCPU), `macs` each
/// interface's MAC (generated when not given).
pub(crate) fn virtio_kinds(
    cfg: &VmConfig,
    disk_queues: &[u16],
    macs: &[[u8; 6]],
) -> Vec<VirtioKind> {
    let mut kinds = Vec::new();
    for (d, &num_queues) in cfg.disks.iter().zip(disk_queues) {
        kinds.push(VirtioKind::Block {
            path: d.path.clone(),
            read_only: d.read_only,
            id: d.id.clone(),
            cache: cache_name(d.cache).into(),
            io_engine: engine_name(d.engine).into(),
            num_queues,
            name: d.name.clone(),
        });
    }
    for (n, mac) in cfg.nets.iter().zip(macs) {
        kinds.push(VirtioKind::Net {
            tap: n.tap.clone(),
            mac: *mac,
            name: n.name.clone(),
        });
    }
    if cfg.rng {
        kinds.push(VirtioKind::Rng);
    }
    if let Some(v) = &cfg.vsock {
        kinds.push(VirtioKind::Vsock {
            cid: u64::from(v.cid),
            uds: v.uds.clone(),
        });
    }
    kinds
}

/// Logs what a snapshot wrote.
pub(crate) fn log_written(w: &Written, kind: SnapshotType, started: Instant) {
    info!(
        "snapshot ({kind:?}) written in {:?} ({:?} with the pause): state {} bytes, memory {} \
         bytes of page data",
        w.took,
        started.elapsed(),
        w.state_bytes,
        w.mem_bytes
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::SeccompLevel;

    fn with_devices(kinds: Vec<VirtioKind>) -> Snapshot {
        let mut s = Snapshot::example();
        let transport = s.devices.virtio[0].transport.clone();
        s.devices.virtio = kinds
            .into_iter()
            .map(|kind| tvm_snapshot::VirtioState {
                kind,
                transport: transport.clone(),
            })
            .collect();
        s
    }

    fn net(tap: &str) -> VirtioKind {
        VirtioKind::Net {
            tap: tap.into(),
            mac: [2, 0, 0, 0, 0, 1],
            name: Some(tap.replace("tap", "eth")),
        }
    }

    #[test]
    fn a_restore_rebuilds_the_saved_devices_and_moves_interfaces_to_other_taps() {
        let s = with_devices(vec![
            Snapshot::example().devices.virtio[0].kind.clone(),
            net("tap0"),
            net("tap1"),
            VirtioKind::Rng,
        ]);
        let cfg = restore_config(
            &s,
            &[NetOverride {
                index: 1,
                tap: "other7".into(),
            }],
            None,
            SeccompLevel::On,
        )
        .unwrap();
        assert_eq!(cfg.mem_size, 16 << 20);
        assert_eq!(cfg.cpus.cpu_count(), 1);
        assert_eq!(cfg.disks.len(), 1);
        assert_eq!(cfg.disks[0].path, PathBuf::from("/tmp/disk.img"));
        assert_eq!(
            cfg.nets.iter().map(|n| n.tap.as_str()).collect::<Vec<_>>(),
            ["tap0", "other7"]
        );
        assert_eq!(cfg.nets[0].mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(cfg.rng);
        // The saved kinds come back from the configuration.
        let macs: Vec<_> = cfg.nets.iter().map(|n| n.mac.unwrap()).collect();
        let kinds = virtio_kinds(&cfg, &[1], &macs);
        assert_eq!(kinds[0], s.devices.virtio[0].kind);
        assert_eq!(kinds[3], VirtioKind::Rng);
    }

    #[test]
    fn overrides_and_saved_settings_this_vmm_cannot_honour_are_refused() {
        let s = with_devices(vec![net("tap0")]);
        let e = restore_config(
            &s,
            &[NetOverride {
                index: 1,
                tap: "x".into(),
            }],
            None,
            SeccompLevel::On,
        )
        .unwrap_err();
        assert!(e.to_string().contains("1 interface(s)"), "{e}");
        let e = restore_config(
            &s,
            &[NetOverride {
                index: 0,
                tap: "a/b".into(),
            }],
            None,
            SeccompLevel::On,
        )
        .unwrap_err();
        assert!(e.to_string().contains("network override"), "{e}");
        let s = with_devices(vec![
            net("tap0"),
            Snapshot::example().devices.virtio[0].kind.clone(),
        ]);
        assert!(restore_config(&s, &[], None, SeccompLevel::On).is_err());
        let mut bad_cache = Snapshot::example();
        if let VirtioKind::Block { cache, .. } = &mut bad_cache.devices.virtio[0].kind {
            *cache = "directsync".into();
        }
        let e = restore_config(&bad_cache, &[], None, SeccompLevel::On).unwrap_err();
        assert!(e.to_string().contains("directsync"), "{e}");
    }
}
