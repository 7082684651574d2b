//! ACPI tables: how the guest finds its local APICs and IOAPIC, its PCI host bridge and
//! legacy devices, and how it powers off.
//!
//! The tables are built with rust-vmm's `acpi_tables` crate and written once, before the
//! first `KVM_RUN`, into the e820-reserved BIOS area below 1 MiB: the RSDP at
//! [`RSDP_START`], where Linux scans for it (and `boot_params.acpi_rsdp_addr` points), and
//! the others from [`ACPI_TABLES_START`]:
//!
//! ```text
//! RSDP -> XSDT -> FADT -> FACS
//!              |       -> DSDT  \_SB.PCI0 (PNP0A03, _CRS, _PRT), COM1, PS/2 keyboard,
//!              |                RTC, pvpanic; \_S5
//!              -> MADT  local APIC per vCPU, IOAPIC, SCI override, LINT1 NMI
//! ```
//!
//! - **FADT**: a full one, not hardware-reduced, because the machine has the PC legacy
//!   hardware (PIT, PIC, i8042, 8250, CMOS). It declares the PM1a event and control
//!   blocks at [`PM1A_EVT_BLK_PORT`] and [`PM1A_CNT_BLK_PORT`] (the VMM serves them), the
//!   SCI on IRQ [`SCI_IRQ`], the i8042 reset (0xFE to port 0x64) as the reset register, and
//!   the CMOS century byte. There is no SMI command port (the machine is always in ACPI
//!   mode), no PM timer and no GPE block.
//! - **MADT**: one enabled local APIC per vCPU (processor uid = vCPU index, APIC id from
//!   the [`crate::CpuTopology`]: equal to the index for one thread per core on one socket), the
//!   IOAPIC at [`IOAPIC_START`] with GSI base 0, an interrupt source override for the SCI
//!   (IRQ 9, level, active high) and LINT1 as NMI on every CPU. There is no override for
//!   IRQ 0: KVM's default GSI routing, which tvm-irq keeps, wires the PIT (GSI 0) to IOAPIC
//!   pin 0, so IRQ 0 is identity-mapped. (QEMU's IRQ 0 -> GSI 2 override goes with QEMU's
//!   own routing table, which moves the PIT to pin 2.)
//! - **DSDT**: the PCI host bridge `\_SB.PCI0` with bus 0, the configuration ports
//!   0xCF8..0xCFF, the I/O windows around them, the memory window [`MMIO_GAP_START`] ..
//!   [`PCI_MMIO_END`] and a `_PRT` entry for each device's INTx; COM1, the i8042 keyboard
//!   port (no PS/2 mouse: none is attached) and the CMOS RTC as PNP devices; QEMU's
//!   pvpanic device (`QEMU0001`) at [`PVPANIC_PORT`]; and `\_S5` for power-off through
//!   PM1a control.
//!
//! There is no MCFG (the PCI bus has no ECAM), no HPET, SRAT or SLIT.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    ACPI_TABLES_END, ACPI_TABLES_START, APIC_START, IOAPIC_START, MMIO_GAP_START, PCI_MMIO_END,
    RSDP_START,
};
use crate::{layout, Error, Result, MAX_XAPIC_ID};

/// The OEM id in every table.
const OEM_ID: [u8; 6] = *b"TVM   ";
/// The OEM revision of every table.
const OEM_REVISION: u32 = 1;

/// The ISA IRQ of the System Control Interrupt, [`layout::SCI_GSI`], as the FADT and the
/// MADT take it (one byte).
pub const SCI_IRQ: u8 = layout::SCI_GSI as u8;
// The GSI is an ISA IRQ, so the conversion above keeps it.
const _: () = assert!(layout::SCI_GSI < 16);
/// First port of the PM1a event block: PM1 status (2 bytes), then PM1 enable (2 bytes).
pub const PM1A_EVT_BLK_PORT: u16 = 0x600;
/// Length of the PM1a event block.
pub const PM1_EVT_LEN: u8 = 4;
/// Port of the PM1a control register (2 bytes), right after the event block.
pub const PM1A_CNT_BLK_PORT: u16 = 0x604;
/// Length of the PM1a control block.
pub const PM1_CNT_LEN: u8 = 2;
/// The SLP_TYP value `\_S5` gives for soft-off.
pub const SLP_TYP_S5: u16 = 5;
/// The pvpanic port, where QEMU's ISA pvpanic device has it: the DSDT's `\_SB.PEVT`
/// (`_HID` `QEMU0001`) names it, and the guest writes 1 there when its kernel panics.
pub const PVPANIC_PORT: u16 = 0x505;

/// The IOAPIC's id (KVM's IOAPIC resets its id register to 0).
const IOAPIC_ID: u8 = 0;
/// MADT flags: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure types (ACPI 6.5, 5.2.12).
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: active high, level triggered.
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);
/// Processor uid meaning "all processors" in a local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// The i8042 command port and its "pulse reset" command, the FADT reset register.
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;
/// CMOS index of the century byte.
const CMOS_CENTURY: u8 = 0x32;

/// One PCI interrupt pin and the GSI it is wired to, for the host bridge's `_PRT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIrq {
    /// Device (slot) number on bus 0.
    pub slot: u8,
    /// Interrupt pin, 0 for INTA .. 3 for INTD (the config-space value minus one).
    pub pin: u8,
    /// The GSI (IOAPIC pin) the line is wired to.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig<'a> {
    /// The vCPUs' APIC ids, in vCPU order (see [`crate::CpuTopology::apic_ids`]).
    pub apic_ids: &'a [u8],
    /// The INTx wiring of the PCI devices.
    pub pci_irqs: &'a [PciIrq],
}

/// Where [`setup_acpi_tables`] put each table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Root System Description Pointer.
    pub rsdp: GuestAddress,
    /// Extended System Description Table.
    pub xsdt: GuestAddress,
    /// Fixed ACPI Description Table.
    pub fadt: GuestAddress,
    /// Firmware ACPI Control Structure.
    pub facs: GuestAddress,
    /// Differentiated System Description Table.
    pub dsdt: GuestAddress,
    /// Multiple APIC Description Table.
    pub madt: GuestAddress,
    /// First byte after the last table.
    pub end: GuestAddress,
}

/// The bytes of an `Aml` object (a table or an AML term).
fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The PCI host bridge, `\_SB.PCI0`: bus 0 behind configuration mechanism #1, the I/O
/// space except the configuration ports, the 32-bit MMIO window for BARs, and `_PRT`.
fn pci_host_bridge(pci_irqs: &[PciIrq]) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    // The window ends below the IOAPIC, so it fits 32 bits (checked in layout.rs).
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        MMIO_GAP_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mmio]),
    );
    // _PRT entries: Package { address (slot << 16 | 0xFFFF: any function), pin, source
    // (0: the index is a GSI), GSI }.
    let entries: Vec<(u32, u8, u32)> = pci_irqs
        .iter()
        .map(|p| ((u32::from(p.slot) << 16) | 0xffff, p.pin, p.gsi))
        .collect();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Name::new(
        "_PRT".into(),
        &aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect()),
    );
    aml_bytes(&aml::Device::new(
        "PCI0".into(),
        vec![&hid, &seg, &uid, &bbn, &crs, &prt],
    ))
}

/// A PNP device with a `_HID`, a `_UID` and a `_CRS` of fixed I/O ranges and one edge,
/// active-high ISA interrupt.
fn pnp_device(name: &str, hid: &str, uid: u8, ports: &[(u16, u8)], irq: u32) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(hid));
    let uid = aml::Name::new("_UID".into(), &uid);
    let io: Vec<aml::IO> = ports
        .iter()
        .map(|&(base, len)| aml::IO::new(base, base, 1, len))
        .collect();
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let mut resources: Vec<&dyn Aml> = io.iter().map(|r| r as &dyn Aml).collect();
    resources.push(&int);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));
    aml_bytes(&aml::Device::new(name.into(), vec![&hid, &uid, &crs]))
}

/// QEMU's pvpanic device as QEMU's own DSDT describes it (`hw/misc/pvpanic-isa.c`):
/// `_HID` is the string "QEMU0001" (not an EISA id), and `_CRS` the one I/O port. Linux's
/// `pvpanic-mmio` driver binds to that `_HID` and takes the port from `_CRS`.
fn pvpanic_device() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io]));
    aml_bytes(&aml::Device::new("PEVT".into(), vec![&hid, &crs]))
}

/// The DSDT: the devices under `\_SB` and the `\_S5` sleep object.
///
/// The i8042 is described with its keyboard port only: no mouse is attached, and a PS/2
/// mouse device here would make Linux probe the aux port, which waits 250 ms for an IRQ 12
/// the controller never raises (docs/performance.md).
pub fn build_dsdt(pci_irqs: &[PciIrq]) -> Vec<u8> {
    let pci = pci_host_bridge(pci_irqs);
    let com1 = pnp_device("COM1", "PNP0501", 1, &[(0x3f8, 8)], layout::COM1_GSI);
    let kbd = pnp_device(
        "PS2K",
        "PNP0303",
        0,
        &[(0x60, 1), (0x64, 1)],
        layout::I8042_KBD_GSI,
    );
    let rtc = pnp_device("RTC_", "PNP0B00", 0, &[(0x70, 2)], layout::RTC_GSI);
    let pvpanic = pvpanic_device();
    let mut devices = Vec::new();
    for d in [pci, com1, kbd, rtc, pvpanic] {
        devices.extend_from_slice(&d);
    }
    let mut body = aml::Scope::raw("\\_SB_".into(), devices);
    // \_S5: SLP_TYPa, SLP_TYPb, two reserved.
    let s5_typ = SLP_TYP_S5 as u8;
    body.extend(aml_bytes(&aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &s5_typ, &aml::ZERO, &aml::ZERO]),
    )));
    // Revision 2: integers in the AML are 64 bits wide.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"TVMDSDT ", OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The MADT for vCPUs with `apic_ids` (in vCPU order; the processor uid is the index).
///
/// # Errors
/// [`Error::InvalidTopology`] when the list cannot be described with xAPIC entries: more
/// than 255 vCPUs (the processor uid is one byte, and 0xFF means "all processors" in the
/// LINT1 NMI entry), an APIC id of 0xFF (the broadcast id), or an APIC id given twice.
/// [`crate::CpuTopology`] never builds such a list; nothing is truncated.
pub fn build_madt(apic_ids: &[u8]) -> Result<Vec<u8>> {
    if apic_ids.len() > usize::from(ALL_PROCESSORS) {
        return Err(Error::InvalidTopology(format!(
            "{} vcpus: the MADT's processor uids stop at {}",
            apic_ids.len(),
            ALL_PROCESSORS - 1
        )));
    }
    let mut seen = [false; 256];
    for &id in apic_ids {
        if u32::from(id) > MAX_XAPIC_ID || seen[usize::from(id)] {
            return Err(Error::InvalidTopology(format!(
                "APIC id {id} is the broadcast id or given twice"
            )));
        }
        seen[usize::from(id)] = true;
    }
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"TVMMADT ", OEM_REVISION);
    // The LAPIC sits below 4 GiB (checked in layout.rs).
    madt.write_u32(36, APIC_START.0 as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for (uid, apic_id) in apic_ids.iter().enumerate() {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            uid as u8,
            *apic_id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(
        IOAPIC_ID,
        IOAPIC_START.0 as u32,
        0,
    )));
    // Interrupt source override: bus 0 (ISA), source IRQ, GSI, MPS INTI flags.
    let mut iso = vec![MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, SCI_IRQ];
    iso.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    iso.extend_from_slice(&MPS_INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    madt.append_slice(&iso);
    // Local APIC NMI: all processors, flags 0 (conforms to the bus), LINT1.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    Ok(madt.as_slice().to_vec())
}

/// The FADT, pointing at the DSDT and the FACS.
pub fn build_fadt(dsdt: GuestAddress, facs: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"TVMFACP ", OEM_REVISION)
        .dsdt_64(dsdt.0)
        .firmware_ctrl_64(facs.0)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No fixed-feature power or sleep button, and no RTC wake status in PM1.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = u16::from(SCI_IRQ).into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_BLK_PORT).into();
    fadt.pm1_evt_len = PM1_EVT_LEN;
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_BLK_PORT).into();
    fadt.pm1_cnt_len = PM1_CNT_LEN;
    fadt.century = CMOS_CENTURY;
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_PORT,
    );
    fadt.reset_value = RESET_VALUE;
    aml_bytes(&fadt.finalize())
}

/// The XSDT listing `tables`.
pub fn build_xsdt(tables: &[GuestAddress]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, *b"TVMXSDT ", OEM_REVISION);
    for t in tables {
        xsdt.add_entry(t.0);
    }
    aml_bytes(&xsdt)
}

/// The RSDP (revision 2) pointing at the XSDT.
pub fn build_rsdp(xsdt: GuestAddress) -> Vec<u8> {
    aml_bytes(&Rsdp::new(OEM_ID, xsdt.0))
}

/// Places tables one after the other from [`ACPI_TABLES_START`], each aligned as asked.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize, align: u64) -> Result<GuestAddress> {
        let start = self.next.next_multiple_of(align);
        let end = start + len as u64;
        if end > ACPI_TABLES_END {
            return Err(Error::AcpiTablesTooLarge {
                size: end - ACPI_TABLES_START.0,
                room: ACPI_TABLES_END - ACPI_TABLES_START.0,
            });
        }
        self.next = end;
        Ok(GuestAddress(start))
    }
}

fn write<M: GuestMemoryBackend>(mem: &M, bytes: &[u8], at: GuestAddress) -> Result<()> {
    mem.write_slice(bytes, at)
        .map_err(|_| Error::WriteAcpiTables(at.0))
}

/// Builds the ACPI tables for `cfg` and writes them into `mem` (RSDP at [`RSDP_START`], the
/// rest from [`ACPI_TABLES_START`]).
///
/// # Errors
/// [`Error::AcpiTablesTooLarge`] when they do not fit below 1 MiB,
/// [`Error::WriteAcpiTables`] when that area is not guest RAM, and
/// [`Error::InvalidTopology`] for APIC ids the MADT cannot list ([`build_madt`]).
pub fn setup_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig<'_>,
) -> Result<AcpiTables> {
    let mut placer = Placer {
        next: ACPI_TABLES_START.0,
    };
    let facs_bytes = aml_bytes(&FACS::new());
    // The FACS must be 64-byte aligned (ACPI 6.5, 5.2.10).
    let facs = placer.place(facs_bytes.len(), 64)?;
    write(mem, &facs_bytes, facs)?;

    let dsdt_bytes = build_dsdt(cfg.pci_irqs);
    let dsdt = placer.place(dsdt_bytes.len(), 8)?;
    write(mem, &dsdt_bytes, dsdt)?;

    let fadt_bytes = build_fadt(dsdt, facs);
    let fadt = placer.place(fadt_bytes.len(), 8)?;
    write(mem, &fadt_bytes, fadt)?;

    let madt_bytes = build_madt(cfg.apic_ids)?;
    let madt = placer.place(madt_bytes.len(), 8)?;
    write(mem, &madt_bytes, madt)?;

    let xsdt_bytes = build_xsdt(&[fadt, madt]);
    let xsdt = placer.place(xsdt_bytes.len(), 8)?;
    write(mem, &xsdt_bytes, xsdt)?;

    write(mem, &build_rsdp(xsdt), RSDP_START)?;
    Ok(AcpiTables {
        rsdp: RSDP_START,
        xsdt,
        fadt,
        facs,
        dsdt,
        madt,
        end: GuestAddress(placer.next),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{e820_entries, E820_RESERVED};
    use crate::layout::ram_ranges;
    use crate::{test_mem, CpuTopology};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn read(mem: &vm_memory::GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Reads a system description table at `addr` the way an OS does: the header's length,
    /// then the whole table, whose bytes must sum to 0. Checks the signature.
    fn read_sdt(mem: &vm_memory::GuestMemoryMmap<()>, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], sig, "signature at {addr:#x}");
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "{sig:?} length {len}");
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "{sig:?} checksum");
        assert_eq!(&table[10..16], b"TVM   ", "{sig:?} oem id");
        table
    }

    /// Finds the RSDP as Linux does: "RSD PTR " on a 16-byte boundary in 0xE0000..1 MiB.
    fn find_rsdp(mem: &vm_memory::GuestMemoryMmap<()>) -> u64 {
        let area = read(mem, 0xe_0000, 0x2_0000);
        (0..area.len())
            .step_by(16)
            .find(|&o| &area[o..o + 8] == b"RSD PTR " && sum(&area[o..o + 20]) == 0)
            .map(|o| 0xe_0000 + o as u64)
            .expect("no RSDP in the BIOS area")
    }

    /// The tables reached from the RSDP: (signature, address, bytes) for each XSDT entry.
    fn walk(mem: &vm_memory::GuestMemoryMmap<()>) -> Vec<([u8; 4], u64, Vec<u8>)> {
        let rsdp_addr = find_rsdp(mem);
        let rsdp = read(mem, rsdp_addr, 36);
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_sdt(mem, xsdt_addr, b"XSDT");
        (36..xsdt.len())
            .step_by(8)
            .map(|o| {
                let addr = u64_at(&xsdt, o);
                let header = read(mem, addr, 4);
                let sig: [u8; 4] = header.try_into().unwrap();
                (sig, addr, read_sdt(mem, addr, &sig))
            })
            .collect()
    }

    fn table<'a>(tables: &'a [([u8; 4], u64, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        let found: Vec<_> = tables.iter().filter(|t| &t.0 == sig).collect();
        assert_eq!(found.len(), 1, "{sig:?} in the XSDT");
        &found[0].2
    }

    /// The MADT's interrupt controller structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            let (kind, len) = (madt[o], madt[o + 1] as usize);
            assert!(len >= 2 && o + len <= madt.len(), "MADT entry at {o}");
            out.push((kind, madt[o..o + len].to_vec()));
            o += len;
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    const IRQS: [PciIrq; 2] = [
        PciIrq {
            slot: 1,
            pin: 0,
            gsi: 10,
        },
        PciIrq {
            slot: 2,
            pin: 0,
            gsi: 11,
        },
    ];

    fn setup(cpus: u8) -> (vm_memory::GuestMemoryMmap<()>, AcpiTables) {
        setup_ids(&CpuTopology::flat(cpus).unwrap().apic_ids())
    }

    fn setup_ids(ids: &[u8]) -> (vm_memory::GuestMemoryMmap<()>, AcpiTables) {
        let mem = test_mem(0x10_0000);
        let t = setup_acpi_tables(
            &mem,
            &AcpiConfig {
                apic_ids: ids,
                pci_irqs: &IRQS,
            },
        )
        .unwrap();
        (mem, t)
    }

    #[test]
    fn rsdp_xsdt_fadt_dsdt_facs_chain() {
        let (mem, placed) = setup(1);
        assert_eq!(find_rsdp(&mem), RSDP_START.0);
        let tables = walk(&mem);
        let sigs: Vec<_> = tables.iter().map(|t| t.0).collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC"]);
        assert_eq!(tables[0].1, placed.fadt.0);
        assert_eq!(tables[1].1, placed.madt.0);

        let fadt = table(&tables, b"FACP");
        assert_eq!(fadt.len(), 276, "an ACPI 6.x FADT");
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT version 6.5");
        // X_DSDT at 140 (the 32-bit DSDT field at 40 is 0), X_FIRMWARE_CTRL at 132.
        assert_eq!(u32_at(fadt, 40), 0);
        let dsdt_addr = u64_at(fadt, 140);
        assert_eq!(dsdt_addr, placed.dsdt.0);
        let dsdt = read_sdt(&mem, dsdt_addr, b"DSDT");
        assert_eq!(dsdt[8], 2, "DSDT revision 2: 64-bit integers");
        let facs_addr = u64_at(fadt, 132);
        assert_eq!(facs_addr, placed.facs.0);
        assert_eq!(facs_addr % 64, 0, "FACS alignment");
        let facs = read(&mem, facs_addr, 64);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);
        // Everything inside the room below 1 MiB.
        assert!(placed.end.0 <= ACPI_TABLES_END);
        for (_, addr, bytes) in &tables {
            assert!(*addr >= ACPI_TABLES_START.0);
            assert!(addr + bytes.len() as u64 <= placed.end.0);
        }
    }

    #[test]
    fn fadt_is_a_full_pc_fadt() {
        let (mem, _) = setup(1);
        let tables = walk(&mem);
        let fadt = table(&tables, b"FACP");
        assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "no SMI_CMD: always in ACPI mode");
        assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(fadt, 76), 0, "no PM timer");
        assert_eq!(u32_at(fadt, 80), 0, "no GPE0 block");
        assert_eq!(
            (fadt[88], fadt[89]),
            (4, 2),
            "PM1 event and control lengths"
        );
        assert_eq!((fadt[90], fadt[91], fadt[92]), (0, 0, 0));
        assert_eq!(fadt[108], 0x32, "CMOS century index");
        assert_eq!(u16_at(fadt, 109), 0b111, "legacy devices, 8042, no VGA");
        let flags = u32_at(fadt, 112);
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        for bit in [0, 2, 4, 5, 6, 10] {
            assert_ne!(flags & (1 << bit), 0, "FADT flag bit {bit}");
        }
        // Reset register: system I/O, 8 bits, port 0x64; value 0xFE.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), 0x64);
        assert_eq!(fadt[128], 0xfe);
        // The extended (X_) blocks are left zero, so the OS takes the 32-bit ones.
        assert!(fadt[148..244].iter().all(|&b| b == 0));
    }

    #[test]
    fn madt_has_a_lapic_per_vcpu_the_ioapic_and_the_sci_override() {
        let topologies = [
            CpuTopology::flat(1).unwrap(),
            CpuTopology::flat(2).unwrap(),
            CpuTopology::flat(4).unwrap(),
            CpuTopology::flat(64).unwrap(),
            CpuTopology::flat(254).unwrap(),
            // Sparse: APIC ids 0..=18 and 32..=50, with holes.
            CpuTopology::new(3, 5, 2).unwrap(),
            CpuTopology::new(2, 3, 2).unwrap(),
        ];
        for t in topologies {
            let ids = t.apic_ids();
            let (mem, _) = setup_ids(&ids);
            let tables = walk(&mem);
            // walk() checked the checksum of every table.
            let madt = table(&tables, b"APIC");
            assert_eq!(madt[8], 5, "MADT revision");
            assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
            assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
            let entries = madt_entries(madt);
            let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
            assert_eq!(lapics.len(), usize::from(t.cpu_count()), "{t}");
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(e[2], i as u8, "{t}: processor uid of vcpu {i}");
                assert_eq!(e[3], t.apic_id(i as u8), "{t}: APIC id of vcpu {i}");
                assert_eq!(u32_at(e, 4), 1, "{t}: vcpu {i} enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let io = &ioapics[0].1;
            assert_eq!(io.len(), 12);
            assert_eq!(io[2], 0, "IOAPIC id");
            assert_eq!(u32_at(io, 4), 0xfec0_0000);
            assert_eq!(u32_at(io, 8), 0, "GSI base");
            let isos: Vec<_> = entries.iter().filter(|e| e.0 == 2).collect();
            assert_eq!(isos.len(), 1, "only the SCI is overridden");
            let iso = &isos[0].1;
            assert_eq!(iso.len(), 10);
            assert_eq!((iso[2], iso[3]), (0, 9), "ISA IRQ 9");
            assert_eq!(u32_at(iso, 4), 9, "to GSI 9");
            assert_eq!(u16_at(iso, 8), 0b1101, "level, active high");
            let nmis: Vec<_> = entries.iter().filter(|e| e.0 == 4).collect();
            assert_eq!(nmis.len(), 1);
            assert_eq!(nmis[0].1, vec![4, 6, 0xff, 0, 0, 1], "LINT1 NMI everywhere");
            assert_eq!(entries.len(), usize::from(t.cpu_count()) + 3);
        }
    }

    #[test]
    fn madt_refuses_what_xapic_entries_cannot_say() {
        // 255 vCPUs (uids 0..=254) is the most: uid 0xFF would read as "all processors".
        let all: Vec<u8> = (0..=254).collect();
        let madt = build_madt(&all).unwrap();
        assert_eq!(sum(&madt), 0);
        assert_eq!(madt_entries(&madt).iter().filter(|e| e.0 == 0).count(), 255);
        let mut too_many = all.clone();
        too_many.push(0);
        let err = build_madt(&too_many).unwrap_err().to_string();
        assert!(err.contains("256 vcpus"), "{err}");
        // The broadcast id, and an id given twice.
        for ids in [&[0u8, 0xff][..], &[1, 2, 1]] {
            assert!(
                matches!(build_madt(ids), Err(Error::InvalidTopology(_))),
                "{ids:?}"
            );
        }
        // And setup_acpi_tables passes the error on.
        let mem = test_mem(0x10_0000);
        let err = setup_acpi_tables(
            &mem,
            &AcpiConfig {
                apic_ids: &too_many,
                pci_irqs: &[],
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidTopology(_)), "{err}");
    }

    #[test]
    fn dsdt_describes_the_pci_host_bridge_and_legacy_devices() {
        let (mem, placed) = setup(1);
        let dsdt = read_sdt(&mem, placed.dsdt.0, b"DSDT");
        let aml = &dsdt[36..];
        // Scope (\_SB_) first, then Name (\_S5_, ...).
        assert_eq!(aml[0], 0x10, "ScopeOp");
        assert!(contains(aml, b"\\_SB_"));
        assert!(contains(aml, b"PCI0"));
        // EISAID("PNP0A03") and the others, as encoded DWords.
        for id in ["PNP0A03", "PNP0501", "PNP0303", "PNP0B00"] {
            let mut enc = vec![0x0c];
            enc.extend_from_slice(&aml_bytes(&aml::EISAName::new(id))[1..]);
            assert!(contains(aml, &enc), "{id}");
        }
        // No PS/2 mouse (PNP0F13): Linux would probe an aux port that is not there.
        let mut mouse = vec![0x0c];
        mouse.extend_from_slice(&aml_bytes(&aml::EISAName::new("PNP0F13"))[1..]);
        assert!(!contains(aml, &mouse), "no PS/2 mouse");
        assert!(!contains(aml, b"PS2M"));
        // pvpanic: Device (PEVT) { Name (_HID, "QEMU0001"), Name (_CRS, ResourceTemplate
        // () { IO (Decode16, 0x505, 0x505, 1, 1) }) }.
        let mut hid = b"\x08_HID\x0dQEMU0001\x00".to_vec();
        hid.extend_from_slice(b"\x08_CRS\x11");
        assert!(contains(aml, b"PEVT"));
        assert!(contains(aml, &hid), "pvpanic _HID string, then _CRS");
        assert!(contains(
            aml,
            &[0x47, 1, 0x05, 0x05, 0x05, 0x05, 1, 1, 0x79, 0]
        ));
        // _CRS: bus 0..0, I/O 0xCF8 x8, I/O windows around it, memory window.
        let bus = [0x88, 0x0d, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert!(contains(aml, &bus), "WordBusNumber 0..0");
        assert!(contains(aml, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        let mut io_low = vec![0x88, 0x0d, 0, 1, 0x0c, 3, 0, 0, 0, 0];
        io_low.extend_from_slice(&[0xf7, 0x0c, 0, 0, 0xf8, 0x0c]);
        assert!(contains(aml, &io_low), "WordIO 0..0xCF7");
        let mut mem_window = vec![0x87, 0x17, 0, 0, 0x0c, 1, 0, 0, 0, 0];
        mem_window.extend_from_slice(&0xc000_0000u32.to_le_bytes());
        mem_window.extend_from_slice(&0xfebf_ffffu32.to_le_bytes());
        mem_window.extend_from_slice(&0u32.to_le_bytes());
        mem_window.extend_from_slice(&0x3ec0_0000u32.to_le_bytes());
        assert!(contains(aml, &mem_window), "DWordMemory window");
        // _PRT: Package (4) { slot << 16 | 0xFFFF, INTA, Zero, GSI } for each device.
        assert!(contains(aml, b"_PRT"));
        for p in IRQS {
            let mut entry = vec![0x12, 0x0b, 4, 0x0c];
            entry.extend_from_slice(&((u32::from(p.slot) << 16) | 0xffff).to_le_bytes());
            entry.extend_from_slice(&[0, 0, 0x0a, p.gsi as u8]);
            assert!(contains(aml, &entry), "_PRT entry for slot {}", p.slot);
        }
        // COM1: I/O 0x3F8 x8 and IRQ 4, edge, active high, exclusive.
        assert!(contains(aml, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        assert!(contains(aml, &[0x89, 6, 0, 3, 1, 4, 0, 0, 0]));
        // \_S5_ = Package (4) { 5, 5, 0, 0 }.
        assert!(contains(
            aml,
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 4, 0x0a, 5, 0x0a, 5, 0, 0]
        ));
    }

    #[test]
    fn no_pci_devices_is_an_empty_prt() {
        let dsdt = build_dsdt(&[]);
        assert_eq!(sum(&dsdt), 0);
        assert!(contains(&dsdt, &[b'_', b'P', b'R', b'T', 0x12, 2, 0]));
    }

    #[test]
    fn tables_sit_in_an_e820_reserved_range() {
        let (_, placed) = setup(4);
        let e820 = e820_entries(&ram_ranges(512 << 20));
        for (what, start, end) in [
            ("RSDP", RSDP_START.0, RSDP_START.0 + 36),
            ("tables", ACPI_TABLES_START.0, placed.end.0),
        ] {
            assert!(
                e820.iter().any(|e| e.r#type == E820_RESERVED
                    && e.addr <= start
                    && end <= e.addr + e.size),
                "{what} {start:#x}..{end:#x} not in a reserved e820 range"
            );
        }
    }

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let mem = test_mem(0x8_0000);
        let err = setup_acpi_tables(
            &mem,
            &AcpiConfig {
                apic_ids: &[0],
                pci_irqs: &[],
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::WriteAcpiTables(a) if a == ACPI_TABLES_START.0));
    }

    #[test]
    fn placing_past_1_mib_is_refused() {
        let mut p = Placer {
            next: ACPI_TABLES_END - 16,
        };
        assert!(p.place(16, 8).is_ok());
        assert!(matches!(
            p.place(1, 1),
            Err(Error::AcpiTablesTooLarge { size, room })
                if size == ACPI_TABLES_END + 1 - ACPI_TABLES_START.0
                    && room == ACPI_TABLES_END - ACPI_TABLES_START.0
        ));
        // Alignment moves the start up.
        let mut p = Placer { next: 0xe_0041 };
        assert_eq!(p.place(4, 64).unwrap(), GuestAddress(0xe_0080));
    }
}
