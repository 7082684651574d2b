//! Tests that need /dev/kvm (PVM is enough): tiny hand-made guests check the entry state
//! the arch crate sets up, and that port I/O and the UART work through the real bus.
//!
//! Ignored by plain `cargo test`; `cargo xtask kvm-test` runs them, and they fail (not skip)
//! without /dev/kvm.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use tvm_arch_x86::{layout, BootMode, VcpuBootConfig};
use tvm_bus::{register_pio_device, IoManager, PioAddress, PioManager};
use tvm_memory::GuestMemoryMmap;
use tvm_tests::{Asm, GUEST_ENTRY};
use vm_memory::{Bytes, GuestAddress};

struct TinyVm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    _mem: GuestMemoryMmap,
}

/// A 64 MiB VM with `code` at the entry point, vCPU configured for `mode`, no irqchip (so
/// HLT comes back to us).
fn tiny_vm(code: &[u8], mode: BootMode, prepare: impl FnOnce(&GuestMemoryMmap)) -> TinyVm {
    let kvm = Kvm::new().expect("these tests need /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(layout::KVM_TSS_ADDRESS.0 as usize)
        .unwrap();
    let ram = layout::ram_ranges(64 << 20);
    let mem = tvm_memory::create_guest_memory(&ram).unwrap();
    // SAFETY: `register_memory_slots` needs `mem`'s regions mapped for as long as the VM
    // can use the slots: `mem` moves into the returned `TinyVm`, whose `_mem` field is
    // declared after `_vm` and `vcpu`, so it is dropped after every fd of the VM is closed.
    unsafe { tvm_memory::register_memory_slots(&vm, &mem) }.unwrap();
    mem.write_slice(code, GuestAddress(GUEST_ENTRY)).unwrap();
    prepare(&mem);
    let vcpu = vm.create_vcpu(0).unwrap();
    tvm_arch_x86::configure_vcpu(
        &kvm,
        &vcpu,
        &mem,
        &VcpuBootConfig {
            index: 0,
            topology: tvm_arch_x86::CpuTopology::flat(1).unwrap(),
            entry: GuestAddress(GUEST_ENTRY),
            mode,
            irqchip: false,
        },
    )
    .unwrap();
    TinyVm {
        _kvm: kvm,
        _vm: vm,
        vcpu,
        _mem: mem,
    }
}

/// Runs until HLT, collecting `(port, value)` of every OUT. Gives up after 1000 exits.
fn run_collect(vcpu: &mut VcpuFd, io: Option<&IoManager>) -> Vec<(u16, u32)> {
    let mut outs = Vec::new();
    for _ in 0..1000 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                let mut v = [0u8; 4];
                v[..data.len()].copy_from_slice(data);
                outs.push((port, u32::from_le_bytes(v)));
                if let Some(io) = io {
                    let _ = io.pio_write(PioAddress(port), data);
                }
            }
            VcpuExit::Hlt => return outs,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("guest did not halt");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_64bit_entry_state() {
    let code = Asm::new()
        .mov_rax(0x1122_3344_5566_7788)
        .shr_rax(32)
        .out_eax(0x10)
        .mov_eax_esi()
        .out_eax(0x11)
        // Above 2 MiB: only reachable through the identity map's later PD entries.
        .load_eax(0x3f0_0000)
        .out_eax(0x12)
        .halt_forever()
        .finish();
    let mut t = tiny_vm(&code, BootMode::Long64, |mem| {
        mem.write_obj(0xcafe_f00du32, GuestAddress(0x3f0_0000))
            .unwrap();
    });
    let sregs = t.vcpu.get_sregs().unwrap();
    assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.selector), (1, 0, 0x10));
    assert_eq!(sregs.efer & 0x500, 0x500, "LME|LMA");
    assert_ne!(sregs.cr0 & tvm_arch_x86::X86_CR0_PG, 0);
    assert_ne!(sregs.cr4 & tvm_arch_x86::X86_CR4_PAE, 0);
    assert_eq!(sregs.cr3, layout::PML4_START.0);

    let outs = run_collect(&mut t.vcpu, None);
    assert_eq!(
        outs,
        vec![
            (0x10, 0x1122_3344),
            (0x11, layout::ZERO_PAGE_START.0 as u32),
            (0x12, 0xcafe_f00d)
        ],
        "64-bit code ran, RSI points at the zero page, the identity map covers 64 MiB"
    );
    let regs = t.vcpu.get_regs().unwrap();
    assert_eq!(regs.rsi, layout::ZERO_PAGE_START.0);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_32bit_entry_state() {
    let code = Asm::new()
        .mov_eax(0xdead_beef)
        .out_eax(0x10)
        .mov_eax_esi()
        .out_eax(0x11)
        .load_eax(0x3f0_0000)
        .out_eax(0x12)
        .halt_forever()
        .finish();
    let mut t = tiny_vm(&code, BootMode::Protected32, |mem| {
        mem.write_obj(0x1234_5678u32, GuestAddress(0x3f0_0000))
            .unwrap();
    });
    let sregs = t.vcpu.get_sregs().unwrap();
    assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.selector), (0, 1, 0x10));
    assert_eq!((sregs.ds.selector, sregs.ss.selector), (0x18, 0x18));
    assert_eq!(sregs.cr0 & 1, 1, "protected mode");
    assert_eq!(sregs.cr0 & tvm_arch_x86::X86_CR0_PG, 0, "paging off");
    assert_eq!(sregs.efer & 0x500, 0);
    let outs = run_collect(&mut t.vcpu, None);
    assert_eq!(
        outs,
        vec![
            (0x10, 0xdead_beef),
            (0x11, layout::ZERO_PAGE_START.0 as u32),
            (0x12, 0x1234_5678)
        ]
    );
}

#[derive(Default)]
struct PortLog(Vec<(u16, Vec<u8>)>);

impl tvm_bus::MutDevicePio for PortLog {
    fn pio_read(&mut self, _: PioAddress, _: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&mut self, _: PioAddress, offset: u16, data: &[u8]) {
        self.0.push((offset, data.to_vec()));
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_port_io_reaches_the_bus() {
    let code = Asm::new()
        .mov_al(0x5a)
        .out_al(0x72)
        .mov_eax(0x0102_0304)
        .out_eax(0x70)
        .halt_forever()
        .finish();
    let mut t = tiny_vm(&code, BootMode::Long64, |_| {});
    let mut io = IoManager::new();
    let dev = Arc::new(Mutex::new(PortLog::default()));
    register_pio_device(&mut io, 0x70, 4, dev.clone()).unwrap();
    run_collect(&mut t.vcpu, Some(&io));
    assert_eq!(
        dev.lock().unwrap().0,
        vec![(2, vec![0x5a]), (0, vec![4, 3, 2, 1])]
    );
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_text_through_the_uart() {
    let code = Asm::new()
        .print(0x3f8, b"hello, uart\r\n")
        .halt_forever()
        .finish();
    let mut t = tiny_vm(&code, BootMode::Protected32, |_| {});
    let out = SharedBuf::default();
    let serial = Arc::new(Mutex::new(
        tvm_serial::SerialDevice::new(out.clone()).unwrap(),
    ));
    let mut io = IoManager::new();
    register_pio_device(&mut io, 0x3f8, 8, serial).unwrap();
    run_collect(&mut t.vcpu, Some(&io));
    assert_eq!(&*out.0.lock().unwrap(), b"hello, uart\r\n");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_guest_sees_the_filtered_cpuid() {
    // Leaf 0x4000_0000 (KVM signature) and leaf 1 (APIC id, hypervisor bit), as the guest
    // reads them with the CPUID instruction.
    let code = Asm::new()
        .mov_eax(0x4000_0000)
        .zero_ecx()
        .cpuid()
        .out_eax(0x10)
        .mov_eax_ebx()
        .out_eax(0x11)
        .mov_eax_ecx()
        .out_eax(0x12)
        .mov_eax_edx()
        .out_eax(0x13)
        .mov_eax(1)
        .zero_ecx()
        .cpuid()
        .mov_eax_ebx()
        .out_eax(0x14)
        .mov_eax_ecx()
        .out_eax(0x15)
        .halt_forever()
        .finish();
    let mut t = tiny_vm(&code, BootMode::Long64, |_| {});
    let outs = run_collect(&mut t.vcpu, None);
    let v: Vec<u32> = outs.iter().map(|(_, v)| *v).collect();
    assert_eq!(v[0], tvm_arch_x86::KVM_CPUID_FEATURES);
    let mut sig = Vec::new();
    for r in &v[1..4] {
        sig.extend_from_slice(&r.to_le_bytes());
    }
    // Linux compares all 12 bytes with KVM_SIGNATURE (hypervisor_cpuid_base).
    assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    assert_eq!(v[4] >> 24, 0, "APIC id of vcpu 0");
    assert_ne!(v[5] & (1 << 31), 0, "hypervisor bit");
}

/// A 32-bit register of a `kvm_lapic_state` (the APIC page as KVM_GET_LAPIC returns it).
fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

/// Whether `vector` is pending in the LAPIC's IRR (eight 32-bit registers from 0x200,
/// 16 bytes apart).
fn irr_has(vcpu: &VcpuFd, vector: u8) -> bool {
    let lapic = vcpu.get_lapic().unwrap();
    let reg = lapic_reg(&lapic, 0x200 + usize::from(vector / 32) * 0x10);
    reg & (1 << (vector % 32)) != 0
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_an_irqfd_on_an_msi_route_raises_its_vector_in_the_lapic() {
    const VECTOR: u8 = 0x41;
    const OTHER: u8 = 0x62;
    let kvm = Kvm::new().expect("these tests need /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    tvm_irq::setup_irqchip(&vm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    tvm_arch_x86::setup_lint(&vcpu, true).unwrap();
    // The LAPIC takes fixed interrupts only when software-enabled (SVR bit 8), as the
    // guest's APIC driver leaves it.
    let mut lapic = vcpu.get_lapic().unwrap();
    let svr = lapic_reg(&lapic, 0xf0) | 0x1ff;
    for (dst, src) in lapic.regs[0xf0..0xf4].iter_mut().zip(svr.to_le_bytes()) {
        *dst = src as _;
    }
    vcpu.set_lapic(&lapic).unwrap();

    // Two MSI routes to APIC ID 0 (fixed delivery, physical destination), two irqfds.
    let mut routing = tvm_irq::GsiRouting::new();
    let gsi = routing.allocate_msi_gsi().unwrap();
    let other_gsi = routing.allocate_msi_gsi().unwrap();
    routing
        .set_msi(gsi, Some((0xfee0_0000, u32::from(VECTOR))))
        .unwrap();
    routing
        .set_msi(other_gsi, Some((0xfee0_0000, u32::from(OTHER))))
        .unwrap();
    routing.apply(&vm).unwrap();
    let evt = vmm_sys_util::eventfd::EventFd::new(libc_nonblock()).unwrap();
    vm.register_irqfd(&evt, gsi).unwrap();
    let other = vmm_sys_util::eventfd::EventFd::new(libc_nonblock()).unwrap();
    vm.register_irqfd(&other, other_gsi).unwrap();
    assert!(!irr_has(&vcpu, VECTOR) && !irr_has(&vcpu, OTHER));

    // The device's signal: the route's vector, and only it, becomes pending. KVM may
    // deliver from a work queue, so wait a little.
    evt.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !irr_has(&vcpu, VECTOR) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(irr_has(&vcpu, VECTOR), "vector {VECTOR:#x} is not pending");
    assert!(
        !irr_has(&vcpu, OTHER),
        "vector {OTHER:#x} pending unsignalled"
    );

    // A route removed and the table applied again: its irqfd no longer delivers.
    routing.set_msi(other_gsi, None).unwrap();
    routing.apply(&vm).unwrap();
    other.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!irr_has(&vcpu, OTHER), "a removed route delivered");

    // The legacy lines still work after the table was replaced.
    let com1 = tvm_irq::IrqLine::new(4).unwrap();
    com1.register(&vm).unwrap();
}

fn libc_nonblock() -> i32 {
    vmm_sys_util::eventfd::EFD_NONBLOCK
}
