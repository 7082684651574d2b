//! What the user asked for: the VM configuration and its validation.

use std::path::PathBuf;

use tvm_arch_x86::CpuTopology;
use tvm_virtio_blk::{CacheMode, IoEngine, MAX_QUEUES};

use crate::{Error, Result};

/// The default kernel command line: serial console, reset through the keyboard controller
/// (which the VMM turns into a clean exit), reboot on panic, PCI through 0xCF8/0xCFC.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=conf1";
/// Default guest memory (the arch layout's: 1 GiB).
pub const DEFAULT_MEM_SIZE: u64 = tvm_arch_x86::layout::DEFAULT_MEM_SIZE;

/// A `--disk` option: `PATH[,readonly=on|off][,id=STRING][,cache=writeback|none]
/// [,num_queues=N][,io_engine=auto|io_uring|sync]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// The serial the guest reads with GET_ID (at most 20 bytes).
    pub id: Option<String>,
    /// The host cache mode.
    pub cache: CacheMode,
    /// Request queues; 0: one per vCPU.
    pub num_queues: u16,
    /// The I/O engine.
    pub engine: IoEngine,
    /// The API's name for it (Firecracker's `drive_id`), kept in snapshots.
    pub name: Option<String>,
}

/// Longest virtio-blk id (VIRTIO_BLK_ID_BYTES).
pub const DISK_ID_MAX_BYTES: usize = 20;

/// Parses a `--disk` value.
pub fn parse_disk(text: &str) -> Result<DiskConfig> {
    let bad = |why: String| Error::InvalidDisk {
        value: text.to_string(),
        why,
    };
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or("");
    if path.is_empty() {
        return Err(bad("the path is empty".into()));
    }
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        ..DiskConfig::default()
    };
    for part in parts {
        let (key, value) = key_value(part).map_err(bad)?;
        match key {
            "readonly" => {
                disk.read_only = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad(format!("readonly={value:?}: use on or off"))),
                }
            }
            "id" => {
                if value.is_empty() || value.len() > DISK_ID_MAX_BYTES || !value.is_ascii() {
                    return Err(bad(format!(
                        "id={value:?}: 1 to {DISK_ID_MAX_BYTES} ASCII characters"
                    )));
                }
                disk.id = Some(value.to_string());
            }
            "cache" => {
                disk.cache = match value {
                    "writeback" => CacheMode::Writeback,
                    "none" => CacheMode::None,
                    _ => return Err(bad(format!("cache={value:?}: use writeback or none"))),
                }
            }
            "num_queues" => {
                disk.num_queues = match value.parse::<u16>() {
                    Ok(n) if (1..=MAX_QUEUES).contains(&n) => n,
                    _ => {
                        return Err(bad(format!(
                            "num_queues={value:?}: a number from 1 to {MAX_QUEUES}"
                        )))
                    }
                }
            }
            "io_engine" => {
                disk.engine = match value {
                    "auto" => IoEngine::Auto,
                    "io_uring" => IoEngine::Uring,
                    "sync" => IoEngine::Sync,
                    _ => {
                        return Err(bad(format!(
                            "io_engine={value:?}: use auto, io_uring or sync"
                        )))
                    }
                }
            }
            other => return Err(bad(format!("unknown option {other:?}"))),
        }
    }
    Ok(disk)
}

/// Splits one `key=value` item of an option list.
fn key_value(part: &str) -> std::result::Result<(&str, &str), String> {
    part.split_once('=')
        .ok_or_else(|| format!("{part:?} is not key=value"))
}

/// Parses a `--cpus` value: `N[,threads=T][,cores=C][,sockets=S]`.
///
/// Threads and sockets default to 1 and cores to what is left (`N / (T x S)`), so `--cpus
/// 4` is four single-threaded cores on one socket; the product must be N.
pub fn parse_cpus(text: &str) -> Result<CpuTopology> {
    let bad = |why: String| Error::InvalidCpus {
        value: text.to_string(),
        why,
    };
    let mut parts = text.split(',');
    let first = parts.next().unwrap_or("").trim();
    let n: u32 = first
        .parse()
        .map_err(|_| bad(format!("{first:?} is not a number of vcpus")))?;
    if n == 0 || n > tvm_arch_x86::MAX_XAPIC_ID {
        return Err(bad(format!("{n} vcpus")));
    }
    let (mut threads, mut cores, mut sockets) = (None, None, None);
    for part in parts {
        let (key, value) = key_value(part).map_err(bad)?;
        let slot = match key {
            "threads" => &mut threads,
            "cores" => &mut cores,
            "sockets" => &mut sockets,
            other => return Err(bad(format!("unknown option {other:?}"))),
        };
        if slot.is_some() {
            return Err(bad(format!("{key} is given twice")));
        }
        let count: u32 = value
            .parse()
            .ok()
            .filter(|c| (1..=n).contains(c))
            .ok_or_else(|| bad(format!("{key}={value:?}: use a number from 1 to {n}")))?;
        *slot = Some(count);
    }
    let threads = threads.unwrap_or(1);
    let sockets = sockets.unwrap_or(1);
    let cores = match cores {
        Some(c) => c,
        None if n % (threads * sockets) == 0 => n / (threads * sockets),
        None => {
            return Err(bad(format!(
                "{n} vcpus are not a multiple of threads={threads} x sockets={sockets}"
            )))
        }
    };
    if threads * cores * sockets != n {
        return Err(bad(format!(
            "threads={threads} x cores={cores} x sockets={sockets} is {}, not {n}",
            threads * cores * sockets
        )));
    }
    // Each count is at most n <= 254 here.
    CpuTopology::new(threads as u8, cores as u8, sockets as u8).map_err(|e| bad(e.to_string()))
}

/// A `--net` option: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface: attached if it exists, created otherwise.
    pub tap: String,
    /// The guest's MAC address; generated from the TAP name when absent.
    pub mac: Option<[u8; 6]>,
    /// The API's name for it (Firecracker's `iface_id`), kept in snapshots.
    pub name: Option<String>,
}

/// Parses a `--net` value.
pub fn parse_net(text: &str) -> Result<NetConfig> {
    let bad = |why: String| Error::InvalidNet {
        value: text.to_string(),
        why,
    };
    let mut tap = None;
    let mut mac = None;
    for part in text.split(',') {
        let (key, value) = key_value(part).map_err(bad)?;
        match key {
            "tap" => {
                tvm_virtio_net::validate_tap_name(value).map_err(|e| bad(e.to_string()))?;
                tap = Some(value.to_string());
            }
            "mac" => {
                mac = Some(tvm_virtio_net::parse_mac(value).map_err(|e| bad(e.to_string()))?);
            }
            other => return Err(bad(format!("unknown option {other:?}"))),
        }
    }
    let tap = tap.ok_or_else(|| bad("tap=NAME is missing".into()))?;
    Ok(NetConfig {
        tap,
        mac,
        name: None,
    })
}

/// A `--vsock` option: `cid=N,uds=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockOptions {
    /// The guest's context id (3 to 2^32 - 2).
    pub cid: u32,
    /// Where the host side listens; a guest connection to port P goes to `PATH_P`.
    pub uds: PathBuf,
}

/// Parses a `--vsock` value.
pub fn parse_vsock(text: &str) -> Result<VsockOptions> {
    let bad = |why: String| Error::InvalidVsock {
        value: text.to_string(),
        why,
    };
    let (mut cid, mut uds) = (None, None);
    for part in text.split(',') {
        let (key, value) = key_value(part).map_err(bad)?;
        match key {
            "cid" if cid.is_none() => {
                cid = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|c| (3..u32::MAX).contains(c))
                        .ok_or_else(|| bad(format!("cid={value:?}: use 3 to {}", u32::MAX - 1)))?,
                );
            }
            "uds" if uds.is_none() => {
                if value.is_empty() {
                    return Err(bad("uds= is empty".into()));
                }
                uds = Some(PathBuf::from(value));
            }
            "cid" | "uds" => return Err(bad(format!("{key} is given twice"))),
            other => return Err(bad(format!("unknown option {other:?}"))),
        }
    }
    Ok(VsockOptions {
        cid: cid.ok_or_else(|| bad("cid=N is missing".into()))?,
        uds: uds.ok_or_else(|| bad("uds=PATH is missing".into()))?,
    })
}

/// The VM to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// The vCPUs and their topology.
    pub cpus: CpuTopology,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// A virtio-rng entropy device, filled from the host's getrandom.
    pub rng: bool,
    /// A virtio-vsock device with its host side on a Unix socket.
    pub vsock: Option<VsockOptions>,
    /// The seccomp filters to install.
    pub seccomp: crate::seccomp::SeccompLevel,
    /// The guest kernel's System.map, to name RIP in state dumps (SIGUSR2).
    pub system_map: Option<PathBuf>,
    /// Track the pages written to guest memory, so that snapshots can be diffs.
    pub track_dirty_pages: bool,
}

/// Parses a memory size: a number with an optional unit K, M, G or T (optionally followed by
/// "iB" or "B"; all binary). A bare number means MiB, as in QEMU's `-m`.
pub fn parse_mem_size(text: &str) -> Result<u64> {
    let bad = || Error::InvalidMemorySize(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let value: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(unit);
    let shift = match unit {
        "" | "M" | "m" => 20,
        "K" | "k" => 10,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Host RAM in bytes from /proc/meminfo, if readable.
fn host_mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks what can be checked before touching KVM: files readable, sizes sane.
    pub fn validate(&self) -> Result<()> {
        if self.mem_size < tvm_memory::MIN_MEM_SIZE {
            return Err(Error::MemoryTooSmall(self.mem_size));
        }
        if self.mem_size % 4096 != 0 {
            return Err(Error::MemoryNotPageAligned(self.mem_size));
        }
        if let Some(host) = host_mem_total() {
            if self.mem_size > host {
                return Err(Error::MemoryTooLarge {
                    asked: self.mem_size,
                    host,
                });
            }
        }
        let mut kernel = open_regular_file(&self.kernel, "kernel")?;
        tvm_arch_x86::check_kernel(&mut kernel)?;
        if let Some(initrd) = &self.initrd {
            open_regular_file(initrd, "initrd")?;
        }
        Ok(())
    }
}

/// Opens `path` for reading, refusing anything but a regular file.
fn open_regular_file(path: &PathBuf, what: &'static str) -> Result<std::fs::File> {
    let open_error = |source| Error::OpenFile {
        what,
        path: path.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(open_error)?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            what,
            path: path.clone(),
        });
    }
    std::fs::File::open(path).map_err(open_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        assert_eq!(
            parse_disk("disk.img").unwrap(),
            DiskConfig {
                path: "disk.img".into(),
                read_only: false,
                id: None,
                cache: CacheMode::Writeback,
                num_queues: 0,
                engine: IoEngine::Auto,
                name: None,
            }
        );
        let d = parse_disk("/a/b.ext4,readonly=on,id=data-1").unwrap();
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("data-1"));
        let d = parse_disk("x,cache=none,num_queues=4,io_engine=sync").unwrap();
        assert_eq!(
            (d.cache, d.num_queues, d.engine),
            (CacheMode::None, 4, IoEngine::Sync)
        );
        let d = parse_disk("x,cache=writeback,io_engine=io_uring").unwrap();
        assert_eq!((d.cache, d.engine), (CacheMode::Writeback, IoEngine::Uring));
        for bad in [
            "",
            ",readonly=on",
            "x,readonly=maybe",
            "x,id=",
            "x,id=123456789012345678901",
            "x,ro",
            "x,cache=unsafe",
            "x,num_queues=0",
            "x,num_queues=65",
            "x,num_queues=four",
            "x,io_engine=aio",
        ] {
            assert!(
                matches!(parse_disk(bad), Err(Error::InvalidDisk { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn net_options() {
        assert_eq!(
            parse_net("tap=tap0").unwrap(),
            NetConfig {
                tap: "tap0".into(),
                mac: None,
                name: None,
            }
        );
        assert_eq!(
            parse_net("tap=t1,mac=52:54:00:12:34:56").unwrap().mac,
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        for bad in [
            "",
            "tap",
            "tap=",
            "mac=52:54:00:12:34:56",
            "tap=a/b",
            "tap=0123456789abcdef",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,vhost=on",
        ] {
            assert!(
                matches!(parse_net(bad), Err(Error::InvalidNet { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn vsock_options() {
        assert_eq!(
            parse_vsock("cid=3,uds=/tmp/v.sock").unwrap(),
            VsockOptions {
                cid: 3,
                uds: PathBuf::from("/tmp/v.sock")
            }
        );
        assert_eq!(
            parse_vsock("uds=/v,cid=4294967294").unwrap().cid,
            u32::MAX - 1
        );
        for bad in [
            "",
            "cid=3",
            "uds=/v",
            "cid=2,uds=/v",
            "cid=4294967295,uds=/v",
            "cid=x,uds=/v",
            "cid=3,uds=",
            "cid=3,cid=4,uds=/v",
            "cid=3,uds=/v,port=1",
        ] {
            let e = parse_vsock(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidVsock { .. }), "{bad}");
            assert!(e.to_string().contains("cid=N,uds=PATH"), "{e}");
        }
    }

    #[test]
    fn cpu_options() {
        let t = |text| parse_cpus(text).unwrap();
        assert_eq!(t("1"), CpuTopology::flat(1).unwrap());
        assert_eq!(t("4"), CpuTopology::new(1, 4, 1).unwrap());
        assert_eq!(t("254"), CpuTopology::flat(254).unwrap());
        assert_eq!(t("8,threads=2"), CpuTopology::new(2, 4, 1).unwrap());
        assert_eq!(t("8,sockets=2"), CpuTopology::new(1, 4, 2).unwrap());
        assert_eq!(
            t("12,threads=2,cores=3,sockets=2"),
            CpuTopology::new(2, 3, 2).unwrap()
        );
        assert_eq!(t("6,cores=3,threads=2"), CpuTopology::new(2, 3, 1).unwrap());
        for bad in [
            "",
            "0",
            "-1",
            "255",
            "1000",
            "two",
            "4,threads=3",
            "4,cores=3",
            "4,threads=2,cores=1",
            "4,threads=0",
            "4,threads=8",
            "4,dies=2",
            "4,threads",
            "4,threads=2,threads=2",
            "4,",
            // 240 vcpus, but socket 15's APIC ids would start at 15 << 5 = 480.
            "240,threads=3,cores=5,sockets=16",
        ] {
            match parse_cpus(bad) {
                Err(Error::InvalidCpus { value, .. }) => assert_eq!(value, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_mem_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_mem_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_mem_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_mem_size("1024MB").unwrap(), 1 << 30);
        assert_eq!(parse_mem_size("65536K").unwrap(), 64 << 20);
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999999T", "1 G B"] {
            assert!(parse_mem_size(bad).is_err(), "{bad}");
        }
    }

    /// A loadable ELF "kernel" (a halt loop), written once per test process.
    fn test_kernel() -> PathBuf {
        static KERNEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        KERNEL
            .get_or_init(|| {
                let p = std::env::temp_dir()
                    .join(format!("tvm-config-test-{}.elf", std::process::id()));
                let code = tvm_tests::Asm::new().halt_forever().finish();
                std::fs::write(&p, tvm_tests::elf_image(&code)).unwrap();
                p
            })
            .clone()
    }

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: test_kernel(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            mem_size: DEFAULT_MEM_SIZE,
            cpus: CpuTopology::flat(1).unwrap(),
            disks: Vec::new(),
            nets: Vec::new(),
            seccomp: Default::default(),
            system_map: None,
            track_dirty_pages: false,
            rng: false,
            vsock: None,
        }
    }

    #[test]
    fn validation() {
        cfg().validate().unwrap();
        let mut c = cfg();
        c.kernel = PathBuf::from("/proc/self/status");
        assert!(matches!(
            c.validate(),
            Err(Error::Arch(tvm_arch_x86::Error::UnknownKernelFormat))
        ));
        // An ELF magic with nothing after it: refused here, before /dev/kvm is opened.
        let mut c = cfg();
        c.kernel = test_kernel().with_extension("truncated");
        std::fs::write(&c.kernel, b"\x7fELF").unwrap();
        assert!(matches!(
            c.validate(),
            Err(Error::Arch(tvm_arch_x86::Error::LoadKernel(_)))
        ));
        let mut c = cfg();
        c.mem_size = 1 << 20;
        assert!(matches!(c.validate(), Err(Error::MemoryTooSmall(_))));
        let mut c = cfg();
        c.mem_size = 1 << 60;
        assert!(matches!(c.validate(), Err(Error::MemoryTooLarge { .. })));
        let mut c = cfg();
        c.kernel = PathBuf::from("/nonexistent/bzImage");
        let e = c.validate().unwrap_err();
        assert!(matches!(e, Error::OpenFile { what: "kernel", .. }));
        let mut c = cfg();
        c.initrd = Some(PathBuf::from("/"));
        assert!(matches!(
            c.validate(),
            Err(Error::NotAFile { what: "initrd", .. })
        ));
    }
}
