//! Hostile guests against a virtio-net interface: the same guests as the disk tests (disk
//! A is used properly before and after), plus `--net tap=NAME`, attacking the interface's
//! RX and TX queues through the real transport.
//!
//! Each test creates its own TAP (`ip tuntap add`, IPv6 off so the host sends nothing on
//! its own, link up), which needs root (CAP_NET_ADMIN) and `/dev/net/tun`: without them
//! the test fails, it does not skip. The VMM attaches to the TAP; the test watches the
//! host side through a packet socket bound to it, so it sees every frame the guest's
//! transmissions put on the TAP, and sends frames towards the guest. The TAP is deleted
//! at the end (also when the test fails).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::*;

/// Where the guest puts the network interface's BAR.
const BAR_NET: u64 = 0xe002_0000;
/// The interface's receive queue.
const RX: Dev = Dev {
    tag: "rx",
    index: 2,
    slot: 3,
    bar: BAR_NET,
    queue: 0,
};
/// The interface's transmit queue.
const TX: Dev = Dev {
    tag: "tx",
    index: 3,
    slot: 3,
    bar: BAR_NET,
    queue: 1,
};

/// `virtio_net_hdr_v1`, in front of every frame on both queues.
const VNET_HDR_LEN: usize = 12;
/// Ethernet header: destination, source, type.
const ETH_HLEN: usize = 14;
/// The IEEE's local experimental ethertype: the host stack ignores such frames.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Length of every Ethernet frame in these tests (the minimum, without the FCS).
const FRAME_LEN: usize = 60;
/// Source MACs of the guest's frames and of the host's.
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// A broadcast Ethernet frame from `src` carrying `text`, padded to [`FRAME_LEN`].
fn eth_frame(src: [u8; 6], text: &str) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(text.as_bytes());
    assert!(f.len() <= FRAME_LEN);
    f.resize(FRAME_LEN, b'.');
    f
}

/// Runs `ip ARGS`; the error is ip's message.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A persistent TAP made for one test; deleted by [`TestTap::delete`], or on drop when the
/// test fails.
struct TestTap {
    name: String,
}

impl TestTap {
    /// Creates `tvmh<pid><suffix>`, turns IPv6 off on it (so the host sends nothing of its
    /// own towards the guest) and sets its link up. Panics, telling what is needed, when
    /// it cannot.
    fn create(suffix: char) -> TestTap {
        let name = format!("tvmh{}{suffix}", std::process::id());
        if let Err(e) = ip(&["tuntap", "add", "dev", &name, "mode", "tap"]) {
            panic!(
                "cannot create the TAP {name} ({e}): the kvm_hostile_net_* tests need root \
                 (CAP_NET_ADMIN), /dev/net/tun and the ip command"
            );
        }
        let tap = TestTap { name };
        let ipv6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name);
        if Path::new(&ipv6).exists() {
            std::fs::write(&ipv6, "1").unwrap();
        }
        ip(&["link", "set", "dev", &tap.name, "up"]).unwrap();
        tap
    }

    /// How the VMM names the interface in its log lines.
    fn device_name(&self) -> String {
        format!("virtio-net {}", self.name)
    }

    /// Deletes the interface and checks it is gone.
    fn delete(mut self) {
        let name = std::mem::take(&mut self.name);
        ip(&["link", "del", "dev", &name]).unwrap();
        assert!(!interface_exists(&name), "{name} is still there");
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = ip(&["link", "del", "dev", &self.name]);
        }
    }
}

/// An `AF_PACKET` socket bound to a TAP: the host's side of the guest's link.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Binds to `ifname` for every protocol, with a 100 ms receive timeout.
    fn bind(ifname: &str) -> PacketSocket {
        let cname = CString::new(ifname).unwrap();
        // SAFETY: `cname` is a NUL-terminated string that outlives the call, which only
        // reads it.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers; the result is checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            raw >= 0,
            "packet socket: {} (needs CAP_NET_RAW)",
            io::Error::last_os_error()
        );
        // SAFETY: `raw` is a descriptor socket() just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is a plain C struct for which all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = i32::try_from(ifindex).unwrap();
        // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size; bind()
        // only reads it.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "bind to {ifname}: {}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size;
        // setsockopt() only reads it.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        PacketSocket { fd }
    }

    /// The next frame the TAP received from the guest (frames on their way to the guest
    /// are skipped), or `None` after 100 ms without one.
    fn recv_from_guest(&self) -> io::Result<Option<Vec<u8>>> {
        // More than any frame a TAP can carry, so nothing is cut.
        let mut buf = vec![0u8; 1 << 17];
        loop {
            // SAFETY: as in `bind`.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `addr` for `len`
            // bytes; recvfrom() writes no more and updates `len`.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::from_mut(&mut addr).cast(),
                    &mut len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            };
            if addr.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(buf[..n].to_vec()));
        }
    }

    /// Sends `frame` out of the TAP, towards the guest.
    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes; send() reads no more.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            usize::try_from(n).ok(),
            Some(frame.len()),
            "send: {}",
            io::Error::last_os_error()
        );
    }
}

/// Everything the guest puts on the TAP, collected by a thread from before the VMM starts
/// until [`Capture::finish`].
struct Capture {
    sock: Arc<PacketSocket>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<Vec<Vec<u8>>>>,
}

impl Capture {
    fn start(tap: &TestTap) -> Capture {
        let sock = Arc::new(PacketSocket::bind(&tap.name));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (sock.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            loop {
                match s.recv_from_guest()? {
                    Some(f) => frames.push(f),
                    // Stop only after 100 ms of silence, so nothing in flight is missed.
                    None if st.load(Ordering::SeqCst) => return Ok(frames),
                    None => {}
                }
            }
        });
        Capture { sock, stop, thread }
    }

    /// Sends `frame` towards the guest.
    fn send(&self, frame: &[u8]) {
        self.sock.send(frame);
    }

    /// The Ethernet frames (the TAP strips the vnet header) the guest sent, in order.
    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("reading the TAP: {e}"))
    }
}

/// Shows the first frames short, for assertion messages.
fn summary(frames: &[Vec<u8>]) -> Vec<String> {
    let mut lines: Vec<String> = frames
        .iter()
        .take(8)
        .map(|f| {
            let text = f.get(ETH_HLEN..).unwrap_or_default();
            let end = text.len().min(32);
            format!(
                "{} bytes: {}",
                f.len(),
                String::from_utf8_lossy(&text[..end])
            )
        })
        .collect();
    if frames.len() > 8 {
        lines.push(format!("and {} more", frames.len() - 8));
    }
    lines
}

impl Guest {
    /// [`Guest::new`] with the network interface placed and identified too.
    fn with_net() -> Guest {
        Guest::build(&[RX])
    }

    /// The network interface initialised with VIRTIO_F_VERSION_1 only (so no mergeable
    /// buffers and no offloads) and both queues on their own rings.
    fn init_net(&mut self) {
        self.negotiate(RX);
        for q in [RX, TX] {
            self.queue(q, None, q.desc(0), q.avail(), q.used());
        }
        self.driver_ok(RX);
        for q in [RX, TX] {
            self.restart_rings(q);
        }
    }

    /// Puts a vnet header (all zeroes: no offloads) and an Ethernet frame with `text` in
    /// transmit buffer `k`; returns the bytes.
    fn tx_frame(&mut self, k: u64, text: &str) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(eth_frame(GUEST_MAC, text));
        self.put(TX.buf(k), &f);
        f
    }

    /// Writes a descriptor that is its own successor; returns its index.
    fn self_loop(&mut self, dev: Dev, (addr, len, flags): Desc) -> u16 {
        let own = self.next_desc[dev.index];
        self.put_desc(dev, own, (addr, len, flags | F_NEXT), own);
        self.next_desc[dev.index] = own + 1;
        own
    }

    /// Sends `head` on `dev` and prints the used length as `TAG.lenN`; returns N.
    fn send_and_show(&mut self, dev: Dev, head: u16) -> u16 {
        let n = self.send(dev, head);
        self.show(&format!("{}.len{n}", dev.tag), dev.used_len(n), 4);
        n
    }
}

/// Checks the interface's PCI identity (virtio-net, modern).
fn assert_net_found(f: &Finished) {
    assert_eq!(f.value("rx.id"), 0x1041_1af4);
}

#[test]
#[ignore = "needs /dev/kvm, and root for the TAP"]
fn kvm_hostile_net_malformed_tx_chains_never_reach_the_tap() {
    let disks = Disks::new("net-tx");
    let tap = TestTap::create('t');
    let capture = Capture::start(&tap);
    let mut g = Guest::with_net();
    g.init_net();
    // Every bad chain carries a well-formed frame: were it sent, the TAP would see it.
    let len = (VNET_HDR_LEN + FRAME_LEN) as u32;
    for k in 1..=7 {
        g.tx_frame(k, &format!("BAD-FRAME-{k}"));
    }
    let mut heads = vec![
        // Device-writable.
        g.chain(TX, &[(TX.buf(1), len, F_WRITE)]),
        // Shorter than the vnet header.
        g.chain(TX, &[(TX.buf(2), 8, 0)]),
        // Longer than 64 KiB + header: the frame, then 64 KiB + 256 bytes of RAM.
        g.chain(TX, &[(TX.buf(3), len, 0), (0x20_0000, 0x1_0100, 0)]),
        // The frame's end outside RAM.
        g.chain(TX, &[(TX.buf(4), 26, 0), (RAM_END, len - 26, 0)]),
        // Wrapping around the address space.
        g.chain(TX, &[(0xffff_ffff_ffff_ffc0, len, 0)]),
    ];
    // A descriptor that is its own successor (read 256 times, it would make an 18 KiB
    // frame), and a cycle of two.
    heads.push(g.self_loop(TX, (TX.buf(6), len, 0)));
    let two = g.next_desc[TX.index];
    g.put_desc(TX, two, (TX.buf(7), 12, F_NEXT), two + 1);
    g.put_desc(TX, two + 1, (TX.buf(7) + 12, len - 12, F_NEXT), two);
    g.next_desc[TX.index] = two + 2;
    heads.push(two);
    for head in heads {
        g.send_and_show(TX, head);
    }
    // Then a good frame: it goes out.
    let good = g.tx_frame(0, "GOOD-FRAME-AFTER-THE-ATTACK");
    let head = g.chain(TX, &[(TX.buf(0), len, 0)]);
    let n = g.send_and_show(TX, head);
    let f = attack_with(g, &disks, Some(&tap.name), |_| {});
    let frames = capture.finish();
    assert_net_found(&f);
    assert_eq!(n, 8);
    for n in 1..=8 {
        // Transmit chains are always returned with length 0.
        assert_eq!(f.value(&format!("tx.len{n}")), 0);
    }
    assert_eq!(
        frames,
        vec![good[VNET_HDR_LEN..].to_vec()],
        "the TAP saw {:#?}",
        summary(&frames)
    );
    f.assert_warnings(
        &tap.device_name(),
        &[&format!(
            "malformed tx chain 0 returned unsent: device-writable descriptor at {:#x}",
            TX.buf(1)
        )],
    );
    tap.delete();
}

#[test]
#[ignore = "needs /dev/kvm, and root for the TAP"]
fn kvm_hostile_net_rx_buffers_outside_ram_are_returned_unused() {
    let disks = Disks::new("net-rx");
    let tap = TestTap::create('r');
    let capture = Capture::start(&tap);
    let mut g = Guest::with_net();
    g.init_net();
    // Receive buffers the device must not fill: past the end of RAM, straddling it,
    // wrapping around the address space, device-readable, looping, smaller than the
    // vnet header; then a good one.
    let mut heads = vec![
        g.chain(RX, &[(RAM_END, 1526, F_WRITE)]),
        g.chain(RX, &[(RAM_END - 0x100, 1526, F_WRITE)]),
        g.chain(RX, &[(0xffff_ffff_ffff_f000, 1526, F_WRITE)]),
        g.chain(RX, &[(RX.buf(1), 512, 0)]),
    ];
    heads.push(g.self_loop(RX, (RX.buf(2), 512, F_WRITE)));
    heads.push(g.chain(RX, &[(RX.buf(3), 11, F_WRITE)]));
    heads.push(g.chain(RX, &[(RX.buf(0), 512, F_WRITE)]));
    let mut n = 0;
    for &head in &heads {
        n = g.offer(RX, head);
        g.publish(RX);
    }
    g.kick(RX);
    // The host sends one frame now; the device goes through the buffers in order.
    g.print("NET-RX-READY\n");
    g.wait_used(RX, n);
    for i in 1..=n {
        g.show(&format!("rx.len{i}"), RX.used_len(i), 4);
    }
    g.show_bytes("rx.text", RX.buf(0) + (VNET_HDR_LEN + ETH_HLEN) as u64, 32);
    for k in 1..=3 {
        g.show_bytes(&format!("rx.untouched{k}"), RX.buf(k), 32);
    }
    let to_guest = eth_frame(HOST_MAC, "FRAME-FROM-THE-HOST-TO-THE-GUEST");
    let f = attack_with(g, &disks, Some(&tap.name), |vmm| {
        vmm.wait_for("NET-RX-READY");
        capture.send(&to_guest);
    });
    let frames = capture.finish();
    assert_net_found(&f);
    assert_eq!(n, 7);
    for i in 1..=6 {
        assert_eq!(f.value(&format!("rx.len{i}")), 0, "bad buffer {i}");
    }
    assert_eq!(f.value("rx.len7"), (VNET_HDR_LEN + FRAME_LEN) as u32);
    assert_eq!(
        f.text("rx.text").as_bytes(),
        &to_guest[ETH_HLEN..ETH_HLEN + 32]
    );
    for k in 1..=3 {
        assert_eq!(
            f.text(&format!("rx.untouched{k}")),
            "-".repeat(32),
            "buffer {k}"
        );
    }
    assert_eq!(frames, Vec::<Vec<u8>>::new(), "the guest sent nothing");
    f.assert_warnings(
        &tap.device_name(),
        &[&format!(
            "malformed rx chain 0 returned unused: descriptor {RAM_END:#x}+0x5f6 outside \
             guest memory"
        )],
    );
    tap.delete();
}

#[test]
#[ignore = "needs /dev/kvm, and root for the TAP"]
fn kvm_hostile_net_bad_queue_sizes_and_early_kicks_are_ignored() {
    let disks = Disks::new("net-early");
    let tap = TestTap::create('e');
    let capture = Capture::start(&tap);
    let mut g = Guest::with_net();
    // A kick while the device is reset.
    g.write(RX.cfg(DEVICE_STATUS), 1, 0);
    g.kick(TX);
    g.negotiate(RX);
    // Sizes that are not a power of two, or 0, on both queues: refused. 128 is taken on TX.
    for q in [RX, TX] {
        g.write(q.cfg(QUEUE_SELECT), 2, q.queue.into());
        for (i, size) in [100u32, 0, 255, 0x8000].into_iter().enumerate() {
            g.write(q.cfg(QUEUE_SIZE), 2, size);
            g.show(&format!("{}.qsize{i}", q.tag), q.cfg(QUEUE_SIZE), 2);
        }
    }
    g.write(TX.cfg(QUEUE_SIZE), 2, 128);
    g.show("tx.qsize", TX.cfg(QUEUE_SIZE), 2);
    for q in [RX, TX] {
        g.queue(q, None, q.desc(0), q.avail(), q.used());
        g.restart_rings(q);
    }
    // A well-formed frame made available and kicked before DRIVER_OK.
    let early = g.tx_frame(0, "SENT-ONLY-AFTER-DRIVER-OK");
    let len = (VNET_HDR_LEN + FRAME_LEN) as u32;
    let head = g.chain(TX, &[(TX.buf(0), len, 0)]);
    let n = g.offer(TX, head);
    g.publish(TX);
    g.kick(TX);
    // Two round trips on A: the event loop has seen the kicks by then.
    g.good_read(A);
    g.good_read(A);
    g.show("tx.used_early", TX.used() + 2, 2);
    // Now DRIVER_OK and a kick: the frame goes out, with the queue of 128.
    g.driver_ok(RX);
    g.show("net.status", RX.cfg(DEVICE_STATUS), 1);
    g.kick(TX);
    g.wait_used(TX, n);
    g.show("tx.used", TX.used() + 2, 2);
    let f = attack_with(g, &disks, Some(&tap.name), |_| {});
    let frames = capture.finish();
    assert_net_found(&f);
    for q in ["rx", "tx"] {
        for i in 0..4 {
            assert_eq!(f.value(&format!("{q}.qsize{i}")), 256, "{q} write {i}");
        }
    }
    assert_eq!(f.value("tx.qsize"), 128);
    assert_eq!(f.value("tx.used_early"), 0);
    assert_eq!(f.value("net.status"), 0x0f);
    assert_eq!(f.value("tx.used"), 1);
    assert_eq!(
        frames,
        vec![early[VNET_HDR_LEN..].to_vec()],
        "the TAP saw {:#?}",
        summary(&frames)
    );
    // The queues are the device's worker's (tvm_virtio::Threaded), which watches their
    // EventFds only while the device is live: the early kick waited there, unserved and
    // unlogged, and was served after DRIVER_OK (above).
    f.assert_warnings(&tap.device_name(), &["queue size 100 refused"]);
    tap.delete();
}

#[test]
#[ignore = "needs /dev/kvm, and root for the TAP"]
fn kvm_hostile_net_kick_storm_stays_bounded() {
    let disks = Disks::new("net-storm");
    let tap = TestTap::create('s');
    let capture = Capture::start(&tap);
    let mut g = Guest::with_net();
    g.init_net();
    // Every available slot offers a descriptor that is its own successor, over a
    // well-formed frame.
    let len = (VNET_HDR_LEN + FRAME_LEN) as u32;
    g.tx_frame(1, "BAD-FRAME-IN-A-LOOP");
    let own = g.self_loop(TX, (TX.buf(1), len, 0));
    g.storm(TX, own);
    // The driver resets the device and sends a good frame.
    g.init_net();
    let good = g.tx_frame(0, "GOOD-FRAME-AFTER-THE-STORM");
    let head = g.chain(TX, &[(TX.buf(0), len, 0)]);
    g.send_and_show(TX, head);
    let mut figures = None;
    let f = attack_with(g, &disks, Some(&tap.name), |vmm| {
        figures = Some(vmm.storm_figures());
    });
    let frames = capture.finish();
    assert_net_found(&f);
    assert_eq!(f.value("tx.storm1_used"), STORM_ROUNDS);
    // Phase 3's chains cannot be returned.
    assert_eq!(f.value("tx.storm3_used"), STORM_ROUNDS);
    assert_eq!(
        frames,
        vec![good[VNET_HDR_LEN..].to_vec()],
        "the TAP saw {:#?}",
        summary(&frames)
    );
    // 3 x 5120 kicks: one warning per kind (the bad heads of phase 3 are a broken ring,
    // like phase 2), and the log stays a few lines long.
    f.assert_warnings(
        &tap.device_name(),
        &[
            &format!("malformed tx chain {own} returned unsent: the chain does not end"),
            &format!(
                "tx queue left alone: the available index {} is more than the queue size 256 \
                 ahead of {STORM_ROUNDS}",
                STORM_ROUNDS + 1000
            ),
        ],
    );
    figures.unwrap().check("net storm", &f);
    tap.delete();
}
