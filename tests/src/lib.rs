//! Test helpers shared by the tests that need /dev/kvm: tiny hand-assembled guests and a
//! minimal ELF64 writer so such a guest can be booted by the `vmm` binary as a "kernel".

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::HashMap;
use std::process::Command;

/// A [`Command`] for the VMM binary at `path` whose process is killed (SIGKILL) when the
/// thread that spawns it ends (`PR_SET_PDEATHSIG`): a test that panics before it reaps its
/// VMM leaves none running (one such left-over, spinning, starved a later CI run's outer
/// guest on this 2-core machine).
#[allow(unsafe_code)]
pub fn vmm_command(path: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(path);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl is one, and the closure touches no memory
    // shared with the parent and allocates nothing on success.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// One HTTP/1.1 request on a VMM's API socket (Unix), with `Connection: close`; every
/// read and write is bounded by 10 s. Returns the status and the body. A client this small
/// is enough for tests of our own server; the compatibility test uses a real client
/// library.
pub fn api_request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let what = format!("{method} {path}");
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("{what}: connect: {e}"))?;
    let limit = Some(std::time::Duration::from_secs(10));
    s.set_read_timeout(limit)
        .and_then(|()| s.set_write_timeout(limit))
        .map_err(|e| format!("{what}: {e}"))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A refused body may close the connection before all of it is written: the answer
    // is still there to read.
    let _ = s.write_all(req.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{what}: no status line in {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The byte at `offset` of the test streams the vsock checks send (host and guest side
/// agree on it without sharing data): a multiplicative hash of the offset, so a byte lost,
/// repeated or moved changes the stream's [`fnv1a`].
pub fn stream_byte(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (offset >> 17);
    (x >> 56) as u8
}

/// FNV-1a over a byte stream, fed in pieces: `fnv1a(fnv1a(FNV_START, a), b)` is the hash
/// of `a` followed by `b`.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The FNV-1a starting value.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

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
///
/// Jumps and calls name a label ([`label`](Self::label)) that may come before or after
/// them; [`finish`](Self::finish) fills in the 32-bit displacements.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: HashMap<String, usize>,
    /// (offset of a rel32 field, label it points to).
    fixups: Vec<(usize, String)>,
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

    /// `mov rdi, imm64` (64-bit mode only).
    pub fn mov_rdi(mut self, v: u64) -> Self {
        self.code.extend_from_slice(&[0x48, 0xbf]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov rcx, imm64` (64-bit mode only).
    pub fn mov_rcx(mut self, v: u64) -> Self {
        self.code.extend_from_slice(&[0x48, 0xb9]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov rsi, imm64` (64-bit mode only).
    pub fn mov_rsi(mut self, v: u64) -> Self {
        self.code.extend_from_slice(&[0x48, 0xbe]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov r12, imm64` (64-bit mode only).
    pub fn mov_r12(mut self, v: u64) -> Self {
        self.code.extend_from_slice(&[0x49, 0xbc]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `dec r12` (64-bit mode only).
    pub fn dec_r12(mut self) -> Self {
        self.code.extend_from_slice(&[0x49, 0xff, 0xcc]);
        self
    }

    /// `add rdi, imm8` (sign-extended; 64-bit mode only).
    pub fn add_rdi(mut self, v: i8) -> Self {
        self.code.extend_from_slice(&[0x48, 0x83, 0xc7, v as u8]);
        self
    }

    /// `cmp ax, word [rsi]`.
    pub fn cmp_ax_at_rsi(mut self) -> Self {
        self.code.extend_from_slice(&[0x66, 0x3b, 0x06]);
        self
    }

    /// `mov byte [rdi], imm8`.
    pub fn store8_at_rdi(mut self, v: u8) -> Self {
        self.code.extend_from_slice(&[0xc6, 0x07, v]);
        self
    }

    /// `mov word [rdi], imm16`.
    pub fn store16_at_rdi(mut self, v: u16) -> Self {
        self.code.extend_from_slice(&[0x66, 0xc7, 0x07]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov dword [rdi], imm32`.
    pub fn store32_at_rdi(mut self, v: u32) -> Self {
        self.code.extend_from_slice(&[0xc7, 0x07]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov qword [rdi], rax` (64-bit mode only).
    pub fn store_rax_at_rdi(mut self) -> Self {
        self.code.extend_from_slice(&[0x48, 0x89, 0x07]);
        self
    }

    /// `movzx eax, byte [rdi]`.
    pub fn load8_from_rdi(mut self) -> Self {
        self.code.extend_from_slice(&[0x0f, 0xb6, 0x07]);
        self
    }

    /// `movzx eax, word [rdi]`.
    pub fn load16_from_rdi(mut self) -> Self {
        self.code.extend_from_slice(&[0x0f, 0xb7, 0x07]);
        self
    }

    /// `mov eax, dword [rdi]`.
    pub fn load32_from_rdi(mut self) -> Self {
        self.code.extend_from_slice(&[0x8b, 0x07]);
        self
    }

    /// `inc word [rdi]`.
    pub fn inc16_at_rdi(mut self) -> Self {
        self.code.extend_from_slice(&[0x66, 0xff, 0x07]);
        self
    }

    /// `out dx, eax`.
    pub fn out_dx_eax(mut self) -> Self {
        self.code.push(0xef);
        self
    }

    /// `in al, dx`.
    pub fn in_al_dx(mut self) -> Self {
        self.code.push(0xec);
        self
    }

    /// `in eax, dx`.
    pub fn in_eax_dx(mut self) -> Self {
        self.code.push(0xed);
        self
    }

    /// `cmp eax, imm32`.
    pub fn cmp_eax(mut self, v: u32) -> Self {
        self.code.push(0x3d);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `dec rcx` (64-bit mode only).
    pub fn dec_rcx(mut self) -> Self {
        self.code.extend_from_slice(&[0x48, 0xff, 0xc9]);
        self
    }

    /// `mov rax, cr3; mov cr3, rax`: flushes the TLB after a page-table change (64-bit
    /// mode only).
    pub fn reload_cr3(mut self) -> Self {
        self.code
            .extend_from_slice(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]);
        self
    }

    /// `rep movsb`: copies RCX bytes from `[RSI]` to `[RDI]` (64-bit mode: the full registers).
    pub fn rep_movsb(mut self) -> Self {
        self.code.extend_from_slice(&[0xf3, 0xa4]);
        self
    }

    /// `pause`: the spin-loop hint.
    pub fn pause(mut self) -> Self {
        self.code.extend_from_slice(&[0xf3, 0x90]);
        self
    }

    /// `rdtsc; shl rdx, 32; or rax, rdx`: the time-stamp counter in RAX (64-bit mode only;
    /// clobbers RDX).
    pub fn tsc_to_rax(mut self) -> Self {
        // 0f 31: rdtsc; 48 c1 e2 20: shl rdx, 32; 48 09 d0: or rax, rdx.
        self.code
            .extend_from_slice(&[0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0]);
        self
    }

    /// `mov r8, rax` (64-bit mode only).
    pub fn mov_r8_rax(mut self) -> Self {
        self.code.extend_from_slice(&[0x49, 0x89, 0xc0]);
        self
    }

    /// `sub rax, r8` (64-bit mode only).
    pub fn sub_rax_r8(mut self) -> Self {
        self.code.extend_from_slice(&[0x4c, 0x29, 0xc0]);
        self
    }

    /// `cli`.
    pub fn cli(mut self) -> Self {
        self.code.push(0xfa);
        self
    }

    /// `mov al, bl`.
    pub fn mov_al_bl(mut self) -> Self {
        self.code.extend_from_slice(&[0x88, 0xd8]);
        self
    }

    /// `and al, imm8` (sets ZF when no bit of `v` was set in AL).
    pub fn and_al(mut self, v: u8) -> Self {
        self.code.extend_from_slice(&[0x24, v]);
        self
    }

    /// Resets the machine through the i8042 (`mov al, 0xfe; out 0x64, al`, the same bytes in
    /// every mode), then [`halt_forever`](Self::halt_forever) should the reset not end the
    /// run.
    pub fn i8042_reset(self) -> Self {
        self.mov_al(0xfe).out_al(0x64).halt_forever()
    }

    /// `jmp $`: a busy loop that never leaves guest mode (the same bytes in every mode).
    pub fn spin_forever(mut self) -> Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }

    /// `add al, imm8`.
    pub fn add_al(mut self, v: u8) -> Self {
        self.code.extend_from_slice(&[0x04, v]);
        self
    }

    /// Embeds `bytes` as they are (data, or code assembled for another mode).
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        self.code.extend_from_slice(bytes);
        self
    }

    // Real mode (16-bit operand and address size by default): where the encoding differs
    // from the 32-/64-bit one above, a `_real` method. `mov al`, `out dx, al`, `out imm8,
    // al`, `cli`, `cpuid`, `mov al, bl`, `add al`, `and al`, `halt_forever` and
    // `spin_forever` are the same bytes there.

    /// `mov dx, imm16` in real mode (no operand-size prefix).
    pub fn mov_dx_real(mut self, v: u16) -> Self {
        self.code.push(0xba);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `mov eax, imm32` in real mode (operand-size prefix 0x66).
    pub fn mov_eax_real(mut self, v: u32) -> Self {
        self.code.extend_from_slice(&[0x66, 0xb8]);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `shr ebx, imm8` in real mode (operand-size prefix 0x66).
    pub fn shr_ebx_real(mut self, n: u8) -> Self {
        self.code.extend_from_slice(&[0x66, 0xc1, 0xeb, n]);
        self
    }

    /// `mov byte cs:[disp16], imm8` in real mode: a store relative to the code segment
    /// (after a SIPI, CS is the only segment based at the code).
    pub fn store8_cs_real(mut self, disp: u16, v: u8) -> Self {
        // 2e: CS override; c6 /0 with ModRM 06: mov r/m8, imm8 at [disp16].
        self.code.extend_from_slice(&[0x2e, 0xc6, 0x06]);
        self.code.extend_from_slice(&disp.to_le_bytes());
        self.code.push(v);
        self
    }

    /// [`print`](Self::print) in real mode.
    pub fn print_real(mut self, base: u16, text: &[u8]) -> Self {
        self = self.mov_dx_real(base);
        for &b in text {
            self = self.mov_al(b).out_dx_al();
        }
        self
    }

    /// `lea rsi, [rip + rel32]` to `target`: its address, wherever the code is loaded
    /// (64-bit mode only).
    pub fn lea_rsi(self, target: &str) -> Self {
        self.rel32(&[0x48, 0x8d, 0x35], target)
    }

    /// Defines `name` at the current position.
    ///
    /// # Panics
    ///
    /// If `name` is already defined: a bug in the test guest.
    pub fn label(mut self, name: &str) -> Self {
        let prev = self.labels.insert(name.to_string(), self.code.len());
        assert!(prev.is_none(), "label {name} defined twice");
        self
    }

    /// A label name unique to this position, for helpers that emit loops more than once.
    pub fn local(&self, base: &str) -> String {
        format!("{base}@{:#x}", self.code.len())
    }

    fn rel32(mut self, opcode: &[u8], target: &str) -> Self {
        self.code.extend_from_slice(opcode);
        self.fixups.push((self.code.len(), target.to_string()));
        self.code.extend_from_slice(&[0; 4]);
        self
    }

    /// `jmp rel32` to `target`.
    pub fn jmp(self, target: &str) -> Self {
        self.rel32(&[0xe9], target)
    }

    /// `je rel32` (`jz`) to `target`.
    pub fn je(self, target: &str) -> Self {
        self.rel32(&[0x0f, 0x84], target)
    }

    /// `jne rel32` (`jnz`) to `target`.
    pub fn jne(self, target: &str) -> Self {
        self.rel32(&[0x0f, 0x85], target)
    }

    /// `jb rel32` (unsigned below) to `target`.
    pub fn jb(self, target: &str) -> Self {
        self.rel32(&[0x0f, 0x82], target)
    }

    /// `call rel32` to `target` (needs a stack; the boot stack is set up).
    pub fn call(self, target: &str) -> Self {
        self.rel32(&[0xe8], target)
    }

    /// `ret`.
    pub fn ret(mut self) -> Self {
        self.code.push(0xc3);
        self
    }

    /// A subroutine at label `name` that writes EAX as 8 lowercase hex digits to the UART
    /// data register at `port`. It clobbers EAX, EBX, ECX and EDX.
    pub fn hex32_subroutine(self, name: &str, port: u16) -> Self {
        let lp = format!("{name}.loop");
        let digit = format!("{name}.digit");
        let mut a = self.label(name);
        // mov ebx, eax; mov ecx, 8
        a.code.extend_from_slice(&[0x89, 0xc3, 0xb9, 8, 0, 0, 0]);
        a = a.mov_dx(port).label(&lp);
        // rol ebx, 4; mov eax, ebx; and eax, 0xf
        a.code
            .extend_from_slice(&[0xc1, 0xc3, 0x04, 0x89, 0xd8, 0x83, 0xe0, 0x0f]);
        a = a.cmp_eax(10).jb(&digit);
        // add al, 'a' - '0' - 10
        a.code.extend_from_slice(&[0x04, b'a' - b'0' - 10]);
        a = a.label(&digit);
        // add al, '0'; out dx, al; dec ecx
        a.code.extend_from_slice(&[0x04, b'0', 0xee, 0xff, 0xc9]);
        a.jne(&lp).ret()
    }

    /// The current length of the code (where the next instruction goes).
    pub fn len(&self) -> usize {
        self.code.len()
    }

    /// Whether no instruction was emitted yet.
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// The machine code, with every jump and call resolved.
    ///
    /// # Panics
    ///
    /// If a jump or call names a label that was never defined: a bug in the test guest.
    pub fn finish(mut self) -> Vec<u8> {
        for (at, name) in &self.fixups {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("undefined label {name}"));
            // Test guests are far smaller than 2 GiB.
            let rel = target as i64 - (*at as i64 + 4);
            let rel = i32::try_from(rel).unwrap_or_else(|_| panic!("jump to {name} too far"));
            self.code[*at..*at + 4].copy_from_slice(&rel.to_le_bytes());
        }
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

    #[test]
    fn memory_and_port_instructions() {
        let code = Asm::new()
            .mov_rdi(0x1122_3344_5566_7788)
            .store8_at_rdi(0xab)
            .store16_at_rdi(0x1234)
            .store32_at_rdi(0xdead_beef)
            .load8_from_rdi()
            .load16_from_rdi()
            .load32_from_rdi()
            .inc16_at_rdi()
            .out_dx_eax()
            .in_eax_dx()
            .cmp_eax(7)
            .mov_rsi(1)
            .cmp_ax_at_rsi()
            .mov_r12(2)
            .dec_r12()
            .add_rdi(-2)
            .finish();
        let want: Vec<u8> = [
            &[0x48, 0xbf, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11][..],
            &[0xc6, 0x07, 0xab],
            &[0x66, 0xc7, 0x07, 0x34, 0x12],
            &[0xc7, 0x07, 0xef, 0xbe, 0xad, 0xde],
            &[0x0f, 0xb6, 0x07],
            &[0x0f, 0xb7, 0x07],
            &[0x8b, 0x07],
            &[0x66, 0xff, 0x07],
            &[0xef],
            &[0xed],
            &[0x3d, 7, 0, 0, 0],
            &[0x48, 0xbe, 1, 0, 0, 0, 0, 0, 0, 0],
            &[0x66, 0x3b, 0x06],
            &[0x49, 0xbc, 2, 0, 0, 0, 0, 0, 0, 0],
            &[0x49, 0xff, 0xcc],
            &[0x48, 0x83, 0xc7, 0xfe],
        ]
        .concat();
        assert_eq!(code, want);
    }

    #[test]
    fn smp_and_real_mode_instructions() {
        let code = Asm::new()
            .rep_movsb()
            .pause()
            .tsc_to_rax()
            .mov_r8_rax()
            .sub_rax_r8()
            .cli()
            .mov_al_bl()
            .add_al(b'0')
            .and_al(1)
            .spin_forever()
            .i8042_reset()
            .mov_dx_real(0x3f8)
            .mov_eax_real(1)
            .shr_ebx_real(24)
            .store8_cs_real(0x800, 1)
            .bytes(&[0x90])
            .finish();
        let want: Vec<u8> = [
            &[0xf3, 0xa4][..],
            &[0xf3, 0x90],
            &[0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0],
            &[0x49, 0x89, 0xc0],
            &[0x4c, 0x29, 0xc0],
            &[0xfa],
            &[0x88, 0xd8],
            &[0x04, 0x30],
            &[0x24, 0x01],
            &[0xeb, 0xfe],
            &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd],
            &[0xba, 0xf8, 0x03],
            &[0x66, 0xb8, 1, 0, 0, 0],
            &[0x66, 0xc1, 0xeb, 24],
            &[0x2e, 0xc6, 0x06, 0x00, 0x08, 0x01],
            &[0x90],
        ]
        .concat();
        assert_eq!(code, want);
        // lea rsi, [rip + 1]: over the one-byte ret to the label.
        let code = Asm::new().lea_rsi("data").ret().label("data").finish();
        assert_eq!(code, [0x48, 0x8d, 0x35, 1, 0, 0, 0, 0xc3]);
    }

    #[test]
    fn jumps_resolve_backwards_and_forwards() {
        // back: dec rcx (3 bytes); jne back (6); je fwd (6); ret (1); fwd:
        let code = Asm::new()
            .label("back")
            .dec_rcx()
            .jne("back")
            .je("fwd")
            .ret()
            .label("fwd")
            .finish();
        assert_eq!(&code[3..5], &[0x0f, 0x85]);
        // From the end of the jne (offset 9) back to 0.
        assert_eq!(i32::from_le_bytes(code[5..9].try_into().unwrap()), -9);
        // From the end of the je (offset 15) over the ret to 16.
        assert_eq!(i32::from_le_bytes(code[11..15].try_into().unwrap()), 1);
    }

    #[test]
    #[should_panic(expected = "undefined label nowhere")]
    fn an_undefined_label_is_a_bug() {
        Asm::new().jmp("nowhere").finish();
    }

    #[test]
    fn local_labels_differ_by_position() {
        let a = Asm::new();
        let first = a.local("poll");
        let a = a.ret();
        assert_ne!(first, a.local("poll"));
    }
}
