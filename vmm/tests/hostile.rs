//! Hostile guests: tiny hand-made guests, booted in the real `vmm` binary with two
//! virtio-blk disks, that attack one disk through the real transport (PCI config ports,
//! the BAR, the rings in guest RAM) and then use the other disk properly. Each test checks
//! that the VMM keeps running, that the attacked device does what the virtio spec says,
//! that the VMM logs one warning line per kind of attack (not one per attack), that the
//! other disk still reads back what the test wrote, and that neither image changed.
//!
//! They need /dev/kvm (PVM is enough) and run with `cargo xtask kvm-test`. The
//! `kvm_hostile_net_*` tests in `hostile/net.rs` attack a virtio-net interface the same
//! way, with the same guest builder; they also need root, for the TAP.
//!
//! The guest is 64-bit code at 1 MiB (see `tvm_tests::elf_image`) followed by data: a
//! page directory that maps the PCI window at 3-4 GiB uncached, and for each queue (one
//! per disk, two for the network interface) its descriptor table, rings, request headers,
//! status bytes and buffers, all built here.
//! The code programs PCI config space through ports 0xCF8/0xCFC, drives the transport's
//! common config through the BAR, kicks, polls the used ring (with a bounded spin) and
//! prints `key=value` lines on COM1, which the tests read.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tvm_tests::{elf_image, Asm, GUEST_ENTRY};
use virtio_bindings::{virtio_blk, virtio_config, virtio_ring};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

const COM1: u16 = 0x3f8;
/// Guest RAM: `--memory 64M`.
const RAM_END: u64 = 64 << 20;
/// The boot page tables' PDPT (tvm-arch-x86 `PDPTE_START`); its entry 3 covers 3-4 GiB.
const BOOT_PDPT: u64 = 0xa000;

/// Offsets in the image (loaded at `GUEST_ENTRY`): code, the page directory, then one area
/// per queue (disk A, disk B, the network interface's RX and TX queues).
const CODE_MAX: usize = 0xc000;
const PD_OFF: usize = 0xc000;
const AREA_OFF: [usize; 4] = [0x1_0000, 0x2_0000, 0x3_0000, 0x4_0000];
const IMAGE_LEN: usize = 0x5_0000;

/// Where the guest puts the two BARs (inside the VMM's PCI window, 0xc000_0000 on).
const BAR_A: u64 = 0xe000_0000;
const BAR_B: u64 = 0xe001_0000;

/// Each disk image: 2048 sectors.
const DISK_LEN: usize = 1 << 20;
const DISK_SECTORS: u32 = (DISK_LEN / 512) as u32;
/// Bytes of sector 0 the guest prints after a read.
const SHOWN: usize = 32;

// Common configuration (virtio 1.2, 4.1.4.3) and the other regions of our BAR.
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notify addresses (`notify_off_multiplier`; each queue's
/// `queue_notify_off` is its index).
const NOTIFY_MULTIPLIER: u64 = 4;

// The spec's values, from virtio-bindings rather than from the device under test.
const ACKNOWLEDGE: u8 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const DRIVER: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER as u8;
const DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
const FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;

const F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const BLK_T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
const BLK_T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
/// What the guest's status bytes hold until the device writes them.
const STATUS_FILL: u8 = 0xee;
/// What the guest's data buffers hold until the device writes them.
const BUF_FILL: u8 = b'-';

/// One queue of a device as the guest sees it: a disk's only queue, or one of the network
/// interface's two.
#[derive(Clone, Copy, Debug)]
struct Dev {
    /// `a`, `b`, `rx` or `tx`, the prefix of what the guest prints about it.
    tag: &'static str,
    /// Index into the guest's per-queue state and areas.
    index: usize,
    /// PCI slot: the host bridge is 0, the disks follow in `--disk` order, then the
    /// network interface.
    slot: u8,
    /// Where the guest put BAR 0.
    bar: u64,
    /// The queue's index in its device.
    queue: u16,
}

const A: Dev = Dev {
    tag: "a",
    index: 0,
    slot: 1,
    bar: BAR_A,
    queue: 0,
};
const B: Dev = Dev {
    tag: "b",
    index: 1,
    slot: 2,
    bar: BAR_B,
    queue: 0,
};

impl Dev {
    fn area(&self) -> u64 {
        GUEST_ENTRY + AREA_OFF[self.index] as u64
    }
    fn cfg(&self, offset: u64) -> u64 {
        self.bar + offset
    }
    fn desc(&self, i: u16) -> u64 {
        self.area() + 16 * u64::from(i)
    }
    fn avail(&self) -> u64 {
        self.area() + 0x1000
    }
    fn used(&self) -> u64 {
        self.area() + 0x2000
    }
    fn header(&self, k: u64) -> u64 {
        self.area() + 0x3000 + 16 * k
    }
    fn status_byte(&self, k: u64) -> u64 {
        self.area() + 0x3800 + k
    }
    fn buf(&self, k: u64) -> u64 {
        self.area() + 0x4000 + 0x200 * k
    }
    /// The length field of used entry `n` (1 for the first).
    fn used_len(&self, n: u16) -> u64 {
        self.used() + 4 + 8 * u64::from((n - 1) % 256) + 4
    }
    fn notify(&self) -> u64 {
        self.cfg(NOTIFY) + NOTIFY_MULTIPLIER * u64::from(self.queue)
    }
    /// The same disk with its BAR somewhere else.
    fn at(self, bar: u64) -> Dev {
        Dev { bar, ..self }
    }
}

/// Builds the guest: code (through `Asm`) and the data image around it.
struct Guest {
    asm: Asm,
    image: Vec<u8>,
    /// Per queue: next free descriptor, next free available-ring slot, next request slot.
    next_desc: [u16; 4],
    next_avail: [u16; 4],
    next_req: [u64; 4],
}

/// A descriptor: address, length, flags (NEXT is added by [`Guest::chain`]).
type Desc = (u64, u32, u16);

impl Guest {
    /// Maps the PCI window, puts both BARs where the guest wants them, checks the IDs, and
    /// brings disk A up with one good read.
    fn new() -> Guest {
        Guest::build(&[])
    }

    /// [`Guest::new`], and the same for the devices in `more` (placed and identified,
    /// not initialised): one [`Dev`] per device.
    fn build(more: &[Dev]) -> Guest {
        let mut g = Guest {
            asm: Asm::new().jmp("main").hex32_subroutine("hex32", COM1),
            image: vec![0; IMAGE_LEN],
            next_desc: [0; 4],
            next_avail: [0; 4],
            next_req: [0; 4],
        };
        // 2 MiB pages for 3-4 GiB: present, writable, write-through, cache disabled, large.
        for i in 0..512u64 {
            g.put(
                GUEST_ENTRY + (PD_OFF as u64) + 8 * i,
                &((0xc000_0000 + (i << 21)) | 0x9b).to_le_bytes(),
            );
        }
        for index in 0..AREA_OFF.len() {
            let dev = Dev { index, ..A };
            for k in 0..16 {
                g.put(dev.status_byte(k), &[STATUS_FILL]);
                g.put(dev.buf(k), &[BUF_FILL; 512]);
            }
        }
        let pd = GUEST_ENTRY + PD_OFF as u64;
        g.op(|a| {
            a.label("main")
                .mov_rdi(BOOT_PDPT + 3 * 8)
                .mov_rax(pd | 3)
                .store_rax_at_rdi()
                .reload_cr3()
        });
        g.print("HOSTILE-START\n");
        for &dev in [A, B].iter().chain(more) {
            g.show_pci(&format!("{}.id", dev.tag), dev.slot, 0);
            g.move_bar(dev.slot, dev.bar);
        }
        g.init(A);
        g.good_read(A);
        g
    }

    fn op(&mut self, f: impl FnOnce(Asm) -> Asm) {
        self.asm = f(std::mem::take(&mut self.asm));
    }

    /// Puts `bytes` at guest physical `addr` in the image.
    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let off = usize::try_from(addr - GUEST_ENTRY).unwrap();
        assert!(off >= CODE_MAX && off + bytes.len() <= IMAGE_LEN);
        self.image[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn print(&mut self, text: &str) {
        self.op(|a| a.print(COM1, text.as_bytes()));
    }

    /// Selects `reg` of `slot` through 0xCF8.
    fn pci_select(&mut self, slot: u8, reg: u8) {
        let addr = 0x8000_0000 | u32::from(slot) << 11 | u32::from(reg) << 2;
        self.op(|a| a.mov_dx(0xcf8).mov_eax(addr).out_dx_eax().mov_dx(0xcfc));
    }

    fn pci_write(&mut self, slot: u8, reg: u8, value: u32) {
        self.pci_select(slot, reg);
        self.op(|a| a.mov_eax(value).out_dx_eax());
    }

    /// Prints `key=` and the config register in hex.
    fn show_pci(&mut self, key: &str, slot: u8, reg: u8) {
        self.print(&format!("{key}="));
        self.pci_select(slot, reg);
        self.op(|a| a.in_eax_dx().call("hex32"));
        self.print("\n");
    }

    /// Programs BAR 0 (a 64-bit BAR: registers 4 and 5) with `addr`, low half first, with
    /// memory decoding left on.
    fn move_bar(&mut self, slot: u8, addr: u64) {
        self.pci_write(slot, 4, addr as u32);
        self.pci_write(slot, 5, (addr >> 32) as u32);
    }

    /// A `width`-byte store of `value` at `addr` (RAM or MMIO).
    fn write(&mut self, addr: u64, width: u8, value: u32) {
        self.op(|a| {
            let a = a.mov_rdi(addr);
            match width {
                1 => a.store8_at_rdi(value as u8),
                2 => a.store16_at_rdi(value as u16),
                _ => a.store32_at_rdi(value),
            }
        });
    }

    /// Prints `key=` and the `width`-byte value at `addr` in hex.
    fn show(&mut self, key: &str, addr: u64, width: u8) {
        self.print(&format!("{key}="));
        self.op(|a| {
            let a = a.mov_rdi(addr);
            match width {
                1 => a.load8_from_rdi(),
                2 => a.load16_from_rdi(),
                _ => a.load32_from_rdi(),
            }
            .call("hex32")
        });
        self.print("\n");
    }

    /// Prints `key=` and `len` bytes of guest memory as they are.
    fn show_bytes(&mut self, key: &str, addr: u64, len: usize) {
        self.print(&format!("{key}="));
        for i in 0..len as u64 {
            self.op(|a| {
                a.mov_rdi(addr + i)
                    .load8_from_rdi()
                    .mov_dx(COM1)
                    .out_dx_al()
            });
        }
        self.print("\n");
    }

    /// Status 0 (reset), ACKNOWLEDGE, DRIVER, VIRTIO_F_VERSION_1 only, FEATURES_OK.
    fn negotiate(&mut self, dev: Dev) {
        self.write(dev.cfg(DEVICE_STATUS), 1, 0);
        self.write(dev.cfg(DEVICE_STATUS), 1, ACKNOWLEDGE.into());
        self.write(dev.cfg(DEVICE_STATUS), 1, (ACKNOWLEDGE | DRIVER).into());
        self.write(dev.cfg(DRIVER_FEATURE_SELECT), 4, 1);
        self.write(dev.cfg(DRIVER_FEATURE), 4, 1);
        self.write(
            dev.cfg(DEVICE_STATUS),
            1,
            (ACKNOWLEDGE | DRIVER | FEATURES_OK).into(),
        );
    }

    /// The queue with the given rings (and size, if any), enabled.
    fn queue(&mut self, dev: Dev, size: Option<u16>, desc: u64, avail: u64, used: u64) {
        self.write(dev.cfg(QUEUE_SELECT), 2, dev.queue.into());
        if let Some(size) = size {
            self.write(dev.cfg(QUEUE_SIZE), 2, size.into());
        }
        for (off, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            self.write(dev.cfg(off), 4, addr as u32);
            self.write(dev.cfg(off + 4), 4, (addr >> 32) as u32);
        }
        self.write(dev.cfg(QUEUE_ENABLE), 2, 1);
    }

    fn driver_ok(&mut self, dev: Dev) {
        let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        self.write(dev.cfg(DEVICE_STATUS), 1, all.into());
    }

    /// The whole initialisation with the disk's own rings; the guest's view of the rings
    /// starts afresh (the device resets its indices too).
    fn init(&mut self, dev: Dev) {
        self.negotiate(dev);
        self.queue(dev, None, dev.desc(0), dev.avail(), dev.used());
        self.driver_ok(dev);
        self.restart_rings(dev);
    }

    /// After a reset both sides count from 0 again: zero the ring indices and forget the
    /// slots handed out so far.
    fn restart_rings(&mut self, dev: Dev) {
        self.write(dev.avail() + 2, 2, 0);
        self.write(dev.used() + 2, 2, 0);
        self.next_avail[dev.index] = 0;
    }

    /// Writes descriptor `i` into the image.
    fn put_desc(&mut self, dev: Dev, i: u16, (addr, len, flags): Desc, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(dev.desc(i), &d);
    }

    /// Writes `descs` as one chain (NEXT added to all but the last) and returns its head.
    fn chain(&mut self, dev: Dev, descs: &[Desc]) -> u16 {
        let head = self.next_desc[dev.index];
        for (j, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = head + j as u16;
            if j + 1 < descs.len() {
                self.put_desc(dev, i, (addr, len, flags | F_NEXT), i + 1);
            } else {
                self.put_desc(dev, i, (addr, len, flags), 0);
            }
        }
        self.next_desc[dev.index] += descs.len() as u16;
        head
    }

    /// A request header in the next request slot; returns the slot.
    fn header(&mut self, dev: Dev, req_type: u32, sector: u64) -> u64 {
        let k = self.next_req[dev.index];
        self.next_req[dev.index] += 1;
        assert!(k < 16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(dev.header(k), &h);
        k
    }

    /// A well-formed read of `sector` into the slot's buffer: (head, slot).
    fn read_request(&mut self, dev: Dev, sector: u64) -> (u16, u64) {
        let k = self.header(dev, BLK_T_IN, sector);
        let head = self.chain(
            dev,
            &[
                (dev.header(k), 16, 0),
                (dev.buf(k), 512, F_WRITE),
                (dev.status_byte(k), 1, F_WRITE),
            ],
        );
        (head, k)
    }

    /// Writes `head` into the next available slot (at run time: an earlier phase may
    /// have overwritten it) and returns the available index that slot makes (the used
    /// index to wait for when the device answers it).
    fn offer(&mut self, dev: Dev, head: u16) -> u16 {
        let n = self.next_avail[dev.index];
        self.next_avail[dev.index] += 1;
        self.write(dev.avail() + 4 + 2 * u64::from(n % 256), 2, head.into());
        n + 1
    }

    /// Publishes one more available entry (the guest increments avail.idx).
    fn publish(&mut self, dev: Dev) {
        self.op(|a| a.mov_rdi(dev.avail() + 2).inc16_at_rdi());
    }

    fn kick(&mut self, dev: Dev) {
        self.write(dev.notify(), 2, dev.queue.into());
    }

    /// Spins until the used index is `n`; after about 2^34 rounds prints a timeout and
    /// gives up (the test's own deadline comes first).
    fn wait_used(&mut self, dev: Dev, n: u16) {
        let lp = self.asm.local("wait");
        let done = format!("{lp}.done");
        let msg = format!("TIMEOUT {}.used={n}\n", dev.tag);
        self.op(|a| {
            a.mov_rcx(1 << 34)
                .mov_rdi(dev.used() + 2)
                .label(&lp)
                .load16_from_rdi()
                .cmp_eax(n.into())
                .je(&done)
                .dec_rcx()
                .jne(&lp)
                .print(COM1, msg.as_bytes())
                .jmp("fail")
                .label(&done)
        });
    }

    /// Prints what the device answered for used entry `n` of request slot `k`: the used
    /// length, the status byte and the start of the buffer.
    fn report(&mut self, dev: Dev, n: u16, k: u64) {
        let t = dev.tag;
        self.show(&format!("{t}.len{n}"), dev.used_len(n), 4);
        self.show(&format!("{t}.status{n}"), dev.status_byte(k), 1);
        self.show_bytes(&format!("{t}.data{n}"), dev.buf(k), SHOWN);
    }

    /// Sends `head` and waits for the answer; returns the used index.
    fn send(&mut self, dev: Dev, head: u16) -> u16 {
        let n = self.offer(dev, head);
        self.publish(dev);
        self.kick(dev);
        self.wait_used(dev, n);
        n
    }

    /// A good read of sector 0, answered and reported; returns the used index.
    fn good_read(&mut self, dev: Dev) -> u16 {
        let (head, k) = self.read_request(dev, 0);
        let n = self.send(dev, head);
        self.report(dev, n, k);
        n
    }

    /// Disk A still works, then the end marker, then a halt; a `fail` path for timeouts.
    fn finish(mut self) -> Vec<u8> {
        self.good_read(A);
        self.print("HOSTILE-END\n");
        self.op(|a| {
            a.halt_forever()
                .label("fail")
                .print(COM1, b"HOSTILE-FAIL\n")
                .halt_forever()
        });
        let code = self.asm.finish();
        assert!(code.len() <= CODE_MAX, "guest code of {} bytes", code.len());
        self.image[..code.len()].copy_from_slice(&code);
        elf_image(&self.image)
    }
}

/// The two disk images and what the test wrote into them.
struct Disks {
    dir: PathBuf,
    paths: [PathBuf; 2],
    contents: [Vec<u8>; 2],
}

impl Disks {
    /// Fresh images in a directory of their own; sector 0 starts with `A-OK:`/`B-OK:` and
    /// a per-run pattern, the rest is pseudo-random.
    fn new(test: &str) -> Disks {
        let dir = std::env::temp_dir().join(format!("tvm-hostile-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let mut seed = u64::from(nanos) ^ u64::from(std::process::id()) << 32 | 1;
        let mut next = move || {
            // xorshift64
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let paths = [dir.join("a.img"), dir.join("b.img")];
        let contents = ["A-OK:", "B-OK:"].map(|prefix| {
            let mut c: Vec<u8> = (0..DISK_LEN).map(|_| next() as u8).collect();
            let mut text = prefix.as_bytes().to_vec();
            while text.len() < SHOWN {
                text.push(b'a' + (next() % 26) as u8);
            }
            c[..SHOWN].copy_from_slice(&text);
            c
        });
        for (p, c) in paths.iter().zip(&contents) {
            std::fs::write(p, c).unwrap();
        }
        Disks {
            dir,
            paths,
            contents,
        }
    }

    /// Sector 0 as the guest prints it.
    fn shown(&self, dev: Dev) -> String {
        String::from_utf8(self.contents[dev.index][..SHOWN].to_vec()).unwrap()
    }

    /// How the VMM names the disk in its log lines.
    fn name(&self, dev: Dev) -> String {
        format!("virtio-blk {:?}", self.paths[dev.index])
    }

    fn assert_unchanged(&self) {
        for (p, c) in self.paths.iter().zip(&self.contents) {
            assert!(std::fs::read(p).unwrap() == *c, "{} changed", p.display());
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `TVM_HOSTILE_LOG_LEVEL`, for looking into a failure: the VMM's `--log-level` (the
/// default is `warn`). The warning checks still hold at `debug`, the storm's line count not.
fn log_level() -> Option<String> {
    std::env::var("TVM_HOSTILE_LOG_LEVEL").ok()
}

/// A running VMM with its console and log collected by two threads.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// What a run left behind.
struct Finished {
    stdout: String,
    stderr: String,
}

impl Running {
    /// Boots `kernel` (an ELF image) with `--disk A --disk B` and 64 MiB, and `--net
    /// tap=TAP` if given.
    fn start(kernel: &[u8], disks: &Disks, tap: Option<&str>) -> Running {
        let k = disks.dir.join("guest.elf");
        std::fs::write(&k, kernel).unwrap();
        let arg = |p: &Path| p.to_str().unwrap().to_string();
        let mut child = tvm_tests::vmm_command(VMM)
            .args(["--kernel", &arg(&k), "--memory", "64M"])
            .args(
                log_level()
                    .map(|l| ["--log-level".to_string(), l])
                    .into_iter()
                    .flatten(),
            )
            .args(["--disk", &arg(&disks.paths[0])])
            .args(["--disk", &arg(&disks.paths[1])])
            .args(
                tap.map(|t| ["--net".to_string(), format!("tap={t}")])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `marker`; panics with the console and the log if the
    /// guest failed, the VMM exited or 60 s passed.
    fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.stdout();
            if out.contains(marker) {
                return;
            }
            let why = if out.contains("HOSTILE-FAIL") {
                "the guest failed".to_string()
            } else if let Some(status) = self.child.try_wait().unwrap() {
                format!("the vmm exited ({status})")
            } else if Instant::now() > deadline {
                let _ = self.child.kill();
                "no marker within 60 s".to_string()
            } else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            panic!(
                "waiting for {marker}: {why}\nconsole:\n{out}\nstderr:\n{}",
                self.stderr()
            );
        }
    }

    /// A field of /proc/PID/status, in kB.
    fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {s}"))
    }

    /// User plus system CPU time of the whole process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which ends with the last ')'): utime is the 14th
        // field of the line, the 12th after the name.
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Checks the VMM still runs, then ends it with SIGTERM, which must give exit code 0.
    fn stop(mut self) -> Finished {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the vmm is gone; stderr:\n{}",
            self.stderr()
        );
        // SAFETY: kill() sends a signal to a process id and touches no memory; the child
        // has not been reaped (try_wait above saw it running), so the id is still its own.
        let ret = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(ret, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the vmm ignored SIGTERM; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the collectors see the end of both pipes.
        std::thread::sleep(Duration::from_millis(50));
        let f = Finished {
            stdout: self.stdout(),
            stderr: self.stderr(),
        };
        assert_eq!(status.code(), Some(0), "stderr:\n{}", f.stderr);
        f
    }
}

impl Finished {
    /// The hex value the guest printed as `key=`.
    fn value(&self, key: &str) -> u32 {
        let v = self.text(key);
        u32::from_str_radix(&v, 16).unwrap_or_else(|_| panic!("{key}={v} is not hex"))
    }

    /// The text the guest printed after `key=`, up to the end of the line.
    fn text(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {key} on the console:\n{}", self.stdout))
            .to_string()
    }

    /// The VMM's `WARN` and `ERROR` lines.
    fn warnings(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect()
    }

    /// Exactly one warning per entry of `expected`, each naming `name` and containing the
    /// entry, in any order, and no other warning or error.
    fn assert_warnings(&self, name: &str, expected: &[&str]) {
        let w = self.warnings();
        assert_eq!(
            w.len(),
            expected.len(),
            "want {expected:#?}, got:\n{}",
            self.stderr
        );
        for e in expected {
            let n = w
                .iter()
                .filter(|l| l.contains(&format!("{name}: ")) && l.contains(e))
                .count();
            assert_eq!(n, 1, "want one line with {e}, got:\n{}", self.stderr);
        }
    }
}

/// Boots `guest` and runs it to its end marker, checks the start (both disks found, A
/// read back what the test wrote) and the end (A still reads, the VMM still runs and stops
/// cleanly, neither image changed).
fn attack(guest: Guest, disks: &Disks) -> Finished {
    attack_with(guest, disks, None, |_| {})
}

/// [`attack`], with `--net tap=TAP` if given, and `during` called while the guest runs
/// (before its end marker).
fn attack_with(
    guest: Guest,
    disks: &Disks,
    tap: Option<&str>,
    during: impl FnOnce(&mut Running),
) -> Finished {
    let mut vmm = Running::start(&guest.finish(), disks, tap);
    during(&mut vmm);
    vmm.wait_for("HOSTILE-END");
    let f = vmm.stop();
    for dev in [A, B] {
        // Vendor 0x1af4, device 0x1042 (virtio-blk, modern).
        assert_eq!(f.value(&format!("{}.id", dev.tag)), 0x1042_1af4);
    }
    // A before and after the attack: two good reads.
    for n in [1, 2] {
        assert_eq!(f.value(&format!("a.len{n}")), 513);
        assert_eq!(f.value(&format!("a.status{n}")), 0);
        assert_eq!(f.text(&format!("a.data{n}")), disks.shown(A));
    }
    disks.assert_unchanged();
    f
}

/// Checks that B answered a good read as used entry `n`.
fn assert_good_read(f: &Finished, disks: &Disks, n: u16) {
    assert_eq!(f.value(&format!("b.len{n}")), 513);
    assert_eq!(f.value(&format!("b.status{n}")), 0);
    assert_eq!(f.text(&format!("b.data{n}")), disks.shown(B));
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_rings_outside_ram_need_a_reset() {
    let disks = Disks::new("rings");
    let mut g = Guest::new();
    let good = (B.desc(0), B.avail(), B.used());
    // Each ring in turn outside RAM: past the end, wrapping around the address space,
    // straddling the end; then a misaligned descriptor table.
    let bad = [
        (RAM_END, good.1, good.2),
        (good.0, 0xffff_ffff_ffff_f000, good.2),
        (good.0, good.1, RAM_END - 8),
        (good.0 + 8, good.1, good.2),
    ];
    for (i, (desc, avail, used)) in bad.into_iter().enumerate() {
        g.negotiate(B);
        g.queue(B, None, desc, avail, used);
        g.driver_ok(B);
        g.show(&format!("b.bad{i}"), B.cfg(DEVICE_STATUS), 1);
        // The driver resets the device, as the spec asks.
        g.write(B.cfg(DEVICE_STATUS), 1, 0);
        g.show(&format!("b.reset{i}"), B.cfg(DEVICE_STATUS), 1);
    }
    // After the reset the device works again.
    g.init(B);
    g.show("b.ok", B.cfg(DEVICE_STATUS), 1);
    g.good_read(B);
    let f = attack(g, &disks);
    for i in 0..4 {
        // DEVICE_NEEDS_RESET | FEATURES_OK | DRIVER_OK | DRIVER | ACKNOWLEDGE.
        assert_eq!(f.value(&format!("b.bad{i}")), 0x4f, "attempt {i}");
        assert_eq!(f.value(&format!("b.reset{i}")), 0, "attempt {i}");
    }
    assert_eq!(f.value("b.ok"), 0x0f);
    assert_good_read(&f, &disks, 1);
    f.assert_warnings(
        &disks.name(B),
        &[&format!(
            "DRIVER_OK refused, the device needs a reset: queue 0 (size 256) has rings \
             outside guest memory or misaligned: desc {RAM_END:#x}"
        )],
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_descriptor_loops_are_returned_unanswered() {
    let disks = Disks::new("loop");
    let mut g = Guest::new();
    g.init(B);
    // A write of sector 0 whose status descriptor points back at the header.
    let k = g.header(B, BLK_T_OUT, 0);
    let head = g.next_desc[B.index];
    g.put_desc(B, head, (B.header(k), 16, F_NEXT), head + 1);
    g.put_desc(B, head + 1, (B.buf(k), 512, F_NEXT), head + 2);
    g.put_desc(B, head + 2, (B.status_byte(k), 1, F_WRITE | F_NEXT), head);
    // A descriptor that is its own successor.
    let own = head + 3;
    g.put_desc(B, own, (B.header(k), 16, F_NEXT), own);
    g.next_desc[B.index] = own + 1;
    let n1 = g.send(B, head);
    g.report(B, n1, k);
    let n2 = g.send(B, own);
    g.show("b.len2", B.used() + 4 + 8 + 4, 4);
    // The device still works.
    let n3 = g.good_read(B);
    let f = attack(g, &disks);
    assert_eq!((n1, n2, n3), (1, 2, 3));
    // Returned with nothing written: no status, no data taken from the buffer.
    assert_eq!(f.value("b.len1"), 0);
    assert_eq!(f.value("b.status1"), STATUS_FILL.into());
    assert_eq!(f.value("b.len2"), 0);
    assert_good_read(&f, &disks, 3);
    f.assert_warnings(
        &disks.name(B),
        &["refused (0 bytes answered): descriptor chain loops"],
    );
}

/// An ext4 file system on a loop device (`mount -o loop`) in `dir/stall`, frozen with
/// `fsfreeze` on request: a write to a file there then blocks in the kernel until it is
/// thawed, a real backend that stops answering. Dropping it thaws and unmounts.
struct FreezableFs {
    mnt: PathBuf,
    image: PathBuf,
}

impl FreezableFs {
    fn new(dir: &Path) -> FreezableFs {
        let image = dir.join("stall-fs.img");
        let mnt = dir.join("stall");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        FreezableFs { mnt, image }
    }

    fn freeze(&self, on: bool) {
        let flag = if on { "-f" } else { "-u" };
        let out = Command::new("fsfreeze")
            .arg(flag)
            .arg(&self.mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fsfreeze {flag}: {}",
            text(&out.stderr)
        );
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mnt).output();
        // Lazily: after a failed test the VMM may still hold the image open (it dies with
        // the test thread, after this).
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A backend that stops answering: disk B's image is on a file system frozen before the
/// guest writes to it, so that write never completes. The guest goes on (its vCPU runs),
/// prints on the console and reads disk A twice while B's request is stuck; SIGTERM still
/// ends the run: the exit flush gives B up after 2 s, says so and makes the exit code 1
/// (the process is reaped once the file system is thawed and the stuck write returns).
#[test]
#[ignore = "needs /dev/kvm, and root for a loop mount and fsfreeze"]
fn kvm_hostile_a_stalled_disk_stalls_nothing_else() {
    let mut disks = Disks::new("stalled");
    let fs = FreezableFs::new(&disks.dir);
    let b = fs.mnt.join("b.img");
    std::fs::copy(&disks.paths[1], &b).unwrap();
    disks.paths[1] = b;
    // Frozen before the VMM starts: opening, locking and reading the image still work,
    // the first write blocks.
    fs.freeze(true);
    let mut g = Guest::new();
    g.init(B);
    g.good_read(B);
    let k = g.header(B, BLK_T_OUT, 0);
    let head = g.chain(
        B,
        &[
            (B.header(k), 16, 0),
            (B.buf(k), 512, 0),
            (B.status_byte(k), 1, F_WRITE),
        ],
    );
    let n = g.offer(B, head);
    g.publish(B);
    g.kick(B);
    g.print("B-WRITE-SENT\n");
    g.good_read(A);
    g.show("b.status_stuck", B.status_byte(k), 1);
    g.show("b.used_stuck", B.used() + 2, 2);
    let mut vmm = Running::start(&g.finish(), &disks, None);
    vmm.wait_for("HOSTILE-END");
    let out = vmm.stdout();
    assert!(out.contains("B-WRITE-SENT"), "{out}");
    // SAFETY: kill() sends a signal to a process id and touches no memory; the child has
    // not been reaped, so the id is still its own.
    let ret = unsafe { libc::kill(vmm.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(ret, 0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    while !vmm.stderr().contains("was not flushed") {
        assert!(
            Instant::now() < deadline,
            "no shutdown within 15 s of SIGTERM; stderr:\n{}",
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    fs.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = vmm.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = vmm.child.kill();
            panic!(
                "the vmm did not exit after the thaw; stderr:\n{}",
                vmm.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(50));
    let f = Finished {
        stdout: vmm.stdout(),
        stderr: vmm.stderr(),
    };
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert_eq!(status.code(), Some(1), "stderr:\n{}", f.stderr);
    assert_good_read(&f, &disks, 1);
    // A's first read, one after B stalled, then the one `finish` makes.
    for n in [1, 2, 3] {
        assert_eq!(f.value(&format!("a.len{n}")), 513);
        assert_eq!(f.text(&format!("a.data{n}")), disks.shown(A));
    }
    // B's write was never answered while the guest ran.
    assert_eq!(f.value("b.status_stuck"), STATUS_FILL.into());
    assert_eq!(f.value("b.used_stuck"), u32::from(n) - 1);
    assert!(
        f.stderr.contains(&format!(
            "{}: a request still had not completed",
            disks.name(B)
        )),
        "{}",
        f.stderr
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_4gib_lengths_are_refused() {
    let disks = Disks::new("4gib");
    let mut g = Guest::new();
    g.init(B);
    // Writes of sector 0: data of 4 GiB (the chain's total passes 4 GiB), data just under
    // 4 GiB (far beyond RAM and size_max), and 512 bytes wrapping around the address space.
    let cases = [
        (B.buf(0), u32::MAX),
        (B.buf(0), u32::MAX - 17),
        (0xffff_ffff_ffff_ff00, 512),
    ];
    for (i, (addr, len)) in cases.into_iter().enumerate() {
        let k = g.header(B, BLK_T_OUT, 0);
        let head = g.chain(
            B,
            &[
                (B.header(k), 16, 0),
                (addr, len, 0),
                (B.status_byte(k), 1, F_WRITE),
            ],
        );
        let n = g.send(B, head);
        assert_eq!(usize::from(n), i + 1);
        g.report(B, n, k);
    }
    g.good_read(B);
    let f = attack(g, &disks);
    // 4 GiB in total: virtio-queue ends the chain before the status, so nothing is written.
    assert_eq!(f.value("b.len1"), 0);
    assert_eq!(f.value("b.status1"), STATUS_FILL.into());
    // The others: IOERR.
    for n in [2, 3] {
        assert_eq!(f.value(&format!("b.len{n}")), 1);
        assert_eq!(f.value(&format!("b.status{n}")), 1);
    }
    assert_good_read(&f, &disks, 4);
    f.assert_warnings(
        &disks.name(B),
        &["refused (0 bytes answered): descriptor chain loops, or is longer than 256 descriptors or 4 GiB"],
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_queue_size_not_a_power_of_two_is_refused() {
    let disks = Disks::new("qsize");
    let mut g = Guest::new();
    g.negotiate(B);
    g.write(B.cfg(QUEUE_SELECT), 2, 0);
    for (i, size) in [100u32, 0, 0x8000, 255, 128].into_iter().enumerate() {
        g.write(B.cfg(QUEUE_SIZE), 2, size);
        g.show(&format!("b.qsize{i}"), B.cfg(QUEUE_SIZE), 2);
    }
    // The driver goes on with the size it read back (128).
    g.queue(B, None, B.desc(0), B.avail(), B.used());
    g.driver_ok(B);
    g.restart_rings(B);
    g.show("b.ok", B.cfg(DEVICE_STATUS), 1);
    g.good_read(B);
    let f = attack(g, &disks);
    for i in 0..4 {
        assert_eq!(f.value(&format!("b.qsize{i}")), 256, "write {i}");
    }
    assert_eq!(f.value("b.qsize4"), 128);
    assert_eq!(f.value("b.ok"), 0x0f);
    assert_good_read(&f, &disks, 1);
    f.assert_warnings(&disks.name(B), &["queue size 100 refused"]);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_kicks_before_driver_ok_are_ignored() {
    let disks = Disks::new("early");
    let mut g = Guest::new();
    // A kick while the device is reset, then one with a request in the ring but no
    // DRIVER_OK yet.
    g.write(B.cfg(DEVICE_STATUS), 1, 0);
    g.kick(B);
    g.negotiate(B);
    g.queue(B, None, B.desc(0), B.avail(), B.used());
    g.restart_rings(B);
    let (head, k) = g.read_request(B, 0);
    let n = g.offer(B, head);
    g.publish(B);
    g.kick(B);
    // Two round trips on A: the event loop has seen B's kicks by then.
    g.good_read(A);
    g.good_read(A);
    g.show("b.used_early", B.used() + 2, 2);
    g.show("b.status_early", B.status_byte(k), 1);
    // Now DRIVER_OK and a kick: the request is served.
    g.driver_ok(B);
    g.kick(B);
    g.wait_used(B, n);
    g.report(B, n, k);
    let f = attack(g, &disks);
    assert_eq!(f.value("b.used_early"), 0);
    assert_eq!(f.value("b.status_early"), STATUS_FILL.into());
    assert_good_read(&f, &disks, 1);
    // A disk's queue is its worker's (tvm_virtio::Threaded), which watches the queue's
    // EventFd only while the device is active: the early kicks wait there, unserved, and
    // nothing is logged (the transport's "notified while the device is not live" warning
    // is for devices the event loop serves).
    f.assert_warnings(&disks.name(B), &[]);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_read_only_common_config_fields_keep_their_values() {
    let disks = Disks::new("rocommon");
    let mut g = Guest::new();
    g.init(B);
    let fields = [
        ("device_feature", DEVICE_FEATURE, 4, 0xffff_ffff),
        ("num_queues", NUM_QUEUES, 2, 7),
        ("config_generation", CONFIG_GENERATION, 1, 9),
        ("queue_notify_off", QUEUE_NOTIFY_OFF, 2, 5),
    ];
    for (name, off, width, _) in fields {
        g.show(&format!("b.{name}.before"), B.cfg(off), width);
    }
    for (_, off, width, value) in fields {
        g.write(B.cfg(off), width, value);
    }
    for (name, off, width, _) in fields {
        g.show(&format!("b.{name}.after"), B.cfg(off), width);
    }
    g.show("b.status", B.cfg(DEVICE_STATUS), 1);
    g.good_read(B);
    let f = attack(g, &disks);
    for (name, ..) in fields {
        assert_eq!(
            f.value(&format!("b.{name}.before")),
            f.value(&format!("b.{name}.after")),
            "{name}"
        );
    }
    // VIRTIO_BLK_F_SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES and the
    // transport's INDIRECT_DESC and EVENT_IDX: the device's answer is not all ones.
    assert_ne!(f.value("b.device_feature.after"), 0xffff_ffff);
    assert_eq!(f.value("b.num_queues.after"), 1);
    assert_eq!(f.value("b.queue_notify_off.after"), 0);
    assert_eq!(f.value("b.status"), 0x0f);
    assert_good_read(&f, &disks, 1);
    f.assert_warnings(
        &disks.name(B),
        &["write of 4 bytes to read-only or unknown common config offset 0x4 ignored"],
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_capacity_writes_are_ignored() {
    let disks = Disks::new("rocap");
    let mut g = Guest::new();
    g.init(B);
    g.show("b.cap_lo.before", B.cfg(DEVICE_CFG), 4);
    g.write(B.cfg(DEVICE_CFG), 4, 0xffff_ffff);
    g.write(B.cfg(DEVICE_CFG + 4), 4, 0x7fff_ffff);
    g.write(B.cfg(DEVICE_CFG), 1, 0);
    g.show("b.cap_lo.after", B.cfg(DEVICE_CFG), 4);
    g.show("b.cap_hi.after", B.cfg(DEVICE_CFG + 4), 4);
    // The device still uses the real capacity: a read of the sector just past it fails.
    let (head, k) = g.read_request(B, DISK_SECTORS.into());
    let n = g.send(B, head);
    g.report(B, n, k);
    g.good_read(B);
    let f = attack(g, &disks);
    assert_eq!(f.value("b.cap_lo.before"), DISK_SECTORS);
    assert_eq!(f.value("b.cap_lo.after"), DISK_SECTORS);
    assert_eq!(f.value("b.cap_hi.after"), 0);
    assert_eq!(f.value("b.len1"), 1);
    assert_eq!(f.value("b.status1"), 1);
    assert_eq!(f.text("b.data1"), "-".repeat(SHOWN));
    assert_good_read(&f, &disks, 2);
    f.assert_warnings(
        &disks.name(B),
        &[
            "write of 4 bytes to the read-only config at 0x0 ignored",
            "sectors 2048+1 beyond capacity 2048",
        ],
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_bar_moved_over_ram_is_left_unmapped() {
    let disks = Disks::new("barram");
    let mut g = Guest::new();
    g.init(B);
    // RAM at 3 MiB holds a pattern; B's BAR is moved on top of it.
    let ram = 0x30_0000;
    g.write(ram + 0x12, 2, 0x1234);
    g.move_bar(B.slot, ram);
    g.show_pci("b.bar_reg", B.slot, 4);
    // It is still RAM: the pattern is there, and a "status" write lands in RAM.
    g.show("b.ram_numq", ram + NUM_QUEUES, 2);
    g.write(ram + DEVICE_STATUS, 1, 0);
    g.show("b.ram_status", ram + DEVICE_STATUS, 1);
    // Nothing answers at the old place.
    g.show("b.old_numq", B.cfg(NUM_QUEUES), 2);
    // Disk A works meanwhile.
    g.good_read(A);
    // Back to a free place: B is mapped again, still live, and serves a request.
    let b = B.at(BAR_B + 0x1_0000);
    g.move_bar(B.slot, b.bar);
    g.show("b.numq", b.cfg(NUM_QUEUES), 2);
    g.show("b.status", b.cfg(DEVICE_STATUS), 1);
    g.good_read(b);
    let f = attack(g, &disks);
    // 64-bit memory BAR at 3 MiB.
    assert_eq!(f.value("b.bar_reg"), 0x30_0004);
    assert_eq!(f.value("b.ram_numq"), 0x1234);
    assert_eq!(f.value("b.ram_status"), 0);
    assert_eq!(f.value("b.old_numq"), 0xffff);
    assert_eq!(f.value("b.numq"), 1);
    assert_eq!(f.value("b.status"), 0x0f);
    assert_good_read(&f, &disks, 1);
    f.assert_warnings(
        &disks.name(B),
        &["the guest moved the bar to 0x300000, which cannot be mapped"],
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_bar_moved_over_the_other_bar_is_left_unmapped() {
    let disks = Disks::new("barbar");
    let mut g = Guest::new();
    g.init(B);
    g.move_bar(B.slot, BAR_A);
    // A owns the address: its registers answer, and it serves reads (good_read(A) in
    // `finish` and here).
    g.show("a.numq", A.cfg(NUM_QUEUES), 2);
    g.show("a.status", A.cfg(DEVICE_STATUS), 1);
    g.good_read(A);
    let b = B.at(BAR_B + 0x1_0000);
    g.move_bar(B.slot, b.bar);
    g.show("b.numq", b.cfg(NUM_QUEUES), 2);
    g.good_read(b);
    let f = attack(g, &disks);
    assert_eq!(f.value("a.numq"), 1);
    assert_eq!(f.value("a.status"), 0x0f);
    assert_eq!(f.value("a.len3"), 513);
    assert_eq!(f.text("a.data3"), disks.shown(A));
    assert_eq!(f.value("b.numq"), 1);
    assert_good_read(&f, &disks, 1);
    f.assert_warnings(
        &disks.name(B),
        &["the guest moved the bar to 0xe0000000, which cannot be mapped"],
    );
}

/// Kicks in each phase of the kick storm.
const STORM_ROUNDS: u32 = 5120;
/// Chains made available between two waits in the storm's first phase (less than the
/// queue size, so the available index stays sane).
const STORM_BATCH: u32 = 128;

impl Guest {
    /// A kick storm on `dev`'s queue (of 256), between `STORM-START` and `STORM-END`:
    ///
    /// 1. every available slot offers head `own` (the caller made it a bad chain), made
    ///    available and kicked [`STORM_ROUNDS`] times in batches of [`STORM_BATCH`], the
    ///    guest waiting after each batch until the device answered all;
    /// 2. the available index far ahead of the device, kicked [`STORM_ROUNDS`] times;
    /// 3. back to a sane index, every slot offering head 300 (beyond the queue), kicked
    ///    [`STORM_ROUNDS`] times.
    ///
    /// The guest prints the used index after phases 1 and 3 (`TAG.storm1_used`,
    /// `TAG.storm3_used`). The device needs a reset afterwards.
    fn storm(&mut self, dev: Dev, own: u16) {
        assert_eq!(STORM_ROUNDS % STORM_BATCH, 0);
        for slot in 0..256u64 {
            self.put(dev.avail() + 4 + 2 * slot, &own.to_le_bytes());
        }
        let t = dev.tag;
        let kick = dev.notify();
        let q = dev.queue;
        self.print("STORM-START\n");
        let used_idx = dev.used() + 2;
        let avail_idx = dev.avail() + 2;
        let l = |name: &str| format!("{t}.{name}");
        self.op(|a| {
            a.mov_r12((STORM_ROUNDS / STORM_BATCH).into())
                .label(&l("storm1"))
                .mov_rcx(STORM_BATCH.into())
                .label(&l("storm1.kick"))
                .mov_rdi(avail_idx)
                .inc16_at_rdi()
                .mov_rdi(kick)
                .store16_at_rdi(q)
                .dec_rcx()
                .jne(&l("storm1.kick"))
                .mov_rcx(1 << 34)
                .mov_rdi(used_idx)
                .mov_rsi(avail_idx)
                .label(&l("storm1.wait"))
                .load16_from_rdi()
                .cmp_ax_at_rsi()
                .je(&l("storm1.next"))
                .dec_rcx()
                .jne(&l("storm1.wait"))
                .print(COM1, format!("TIMEOUT {t}.storm1\n").as_bytes())
                .jmp("fail")
                .label(&l("storm1.next"))
                .dec_r12()
                .jne(&l("storm1"))
        });
        self.show(&l("storm1_used"), used_idx, 2);
        self.write(avail_idx, 2, STORM_ROUNDS + 1000);
        self.op(|a| {
            a.mov_r12(STORM_ROUNDS.into())
                .mov_rdi(kick)
                .label(&l("storm2"))
                .store16_at_rdi(q)
                .dec_r12()
                .jne(&l("storm2"))
        });
        self.write(avail_idx, 2, STORM_ROUNDS);
        self.op(|a| {
            a.mov_rdi(dev.avail() + 4)
                .mov_rcx(256)
                .label(&l("storm3.fill"))
                .store16_at_rdi(300)
                .add_rdi(2)
                .dec_rcx()
                .jne(&l("storm3.fill"))
                .mov_r12(STORM_ROUNDS.into())
                .label(&l("storm3"))
                .mov_rdi(avail_idx)
                .inc16_at_rdi()
                .mov_rdi(kick)
                .store16_at_rdi(q)
                .dec_r12()
                .jne(&l("storm3"))
        });
        self.show(&l("storm3_used"), used_idx, 2);
        self.print("STORM-END\n");
    }
}

/// What the VMM used through a storm.
struct StormFigures {
    /// VmRSS at `STORM-START` and at `HOSTILE-END`, in kB.
    rss_before: u64,
    rss_after: u64,
    /// CPU ticks in the second after `HOSTILE-END`, while the guest halts.
    idle_ticks: u64,
}

impl Running {
    /// Follows a guest with a [`Guest::storm`] to its end marker, measuring.
    fn storm_figures(&mut self) -> StormFigures {
        self.wait_for("STORM-START");
        let rss_before = self.status_kib("VmRSS:");
        self.wait_for("HOSTILE-END");
        let rss_after = self.status_kib("VmRSS:");
        // The guest now halts: the VMM must not keep a core busy.
        let ticks_before = self.cpu_ticks();
        std::thread::sleep(Duration::from_secs(1));
        let idle_ticks = self.cpu_ticks() - ticks_before;
        StormFigures {
            rss_before,
            rss_after,
            idle_ticks,
        }
    }
}

impl StormFigures {
    /// Prints the figures (`what` names the storm) and checks them: VmRSS grew by less
    /// than 2 MiB, less than half a core while halted, and a short log.
    fn check(&self, what: &str, f: &Finished) {
        let StormFigures {
            rss_before,
            rss_after,
            idle_ticks,
        } = *self;
        eprintln!(
            "{what}: VmRSS {rss_before} -> {rss_after} kB, {idle_ticks} ticks of CPU in 1 s \
             while halted, {} stderr lines",
            f.stderr.lines().count()
        );
        assert!(
            rss_after < rss_before + 2048,
            "VmRSS grew from {rss_before} to {rss_after} kB"
        );
        assert!(
            idle_ticks < 50,
            "{idle_ticks} ticks of CPU in 1 s while the guest halts"
        );
        if log_level().is_none() {
            assert!(f.stderr.lines().count() < 10, "stderr:\n{}", f.stderr);
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn kvm_hostile_kick_storm_stays_bounded() {
    let disks = Disks::new("storm");
    let mut g = Guest::new();
    g.init(B);
    // Every available slot offers a descriptor that is its own successor.
    let own = g.next_desc[B.index];
    g.put_desc(B, own, (B.header(0), 16, F_NEXT), own);
    g.next_desc[B.index] = own + 1;
    g.storm(B, own);
    // The driver resets the device and uses it properly.
    g.init(B);
    g.good_read(B);
    let mut figures = None;
    let f = attack_with(g, &disks, None, |vmm| figures = Some(vmm.storm_figures()));
    assert_eq!(f.value("b.storm1_used"), STORM_ROUNDS);
    // Phase 3's chains cannot be returned.
    assert_eq!(f.value("b.storm3_used"), STORM_ROUNDS);
    assert_good_read(&f, &disks, 1);
    // 3 x 5120 kicks: one warning per kind, and the log stays a few lines long.
    f.assert_warnings(
        &disks.name(B),
        &[
            "refused (0 bytes answered): descriptor chain loops",
            &format!(
                "queue left alone: the available index {} is more than the queue size 256 \
                 ahead of {STORM_ROUNDS}",
                STORM_ROUNDS + 1000
            ),
        ],
    );
    figures.unwrap().check("storm", &f);
}

/// The `kvm_hostile_net_*` tests.
#[path = "hostile/net.rs"]
mod net;
