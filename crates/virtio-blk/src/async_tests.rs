// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The asynchronous engine path of [`Block`]: a fake engine whose test decides when and
//! how each operation completes, and the real io_uring engine on a temporary image.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::engine::{AsyncIo, Op, OpKind};

/// How the test completes an operation.
#[derive(Clone, Copy, Debug)]
enum Outcome2 {
    /// Moves every byte.
    Full,
    /// Moves this many bytes (a short read or write).
    Short(usize),
    /// Fails with this errno.
    Errno(i32),
}

/// What the fake engine holds, shared with the test.
#[derive(Default)]
struct FakeState {
    /// The image.
    disk: Vec<u8>,
    /// Operations pushed and not completed yet, in order.
    running: Vec<Op>,
    /// Completed, waiting to be reaped.
    done: Vec<(Op, i32)>,
    /// Every operation pushed, as (kind, offset, bytes), in order.
    log: Vec<(OpKind, u64, u64)>,
    /// The host address of each pushed operation's first buffer.
    bases: Vec<usize>,
    /// Whether each pushed operation was marked for the kernel's workers.
    background: Vec<bool>,
    /// Most operations running at once.
    peak: usize,
    /// Pushes refused (the fake is "full").
    full: bool,
}

/// A fake [`AsyncIo`] over a byte vector.
struct Fake {
    state: Arc<Mutex<FakeState>>,
    evt: EventFd,
}

impl Fake {
    fn new(disk: Vec<u8>) -> (Fake, Arc<Mutex<FakeState>>) {
        let state = Arc::new(Mutex::new(FakeState {
            disk,
            ..FakeState::default()
        }));
        let fake = Fake {
            state: state.clone(),
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        (fake, state)
    }
}

/// Completes the running operation at `index` the way `how` says, moving data between
/// the fake image and the operation's buffers as the kernel would.
fn complete(state: &mut FakeState, index: usize, how: Outcome2) {
    let op = state.running.remove(index);
    let res = match (op.kind, how) {
        (_, Outcome2::Errno(e)) => -e,
        (OpKind::Read | OpKind::Write, _) => {
            let want = op.remaining() as usize;
            let n = match how {
                Outcome2::Short(n) => n.min(want),
                _ => want,
            };
            let mut pos = op.offset as usize;
            let mut left = n;
            for iov in op.iovecs() {
                if left == 0 {
                    break;
                }
                let len = iov.iov_len.min(left);
                // SAFETY: the operation keeps its buffers (guest memory or its own) alive
                // and at least `iov_len` bytes long while it is not completed; the test
                // owns the only other reference to them and does not touch them meanwhile.
                let buf = unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast::<u8>(), len) };
                if op.kind == OpKind::Read {
                    buf.copy_from_slice(&state.disk[pos..pos + len]);
                } else {
                    state.disk[pos..pos + len].copy_from_slice(buf);
                }
                pos += len;
                left -= len;
            }
            n as i32
        }
        (OpKind::Fallocate { len, .. }, _) => {
            let (o, l) = (op.offset as usize, len as usize);
            state.disk[o..o + l].fill(0);
            0
        }
        (OpKind::Flush, _) => 0,
    };
    state.done.push((op, res));
}

impl AsyncIo for Fake {
    fn push(&mut self, _fd: RawFd, op: Op) -> std::result::Result<(), Op> {
        let mut s = self.state.lock().unwrap();
        if s.full {
            return Err(op);
        }
        let bytes = match op.kind {
            OpKind::Fallocate { len, .. } => len,
            _ => op.remaining(),
        };
        s.log.push((op.kind, op.offset, bytes));
        s.bases
            .push(op.iovecs().first().map_or(0, |v| v.iov_base as usize));
        s.background.push(op.background);
        s.running.push(op);
        s.peak = s.peak.max(s.running.len());
        Ok(())
    }

    fn submit(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(Op, i32)>) {
        let _ = self.evt.read();
        out.append(&mut self.state.lock().unwrap().done);
    }

    /// Completes the oldest operation running, as a kernel that finishes one would (the
    /// caller waits again while it needs more).
    fn wait(&mut self) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !s.running.is_empty() {
            complete(&mut s, 0, Outcome2::Full);
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.running.len() + s.done.len()
    }

    fn room(&self) -> usize {
        let s = self.state.lock().unwrap();
        if s.full {
            0
        } else {
            1024
        }
    }

    fn event_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

/// A read-write disk over `img` served by a fake engine with `slots` request slots.
fn fake_disk(img: &TempImage, content: &[u8], slots: usize) -> (Block, Arc<Mutex<FakeState>>) {
    let mut disk = open_disk(img);
    let (fake, state) = Fake::new(content.to_vec());
    disk.set_engine_for_test(Box::new(fake), slots);
    (disk, state)
}

/// Completes the running operation at `index` and lets the device handle it.
fn finish_op(disk: &mut Block, state: &Mutex<FakeState>, index: usize, how: Outcome2) {
    complete(&mut state.lock().unwrap(), index, how);
    disk.process_extra_event(0, tvm_virtio::EventSet::IN);
}

/// Puts `n` chains on `mock`, request `i` being `(type, sector, data len)` with its header
/// at HDR + 0x100 i, data at DATA + 0x1000 i and status at STATUS + 0x10 i.
fn add_requests(
    mem: &GuestMemoryMmap<()>,
    mock: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    reqs: &[(u32, u64, u32)],
) {
    let next = VRING_DESC_F_NEXT as u16;
    let mut descs = Vec::new();
    for (i, &(t, sector, len)) in reqs.iter().enumerate() {
        let i64_ = i as u64;
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR + 0x100 * i64_))
            .unwrap();
        let base = (descs.len()) as u16;
        let data_flags = if t == VIRTIO_BLK_T_IN { W } else { R };
        if len > 0 {
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                HDR + 0x100 * i64_,
                16,
                next,
                base + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                DATA + 0x1000 * i64_,
                len,
                next | data_flags,
                base + 2,
            )));
        } else {
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                HDR + 0x100 * i64_,
                16,
                next,
                base + 1,
            )));
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            STATUS + 0x10 * i64_,
            1,
            W,
            0,
        )));
    }
    mock.add_desc_chains(&descs, 0).unwrap();
}

/// The used ring as (head, len) pairs.
fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap<()>>) -> Vec<(u32, u32)> {
    let n = mock.used().idx().load();
    (0..n)
        .map(|i| {
            let e = mock.used().ring().ref_at(usize::from(i)).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn status_of(mem: &GuestMemoryMmap<()>, i: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + 0x10 * i)).unwrap()
}

#[test]
fn completions_reach_the_used_ring_in_the_order_they_finish() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(
        &mem,
        &mock,
        &[
            (VIRTIO_BLK_T_IN, 1, 512),
            (VIRTIO_BLK_T_IN, 2, 1024),
            (VIRTIO_BLK_T_IN, 5, 512),
        ],
    );
    let irq = activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    // All three started, none answered.
    assert_eq!(state.lock().unwrap().running.len(), 3);
    assert!(used(&mock).is_empty());
    assert_eq!(status_of(&mem, 0), FILL);
    // The third finishes first, then the first, then the second.
    finish_op(&mut disk, &state, 2, Outcome2::Full);
    assert_eq!(used(&mock), vec![(6, 513)]);
    assert_eq!(irq.queues(), vec![0]);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(6, 513), (0, 513), (3, 1025)]);
    for i in 0..3 {
        assert_eq!(status_of(&mem, i), OK);
    }
    assert_eq!(guest(&mem, DATA, 512), content[512..1024]);
    assert_eq!(guest(&mem, DATA + 0x1000, 1024), content[1024..2048]);
    assert_eq!(guest(&mem, DATA + 0x2000, 512), content[5 * 512..6 * 512]);
    assert_eq!(disk.counters().read_count, 3);
    assert_eq!(disk.counters().read_bytes, 2048);
}

#[test]
fn a_short_transfer_goes_on_from_where_it_stopped() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    mem.write_slice(&[0x5a; 1024], GuestAddress(DATA + 0x1000))
        .unwrap();
    add_requests(
        &mem,
        &mock,
        &[(VIRTIO_BLK_T_IN, 2, 1024), (VIRTIO_BLK_T_OUT, 8, 1024)],
    );
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    finish_op(&mut disk, &state, 0, Outcome2::Short(100));
    finish_op(&mut disk, &state, 0, Outcome2::Short(700));
    assert!(used(&mock).is_empty(), "not answered after a short write");
    {
        let s = state.lock().unwrap();
        // The read's rest was resubmitted at the right offset, then the write's.
        assert_eq!(s.log[2], (OpKind::Read, 1024 + 100, 924));
        assert_eq!(s.log[3], (OpKind::Write, 8 * 512 + 700, 324));
    }
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, 1025), (3, 1)]);
    assert_eq!(guest(&mem, DATA, 1024), content[1024..2048]);
    assert_eq!(
        &state.lock().unwrap().disk[8 * 512..9 * 512 + 512],
        &[0x5a; 1024][..]
    );
    // A read that hits the end (0 bytes while some remain) is an error, not a loop.
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 0, 512)]);
    disk.process_queue(0);
    let n = state.lock().unwrap().running.len();
    assert_eq!(n, 1);
    finish_op(&mut disk, &state, 0, Outcome2::Short(0));
    assert_eq!(used(&mock).len(), 3);
    assert_eq!(status_of(&mem, 0), IOERR);
    assert_eq!(disk.counters().execute_fails, 1);
}

#[test]
fn host_errors_from_the_engine_are_ioerr_and_counted_by_kind() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(
        &mem,
        &mock,
        &[
            (VIRTIO_BLK_T_OUT, 1, 512),
            (VIRTIO_BLK_T_OUT, 2, 512),
            (VIRTIO_BLK_T_FLUSH, 0, 0),
        ],
    );
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    finish_op(&mut disk, &state, 0, Outcome2::Errno(libc::ENOSPC));
    finish_op(&mut disk, &state, 0, Outcome2::Errno(libc::ENOSPC));
    finish_op(&mut disk, &state, 0, Outcome2::Errno(libc::EIO));
    assert_eq!(used(&mock), vec![(0, 1), (3, 1), (6, 1)]);
    for i in 0..3 {
        assert_eq!(status_of(&mem, i), IOERR);
    }
    assert_eq!(disk.counters().execute_fails, 3);
    let kinds = disk.host_errors();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .any(|(k, n)| k.contains("No space left") && *n == 2),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, n)| k.contains("Input/output error") && *n == 1),
        "{kinds:?}"
    );
    // The image was not touched.
    assert_eq!(state.lock().unwrap().disk, content);
}

#[test]
fn a_flush_reaches_the_image_only_after_the_writes_acknowledged_before_it() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_OUT, 1, 512)]);
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    // A write is acknowledged only once the engine completed it.
    assert!(used(&mock).is_empty());
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, 1)]);
    // Then the driver flushes: the flush goes to the engine after the write's data.
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_FLUSH, 0, 0)]);
    disk.process_queue(0);
    {
        let s = state.lock().unwrap();
        let kinds: Vec<OpKind> = s.log.iter().map(|l| l.0).collect();
        assert_eq!(kinds, vec![OpKind::Write, OpKind::Flush]);
        assert_eq!(s.running.len(), 1);
    }
    assert_eq!(used(&mock).len(), 1, "the flush waits for the engine");
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, 1), (0, 1)]);
    assert_eq!(disk.counters().flush_count, 1);
}

#[test]
fn more_requests_than_slots_wait_for_a_free_slot() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 2);
    let mock = MockSplitQueue::new(&mem, 16);
    let reqs: Vec<(u32, u64, u32)> = (0..5).map(|i| (VIRTIO_BLK_T_IN, i, 512)).collect();
    add_requests(&mem, &mock, &reqs);
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    assert_eq!(state.lock().unwrap().running.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while used(&mock).len() < 5 {
        assert!(Instant::now() < deadline, "requests left behind");
        finish_op(&mut disk, &state, 0, Outcome2::Full);
    }
    assert_eq!(state.lock().unwrap().peak, 2);
    for i in 0..5 {
        assert_eq!(status_of(&mem, i), OK);
        assert_eq!(
            guest(&mem, DATA + 0x1000 * i, 512),
            content[512 * i as usize..512 * (i as usize + 1)]
        );
    }
    // An engine that refuses an operation: the request is an i/o error, not lost.
    state.lock().unwrap().full = true;
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 0, 512)]);
    disk.process_queue(0);
    assert_eq!(used(&mock).len(), 6);
    assert_eq!(status_of(&mem, 0), IOERR);
}

#[test]
fn a_reset_waits_for_requests_in_flight_and_answers_none_of_them() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(
        &mem,
        &mock,
        &[(VIRTIO_BLK_T_IN, 1, 512), (VIRTIO_BLK_T_OUT, 3, 512)],
    );
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    assert_eq!(state.lock().unwrap().running.len(), 2);
    disk.reset();
    // Both operations ended inside the reset: nothing runs that could write guest memory
    // later, and neither request was answered.
    {
        let s = state.lock().unwrap();
        assert!(s.running.is_empty() && s.done.is_empty());
    }
    assert!(used(&mock).is_empty());
    assert_eq!(status_of(&mem, 0), FILL);
    assert_eq!(status_of(&mem, 1), FILL);
    // A completion notification after the reset finds nothing to do.
    disk.process_extra_event(0, tvm_virtio::EventSet::IN);
    assert!(used(&mock).is_empty());
}

/// A 64 KiB image with a pattern, served by the fake engine with transfers of 16 KiB or
/// more split into up to 4 pieces of at least 8 KiB.
fn piece_disk() -> (TempImage, Vec<u8>, Block, Arc<Mutex<FakeState>>) {
    let content: Vec<u8> = (0..64 << 10).map(|i| (i * 13 % 253) as u8).collect();
    let img = TempImage::new(&content);
    let (mut disk, state) = fake_disk(&img, &content, 64);
    disk.set_pieces_for_test(4, 8 << 10);
    (img, content, disk, state)
}

#[test]
fn a_large_read_runs_as_pieces_and_is_answered_when_the_last_one_ends() {
    let (_img, content, mut disk, state) = piece_disk();
    let mem = test_mem();
    let mock = MockSplitQueue::new(&mem, 16);
    // 32 KiB from byte 4096, into one 32 KiB guest buffer: cut inside it.
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 8, 32 << 10)]);
    let irq = activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    let host_data = mem.get_host_address(GuestAddress(DATA)).unwrap() as usize;
    {
        let s = state.lock().unwrap();
        // The pieces for the kernel's workers first, the one run during the submission
        // last: consecutive 8 KiB ranges of the image and of the guest buffer.
        let k = 8 << 10;
        let want: Vec<(OpKind, u64, u64)> = [1u64, 2, 3, 0]
            .iter()
            .map(|&i| (OpKind::Read, 4096 + i * k, k))
            .collect();
        assert_eq!(s.log, want);
        let bases: Vec<usize> = [1usize, 2, 3, 0]
            .iter()
            .map(|&i| host_data + i * 8192)
            .collect();
        assert_eq!(s.bases, bases);
        assert_eq!(s.background, vec![true, true, true, false]);
    }
    // Out of order; nothing answered before the last piece.
    for index in [2, 0, 1] {
        finish_op(&mut disk, &state, index, Outcome2::Full);
        assert!(used(&mock).is_empty());
        assert_eq!(status_of(&mem, 0), FILL);
        assert!(irq.queues().is_empty());
    }
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, (32 << 10) + 1)]);
    assert_eq!(status_of(&mem, 0), OK);
    assert_eq!(irq.queues(), vec![0]);
    assert_eq!(
        guest(&mem, DATA, 32 << 10),
        content[4096..4096 + (32 << 10)]
    );
    let c = disk.counters();
    assert_eq!((c.read_count, c.read_bytes), (1, 32 << 10));
}

#[test]
fn a_failed_or_short_piece_decides_the_request_only_after_every_piece() {
    let (_img, content, mut disk, state) = piece_disk();
    let mem = test_mem();
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 0, 16 << 10)]);
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    assert_eq!(state.lock().unwrap().running.len(), 2);
    // The background piece (bytes 8K..16K) comes back short: its rest goes on.
    finish_op(&mut disk, &state, 0, Outcome2::Short(100));
    assert_eq!(
        state.lock().unwrap().log.last(),
        Some(&(OpKind::Read, (8 << 10) + 100, (8 << 10) - 100))
    );
    // The first piece fails: still not answered, the other piece runs.
    finish_op(&mut disk, &state, 0, Outcome2::Errno(libc::EIO));
    assert!(used(&mock).is_empty());
    assert_eq!(status_of(&mem, 0), FILL);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    // One answer, an i/o error (only the status byte counts as written), counted once.
    assert_eq!(used(&mock), vec![(0, 1)]);
    assert_eq!(status_of(&mem, 0), IOERR);
    assert_eq!(disk.counters().execute_fails, 1);
    assert_eq!(disk.counters().read_count, 0);
    let kinds = disk.host_errors();
    assert!(
        kinds.len() == 1 && kinds[0].0.contains("Input/output error") && kinds[0].1 == 1,
        "{kinds:?}"
    );
    // The piece that succeeded did reach guest memory (a failed read's buffer is
    // undefined for the driver).
    assert_eq!(
        guest(&mem, DATA + (8 << 10), 8 << 10),
        content[8 << 10..16 << 10]
    );
}

#[test]
fn buffered_writes_and_small_transfers_run_whole() {
    let (_img, _content, mut disk, state) = piece_disk();
    let mem = test_mem();
    let mock = MockSplitQueue::new(&mem, 16);
    // A buffered write (the file system serializes writes to one file), and a read
    // below two pieces.
    add_requests(
        &mem,
        &mock,
        &[
            (VIRTIO_BLK_T_OUT, 0, 32 << 10),
            (VIRTIO_BLK_T_IN, 64, 12 << 10),
        ],
    );
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    let s = state.lock().unwrap();
    assert_eq!(
        s.log,
        vec![
            (OpKind::Write, 0, 32 << 10),
            (OpKind::Read, 64 * 512, 12 << 10)
        ]
    );
    assert_eq!(s.background, vec![false, false]);
}

#[test]
fn a_reset_waits_for_every_piece_of_a_split_request() {
    let (_img, _content, mut disk, state) = piece_disk();
    let mem = test_mem();
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 0, 32 << 10)]);
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    assert_eq!(state.lock().unwrap().running.len(), 4);
    // The fake completes one operation per wait: the reset must go on until the last.
    disk.reset();
    {
        let s = state.lock().unwrap();
        assert!(
            s.running.is_empty() && s.done.is_empty(),
            "pieces left running"
        );
    }
    assert!(used(&mock).is_empty());
    assert_eq!(status_of(&mem, 0), FILL);
}

#[test]
fn write_zeroes_falls_back_mode_by_mode_then_writes_zeros() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    // One WRITE_ZEROES segment: sectors 2..4.
    let seg = {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&2u64.to_le_bytes());
        s[8..12].copy_from_slice(&2u32.to_le_bytes());
        s
    };
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16)]);
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    // ZERO_RANGE unsupported, PUNCH_HOLE unsupported: zeros are written.
    finish_op(&mut disk, &state, 0, Outcome2::Errno(libc::EOPNOTSUPP));
    finish_op(&mut disk, &state, 0, Outcome2::Errno(libc::EOPNOTSUPP));
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, 1)]);
    assert_eq!(status_of(&mem, 0), OK);
    let s = state.lock().unwrap();
    let modes: Vec<OpKind> = s.log.iter().map(|l| l.0).collect();
    assert_eq!(
        modes,
        vec![
            OpKind::Fallocate {
                mode: libc::FALLOC_FL_ZERO_RANGE,
                len: 1024
            },
            OpKind::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE,
                len: 1024
            },
            OpKind::Write,
        ]
    );
    assert_eq!(&s.disk[1024..2048], &[0u8; 1024][..]);
    assert_eq!(&s.disk[..1024], &content[..1024]);
    assert_eq!(&s.disk[2048..], &content[2048..]);
}

/// Waits (up to 5 s) until the disk's engine reports completions, then hands them over;
/// until `used` chains are in the ring.
fn serve_until(disk: &mut Block, mock: &MockSplitQueue<'_, GuestMemoryMmap<()>>, n: usize) {
    let fd = disk.extra_event_sources()[0].0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while used(mock).len() < n {
        assert!(
            Instant::now() < deadline,
            "io_uring completions did not come"
        );
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the call only.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        disk.process_extra_event(0, tvm_virtio::EventSet::IN);
    }
}

/// The io_uring engine on a real image: `cache` as given, buffers at guest addresses
/// `DATA + 0x1000 i + skew` (a skew that breaks direct-I/O alignment bounces).
fn io_uring_round_trip(cache: CacheMode, skew: u64) {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let mut disk = Block::open(BlockConfig {
        path: img.path.clone(),
        cache,
        engine: IoEngine::Uring,
        ..BlockConfig::default()
    })
    .unwrap();
    assert_eq!(disk.engine_name(), "io_uring");
    // The completion EventFd and the coalescing timer.
    assert_eq!(disk.extra_event_sources().len(), 2);
    let mock = MockSplitQueue::new(&mem, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let chain = |i: u64, t: u32, sector: u64, w: u16| {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR + 0x100 * i))
            .unwrap();
        let b = (i * 3) as u16;
        [
            RawDescriptor::from(SplitDescriptor::new(HDR + 0x100 * i, 16, next, b + 1)),
            RawDescriptor::from(SplitDescriptor::new(
                DATA + 0x1000 * i + skew,
                1024,
                next | w,
                b + 2,
            )),
            RawDescriptor::from(SplitDescriptor::new(STATUS + 0x10 * i, 1, W, 0)),
        ]
    };
    mem.write_slice(&[0xa7; 1024], GuestAddress(DATA + skew))
        .unwrap();
    let mut descs = Vec::new();
    descs.extend(chain(0, VIRTIO_BLK_T_OUT, 4, R));
    descs.extend(chain(1, VIRTIO_BLK_T_IN, 10, W));
    mock.add_desc_chains(&descs, 0).unwrap();
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    serve_until(&mut disk, &mock, 2);
    assert_eq!(status_of(&mem, 0), OK);
    assert_eq!(status_of(&mem, 1), OK);
    assert_eq!(guest(&mem, DATA + 0x1000 + skew, 1024), content[5120..6144]);
    disk.flush().unwrap();
    let now = img.contents();
    assert_eq!(&now[2048..3072], &[0xa7; 1024][..]);
    assert_eq!(&now[..2048], &content[..2048]);
    assert_eq!(&now[3072..], &content[3072..]);
    let c = disk.counters();
    assert_eq!((c.read_count, c.write_count, c.execute_fails), (1, 1, 0));
}

/// A 1 MiB write, then a 1 MiB read, through the io_uring engine in pieces (the write
/// only with `cache=none`: buffered writes run whole) on a real 2 MiB image.
fn io_uring_pieces(cache: CacheMode) {
    let content: Vec<u8> = (0..2 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let img = TempImage::new(&content);
    let mem = test_mem();
    let mut disk = Block::open(BlockConfig {
        path: img.path.clone(),
        cache,
        engine: IoEngine::Uring,
        ..BlockConfig::default()
    })
    .unwrap();
    disk.set_pieces_for_test(4, 256 << 10);
    let mock = MockSplitQueue::new(&mem, 16);
    let mib = 1u32 << 20;
    let written: Vec<u8> = (0..mib).map(|i| (i % 239) as u8 ^ 0x5a).collect();
    mem.write_slice(&written, GuestAddress(DATA)).unwrap();
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_OUT, 0, mib)]);
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    serve_until(&mut disk, &mock, 1);
    assert_eq!(status_of(&mem, 0), OK);
    // Read the image's second MiB over the buffer.
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 2048, mib)]);
    disk.process_queue(0);
    serve_until(&mut disk, &mock, 2);
    assert_eq!(status_of(&mem, 0), OK);
    assert!(
        guest(&mem, DATA, mib as usize) == content[1 << 20..],
        "read data"
    );
    disk.flush().unwrap();
    let now = img.contents();
    assert!(now[..1 << 20] == written[..], "written data");
    assert!(now[1 << 20..] == content[1 << 20..]);
    let c = disk.counters();
    assert_eq!((c.read_count, c.write_count, c.execute_fails), (1, 1, 0));
    assert_eq!((c.read_bytes, c.write_bytes), (1 << 20, 1 << 20));
}

#[test]
fn io_uring_runs_large_transfers_in_pieces() {
    io_uring_pieces(CacheMode::Writeback);
    io_uring_pieces(CacheMode::None);
}

#[test]
fn io_uring_reads_and_writes_a_real_image() {
    io_uring_round_trip(CacheMode::Writeback, 0);
}

#[test]
fn cache_none_with_aligned_and_unaligned_guest_buffers() {
    io_uring_round_trip(CacheMode::None, 0);
    io_uring_round_trip(CacheMode::None, 1);
}

#[test]
fn cache_none_on_the_synchronous_engine_bounces_unaligned_buffers() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let mut disk = Block::open(BlockConfig {
        path: img.path.clone(),
        cache: CacheMode::None,
        engine: IoEngine::Sync,
        ..BlockConfig::default()
    })
    .unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 1, 512)]);
    // Move the data descriptor off alignment.
    mock.desc_table()
        .store(
            1,
            RawDescriptor::from(SplitDescriptor::new(
                DATA + 3,
                512,
                (VRING_DESC_F_NEXT as u16) | W,
                2,
            )),
        )
        .unwrap();
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    assert_eq!(used(&mock), vec![(0, 513)]);
    assert_eq!(status_of(&mem, 0), OK);
    assert_eq!(guest(&mem, DATA + 3, 512), content[512..1024]);
}

#[test]
fn multi_queue_offers_mq_and_serves_every_enabled_queue() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let mut disk = Block::open(BlockConfig {
        path: img.path.clone(),
        engine: IoEngine::Sync,
        num_queues: 4,
        ..BlockConfig::default()
    })
    .unwrap();
    assert_eq!(disk.queue_max_sizes().len(), 4);
    assert_ne!(
        disk.device_features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ),
        0
    );
    let mut nq = [0u8; 2];
    disk.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 4);
    // The driver enables queues 0 and 2 only.
    let m0 = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let m2 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    add_requests(&mem, &m2, &[(VIRTIO_BLK_T_IN, 7, 512)]);
    let off = || {
        let mut q = Queue::new(16).unwrap();
        q.set_ready(false);
        q
    };
    let irq = Arc::new(RecordingInterrupt::default());
    disk.activate(ActivateContext {
        mem: mem.clone(),
        features: 0,
        queues: vec![
            m0.create_queue().unwrap(),
            off(),
            m2.create_queue().unwrap(),
            off(),
        ],
        queue_evts: (0..4).map(|_| EventFd::new(0).unwrap()).collect(),
        interrupt: irq.clone(),
    })
    .unwrap();
    disk.process_queue(1);
    disk.process_queue(3);
    disk.process_queue(2);
    assert_eq!(used(&m2), vec![(0, 513)]);
    assert!(used(&m0).is_empty());
    assert_eq!(irq.queues(), vec![2]);
    assert_eq!(guest(&mem, DATA, 512), content[7 * 512..8 * 512]);
    // Out of range.
    assert!(matches!(
        Block::open(BlockConfig {
            path: img.path.clone(),
            num_queues: 65,
            ..BlockConfig::default()
        }),
        Err(Error::InvalidQueues(65))
    ));
}

#[test]
fn cache_none_bounces_guest_buffers_that_break_the_memory_alignment() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let mut disk = Block::open(BlockConfig {
        path: img.path.clone(),
        cache: CacheMode::None,
        engine: IoEngine::Sync,
        ..BlockConfig::default()
    })
    .unwrap();
    let (fake, state) = Fake::new(content.clone());
    disk.set_engine_for_test(Box::new(fake), 8);
    let mock = MockSplitQueue::new(&mem, 16);
    // Request 0 reads into an aligned buffer, request 1 into one 1 byte off.
    add_requests(
        &mem,
        &mock,
        &[(VIRTIO_BLK_T_IN, 1, 512), (VIRTIO_BLK_T_IN, 2, 512)],
    );
    let flags = (VRING_DESC_F_NEXT as u16) | W;
    mock.desc_table()
        .store(
            4,
            RawDescriptor::from(SplitDescriptor::new(DATA + 0x1000 + 1, 512, flags, 5)),
        )
        .unwrap();
    activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as usize;
    {
        let s = state.lock().unwrap();
        assert_eq!(
            s.bases[0],
            host(DATA),
            "an aligned buffer goes straight to the kernel"
        );
        assert_ne!(
            s.bases[1],
            host(DATA + 0x1000 + 1),
            "an unaligned one is bounced"
        );
        assert_eq!(s.bases[1] % 512, 0);
    }
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, 513), (3, 513)]);
    assert_eq!(guest(&mem, DATA, 512), content[512..1024]);
    assert_eq!(guest(&mem, DATA + 0x1001, 512), content[1024..1536]);
    // The synchronous engine's check: the same two buffers.
    let slices = |a: u64| vec![mem.get_slice(GuestAddress(a), 512).unwrap()];
    let mut file = img.open_rw();
    let image = crate::device::Image {
        file: &mut file,
        mem_align: 512,
    };
    assert!(image.aligned(&slices(DATA)));
    assert!(!image.aligned(&slices(DATA + 0x1001)));
}

#[test]
fn a_hold_completes_what_is_in_flight_and_takes_nothing_new_until_released() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 1, 512)]);
    let irq = activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    assert_eq!(state.lock().unwrap().running.len(), 1);
    disk.hold();
    // The read completed into the used ring (the fake finishes what it waits for).
    assert_eq!(used(&mock), vec![(0, 513)]);
    assert_eq!(irq.queues(), vec![0]);
    // A new request waits in the ring, kicks or completions notwithstanding.
    mem.write_slice(&[0u8; 16], GuestAddress(HDR + 0x100))
        .unwrap();
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 2, 512)]);
    disk.process_queue(0);
    disk.process_extra_event(0, tvm_virtio::EventSet::IN);
    assert_eq!(state.lock().unwrap().log.len(), 1);
    disk.release();
    assert_eq!(state.lock().unwrap().log.len(), 2);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock), vec![(0, 513), (0, 513)]);
    assert_eq!(guest(&mem, DATA, 512), content[1024..1536]);
}

/// Waits (up to 5 s) for the disk's coalescing timer and hands it over.
fn window_tick(disk: &mut Block) {
    let fd = disk.extra_event_sources()[1].0;
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the call only.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "the coalescing timer did not fire");
    disk.process_extra_event(1, tvm_virtio::EventSet::IN);
}

/// The used ring's flags: VRING_USED_F_NO_NOTIFY while the device wants no kicks.
fn no_notify(mem: &GuestMemoryMmap<()>, mock: &MockSplitQueue<'_, GuestMemoryMmap<()>>) -> bool {
    let flags: u16 = mem.read_obj(mock.used_addr()).unwrap();
    flags & virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16 != 0
}

#[test]
fn a_coalescing_window_answers_a_burst_with_one_interrupt_and_no_kicks() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    disk.enable_coalescing_for_test();
    assert_eq!(disk.extra_event_sources().len(), 2);
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 1, 512)]);
    let irq = activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    // Answered, the interrupt held, notifications left off.
    assert_eq!(used(&mock), vec![(0, 513)]);
    assert!(irq.queues().is_empty(), "{:?}", irq.queues());
    assert!(no_notify(&mem, &mock));
    // The driver adds two more without kicking; the window's poll finds them.
    add_requests(
        &mem,
        &mock,
        &[(VIRTIO_BLK_T_IN, 2, 512), (VIRTIO_BLK_T_IN, 3, 512)],
    );
    window_tick(&mut disk);
    assert_eq!(state.lock().unwrap().running.len(), 2);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert_eq!(used(&mock).len(), 3);
    assert!(irq.queues().is_empty(), "still in the window");
    // Nothing new at the next poll: one interrupt for the three, notifications back on.
    window_tick(&mut disk);
    assert_eq!(irq.take(), vec![0]);
    assert!(!no_notify(&mem, &mock));
    for i in 0..2 {
        assert_eq!(status_of(&mem, i), OK);
    }
    assert_eq!(guest(&mem, DATA + 0x1000, 512), content[1536..2048]);
}

#[test]
fn one_request_at_a_time_soon_gets_its_interrupt_at_once() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    disk.enable_coalescing_for_test();
    let mock = MockSplitQueue::new(&mem, 16);
    let irq = activate(&mut disk, &mem, mock.create_queue().unwrap());
    let mut answered = 0;
    for round in 0..u32::from(tvm_virtio::MISS_LIMIT) + 3 {
        add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 1, 512)]);
        disk.process_queue(0);
        finish_op(&mut disk, &state, 0, Outcome2::Full);
        answered += 1;
        assert_eq!(used(&mock).len(), answered);
        if round < u32::from(tvm_virtio::MISS_LIMIT) {
            // A window that finds nothing more: the interrupt at its first poll.
            assert!(irq.queues().is_empty(), "round {round}");
            window_tick(&mut disk);
        }
        assert_eq!(irq.take(), vec![0], "round {round}");
        assert!(!no_notify(&mem, &mock), "round {round}");
    }
}

#[test]
fn a_reset_drops_a_held_interrupt_and_a_hold_raises_it() {
    let (img, content) = TempImage::with_pattern();
    let mem = test_mem();
    let (mut disk, state) = fake_disk(&img, &content, 64);
    disk.enable_coalescing_for_test();
    let mock = MockSplitQueue::new(&mem, 16);
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 1, 512)]);
    let irq = activate(&mut disk, &mem, mock.create_queue().unwrap());
    disk.process_queue(0);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert!(irq.queues().is_empty());
    // A hold (a media change) raises what was held and turns notifications back on.
    disk.hold();
    assert_eq!(irq.take(), vec![0]);
    assert!(!no_notify(&mem, &mock));
    disk.release();
    // A reset forgets a held interrupt: the timer stays quiet, nothing is raised.
    add_requests(&mem, &mock, &[(VIRTIO_BLK_T_IN, 1, 512)]);
    disk.process_queue(0);
    finish_op(&mut disk, &state, 0, Outcome2::Full);
    assert!(irq.queues().is_empty());
    disk.reset();
    let fd = disk.extra_event_sources()[1].0;
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the call only.
    let n = unsafe { libc::poll(&mut pfd, 1, 200) };
    assert_eq!(n, 0, "the timer fired after the reset");
    assert!(irq.queues().is_empty());
}
