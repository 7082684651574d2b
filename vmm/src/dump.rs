//! Explaining a running guest from outside, without stopping it.
//!
//! On [`DUMP_SIGNAL`] (SIGUSR2) the VMM logs, at `warn!` so that it shows at the default
//! log level, one block of lines all starting `dump N:` (N counts the dumps):
//! - per vCPU, collected **on the vCPU's own thread** (its fd is used there), which the
//!   event loop asks for with a flag and a kick out of `KVM_RUN`: the registers (RIP with
//!   the nearest guest symbol below it when `--system-map` was given), the multiprocessing
//!   state (runnable or halted), the pending and injected events, the local APIC's TPR,
//!   IRR and ISR, and the exit statistics ([`ExitStats`]): counts per kind of exit and the
//!   last [`LAST_EXITS`] exits;
//! - the UART's registers and FIFO fill;
//! - every virtio device's status, interrupt mode and queues (indices in guest memory,
//!   notification suppression fields, MSI-X vector state).
//!
//! The guest keeps running: a vCPU leaves `KVM_RUN` for the few microseconds the dump
//! takes, exactly as for any other exit.
//!
//! Everything here is either plain data shared through atomics (the exit statistics are
//! bumped by the vCPU thread on every exit and may be read by any thread) or pure
//! formatting over `kvm_bindings` structs, so it is tested without KVM.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuExit;

use crate::{Error, Result};

/// The signal that asks for a dump.
pub const DUMP_SIGNAL: i32 = libc::SIGUSR2;

/// How many of the most recent exits each vCPU remembers.
pub const LAST_EXITS: usize = 16;

/// The kinds of VM exit counted per vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitKind {
    /// KVM_EXIT_IO, in.
    IoIn = 0,
    /// KVM_EXIT_IO, out.
    IoOut = 1,
    /// KVM_EXIT_MMIO, read.
    MmioRead = 2,
    /// KVM_EXIT_MMIO, write.
    MmioWrite = 3,
    /// KVM_EXIT_HLT.
    Hlt = 4,
    /// KVM_EXIT_SHUTDOWN.
    Shutdown = 5,
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent = 6,
    /// KVM_EXIT_IRQ_WINDOW_OPEN.
    IrqWindowOpen = 7,
    /// KVM_EXIT_INTR: a signal made KVM return.
    Intr = 8,
    /// KVM_RUN failed with EINTR or EAGAIN (a kick, or `immediate_exit`).
    Interrupted = 9,
    /// Anything else (each ends the run).
    Other = 10,
}

/// Number of [`ExitKind`]s.
pub const EXIT_KINDS: usize = 11;

/// Every [`ExitKind`], in the order of their values.
pub const KINDS: [ExitKind; EXIT_KINDS] = [
    ExitKind::IoIn,
    ExitKind::IoOut,
    ExitKind::MmioRead,
    ExitKind::MmioWrite,
    ExitKind::Hlt,
    ExitKind::Shutdown,
    ExitKind::SystemEvent,
    ExitKind::IrqWindowOpen,
    ExitKind::Intr,
    ExitKind::Interrupted,
    ExitKind::Other,
];

impl ExitKind {
    /// The name in dump lines.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system-event",
            ExitKind::IrqWindowOpen => "irq-window",
            ExitKind::Intr => "intr",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }

    /// The kind of `exit` and the detail worth remembering: the port, the address, the
    /// event type.
    pub fn of(exit: &VcpuExit<'_>) -> (ExitKind, u64) {
        match exit {
            VcpuExit::IoIn(port, _) => (ExitKind::IoIn, u64::from(*port)),
            VcpuExit::IoOut(port, _) => (ExitKind::IoOut, u64::from(*port)),
            VcpuExit::MmioRead(addr, _) => (ExitKind::MmioRead, *addr),
            VcpuExit::MmioWrite(addr, _) => (ExitKind::MmioWrite, *addr),
            VcpuExit::Hlt => (ExitKind::Hlt, 0),
            VcpuExit::Shutdown => (ExitKind::Shutdown, 0),
            VcpuExit::SystemEvent(kind, _) => (ExitKind::SystemEvent, u64::from(*kind)),
            VcpuExit::IrqWindowOpen => (ExitKind::IrqWindowOpen, 0),
            VcpuExit::Intr => (ExitKind::Intr, 0),
            _ => (ExitKind::Other, 0),
        }
    }

    fn has_detail(self) -> bool {
        matches!(
            self,
            ExitKind::IoIn
                | ExitKind::IoOut
                | ExitKind::MmioRead
                | ExitKind::MmioWrite
                | ExitKind::SystemEvent
        )
    }
}

/// Detail bits of an entry of [`ExitStats::last`]; the kind sits above them.
const DETAIL_BITS: u32 = 56;

/// Per-vCPU exit statistics: a counter per [`ExitKind`] and a ring of the last
/// [`LAST_EXITS`] exits. Written by the vCPU thread only (a few relaxed atomic operations
/// per exit), readable from any thread.
#[derive(Debug, Default)]
pub struct ExitStats {
    counts: [AtomicU64; EXIT_KINDS],
    /// `kind << 56 | detail`, at `total % LAST_EXITS`.
    last: [AtomicU64; LAST_EXITS],
    total: AtomicU64,
}

impl ExitStats {
    /// Counts one exit of `kind` with `detail` (only the low 56 bits are kept).
    pub fn record(&self, kind: ExitKind, detail: u64) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
        // One writer: a plain load and store are enough for the position.
        let n = self.total.load(Ordering::Relaxed);
        let entry = (kind as u64) << DETAIL_BITS | (detail & ((1 << DETAIL_BITS) - 1));
        self.last[(n % LAST_EXITS as u64) as usize].store(entry, Ordering::Relaxed);
        self.total.store(n + 1, Ordering::Relaxed);
    }

    /// Exits recorded so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The count of `kind`.
    pub fn count(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// The most recent exits, newest first (at most [`LAST_EXITS`]).
    pub fn last(&self) -> Vec<(ExitKind, u64)> {
        let total = self.total();
        let n = total.min(LAST_EXITS as u64);
        (1..=n)
            .map(|back| {
                let e = self.last[((total - back) % LAST_EXITS as u64) as usize]
                    .load(Ordering::Relaxed);
                let kind = KINDS
                    .get((e >> DETAIL_BITS) as usize)
                    .copied()
                    .unwrap_or(ExitKind::Other);
                (kind, e & ((1 << DETAIL_BITS) - 1))
            })
            .collect()
    }

    /// `exits 1234 (io-out 1200, io-in 30, interrupted 4); last 16, newest first: io-out
    /// 0x80 x15, io-in 0x3fd` (kinds never seen are left out; repeats are folded).
    pub fn summary(&self) -> String {
        let mut text = format!("exits {}", self.total());
        let counts: Vec<String> = KINDS
            .iter()
            .filter(|k| self.count(**k) > 0)
            .map(|k| format!("{} {}", k.name(), self.count(*k)))
            .collect();
        if !counts.is_empty() {
            let _ = write!(text, " ({})", counts.join(", "));
        }
        let last = self.last();
        if !last.is_empty() {
            let mut folded: Vec<((ExitKind, u64), usize)> = Vec::new();
            for e in last.iter().copied() {
                match folded.last_mut() {
                    Some((prev, n)) if *prev == e => *n += 1,
                    _ => folded.push((e, 1)),
                }
            }
            let items: Vec<String> = folded
                .into_iter()
                .map(|((kind, detail), n)| {
                    let mut s = kind.name().to_string();
                    if kind.has_detail() {
                        let _ = write!(s, " {detail:#x}");
                    }
                    if n > 1 {
                        let _ = write!(s, " x{n}");
                    }
                    s
                })
                .collect();
            let _ = write!(
                text,
                "; last {}, newest first: {}",
                last.len(),
                items.join(", ")
            );
        }
        text
    }
}

/// A guest's symbol table from a System.map (`ADDRESS TYPE NAME` per line), parsed once at
/// start-up; [`lookup`](Self::lookup) finds the nearest symbol at or below an address.
#[derive(Debug, Default)]
pub struct SymbolMap {
    symbols: BTreeMap<u64, String>,
}

/// An address more than this past the nearest symbol is not attributed to it (the last
/// symbols of a System.map mark the end of the image, not code).
const MAX_SYMBOL_OFFSET: u64 = 1 << 20;

impl SymbolMap {
    /// Parses System.map text. Lines that do not parse are skipped; absolute symbols
    /// (type `a`/`A`) are left out, as they are not addresses in the image.
    pub fn parse(text: &str) -> Self {
        let mut symbols = BTreeMap::new();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if kind.eq_ignore_ascii_case("a") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            // The first name at an address wins (aliases follow it in the file).
            symbols.entry(addr).or_insert_with(|| name.to_string());
        }
        SymbolMap { symbols }
    }

    /// Reads and parses the System.map at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::OpenFile`] when it cannot be read, [`Error::EmptySystemMap`] when it holds no
    /// symbol.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|source| Error::OpenFile {
            what: "system map",
            path: path.to_path_buf(),
            source,
        })?;
        let map = SymbolMap::parse(&String::from_utf8_lossy(&text));
        if map.symbols.is_empty() {
            return Err(Error::EmptySystemMap(path.to_path_buf()));
        }
        Ok(map)
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// `name+0xoff` for the nearest symbol at or below `addr`, if one is close enough.
    pub fn lookup(&self, addr: u64) -> Option<String> {
        let (base, name) = self.symbols.range(..=addr).next_back()?;
        let off = addr - base;
        (off < MAX_SYMBOL_OFFSET).then(|| format!("{name}+{off:#x}"))
    }
}

/// What a vCPU thread reads from its vCPU for a dump; each part may be missing (the ioctl
/// failed).
#[derive(Debug, Default)]
pub struct VcpuSnapshot {
    /// KVM_GET_REGS.
    pub regs: Option<kvm_regs>,
    /// KVM_GET_SREGS.
    pub sregs: Option<kvm_sregs>,
    /// KVM_GET_MP_STATE.
    pub mp_state: Option<u32>,
    /// KVM_GET_VCPU_EVENTS.
    pub events: Option<kvm_vcpu_events>,
    /// KVM_GET_LAPIC.
    pub lapic: Option<kvm_lapic_state>,
}

fn mp_state_name(state: u32) -> String {
    match state {
        kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable".into(),
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "uninitialized".into(),
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "init-received".into(),
        kvm_bindings::KVM_MP_STATE_HALTED => "halted".into(),
        kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "sipi-received".into(),
        other => format!("state {other}"),
    }
}

/// The 32-bit local APIC register at `offset` (the KVM_GET_LAPIC page).
fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs.get(offset + i).map_or(0, |&c| c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The vectors set in the 256-bit register at `base` (IRR, ISR: eight 32-bit words, 16
/// bytes apart).
fn lapic_vectors(lapic: &kvm_lapic_state, base: usize) -> Vec<u32> {
    let mut v = Vec::new();
    for word in 0..8 {
        let bits = lapic_reg(lapic, base + 16 * word);
        for bit in 0..32 {
            if bits & (1 << bit) != 0 {
                v.push(word as u32 * 32 + bit);
            }
        }
    }
    v
}

fn vectors(v: &[u32]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:#x}")).collect();
    format!("[{}]", items.join(" "))
}

const APIC_TPR: usize = 0x80;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const RFLAGS_IF: u64 = 1 << 9;

/// The dump lines of vCPU `id` for dump number `seq` (without the `dump N:` prefix's
/// level; the caller logs each).
pub fn vcpu_lines(
    seq: u64,
    id: u8,
    snap: &VcpuSnapshot,
    stats: &ExitStats,
    symbols: Option<&SymbolMap>,
) -> Vec<String> {
    let mut lines = Vec::with_capacity(3);
    let mut cpu = format!("dump {seq}: vcpu{id}:");
    match (&snap.regs, &snap.sregs) {
        (Some(regs), Some(sregs)) => {
            let rip = sregs.cs.base.wrapping_add(regs.rip);
            let _ = write!(cpu, " rip {rip:#x}");
            if let Some(sym) = symbols.and_then(|s| s.lookup(rip)) {
                let _ = write!(cpu, " <{sym}>");
            }
            let _ = write!(
                cpu,
                " rsp {:#x} rflags {:#x} (interrupts {}) cs {:#x} cr0 {:#x} cr3 {:#x} efer {:#x}",
                regs.rsp,
                regs.rflags,
                if regs.rflags & RFLAGS_IF != 0 {
                    "on"
                } else {
                    "off"
                },
                sregs.cs.selector,
                sregs.cr0,
                sregs.cr3,
                sregs.efer
            );
        }
        _ => cpu.push_str(" registers unavailable"),
    }
    match snap.mp_state {
        Some(s) => {
            let _ = write!(cpu, ", {}", mp_state_name(s));
        }
        None => cpu.push_str(", mp state unavailable"),
    }
    lines.push(cpu);

    let mut irq = format!("dump {seq}: vcpu{id}: events:");
    match &snap.events {
        Some(e) => {
            let _ = write!(
                irq,
                " interrupt {}, nmi {}{}{}, exception {}",
                if e.interrupt.injected != 0 {
                    format!("{:#x} injected", e.interrupt.nr)
                } else {
                    "none".into()
                },
                if e.nmi.pending != 0 { "pending" } else { "-" },
                if e.nmi.injected != 0 { " injected" } else { "" },
                if e.nmi.masked != 0 { " masked" } else { "" },
                if e.exception.injected != 0 || e.exception.pending != 0 {
                    format!(
                        "{} {}",
                        e.exception.nr,
                        if e.exception.injected != 0 {
                            "injected"
                        } else {
                            "pending"
                        }
                    )
                } else {
                    "none".into()
                },
            );
        }
        None => irq.push_str(" unavailable"),
    }
    match &snap.lapic {
        Some(l) => {
            let _ = write!(
                irq,
                "; lapic tpr {:#x} irr {} isr {} timer lvt {:#x} initial count {}",
                lapic_reg(l, APIC_TPR),
                vectors(&lapic_vectors(l, APIC_IRR)),
                vectors(&lapic_vectors(l, APIC_ISR)),
                lapic_reg(l, APIC_LVT_TIMER),
                lapic_reg(l, APIC_TMICT)
            );
        }
        None => irq.push_str("; lapic unavailable"),
    }
    lines.push(irq);
    lines.push(format!("dump {seq}: vcpu{id}: {}", stats.summary()));
    lines
}

/// The raw fd of the EventFd [`DUMP_SIGNAL`] writes (-1 until installed).
static DUMP_EVT_FD: crate::signal_evt::Slot = crate::signal_evt::Slot::new(-1);

extern "C" fn handle_dump_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::signal_evt::wake(&DUMP_EVT_FD);
}

/// Makes [`DUMP_SIGNAL`] write `evt` (any thread may take the signal; the handler only
/// writes the eventfd, and the event loop does the rest).
///
/// # Errors
///
/// [`Error::EventFd`] or [`Error::Signals`].
pub fn install_dump_handler(evt: &vmm_sys_util::eventfd::EventFd) -> Result<()> {
    crate::signal_evt::install(evt, &DUMP_EVT_FD, &[DUMP_SIGNAL], handle_dump_signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_stats_count_and_remember_the_last_exits() {
        let s = ExitStats::default();
        assert_eq!(s.summary(), "exits 0");
        s.record(ExitKind::IoIn, 0x3fd);
        for _ in 0..20 {
            s.record(ExitKind::IoOut, 0x80);
        }
        s.record(ExitKind::Interrupted, libc::EINTR as u64);
        s.record(ExitKind::MmioWrite, 0xfebf_3000);
        assert_eq!(s.total(), 23);
        assert_eq!(s.count(ExitKind::IoOut), 20);
        assert_eq!(s.count(ExitKind::Hlt), 0);
        let last = s.last();
        assert_eq!(last.len(), LAST_EXITS);
        assert_eq!(last[0], (ExitKind::MmioWrite, 0xfebf_3000));
        assert_eq!(last[1].0, ExitKind::Interrupted);
        assert_eq!(last[2], (ExitKind::IoOut, 0x80));
        assert_eq!(
            s.summary(),
            "exits 23 (io-in 1, io-out 20, mmio-write 1, interrupted 1); last 16, newest \
             first: mmio-write 0xfebf3000, interrupted, io-out 0x80 x14"
        );
    }

    #[test]
    fn exit_kinds_of_hand_made_exits() {
        let mut data = [0u8; 4];
        assert_eq!(
            ExitKind::of(&VcpuExit::IoIn(0x3f8, &mut data[..1])),
            (ExitKind::IoIn, 0x3f8)
        );
        assert_eq!(
            ExitKind::of(&VcpuExit::MmioRead(0xfee0_0030, &mut data)),
            (ExitKind::MmioRead, 0xfee0_0030)
        );
        assert_eq!(ExitKind::of(&VcpuExit::Shutdown), (ExitKind::Shutdown, 0));
        assert_eq!(ExitKind::of(&VcpuExit::Hlt), (ExitKind::Hlt, 0));
        assert_eq!(ExitKind::of(&VcpuExit::InternalError), (ExitKind::Other, 0));
        for (i, k) in KINDS.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    const MAP: &str = "\
0000000000000000 A VDSO32_PRELINK
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t native_safe_halt
ffffffff81001010 T default_idle
ffffffff81001040 T arch_cpu_idle
this line is not a symbol
ffffffff82000000 B _end
";

    #[test]
    fn symbol_lookup_takes_the_nearest_symbol_below() {
        let map = SymbolMap::parse(MAP);
        assert_eq!(map.len(), 5);
        assert_eq!(
            map.lookup(0xffff_ffff_8100_1012).unwrap(),
            "default_idle+0x2"
        );
        assert_eq!(
            map.lookup(0xffff_ffff_8100_1010).unwrap(),
            "default_idle+0x0"
        );
        assert_eq!(map.lookup(0xffff_ffff_8100_0000).unwrap(), "_text+0x0");
        // Below the first symbol (the absolute one is not used), and far past the last.
        assert_eq!(map.lookup(0x10_0000), None);
        assert_eq!(map.lookup(0xffff_ffff_8300_0000), None);
    }

    #[test]
    fn an_empty_or_missing_system_map_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tvm-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.map");
        std::fs::write(&empty, "nothing here\n").unwrap();
        assert!(matches!(
            SymbolMap::load(&empty),
            Err(Error::EmptySystemMap(_))
        ));
        assert!(matches!(
            SymbolMap::load(&dir.join("missing.map")),
            Err(Error::OpenFile { .. })
        ));
        let good = dir.join("System.map");
        std::fs::write(&good, MAP).unwrap();
        assert_eq!(SymbolMap::load(&good).unwrap().len(), 5);
    }

    fn lapic_with(regs: &[(usize, u32)]) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        for &(off, v) in regs {
            for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                l.regs[off + i] = b as _;
            }
        }
        l
    }

    #[test]
    fn vcpu_lines_name_rip_symbol_state_events_and_exits() {
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_1013,
            rsp: 0xffff_c900_0000_3f00,
            rflags: 0x246,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x10;
        sregs.cr0 = 0x8005_0033;
        sregs.cr3 = 0x1e0_a000;
        sregs.efer = 0xd01;
        let mut events = kvm_vcpu_events::default();
        events.interrupt.injected = 1;
        events.interrupt.nr = 0xec;
        let snap = VcpuSnapshot {
            regs: Some(regs),
            sregs: Some(sregs),
            mp_state: Some(kvm_bindings::KVM_MP_STATE_HALTED),
            events: Some(events),
            // IRR: vectors 0x24 (word 1, bit 4) and 0xef; ISR: 0x30.
            lapic: Some(lapic_with(&[
                (APIC_IRR + 16, 1 << 4),
                (APIC_IRR + 16 * 7, 1 << 15),
                (APIC_ISR + 16, 1 << 16),
                (APIC_LVT_TIMER, 0x400ec),
            ])),
        };
        let stats = ExitStats::default();
        stats.record(ExitKind::Hlt, 0);
        let map = SymbolMap::parse(MAP);
        let lines = vcpu_lines(3, 0, &snap, &stats, Some(&map));
        assert_eq!(
            lines,
            vec![
                "dump 3: vcpu0: rip 0xffffffff81001013 <default_idle+0x3> rsp 0xffffc90000003f00 \
                 rflags 0x246 (interrupts on) cs 0x10 cr0 0x80050033 cr3 0x1e0a000 efer 0xd01, \
                 halted"
                    .to_string(),
                "dump 3: vcpu0: events: interrupt 0xec injected, nmi -, exception none; lapic \
                 tpr 0x0 irr [0x24 0xef] isr [0x30] timer lvt 0x400ec initial count 0"
                    .to_string(),
                "dump 3: vcpu0: exits 1 (hlt 1); last 1, newest first: hlt".to_string(),
            ]
        );
        // Interrupts off, no symbol map, nothing readable.
        regs.rflags = 0x2;
        let snap = VcpuSnapshot {
            regs: Some(regs),
            sregs: Some(sregs),
            ..Default::default()
        };
        let lines = vcpu_lines(4, 1, &snap, &stats, None);
        assert!(lines[0].starts_with("dump 4: vcpu1: rip 0xffffffff81001013 rsp"));
        assert!(lines[0].contains("(interrupts off)"));
        assert!(lines[0].ends_with(", mp state unavailable"));
        assert_eq!(
            lines[1],
            "dump 4: vcpu1: events: unavailable; lapic unavailable"
        );
        let none = vcpu_lines(5, 0, &VcpuSnapshot::default(), &stats, None);
        assert_eq!(
            none[0],
            "dump 5: vcpu0: registers unavailable, mp state unavailable"
        );
    }
}
