//! What a snapshot holds: the machine's shape, where each RAM region is in the memory file,
//! each vCPU's KVM state, the VM's in-kernel devices and clock, and every emulated device.

use std::path::PathBuf;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most vCPUs a snapshot may describe (the VMM's own limit).
pub const MAX_VCPUS: usize = 254;
/// Most MSI-X vectors of one virtio device (queues + 1).
pub const MAX_MSIX_VECTORS: usize = 65;
/// Most queues of one virtio device.
pub const MAX_QUEUES: usize = 64;
/// Guest pages are this large; memory regions are aligned to it.
pub const PAGE_SIZE: u64 = 4096;

/// Full (all of RAM) or diff (only the pages dirtied since the previous snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every page of guest RAM is in the memory file.
    Full,
    /// Only the pages written since the last snapshot are in the memory file, at their
    /// offsets; the others are holes, to be filled from the previous memory file.
    Diff,
}

/// A saved VM: everything but the contents of guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The version of the VMM that wrote it (for people; [`crate::FORMAT_VERSION`] is
    /// what decides whether it can be read).
    pub vmm_version: String,
    /// Full or diff.
    pub snapshot_type: SnapshotType,
    /// vCPU topology and memory size.
    pub machine: Machine,
    /// Guest RAM regions and where each is in the memory file.
    pub memory: Vec<MemoryRegion>,
    /// One per vCPU, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel PIC, IOAPIC, PIT and kvmclock.
    pub vm: VmState,
    /// The emulated devices.
    pub devices: Devices,
}

/// The machine's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// vCPUs.
    pub vcpu_count: u8,
    /// Threads per core.
    pub threads_per_core: u8,
    /// Cores per socket.
    pub cores_per_socket: u8,
    /// Sockets.
    pub sockets: u8,
    /// Guest RAM in bytes.
    pub mem_size: u64,
}

/// One region of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where its bytes start in the memory file.
    pub file_offset: u64,
}

/// One vCPU, as KVM exposes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU had (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists as saveable that the vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX and the other XSAVE components.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency in kHz, where KVM tells it.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// The host's wall-clock time (CLOCK_REALTIME, ns since the epoch) when `clock` was
    /// read: how far to move kvmclock on where KVM cannot (`KVM_CLOCK_REALTIME` needs
    /// KVM's master clock, which a host without a stable TSC does not have).
    pub host_realtime_ns: u64,
}

/// The emulated devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// COM1.
    pub serial: SerialState,
    /// The CMOS/RTC's index register and NVRAM.
    pub cmos: CmosState,
    /// The i8042 and its keyboard, as the guest configured them.
    pub i8042: I8042State,
    /// The virtio devices, in PCI slot order.
    pub virtio: Vec<VirtioState>,
}

/// The 16550A's registers (vm-superio's `SerialState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    /// A 16550A after reset (vm-superio's defaults).
    fn default() -> Self {
        SerialState {
            baud_divisor_low: 0x0c,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 0x01,
            line_control: 0x03,
            line_status: 0x60,
            modem_control: 0x08,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: Vec::new(),
        }
    }
}

/// The CMOS: index register and the bytes the guest may write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register.
    pub index: u8,
    /// The 128 bytes of NVRAM (the clock registers are read from the host clock).
    pub data: Vec<u8>,
}

/// The i8042's configuration (bytes in flight are not kept: a restored keyboard starts
/// with empty buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller's control register (interrupt enables, translation ...).
    pub ctr: u8,
    /// The keyboard's scancode set: 1, 2 or 3.
    pub scan_set: u8,
    /// Whether the keyboard sends keys.
    pub scanning: bool,
}

impl Default for I8042State {
    /// At power-on: keyboard interrupt, system flag and translation on; set 2; scanning.
    fn default() -> Self {
        I8042State {
            ctr: 0x47,
            scan_set: 2,
            scanning: true,
        }
    }
}

/// A virtio device: what it is backed by, and its transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The device and its host-side backing.
    pub kind: VirtioKind,
    /// The PCI transport.
    pub transport: TransportState,
}

/// A virtio device and what backs it on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioKind {
    /// virtio-blk on an image file.
    Block {
        /// The image.
        path: PathBuf,
        /// Opened read-only.
        read_only: bool,
        /// The serial (`VIRTIO_BLK_T_GET_ID`).
        id: Option<String>,
        /// `writeback` or `none`.
        cache: String,
        /// `auto`, `io_uring` or `sync`.
        io_engine: String,
        /// Queues.
        num_queues: u16,
        /// The API's name for it (Firecracker's `drive_id`).
        name: Option<String>,
    },
    /// virtio-net on a TAP.
    Net {
        /// The TAP's name.
        tap: String,
        /// The guest's MAC address.
        mac: [u8; 6],
        /// The API's name for it (Firecracker's `iface_id`).
        name: Option<String>,
    },
    /// virtio-rng.
    Rng,
    /// virtio-vsock with a hybrid (Unix socket) backend.
    Vsock {
        /// The guest's context id.
        cid: u64,
        /// The host socket.
        uds: PathBuf,
    },
}

/// The virtio-pci transport as the driver left it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device type (2 block, 1 net, 4 entropy, 19 socket).
    pub device_type: u32,
    /// BAR 0 as programmed.
    pub bar_addr: u64,
    /// The PCI command register.
    pub command: u16,
    /// The interrupt line register.
    pub interrupt_line: u8,
    /// The MSI-X capability's message control.
    pub msix_control: u16,
    /// The MSI-X table: address low, address high, data, vector control.
    pub msix_table: Vec<[u32; 4]>,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// The device status byte.
    pub status: u8,
    /// `config_generation`.
    pub config_generation: u8,
    /// The configuration-change MSI-X vector.
    pub config_vector: u16,
    /// Each queue as configured.
    pub queues: Vec<QueueState>,
}

/// One virtqueue as the driver configured it. Where the device was in it is read back
/// from the used ring in guest memory: a paused device has completed every chain it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Queue size.
    pub size: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub driver: u64,
    /// Used (device) ring.
    pub device: u64,
    /// MSI-X vector.
    pub vector: u16,
}

fn invalid(what: impl Into<String>) -> Error {
    Error::Invalid(what.into())
}

impl Snapshot {
    /// Checks that the snapshot describes a machine the VMM can rebuild: vCPU count and
    /// topology agree, memory regions are page aligned, ordered, disjoint, add up to the
    /// memory size and do not overlap in the memory file, and each device's transport is
    /// within the transport's limits.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        let m = &self.machine;
        let n = usize::from(m.vcpu_count);
        if n == 0 || n > MAX_VCPUS {
            return Err(invalid(format!("{n} vcpus")));
        }
        if u32::from(m.threads_per_core) * u32::from(m.cores_per_socket) * u32::from(m.sockets)
            != u32::from(m.vcpu_count)
        {
            return Err(invalid(format!(
                "topology {}x{}x{} is not {} vcpus",
                m.threads_per_core, m.cores_per_socket, m.sockets, m.vcpu_count
            )));
        }
        if self.vcpus.len() != n {
            return Err(invalid(format!(
                "{} vcpu states for {n} vcpus",
                self.vcpus.len()
            )));
        }
        if self.memory.is_empty() {
            return Err(invalid("no memory regions"));
        }
        let mut total = 0u64;
        let mut prev_end = 0u64;
        let mut file_ranges = Vec::with_capacity(self.memory.len());
        for (i, r) in self.memory.iter().enumerate() {
            let end = r.guest_addr.checked_add(r.size);
            let file_end = r.file_offset.checked_add(r.size);
            let (Some(end), Some(file_end)) = (end, file_end) else {
                return Err(invalid(format!("memory region {i} wraps around")));
            };
            if r.size == 0
                || r.guest_addr % PAGE_SIZE != 0
                || r.size % PAGE_SIZE != 0
                || r.file_offset % PAGE_SIZE != 0
            {
                return Err(invalid(format!(
                    "memory region {i} at {:#x}, {:#x} bytes, file offset {:#x} is not page aligned",
                    r.guest_addr, r.size, r.file_offset
                )));
            }
            if i > 0 && r.guest_addr < prev_end {
                return Err(invalid(format!(
                    "memory region {i} at {:#x} overlaps or precedes the one before",
                    r.guest_addr
                )));
            }
            prev_end = end;
            total = total.saturating_add(r.size);
            file_ranges.push((r.file_offset, file_end));
        }
        file_ranges.sort_unstable();
        if file_ranges.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(invalid("memory regions overlap in the memory file"));
        }
        if total != m.mem_size {
            return Err(invalid(format!(
                "memory regions hold {total} bytes, the machine has {}",
                m.mem_size
            )));
        }
        for (i, d) in self.devices.virtio.iter().enumerate() {
            let t = &d.transport;
            if t.queues.is_empty() || t.queues.len() > MAX_QUEUES {
                return Err(invalid(format!(
                    "virtio device {i} has {} queues",
                    t.queues.len()
                )));
            }
            if t.msix_table.len() > MAX_MSIX_VECTORS {
                return Err(invalid(format!(
                    "virtio device {i} has {} msi-x vectors",
                    t.msix_table.len()
                )));
            }
            let expected_type = match d.kind {
                VirtioKind::Net { .. } => 1,
                VirtioKind::Block { num_queues, .. } => {
                    if usize::from(num_queues) != t.queues.len() {
                        return Err(invalid(format!(
                            "virtio-blk {i}: {num_queues} queues configured, {} saved",
                            t.queues.len()
                        )));
                    }
                    2
                }
                VirtioKind::Rng => 4,
                VirtioKind::Vsock { .. } => 19,
            };
            if t.device_type != expected_type {
                return Err(invalid(format!(
                    "virtio device {i} is of type {}, its backing is for type {expected_type}",
                    t.device_type
                )));
            }
        }
        if self.devices.serial.in_buffer.len() > 64 {
            return Err(invalid("more than 64 bytes in the serial receive fifo"));
        }
        if self.devices.cmos.data.len() > 128 {
            return Err(invalid("more than 128 bytes of cmos"));
        }
        Ok(())
    }

    /// A small, valid snapshot (one vCPU, 16 MiB, a disk), for tests and examples.
    #[doc(hidden)]
    pub fn example() -> Snapshot {
        Self::example_with(1)
    }

    /// [`example`](Self::example) with `n` vCPUs (cores of one socket).
    #[doc(hidden)]
    pub fn example_with(n: u8) -> Snapshot {
        let vcpu = || VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0001,
                edx: 0x178b_fbff,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 123_456,
                ..Default::default()
            }],
            regs: kvm_regs {
                rip: 0x10_0000,
                rax: 42,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_000_000),
        };
        Snapshot {
            vmm_version: "0.1.0".into(),
            snapshot_type: SnapshotType::Full,
            machine: Machine {
                vcpu_count: n,
                threads_per_core: 1,
                cores_per_socket: n,
                sockets: 1,
                mem_size: 16 << 20,
            },
            memory: vec![MemoryRegion {
                guest_addr: 0,
                size: 16 << 20,
                file_offset: 0,
            }],
            vcpus: (0..n).map(|_| vcpu()).collect(),
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip {
                    chip_id: 1,
                    ..Default::default()
                },
                ioapic: kvm_irqchip {
                    chip_id: 2,
                    ..Default::default()
                },
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 1_000_000,
                    ..Default::default()
                },
                host_realtime_ns: 1_796_000_000_000_000_000,
            },
            devices: Devices {
                serial: SerialState::default(),
                cmos: CmosState {
                    index: 0,
                    data: vec![0; 128],
                },
                i8042: I8042State::default(),
                virtio: vec![VirtioState {
                    kind: VirtioKind::Block {
                        path: "/tmp/disk.img".into(),
                        read_only: false,
                        id: None,
                        cache: "writeback".into(),
                        io_engine: "auto".into(),
                        num_queues: 1,
                        name: Some("rootfs".into()),
                    },
                    transport: TransportState {
                        device_type: 2,
                        bar_addr: 0xc000_0000,
                        command: 0x6,
                        msix_control: 0x8001,
                        msix_table: vec![[0xfee0_0000, 0, 0x21, 0], [0xfee0_0000, 0, 0x22, 0]],
                        driver_features: 1 << 32,
                        status: 0xf,
                        queues: vec![QueueState {
                            size: 256,
                            enabled: true,
                            desc: 0x10_0000,
                            driver: 0x10_1000,
                            device: 0x10_2000,
                            vector: 1,
                        }],
                        ..Default::default()
                    },
                }],
            },
        }
    }
}

/// CPUID registers that carry CPU features, with the bits that the guest's own settings
/// turn on at run time (OSXSAVE, OSPKE) left out: (leaf, index, register, mask).
const FEATURE_REGISTERS: &[(u32, u32, usize, u32)] = &[
    (0x1, 0, 2, !(1 << 27)),
    (0x1, 0, 3, !0),
    (0x7, 0, 1, !0),
    (0x7, 0, 2, !(1 << 4)),
    (0x7, 0, 3, !0),
    (0x7, 1, 0, !0),
    (0xd, 1, 0, !0),
    (0x8000_0001, 0, 2, !0),
    (0x8000_0001, 0, 3, !0),
    (0x8000_0008, 0, 1, !0),
];

const REGISTER_NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    // KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry is for one index only.
    entries
        .iter()
        .find(|e| e.function == leaf && (e.flags & 1 == 0 || e.index == index))
}

fn register(e: &kvm_cpuid_entry2, r: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][r]
}

/// Checks that every CPU feature in a saved vCPU's CPUID (`saved`) is one this host would
/// give a new vCPU (`available`: the VMM's CPUID for the same place in the topology).
///
/// # Errors
///
/// [`Error::CpuFeatures`] naming the first register with bits the host lacks.
pub fn check_cpu_features(
    saved: &[kvm_cpuid_entry2],
    available: &[kvm_cpuid_entry2],
) -> Result<()> {
    for &(leaf, index, r, mask) in FEATURE_REGISTERS {
        let Some(s) = find(saved, leaf, index) else {
            continue;
        };
        let have = find(available, leaf, index).map_or(0, |a| register(a, r));
        let missing = register(s, r) & mask & !have;
        if missing != 0 {
            return Err(Error::CpuFeatures {
                leaf,
                index,
                register: REGISTER_NAMES[r],
                missing,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: u32::from(function == 7 || function == 0xd),
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn the_example_is_valid_and_each_inconsistency_is_named() {
        Snapshot::example().validate().unwrap();
        type BreakIt = Box<dyn Fn(&mut Snapshot)>;
        let cases: Vec<(&str, BreakIt)> = vec![
            ("0 vcpus", Box::new(|s| s.machine.vcpu_count = 0)),
            ("topology", Box::new(|s| s.machine.sockets = 2)),
            ("vcpu states", Box::new(|s| s.vcpus.clear())),
            ("no memory", Box::new(|s| s.memory.clear())),
            ("page aligned", Box::new(|s| s.memory[0].size = 4097)),
            ("regions hold", Box::new(|s| s.memory[0].size = 8 << 20)),
            (
                "wraps",
                Box::new(|s| s.memory[0].file_offset = u64::MAX - 4095),
            ),
            (
                "overlap in the memory file",
                Box::new(|s| {
                    s.memory[0].size = 8 << 20;
                    s.memory.push(MemoryRegion {
                        guest_addr: 8 << 20,
                        size: 8 << 20,
                        file_offset: 4096,
                    });
                }),
            ),
            (
                "overlaps or precedes",
                Box::new(|s| {
                    s.memory[0].size = 8 << 20;
                    s.memory.push(MemoryRegion {
                        guest_addr: 4096,
                        size: 8 << 20,
                        file_offset: 8 << 20,
                    });
                }),
            ),
            (
                "type 1",
                Box::new(|s| s.devices.virtio[0].transport.device_type = 1),
            ),
            (
                "queues configured",
                Box::new(|s| {
                    let q = s.devices.virtio[0].transport.queues[0];
                    s.devices.virtio[0].transport.queues.push(q);
                }),
            ),
            (
                "msi-x vectors",
                Box::new(|s| s.devices.virtio[0].transport.msix_table = vec![[0; 4]; 66]),
            ),
            (
                "serial",
                Box::new(|s| s.devices.serial.in_buffer = vec![0; 65]),
            ),
        ];
        for (what, break_it) in cases {
            let mut s = Snapshot::example();
            break_it(&mut s);
            let e = s.validate().unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn cpu_features_the_host_lacks_are_refused_and_run_time_bits_are_not_features() {
        let host = vec![
            leaf(1, 0, [0, 0, 0x0000_0201, 0x178b_fbff]),
            leaf(7, 0, [0, 0x0000_0209, 0, 0]),
        ];
        // The same, plus OSXSAVE (the guest set CR4.OSXSAVE) and OSPKE: fine.
        let saved = vec![
            leaf(1, 0, [0, 0, 0x0800_0201, 0x178b_fbff]),
            leaf(7, 0, [0, 0x0000_0209, 1 << 4, 0]),
        ];
        check_cpu_features(&saved, &host).unwrap();
        // AVX2 (leaf 7 ebx bit 5) on the saved side only.
        let saved = vec![leaf(7, 0, [0, 0x0000_0229, 0, 0])];
        let e = check_cpu_features(&saved, &host).unwrap_err();
        assert!(
            matches!(
                e,
                Error::CpuFeatures {
                    leaf: 7,
                    index: 0,
                    register: "ebx",
                    missing: 0x20
                }
            ),
            "{e}"
        );
        // A leaf the host does not have at all: every saved feature bit in it is missing.
        let saved = vec![leaf(0x8000_0001, 0, [0, 0, 0x1, 0])];
        assert!(check_cpu_features(&saved, &host).is_err());
    }
}
