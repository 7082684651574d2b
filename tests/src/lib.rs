//! Test helpers shared by the tests that need /dev/kvm: tiny hand-assembled guests and a
//! minimal ELF64 writer so such a guest can be booted by the `vmm` binary as a "kernel".

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

/// Where tiny guests are loaded and entered (the usual kernel load address).
pub const GUEST_ENTRY: u64 = 0x10_0000;

/// Wraps `code` in an ELF64 executable with one PT_LOAD segment at `GUEST_ENTRY`, entered at
/// its first byte. linux-loader loads it like a vmlinux (64-bit entry).
pub fn elf_image(code: &[u8]) -> Vec<u8> {
    const PHOFF: u64 = 64;
    const CODE_OFF: u64 = 0x1000;
    let mut out = Vec::with_capacity(CODE_OFF as usize + code.len());
    // e_ident: magic, 64-bit, little endian, version 1, System V ABI.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&GUEST_ENTRY.to_le_bytes()); // e_entry
    out.extend_from_slice(&PHOFF.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                                // Program header: PT_LOAD, R+X.
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes());
    out.extend_from_slice(&CODE_OFF.to_le_bytes()); // p_offset
    out.extend_from_slice(&GUEST_ENTRY.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&GUEST_ENTRY.to_le_bytes()); // p_paddr
    out.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    out.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    out.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    out.resize(CODE_OFF as usize, 0);
    out.extend_from_slice(code);
    out
}

/// A tiny x86 assembler for the handful of instructions the test guests use. The same
/// bytes mean the same thing in 32- and 64-bit mode unless noted.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// `mov dx, imm16`.
    pub fn mov_dx(mut self, v: u16) -> Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov al, imm8`.
    pub fn mov_al(mut self, v: u8) -> Self {
        self.code.extend_from_slice(&[0xb0, v]);
        self
    }

    /// `mov eax, imm32`.
    pub fn mov_eax(mut self, v: u32) -> Self {
        self.code.push(0xb8);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov rax, imm64` (64-bit mode only: in 32-bit mode 0x48 is `dec eax`).
    pub fn mov_rax(mut self, v: u64) -> Self {
        self.code.extend_from_slice(&[0x48, 0xb8]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `shr rax, imm8` (64-bit mode only).
    pub fn shr_rax(mut self, n: u8) -> Self {
        self.code.extend_from_slice(&[0x48, 0xc1, 0xe8, n]);
        self
    }

    /// `mov eax, esi`.
    pub fn mov_eax_esi(mut self) -> Self {
        self.code.extend_from_slice(&[0x89, 0xf0]);
        self
    }

    /// `mov eax, [abs32]` (SIB form: absolute in both modes).
    pub fn load_eax(mut self, addr: u32) -> Self {
        self.code.extend_from_slice(&[0x8b, 0x04, 0x25]);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// `out dx, al`.
    pub fn out_dx_al(mut self) -> Self {
        self.code.push(0xee);
        self
    }

    /// `out imm8, al`.
    pub fn out_al(mut self, port: u8) -> Self {
        self.code.extend_from_slice(&[0xe6, port]);
        self
    }

    /// `out imm8, eax`.
    pub fn out_eax(mut self, port: u8) -> Self {
        self.code.extend_from_slice(&[0xe7, port]);
        self
    }

    /// Writes `text` to the UART data register at `base` (no flow control: the emulated
    /// UART's transmitter is always ready).
    pub fn print(mut self, base: u16, text: &[u8]) -> Self {
        self = self.mov_dx(base);
        for &b in text {
            self = self.mov_al(b).out_dx_al();
        }
        self
    }

    /// `cpuid` (leaf in EAX, subleaf in ECX).
    pub fn cpuid(mut self) -> Self {
        self.code.extend_from_slice(&[0x0f, 0xa2]);
        self
    }

    /// `mov eax, ebx`.
    pub fn mov_eax_ebx(mut self) -> Self {
        self.code.extend_from_slice(&[0x89, 0xd8]);
        self
    }

    /// `mov eax, ecx`.
    pub fn mov_eax_ecx(mut self) -> Self {
        self.code.extend_from_slice(&[0x89, 0xc8]);
        self
    }

    /// `mov eax, edx`.
    pub fn mov_eax_edx(mut self) -> Self {
        self.code.extend_from_slice(&[0x89, 0xd0]);
        self
    }

    /// `xor ecx, ecx`.
    pub fn zero_ecx(mut self) -> Self {
        self.code.extend_from_slice(&[0x31, 0xc9]);
        self
    }

    /// `jmp eax` (`jmp rax` in 64-bit mode, with the upper half zero after `mov eax`).
    pub fn jmp_eax(mut self) -> Self {
        self.code.extend_from_slice(&[0xff, 0xe0]);
        self
    }

    /// `int3` (with the boot IDT's limit this triple-faults).
    pub fn int3(mut self) -> Self {
        self.code.push(0xcc);
        self
    }

    /// `hlt; jmp $-1`: halt forever.
    pub fn halt_forever(mut self) -> Self {
        self.code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
        self
    }

    /// The machine code.
    pub fn finish(self) -> Vec<u8> {
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_header_fields() {
        let img = elf_image(&[0xf4]);
        assert_eq!(&img[..4], b"\x7fELF");
        assert_eq!(img[4], 2);
        assert_eq!(
            u64::from_le_bytes(img[24..32].try_into().unwrap()),
            GUEST_ENTRY
        );
        assert_eq!(img.len(), 0x1001);
        assert_eq!(img[0x1000], 0xf4);
    }

    #[test]
    fn assembler_bytes() {
        let code = Asm::new().mov_dx(0x3f8).mov_al(b'A').out_dx_al().finish();
        assert_eq!(code, vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee]);
        let code = Asm::new().mov_rax(1).shr_rax(32).finish();
        assert_eq!(code.len(), 14);
    }
}
