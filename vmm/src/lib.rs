//! The tvm virtual machine monitor: builds a KVM VM from the workspace's crates, boots a
//! Linux kernel and runs it until the guest or the user ends it.
//!
//! Threads: the main thread runs the event loop (event-manager over epoll: console input,
//! the exit requests of vCPUs, the i8042 reset line, the ACPI power-off and pvpanic
//! signals of tvm-legacy's devices, Ctrl-A x and termination signals); one
//! thread per vCPU runs KVM_RUN and dispatches port and MMIO exits to the bus; a
//! "serial-out" thread writes the console to stdout so that a stalled terminal never blocks
//! a vCPU.

#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod acpi;
pub mod commands;
pub mod config;
pub mod dump;
pub mod firecracker;
pub mod logger;
pub mod pause;
pub mod seccomp;
mod signal_evt;
pub mod snapshot;
pub mod terminal;
pub mod timing;
pub mod vcpu;
pub mod virtio;
mod vmm;

pub use vmm::{run_vm, Vmm};

use std::path::PathBuf;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--memory` did not parse.
    #[error("invalid memory size {0:?}: use a number with an optional unit K, M, G or T (e.g. 512M, 2G)")]
    InvalidMemorySize(String),
    /// A `--disk` value did not parse.
    #[error("invalid --disk {value:?}: {why}; expected PATH[,readonly=on|off][,id=STRING]")]
    InvalidDisk {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `--vsock` value did not parse.
    #[error("invalid --vsock {value:?}: {why}; expected cid=N,uds=PATH")]
    InvalidVsock {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `--net` value did not parse.
    #[error("invalid --net {value:?}: {why}; expected tap=NAME[,mac=MAC]")]
    InvalidNet {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `--cpus` value did not parse, or names a topology that cannot be built.
    #[error("invalid --cpus {value:?}: {why}; expected N[,threads=T][,cores=C][,sockets=S] with 1 <= N <= {max} and T x C x S = N", max = tvm_arch_x86::MAX_XAPIC_ID)]
    InvalidCpus {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// More vCPUs (or a higher APIC id) than this host's KVM allows.
    #[error("--cpus {asked}: this host's kvm allows at most {max} vcpus (KVM_CAP_MAX_VCPUS) and vcpu ids below {max_id} (KVM_CAP_MAX_VCPU_ID); the highest APIC id would be {highest_id}")]
    TooManyVcpus {
        /// vCPUs asked for.
        asked: u8,
        /// The highest APIC id the topology gives.
        highest_id: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
        /// KVM_CAP_MAX_VCPU_ID.
        max_id: usize,
    },
    /// Not enough memory for a guest.
    #[error("guest memory of {0} bytes is too small: at least 16 MiB is needed")]
    MemoryTooSmall(u64),
    /// Memory size not a whole number of pages.
    #[error("guest memory of {0} bytes is not a multiple of 4 KiB")]
    MemoryNotPageAligned(u64),
    /// More memory than the host has.
    #[error("guest memory of {asked} bytes is more than the host's {host} bytes of ram")]
    MemoryTooLarge {
        /// What was asked.
        asked: u64,
        /// What the host has.
        host: u64,
    },
    /// A file given on the command line cannot be opened.
    #[error("cannot open the {what} {path:?}")]
    OpenFile {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A path given on the command line is not a regular file.
    #[error("the {what} {path:?} is not a regular file")]
    NotAFile {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// A `--system-map` file holds no symbol.
    #[error(
        "the system map {0:?} holds no symbols (expected lines like `ffffffff81000000 T _text`)"
    )]
    EmptySystemMap(PathBuf),
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is the kvm module loaded, and may this user use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something we need.
    #[error("kvm lacks the required capability {0}")]
    MissingCapability(&'static str),
    /// KVM_CREATE_VM failed.
    #[error("failed to create the vm")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("failed to set the tss address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("failed to set the identity map address")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("failed to create vcpu {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// Interrupt controller set-up.
    #[error(transparent)]
    Irq(#[from] tvm_irq::Error),
    /// Guest memory set-up.
    #[error(transparent)]
    Memory(#[from] tvm_memory::Error),
    /// Boot state set-up.
    #[error(transparent)]
    Arch(#[from] tvm_arch_x86::Error),
    /// Device placement.
    #[error(transparent)]
    Bus(#[from] tvm_bus::Error),
    /// Serial console set-up.
    #[error(transparent)]
    Serial(#[from] tvm_serial::Error),
    /// Legacy device set-up.
    #[error(transparent)]
    Legacy(#[from] tvm_legacy::Error),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] tvm_virtio::Error),
    /// A disk could not be opened.
    #[error(transparent)]
    Block(#[from] tvm_virtio_blk::Error),
    /// A TAP could not be opened.
    #[error(transparent)]
    Net(#[from] tvm_virtio_net::Error),
    /// The vsock device could not be set up (a bad CID, its Unix socket path taken).
    #[error(transparent)]
    Vsock(#[from] tvm_vsock::Error),
    /// An EventFd could not be created.
    #[error("failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop failure")]
    EventManager(#[source] event_manager::Error),
    /// A vCPU thread could not be started.
    #[error("failed to start a vcpu thread")]
    SpawnVcpu(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("failed to install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A seccomp filter could not be built.
    #[error("failed to build the seccomp filters")]
    Seccomp(#[source] seccompiler::Error),
    /// A thread could not install its seccomp filter.
    #[error("the {thread} thread could not install its seccomp filter")]
    SeccompApply {
        /// The kind of thread.
        thread: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The Firecracker-style control plane could not go on (a bad config file, a failed
    /// start with `--no-api`, the API thread ending).
    #[error("{0}")]
    Api(String),
    /// The API socket could not be created.
    #[error("cannot serve the api socket")]
    ApiSocket(#[source] tvm_http::Error),
    /// A snapshot's state file that cannot be restored (damaged, truncated, another
    /// format version, inconsistent, or taken on a CPU this host cannot stand in for).
    #[error("cannot restore the snapshot {path:?}")]
    Snapshot {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: tvm_snapshot::Error,
    },
    /// A saved vCPU that this host's KVM cannot stand in for.
    #[error("vcpu {0} of the snapshot cannot run on this host")]
    SnapshotCpu(u8, #[source] tvm_snapshot::Error),
    /// A snapshot whose machine or devices this VMM cannot rebuild as saved.
    #[error("cannot restore the snapshot: {0}")]
    InvalidSnapshotConfig(String),
    /// The terminal could not be put into raw mode.
    #[error("failed to put the terminal into raw mode")]
    Terminal(#[source] std::io::Error),
}

/// Result of the VMM.
pub type Result<T> = std::result::Result<T, Error>;

/// Formats an error and its chain of causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        // Some errors (linux-loader's) print their source in their own message too.
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cur = s.source();
    }
    text
}
