//! seccomp-bpf filters, one per thread kind, installed after set-up and before the guest
//! runs its first instruction or drives any I/O.
//!
//! Every thread of the VMM runs one of four filters:
//! - [`ThreadKind::Vcpu`]: KVM_RUN and the few things a BAR or PCI config write can lead to
//!   (MSI routing, ioeventfd moves, TAP offloads, eventfd clones on device activation);
//! - [`ThreadKind::EventLoop`] (the main thread): epoll, disk and TAP I/O, the vsock
//!   device's Unix sockets, kicking vCPU threads at shutdown, putting the terminal back;
//! - [`ThreadKind::SerialOut`]: writing the console to stdout;
//! - [`ThreadKind::Io`]: a disk's I/O worker (its epoll, disk reads and writes, FLUSH,
//!   DISCARD; nothing that opens anything);
//! - [`ThreadKind::Api`]: the Firecracker-style API socket (accepting and serving clients,
//!   opening the log and metrics files it is pointed at, removing the socket at exit).
//!
//! Filters are per thread (no TSYNC): a vCPU thread installs its own before it waits on the
//! start barrier, the serial-out thread before it writes anything, and the main thread its
//! own after every other thread exists (a thread inherits its creator's filter, so the order
//! keeps each thread at exactly its own list).
//!
//! With [`SeccompLevel::On`] a syscall outside the list raises SIGSYS; [`install_sigsys_handler`]
//! prints which syscall and on which kind of thread, then ends the process with exit code
//! [`SECCOMP_EXIT_CODE`] (128 + SIGSYS, what a shell reports for a process killed by it).
//! [`SeccompLevel::Log`] lets such calls through and has the kernel log them (audit, or
//! dmesg as `type=1326`), to find what a list misses; [`SeccompLevel::Off`] installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::KVMIO;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use crate::{Error, Result};

/// Exit code after a forbidden syscall: 128 + SIGSYS.
pub const SECCOMP_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// What `--seccomp` asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompLevel {
    /// Filters installed; a forbidden syscall ends the VMM with a message.
    #[default]
    On,
    /// No filters.
    Off,
    /// Filters installed; forbidden syscalls are allowed but logged by the kernel.
    Log,
}

/// The kinds of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu = 1,
    /// The main thread, running the event loop.
    EventLoop = 2,
    /// The thread that writes the console to stdout.
    SerialOut = 3,
    /// The thread that serves the API socket (`fc_api`).
    Api = 4,
    /// A device's I/O worker (`virtio-blkN`): serves the queues of one disk.
    Io = 5,
}

impl ThreadKind {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::SerialOut => "serial-out",
            ThreadKind::Api => "api",
            ThreadKind::Io => "io-worker",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ThreadKind::Vcpu),
            2 => Some(ThreadKind::EventLoop),
            3 => Some(ThreadKind::SerialOut),
            4 => Some(ThreadKind::Api),
            5 => Some(ThreadKind::Io),
            _ => None,
        }
    }
}

thread_local! {
    /// The filter this thread installed (0: none), read by the SIGSYS handler. A `const`
    /// thread local with no destructor: reading it allocates nothing and takes no lock.
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// The compiled filters for one VM (all `None` with [`SeccompLevel::Off`]).
#[derive(Clone, Debug, Default)]
pub struct Filters {
    vcpu: Option<Arc<BpfProgram>>,
    event_loop: Option<Arc<BpfProgram>>,
    serial_out: Option<Arc<BpfProgram>>,
    api: Option<Arc<BpfProgram>>,
    io: Option<Arc<BpfProgram>>,
}

impl Filters {
    /// Compiles the filter of every kind for `level`.
    pub fn new(level: SeccompLevel) -> Result<Self> {
        let action = match level {
            SeccompLevel::Off => return Ok(Filters::default()),
            SeccompLevel::On => SeccompAction::Trap,
            SeccompLevel::Log => SeccompAction::Log,
        };
        let build = |kind| compile(kind, action.clone()).map(|p| Some(Arc::new(p)));
        Ok(Filters {
            vcpu: build(ThreadKind::Vcpu)?,
            event_loop: build(ThreadKind::EventLoop)?,
            serial_out: build(ThreadKind::SerialOut)?,
            api: build(ThreadKind::Api)?,
            io: build(ThreadKind::Io)?,
        })
    }

    /// The filter for `kind`, if any.
    pub fn get(&self, kind: ThreadKind) -> Option<Arc<BpfProgram>> {
        match kind {
            ThreadKind::Vcpu => self.vcpu.clone(),
            ThreadKind::EventLoop => self.event_loop.clone(),
            ThreadKind::SerialOut => self.serial_out.clone(),
            ThreadKind::Api => self.api.clone(),
            ThreadKind::Io => self.io.clone(),
        }
    }

    /// A closure that installs the filter for `kind` on the thread that calls it (a no-op
    /// without filters); for threads spawned by other crates' code.
    pub fn installer(&self, kind: ThreadKind) -> impl FnOnce() -> Result<()> + Send + 'static {
        let filter = self.get(kind);
        move || apply(kind, filter.as_deref())
    }
}

/// Installs `filter` on the calling thread (nothing when `None`).
pub fn apply(kind: ThreadKind, filter: Option<&BpfProgram>) -> Result<()> {
    let Some(filter) = filter else {
        return Ok(());
    };
    THREAD_KIND.with(|k| k.set(kind as u8));
    seccompiler::apply_filter(filter).map_err(|source| Error::SeccompApply {
        thread: kind.name(),
        source,
    })
}

/// Writes `bytes` to stderr with a raw write(2) (async-signal-safe; errors ignored).
fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) reads `bytes.len()` bytes from a valid slice; it is async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
}

/// Formats `n` in decimal into `buf`, returning the digits (no allocation).
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t for SIGSYS (asm-generic/siginfo.h): after si_signo, si_errno, si_code and
    // 4 bytes of padding, the union holds `_sigsys { void *_call_addr; int _syscall; ... }`,
    // so the syscall number is at byte 16 + 8. The libc crate does not name the field.
    const SYSCALL_OFFSET: usize = 24;
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an SA_SIGINFO handler, and
    // for SIGSYS the 4 bytes at SYSCALL_OFFSET are the `_syscall` field.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let kind = THREAD_KIND
        .with(|k| ThreadKind::from_u8(k.get()))
        .map_or("unknown", ThreadKind::name);
    let mut buf = [0u8; 10];
    // Only async-signal-safe work from here: raw writes, a try-lock tcsetattr, _exit.
    crate::terminal::restore();
    write_stderr(b"\r\nvmm: error: seccomp: the ");
    write_stderr(kind.as_bytes());
    write_stderr(b" thread made system call ");
    write_stderr(decimal(nr as u32, &mut buf));
    write_stderr(b", which its filter does not allow (a bug: please report it; --seccomp log lets such calls through and logs them)\n");
    // SAFETY: _exit(2) ends the process at once; it is async-signal-safe.
    unsafe { libc::_exit(SECCOMP_EXIT_CODE) };
}

/// Installs the SIGSYS handler that reports a forbidden syscall (process-wide; call once,
/// before any filter with [`SeccompLevel::On`] is installed).
pub fn install_sigsys_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
        .map_err(|e| Error::Signals(std::io::Error::from_raw_os_error(e.errno())))
}

// ioctl request numbers, from the kernel's uapi headers (linux/kvm.h, linux/if_tun.h,
// asm-generic/ioctls.h).
/// `_IOC(dir, type, nr, size_of::<T>())` as the filter compares it.
const fn ioc<T>(dir: u32, ty: u32, nr: u32) -> u64 {
    ioctl_expr(dir, ty, nr, std::mem::size_of::<T>() as u32) as u64
}

const KVM_RUN: u64 = ioc::<()>(_IOC_NONE, KVMIO, 0x80);
const KVM_KVMCLOCK_CTRL: u64 = ioc::<()>(_IOC_NONE, KVMIO, 0xad);
const KVM_GET_REGS: u64 = ioc::<kvm_bindings::kvm_regs>(_IOC_READ, KVMIO, 0x81);
const KVM_GET_SREGS: u64 = ioc::<kvm_bindings::kvm_sregs>(_IOC_READ, KVMIO, 0x83);
const KVM_GET_LAPIC: u64 = ioc::<kvm_bindings::kvm_lapic_state>(_IOC_READ, KVMIO, 0x8e);
const KVM_GET_MP_STATE: u64 = ioc::<kvm_bindings::kvm_mp_state>(_IOC_READ, KVMIO, 0x98);
const KVM_GET_VCPU_EVENTS: u64 = ioc::<kvm_bindings::kvm_vcpu_events>(_IOC_READ, KVMIO, 0x9f);
const KVM_TRANSLATE: u64 =
    ioc::<kvm_bindings::kvm_translation>(_IOC_READ | _IOC_WRITE, KVMIO, 0x85);
const KVM_SET_GSI_ROUTING: u64 = ioc::<kvm_bindings::kvm_irq_routing>(_IOC_WRITE, KVMIO, 0x6a);
const KVM_IOEVENTFD: u64 = ioc::<kvm_bindings::kvm_ioeventfd>(_IOC_WRITE, KVMIO, 0x79);
// A snapshot's state: each vCPU thread reads its own, the event loop the VM's.
const KVM_GET_CPUID2: u64 = ioc::<kvm_bindings::kvm_cpuid2>(_IOC_READ | _IOC_WRITE, KVMIO, 0x91);
const KVM_GET_MSRS: u64 = ioc::<kvm_bindings::kvm_msrs>(_IOC_READ | _IOC_WRITE, KVMIO, 0x88);
const KVM_GET_XSAVE: u64 = ioc::<kvm_bindings::kvm_xsave>(_IOC_READ, KVMIO, 0xa4);
const KVM_GET_XCRS: u64 = ioc::<kvm_bindings::kvm_xcrs>(_IOC_READ, KVMIO, 0xa6);
const KVM_GET_DEBUGREGS: u64 = ioc::<kvm_bindings::kvm_debugregs>(_IOC_READ, KVMIO, 0xa1);
const KVM_GET_TSC_KHZ: u64 = ioc::<()>(_IOC_NONE, KVMIO, 0xa3);
const KVM_GET_IRQCHIP: u64 = ioc::<kvm_bindings::kvm_irqchip>(_IOC_READ | _IOC_WRITE, KVMIO, 0x62);
const KVM_GET_PIT2: u64 = ioc::<kvm_bindings::kvm_pit_state2>(_IOC_READ, KVMIO, 0x9f);
const KVM_GET_CLOCK: u64 = ioc::<kvm_bindings::kvm_clock_data>(_IOC_READ, KVMIO, 0x7c);
const TUNSETOFFLOAD: u64 = ioc::<libc::c_uint>(_IOC_WRITE, b'T' as u32, 208);
const TCSETS: u64 = libc::TCSETS;

type Rules = Vec<(i64, Vec<SeccompRule>)>;

fn seccomp_error(e: impl Into<seccompiler::Error>) -> Error {
    Error::Seccomp(e.into())
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(seccomp_error)
}

/// One rule per value: argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, v)?]).map_err(seccomp_error))
        .collect()
}

/// Memory that is never made executable: `prot` (argument 2 of mmap and mprotect) without
/// PROT_EXEC.
fn no_exec() -> Result<Vec<SeccompRule>> {
    let prot = libc::PROT_EXEC as u64;
    Ok(vec![SeccompRule::new(vec![cond(
        2,
        SeccompCmpOp::MaskedEq(prot),
        0,
    )?])
    .map_err(seccomp_error)?])
}

/// `ioctl(0, TCSETS)` and `ioctl(0, TCGETS)`: the terminal put back on fd 0.
fn terminal_ioctls() -> Result<Vec<SeccompRule>> {
    [TCSETS, libc::TCGETS]
        .into_iter()
        .map(|cmd| {
            SeccompRule::new(vec![
                cond(0, SeccompCmpOp::Eq, libc::STDIN_FILENO as u64)?,
                cond(1, SeccompCmpOp::Eq, cmd)?,
            ])
            .map_err(seccomp_error)
        })
        .collect()
}

/// What every thread needs: the Rust runtime and glibc (allocation, locks, thread exit,
/// signal return), logging to stderr, the SIGSYS report and the panic path.
fn common() -> Result<Rules> {
    let any = Vec::new;
    Ok(vec![
        // Logging, eventfd signals, console output.
        (libc::SYS_write, any()),
        // Mutexes, condition variables, joins.
        (libc::SYS_futex, any()),
        // The allocator: glibc arenas map, grow (mprotect to read-write) and trim memory;
        // never executable.
        (libc::SYS_mmap, no_exec()?),
        (libc::SYS_mprotect, no_exec()?),
        (libc::SYS_munmap, any()),
        (libc::SYS_mremap, any()),
        (libc::SYS_brk, any()),
        (libc::SYS_madvise, any()),
        // Timestamps in logs and boot timing when the vDSO falls back to the syscall (it
        // does under some clock sources, e.g. in a TCG guest); short sleeps.
        (libc::SYS_clock_gettime, any()),
        (libc::SYS_clock_nanosleep, any()),
        (libc::SYS_nanosleep, any()),
        (libc::SYS_sched_yield, any()),
        // HashMap seeds are drawn per thread on first use.
        (libc::SYS_getrandom, any()),
        // Signal handlers (the vCPU kick, termination signals on any thread) return with
        // rt_sigreturn; thread exit masks signals and drops the alternate signal stack.
        (libc::SYS_rt_sigreturn, any()),
        // A timed wait (a futex or a sleep with a timeout) that a handled signal interrupts
        // is resumed by the kernel through restart_syscall (seen: the event loop waiting
        // for a disk worker at exit when SIGTERM arrived).
        (libc::SYS_restart_syscall, any()),
        (libc::SYS_rt_sigprocmask, any()),
        (libc::SYS_sigaltstack, any()),
        // abort() on a panic (panic = "abort" in release) raises SIGABRT on itself.
        (libc::SYS_getpid, any()),
        (libc::SYS_gettid, any()),
        (libc::SYS_tgkill, any()),
        // Putting the terminal back (at exit, in the SIGSYS report and the panic hook):
        // glibc's tcsetattr issues TCSETS and then reads the result back with TCGETS; both
        // on fd 0 only.
        (libc::SYS_ioctl, terminal_ioctls()?),
        (libc::SYS_exit, any()),
        (libc::SYS_exit_group, any()),
    ])
}

/// The syscalls of `kind` beyond [`common`].
fn specific(kind: ThreadKind) -> Result<Rules> {
    let any = Vec::new;
    Ok(match kind {
        ThreadKind::Vcpu => vec![
            // KVM_RUN; the register reads and the address translation of a failure report;
            // everything a snapshot saves of a vCPU (read by its own thread while parked);
            // the state a dump (SIGUSR2) shows: MP state, pending events, the local APIC;
            // MSI-X table writes re-route GSIs; BAR moves re-register queue ioeventfds;
            // virtio-net activation sets the TAP's offloads; after a pause, the guest's
            // kvmclock is told the vCPU was stopped.
            (
                libc::SYS_ioctl,
                arg_in(
                    1,
                    &[
                        KVM_RUN,
                        KVM_KVMCLOCK_CTRL,
                        KVM_GET_REGS,
                        KVM_GET_SREGS,
                        KVM_TRANSLATE,
                        KVM_GET_MP_STATE,
                        KVM_GET_VCPU_EVENTS,
                        KVM_GET_LAPIC,
                        KVM_SET_GSI_ROUTING,
                        KVM_IOEVENTFD,
                        TUNSETOFFLOAD,
                        KVM_GET_CPUID2,
                        KVM_GET_MSRS,
                        KVM_GET_XSAVE,
                        KVM_GET_XCRS,
                        KVM_GET_DEBUGREGS,
                        KVM_GET_TSC_KHZ,
                    ],
                )?,
            ),
            // Device activation clones the queue eventfds (F_DUPFD_CLOEXEC); reset drops
            // them and drains pending kicks. Closing a file descriptor (here the vCPU's own
            // when the thread ends) checks it with F_GETFD first in debug builds of std.
            (
                libc::SYS_fcntl,
                arg_in(1, &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFD as u64])?,
            ),
            (libc::SYS_close, any()),
            (libc::SYS_read, any()),
        ],
        ThreadKind::EventLoop => vec![
            // A snapshot of the paused VM: the in-kernel PIC, IOAPIC, PIT and clock, then
            // the files the asker opened, truncated and written (memory sparsely).
            (
                libc::SYS_ioctl,
                arg_in(1, &[KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK])?,
            ),
            (libc::SYS_ftruncate, any()),
            (libc::SYS_pwrite64, any()),
            // A diff snapshot reads the soft-dirty bits (/proc/self/pagemap, opened at
            // start) and every snapshot clears them (/proc/self/clear_refs, a write).
            (libc::SYS_pread64, any()),
            (libc::SYS_epoll_wait, any()),
            (libc::SYS_epoll_pwait, any()),
            // Sources leave and rejoin the epoll set (serial input backpressure, errors).
            (libc::SYS_epoll_ctl, any()),
            // Eventfds, console input.
            (libc::SYS_read, any()),
            (libc::SYS_readv, any()),
            (libc::SYS_writev, any()),
            // Disk requests, media changes and the flush at exit run on the disks' own
            // workers (ThreadKind::Io).
            (libc::SYS_fdatasync, any()),
            (libc::SYS_fsync, any()),
            // Files and eventfds dropped at shutdown (F_GETFD: std's debug check on close).
            (libc::SYS_close, any()),
            (libc::SYS_fcntl, arg_in(1, &[libc::F_GETFD as u64])?),
            // virtio-vsock's host side: host processes connect to its Unix socket
            // (accepted, made non-blocking), guest connections open Unix streams to
            // `<uds>_<port>`, bytes move with recv/send (send with MSG_NOSIGNAL),
            // half-closes are shutdown(2), timeouts a timerfd. The socket file is removed
            // when the device is dropped at exit.
            (libc::SYS_accept4, any()),
            (libc::SYS_ioctl, arg_in(1, &[libc::FIONBIO])?),
            (libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64])?),
            (libc::SYS_connect, any()),
            (libc::SYS_recvfrom, any()),
            (libc::SYS_sendto, any()),
            (libc::SYS_shutdown, any()),
            (libc::SYS_timerfd_settime, any()),
            (libc::SYS_unlink, any()),
            (libc::SYS_unlinkat, any()),
            // ... after checking that it is still the socket it made.
            (libc::SYS_statx, any()),
            (libc::SYS_fstat, any()),
            (libc::SYS_newfstatat, any()),
        ],
        ThreadKind::SerialOut => vec![],
        ThreadKind::Io => vec![
            // The worker's epoll: its wake EventFd and the queue notification EventFds,
            // which it adds and removes as the device is activated and reset.
            (libc::SYS_epoll_wait, any()),
            (libc::SYS_epoll_pwait, any()),
            (libc::SYS_epoll_ctl, any()),
            // Notifications consumed; queue EventFds re-signalled when a budget runs out
            // (write is common). A network device's frames: one read(2) per received
            // frame, one writev(2) per sent frame, on its TAP.
            (libc::SYS_read, any()),
            (libc::SYS_writev, any()),
            // Disk requests go straight between the image and guest memory.
            (libc::SYS_pread64, any()),
            (libc::SYS_pwrite64, any()),
            (libc::SYS_preadv, any()),
            (libc::SYS_pwritev, any()),
            // FLUSH.
            (libc::SYS_fdatasync, any()),
            (libc::SYS_fsync, any()),
            // DISCARD and WRITE_ZEROES: punch hole / zero range.
            (libc::SYS_fallocate, any()),
            // A disk's new medium (Firecracker's PATCH /drives), opened by the API thread,
            // is locked, compared with the old one and measured here (the event loop hands
            // the change to the disk's worker).
            (libc::SYS_flock, any()),
            (libc::SYS_statx, any()),
            (libc::SYS_fstat, any()),
            (libc::SYS_newfstatat, any()),
            (libc::SYS_lseek, any()),
            // The io_uring engine hands its operations to the kernel (the ring was set up,
            // and its EventFd registered, before the filters went on: no io_uring_setup or
            // io_uring_register anywhere).
            (libc::SYS_io_uring_enter, any()),
            // A disk's interrupt-coalescing window: its timerfd armed and disarmed.
            (libc::SYS_timerfd_settime, any()),
            // The last clone of a reset device's queue EventFd is dropped here (F_GETFD:
            // std's debug check on close).
            (libc::SYS_close, any()),
            // F_GETFL/F_SETFL: a `cache=none` disk's new medium is switched to O_DIRECT.
            (
                libc::SYS_fcntl,
                arg_in(
                    1,
                    &[
                        libc::F_GETFD as u64,
                        libc::F_GETFL as u64,
                        libc::F_SETFL as u64,
                    ],
                )?,
            ),
        ],
        ThreadKind::Api => vec![
            (libc::SYS_epoll_wait, any()),
            (libc::SYS_epoll_pwait, any()),
            // Connections join and leave the epoll set.
            (libc::SYS_epoll_ctl, any()),
            (libc::SYS_accept4, any()),
            // Accepted connections are made non-blocking (std's set_nonblocking).
            (libc::SYS_ioctl, arg_in(1, &[libc::FIONBIO])?),
            (libc::SYS_read, any()),
            (libc::SYS_recvfrom, any()),
            (libc::SYS_sendto, any()),
            (libc::SYS_writev, any()),
            (libc::SYS_shutdown, any()),
            (libc::SYS_close, any()),
            (libc::SYS_fcntl, arg_in(1, &[libc::F_GETFD as u64])?),
            // `PUT /logger` and `PUT /metrics` open (create, append) the files they name;
            // the log replaces stderr.
            (libc::SYS_openat, any()),
            (libc::SYS_dup2, any()),
            (libc::SYS_dup3, any()),
            // At exit the socket file is removed if it is still the one we created.
            (libc::SYS_newfstatat, any()),
            (libc::SYS_statx, any()),
            (libc::SYS_fstat, any()),
            (libc::SYS_unlink, any()),
            (libc::SYS_unlinkat, any()),
        ],
    })
}

/// Compiles the filter of `kind`: the allowed syscalls, `mismatch` for everything else.
fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram> {
    // `None`: allowed unconditionally (an empty rule list in seccompiler's terms), which
    // wins over conditions from another list.
    let mut merged: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, r) in common()?.into_iter().chain(specific(kind)?) {
        let cond = (!r.is_empty()).then_some(r);
        match (merged.get_mut(&nr), cond) {
            (None, c) => {
                merged.insert(nr, c);
            }
            (Some(Some(have)), Some(more)) => have.extend(more),
            (Some(entry), _) => *entry = None,
        }
    }
    let rules = merged
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp_error)?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(BpfProgram::try_from)
        .map_err(seccomp_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    /// Set in the child processes of the tests below.
    const CHILD_ENV: &str = "TVM_SECCOMP_TEST_CHILD";

    #[test]
    fn off_builds_nothing_and_on_and_log_build_every_filter() {
        let kinds = [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::SerialOut,
            ThreadKind::Api,
            ThreadKind::Io,
        ];
        let off = Filters::new(SeccompLevel::Off).unwrap();
        for kind in kinds {
            assert!(off.get(kind).is_none());
            assert_eq!(ThreadKind::from_u8(kind as u8), Some(kind));
        }
        for level in [SeccompLevel::On, SeccompLevel::Log] {
            let f = Filters::new(level).unwrap();
            for kind in kinds {
                assert!(!f.get(kind).unwrap().is_empty(), "{level:?} {kind:?}");
            }
        }
        // Installing "no filter" is a no-op, not an error.
        off.installer(ThreadKind::SerialOut)().unwrap();
    }

    #[test]
    fn a_syscall_allowed_unconditionally_stays_unconditional() {
        // write (common, unconditional) and fcntl (vCPU, by command) both compile; the
        // serial-out thread, with the shortest list, has the shortest program.
        let len = |k| compile(k, SeccompAction::Trap).unwrap().len();
        assert!(len(ThreadKind::SerialOut) < len(ThreadKind::Vcpu));
        assert!(len(ThreadKind::SerialOut) < len(ThreadKind::EventLoop));
        assert!(len(ThreadKind::SerialOut) < len(ThreadKind::Api));
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // The values in the kernel's uapi headers on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_KVMCLOCK_CTRL, 0xaead);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        // The snapshot's (linux/kvm.h on x86_64).
        assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(KVM_GET_TSC_KHZ, 0xaea3);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
    }

    #[test]
    fn decimal_formats_without_allocating() {
        let mut buf = [0u8; 10];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(72, &mut buf), b"72");
        assert_eq!(decimal(u32::MAX, &mut buf), b"4294967295");
    }

    /// Runs `body` in a child process: there, the test `name` of this binary (the caller)
    /// runs again with [`CHILD_ENV`] set, calls `body` and returns `None`. In the test
    /// run itself it returns the child's (exit code, stderr). The child bodies are plain
    /// functions, not tests of their own, so a normal run never counts them as passing.
    fn in_child(name: &str, body: fn()) -> Option<(Option<i32>, String)> {
        if std::env::var_os(CHILD_ENV).is_some() {
            body();
            return None;
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The child ran the body (it did not filter the test away or fail to start).
        assert!(stderr.contains("child: start"), "{stderr}");
        Some((out.status.code(), stderr))
    }

    /// In the child: the vCPU filter, then an allowed ioctl (KVM_RUN on a bad fd: EBADF
    /// from the kernel, not the filter), then socket(2), which no thread may make.
    fn child_vcpu_filter() {
        write_stderr(b"child: start\n");
        install_sigsys_handler().unwrap();
        let f = Filters::new(SeccompLevel::On).unwrap();
        apply(ThreadKind::Vcpu, f.get(ThreadKind::Vcpu).as_deref()).unwrap();
        // SAFETY: ioctl on an invalid fd touches no memory; it fails with EBADF.
        let rc = unsafe { libc::ioctl(-1, KVM_RUN as libc::c_ulong, 0) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        write_stderr(format!("ioctl rc {rc} errno {errno:?}\n").as_bytes());
        // SAFETY: socket(2) has no memory-safety preconditions.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        write_stderr(b"socket was allowed\n");
    }

    #[test]
    fn a_forbidden_syscall_ends_the_process_with_a_message_naming_it() {
        let Some((code, stderr)) = in_child(
            "seccomp::tests::a_forbidden_syscall_ends_the_process_with_a_message_naming_it",
            child_vcpu_filter,
        ) else {
            return;
        };
        assert_eq!(code, Some(SECCOMP_EXIT_CODE), "{stderr}");
        assert!(stderr.contains("ioctl rc -1 errno Some(9)"), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "vmm: error: seccomp: the vcpu thread made system call {}",
                libc::SYS_socket
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("socket was allowed"), "{stderr}");
    }

    /// In the child: the vCPU filter forbids an ioctl it has no use for (KVM_CREATE_VM).
    fn child_vcpu_filter_ioctl() {
        write_stderr(b"child: start\n");
        install_sigsys_handler().unwrap();
        let f = Filters::new(SeccompLevel::On).unwrap();
        apply(ThreadKind::Vcpu, f.get(ThreadKind::Vcpu).as_deref()).unwrap();
        let create_vm = ioctl_expr(_IOC_NONE, KVMIO, 0x01, 0);
        // SAFETY: ioctl on an invalid fd touches no memory.
        unsafe { libc::ioctl(-1, libc::c_ulong::from(create_vm), 0) };
        write_stderr(b"KVM_CREATE_VM was allowed\n");
    }

    #[test]
    fn the_vcpu_filter_checks_ioctl_commands() {
        let Some((code, stderr)) = in_child(
            "seccomp::tests::the_vcpu_filter_checks_ioctl_commands",
            child_vcpu_filter_ioctl,
        ) else {
            return;
        };
        assert_eq!(code, Some(SECCOMP_EXIT_CODE), "{stderr}");
        assert!(
            stderr.contains(&format!("system call {}", libc::SYS_ioctl)),
            "{stderr}"
        );
        assert!(!stderr.contains("was allowed"), "{stderr}");
    }

    /// In the child: the serial-out filter in log mode lets openat through.
    fn child_log_mode() {
        write_stderr(b"child: start\n");
        let f = Filters::new(SeccompLevel::Log).unwrap();
        apply(
            ThreadKind::SerialOut,
            f.get(ThreadKind::SerialOut).as_deref(),
        )
        .unwrap();
        let opened = std::fs::File::open("/proc/self/status").is_ok();
        write_stderr(format!("open allowed: {opened}\n").as_bytes());
    }

    #[test]
    fn log_mode_lets_a_forbidden_syscall_through() {
        let Some((code, stderr)) = in_child(
            "seccomp::tests::log_mode_lets_a_forbidden_syscall_through",
            child_log_mode,
        ) else {
            return;
        };
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("open allowed: true"), "{stderr}");
    }
}
