// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Interrupt and notification coalescing for the queues of a device served on a worker
//! thread.
//!
//! A device that answers each request the moment it is kicked (a disk whose image is in
//! the host's page cache) costs the guest one notification (an exit) and one interrupt
//! per request. When the guest has many requests going (many threads, each with one
//! synchronous read, all runnable since their reads finish at once), that is where its
//! time goes. A [`Coalescer`] opens a *window* on a queue when used entries are added:
//! the interrupt is held back and the queue's notifications stay off, and the device polls
//! the ring every *gap* instead, answering what the guest submitted meanwhile. The window
//! closes, notifications go back on and one interrupt is raised, at the first poll that
//! finds nothing new (the guest has nothing more to submit until it is told of
//! completions), after [`MAX_GAPS`] polls, or when [`MAX_BATCH`] entries wait.
//!
//! The gap follows the guest: it is [`GAP_FACTOR`] times the mean interval between the
//! queue's requests (measured from notifications outside windows and from what polls
//! find inside them), between [`MIN_GAP`] and [`MAX_GAP`].
//!
//! A window only pays where the guest submits more while it is open. Where it has one
//! request at a time (queue depth 1), each window adds a gap of latency and ends with a
//! single entry: after [`MISS_LIMIT`] such windows in a row the queue raises its
//! interrupts at once and keeps its notifications on, and tries a window again after
//! [`PROBE_EVERY`] interrupts. At queue depth 1 the cost is thus [`MISS_LIMIT`] gaps every
//! [`PROBE_EVERY`] requests.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// Windows in a row that ended with a single used entry after which a queue raises its
/// interrupts at once.
pub const MISS_LIMIT: u8 = 2;
/// Interrupts raised at once before a queue that stopped coalescing tries a window again.
pub const PROBE_EVERY: u32 = 256;
/// Shortest gap between polls of a window.
pub const MIN_GAP: Duration = Duration::from_micros(10);
/// Longest gap between polls of a window.
pub const MAX_GAP: Duration = Duration::from_millis(2);
/// The gap as a multiple of the mean interval between requests.
pub const GAP_FACTOR: u32 = 4;
/// Most polls in one window.
pub const MAX_GAPS: u32 = 16;
/// Entries after which a window closes at once.
pub const MAX_BATCH: u32 = 64;
/// The gap before any interval has been measured.
const FIRST_GAP: Duration = Duration::from_micros(50);

/// How a queue raises its interrupt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// In a window after used entries are added.
    Window,
    /// At once, for this many more interrupts.
    Direct { left: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Lane {
    /// Used entries added since the queue's interrupt was last raised.
    pending: u32,
    mode: Mode,
    /// Windows in a row that ended with one entry.
    misses: u8,
    /// The open window: its next poll and how many polls it had.
    window: Option<(Instant, u32)>,
    /// The last notification taken outside a window.
    last_kick: Option<Instant>,
    /// Mean interval between requests, in nanoseconds (exponentially weighted); 0: none
    /// measured yet.
    interval_ns: u64,
}

impl Lane {
    const IDLE: Lane = Lane {
        pending: 0,
        mode: Mode::Window,
        misses: 0,
        window: None,
        last_kick: None,
        interval_ns: 0,
    };

    /// Folds one interval into the mean (weight 1/8).
    fn sample(&mut self, ns: u64) {
        self.interval_ns = if self.interval_ns == 0 {
            ns
        } else {
            self.interval_ns - self.interval_ns / 8 + ns / 8
        };
    }

    fn gap(&self) -> Duration {
        if self.interval_ns == 0 {
            return FIRST_GAP;
        }
        Duration::from_nanos(self.interval_ns.saturating_mul(u64::from(GAP_FACTOR)))
            .clamp(MIN_GAP, MAX_GAP)
    }
}

/// What a poll of the open windows decided for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// The window stays open: poll the ring again with notifications left off.
    Again,
    /// The window closes: turn notifications back on (a last pass over the ring), then
    /// [`close`](Coalescer::close) it.
    Close,
}

/// The coalescing state of a device's queues and the timer that paces their windows.
///
/// The device calls, per queue:
/// - [`kicked`](Self::kicked) when it takes a notification;
/// - [`added`](Self::added) for each used entry, then [`signal_now`](Self::signal_now)
///   where it would raise the interrupt, and raises it only when that says so;
/// - [`quiet`](Self::quiet) to know whether to leave notifications off after a pass over
///   the ring (a window is open);
///
/// and when [`as_raw_fd`](AsRawFd::as_raw_fd) is readable, [`due`](Self::due), then for
/// each queue it names a pass over the ring (notifications off), then
/// [`polled`](Self::polled) with how many requests the pass found, and for a
/// [`Poll::Close`] a last pass with notifications on and [`close`](Self::close).
#[derive(Debug)]
pub struct Coalescer {
    lanes: Vec<Lane>,
    timer: TimerFd,
    /// When the timer fires; `None`: not armed.
    armed: Option<Instant>,
}

impl Coalescer {
    /// Coalescing for `queues` queues.
    ///
    /// # Errors
    ///
    /// The timer could not be created.
    pub fn new(queues: usize) -> io::Result<Coalescer> {
        Ok(Coalescer {
            lanes: vec![Lane::IDLE; queues],
            timer: TimerFd::new()?,
            armed: None,
        })
    }

    /// Queue `q`'s notification was taken.
    pub fn kicked(&mut self, q: u16) {
        self.kicked_at(q, Instant::now());
    }

    fn kicked_at(&mut self, q: u16, now: Instant) {
        let Some(lane) = self.lanes.get_mut(usize::from(q)) else {
            return;
        };
        if lane.window.is_some() {
            return;
        }
        if let Some(last) = lane.last_kick.replace(now) {
            let ns = now.saturating_duration_since(last).as_nanos();
            // Longer than the longest gap: the guest was idle, not submitting.
            if ns <= MAX_GAP.as_nanos() {
                lane.sample(ns as u64);
            }
        }
    }

    /// Counts a used entry added to queue `q`.
    pub fn added(&mut self, q: u16) {
        if let Some(lane) = self.lanes.get_mut(usize::from(q)) {
            lane.pending = lane.pending.saturating_add(1);
        }
    }

    /// Whether queue `q` is in a window: a pass over its ring leaves notifications off.
    pub fn quiet(&self, q: u16) -> bool {
        self.lanes
            .get(usize::from(q))
            .is_some_and(|l| l.window.is_some())
    }

    /// Whether queue `q`'s interrupt should be raised now. When not, a window is open (or
    /// was already) and the interrupt comes when it closes. A queue without new entries
    /// has nothing to raise.
    pub fn signal_now(&mut self, q: u16) -> bool {
        self.signal_now_at(q, Instant::now())
    }

    fn signal_now_at(&mut self, q: u16, now: Instant) -> bool {
        let Some(lane) = self.lanes.get_mut(usize::from(q)) else {
            return true;
        };
        if lane.pending == 0 {
            return false;
        }
        match lane.mode {
            Mode::Direct { left } => {
                lane.pending = 0;
                lane.mode = if left <= 1 {
                    Mode::Window
                } else {
                    Mode::Direct { left: left - 1 }
                };
                true
            }
            // Closed by `polled` at the next poll.
            Mode::Window if lane.window.is_some() => false,
            Mode::Window => {
                let next = now + lane.gap();
                lane.window = Some((next, 0));
                if self.armed.is_none_or(|at| next < at) && !self.arm(next, now) {
                    // No timer, no window.
                    if let Some(lane) = self.lanes.get_mut(usize::from(q)) {
                        lane.window = None;
                        lane.pending = 0;
                    }
                    return true;
                }
                false
            }
        }
    }

    fn arm(&mut self, at: Instant, now: Instant) -> bool {
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_micros(1));
        if self.timer.reset(wait, None).is_err() {
            return false;
        }
        self.armed = Some(at);
        true
    }

    /// The timer fired: the queues whose windows are due for a poll.
    pub fn due(&mut self) -> Vec<u16> {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> Vec<u16> {
        // Disarming also clears the expiration count: the timer stops being readable.
        if self.armed.take().is_some() {
            let _ = self.timer.clear();
        }
        let due: Vec<u16> = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| l.window.is_some_and(|(at, _)| at <= now))
            // q < lanes.len(), a queue count.
            .map(|(q, _)| q as u16)
            .collect();
        self.rearm(now);
        due
    }

    /// Arms the timer for the earliest open window.
    fn rearm(&mut self, now: Instant) {
        let next = self
            .lanes
            .iter()
            .filter_map(|l| l.window.map(|(at, _)| at))
            .min();
        match next {
            Some(at) if self.armed != Some(at) => {
                let _ = self.arm(at, now);
            }
            Some(_) => {}
            None => {
                if self.armed.take().is_some() {
                    let _ = self.timer.clear();
                }
            }
        }
    }

    /// A poll of queue `q`'s window found `found` new requests: whether it stays open.
    pub fn polled(&mut self, q: u16, found: usize) -> Poll {
        self.polled_at(q, found, Instant::now())
    }

    fn polled_at(&mut self, q: u16, found: usize, now: Instant) -> Poll {
        let Some(lane) = self.lanes.get_mut(usize::from(q)) else {
            return Poll::Close;
        };
        let Some((_, polls)) = lane.window else {
            return Poll::Close;
        };
        if found > 0 {
            // `found` requests in one gap.
            let gap = lane.gap().as_nanos() as u64;
            lane.sample(gap / found as u64);
        }
        let polls = polls + 1;
        if found == 0 || polls >= MAX_GAPS || lane.pending >= MAX_BATCH {
            return Poll::Close;
        }
        lane.window = Some((now + lane.gap(), polls));
        self.rearm(now);
        Poll::Again
    }

    /// Closes queue `q`'s window (after the last pass over its ring): whether its
    /// interrupt should be raised (entries wait). A window that held a single entry counts
    /// a miss.
    pub fn close(&mut self, q: u16) -> bool {
        let now = Instant::now();
        let Some(lane) = self.lanes.get_mut(usize::from(q)) else {
            return false;
        };
        let raise = lane.pending > 0;
        if lane.window.take().is_some() {
            lane.last_kick = None;
            if lane.pending <= 1 {
                lane.misses += 1;
                if lane.misses >= MISS_LIMIT {
                    lane.misses = 0;
                    lane.mode = Mode::Direct { left: PROBE_EVERY };
                }
            } else {
                lane.misses = 0;
            }
        }
        lane.pending = 0;
        self.rearm(now);
        raise
    }

    /// The queues with an open window, to close them now (a drain), with
    /// [`close`](Self::close) after their last pass.
    pub fn open_windows(&self) -> Vec<u16> {
        self.lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| l.window.is_some())
            .map(|(q, _)| q as u16)
            .collect()
    }

    /// Forgets everything (a reset: the rings are gone) and disarms the timer.
    pub fn reset(&mut self) {
        if self.armed.take().is_some() {
            let _ = self.timer.clear();
        }
        self.lanes.fill(Lane::IDLE);
    }
}

impl AsRawFd for Coalescer {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Whether the timer fires within `limit`.
    fn fires_within(c: &Coalescer, limit: Duration) -> bool {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                c.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        epoll.wait(limit.as_millis() as i32, &mut events).unwrap() == 1
    }

    /// Opens a window on queue `q` at `t` with one entry.
    fn open(c: &mut Coalescer, q: u16, t: Instant) {
        c.added(q);
        assert!(!c.signal_now_at(q, t), "held back");
        assert!(c.quiet(q));
    }

    #[test]
    fn a_window_holds_the_interrupt_and_polls_until_nothing_new_comes() {
        let mut c = Coalescer::new(2).unwrap();
        let t = Instant::now();
        assert!(!c.quiet(0));
        open(&mut c, 0, t);
        assert!(!c.quiet(1), "the other queue is not in the window");
        // More entries during the window: still held.
        c.added(0);
        assert!(!c.signal_now_at(0, t));
        // Not due before the first gap.
        assert!(c.due_at(t + FIRST_GAP - us(1)).is_empty());
        assert_eq!(c.due_at(t + FIRST_GAP), vec![0]);
        // The poll found 3 requests: stays open.
        assert_eq!(c.polled_at(0, 3, t + FIRST_GAP), Poll::Again);
        assert!(c.quiet(0));
        let t2 = t + FIRST_GAP * 2;
        assert_eq!(c.due_at(t2 + MAX_GAP), vec![0]);
        // Nothing new: closes, one interrupt for everything.
        assert_eq!(c.polled_at(0, 0, t2), Poll::Close);
        assert!(c.close(0));
        assert!(!c.quiet(0));
        // A second close has nothing to raise.
        assert!(!c.close(0));
        assert!(!c.signal_now(0), "no entries: nothing to raise");
    }

    #[test]
    fn the_timer_fires_when_a_window_is_due_and_not_after_it_is_polled() {
        let mut c = Coalescer::new(1).unwrap();
        assert!(!fires_within(&c, Duration::from_millis(20)));
        open(&mut c, 0, Instant::now());
        assert!(fires_within(&c, Duration::from_secs(5)));
        assert_eq!(c.due(), vec![0]);
        assert_eq!(c.polled(0, 0), Poll::Close);
        assert!(c.close(0));
        assert!(!fires_within(&c, Duration::from_millis(20)));
        // A reset disarms it too.
        open(&mut c, 0, Instant::now());
        c.reset();
        assert!(!c.quiet(0));
        assert!(!fires_within(&c, FIRST_GAP + Duration::from_millis(20)));
    }

    #[test]
    fn one_request_at_a_time_stops_windows_and_probes_again_later() {
        let mut c = Coalescer::new(1).unwrap();
        let t = Instant::now();
        for _ in 0..MISS_LIMIT {
            open(&mut c, 0, t);
            assert_eq!(c.polled_at(0, 0, t), Poll::Close);
            assert!(c.close(0));
        }
        // Now at once, notifications on, for PROBE_EVERY interrupts.
        for _ in 0..PROBE_EVERY {
            c.added(0);
            assert!(c.signal_now_at(0, t));
            assert!(!c.quiet(0));
        }
        // Then a window again.
        open(&mut c, 0, t);
    }

    #[test]
    fn a_window_with_several_entries_is_not_a_miss() {
        let mut c = Coalescer::new(1).unwrap();
        let t = Instant::now();
        for _ in 0..MISS_LIMIT * 4 {
            open(&mut c, 0, t);
            c.added(0);
            assert_eq!(c.polled_at(0, 0, t), Poll::Close);
            assert!(c.close(0));
            // One single-entry window in between does not add up across hits.
            open(&mut c, 0, t);
            assert_eq!(c.polled_at(0, 0, t), Poll::Close);
            assert!(c.close(0));
        }
        open(&mut c, 0, t);
    }

    #[test]
    fn a_full_batch_or_too_many_polls_close_the_window() {
        let mut c = Coalescer::new(1).unwrap();
        let t = Instant::now();
        open(&mut c, 0, t);
        for _ in 1..MAX_BATCH {
            c.added(0);
        }
        assert_eq!(c.polled_at(0, 5, t), Poll::Close);
        assert!(c.close(0));
        open(&mut c, 0, t);
        for i in 1..MAX_GAPS {
            assert_eq!(c.polled_at(0, 1, t), Poll::Again, "poll {i}");
        }
        assert_eq!(c.polled_at(0, 1, t), Poll::Close);
    }

    #[test]
    fn the_gap_follows_the_interval_between_requests() {
        let mut c = Coalescer::new(1).unwrap();
        let t = Instant::now();
        // Requests every 100 us.
        for i in 0..64 {
            c.kicked_at(0, t + us(100 * i));
        }
        let at = t + us(6400);
        open(&mut c, 0, at);
        let gap = us(100) * GAP_FACTOR;
        assert!(c.due_at(at + gap - us(2)).is_empty());
        assert_eq!(c.due_at(at + gap + us(2)), vec![0]);
        // A notification taken during a window is not an interval.
        c.kicked_at(0, at + us(1));
        assert_eq!(c.lanes[0].interval_ns, 100_000, "in a window: ignored");
        // Clamped at both ends.
        let mut fast = Coalescer::new(1).unwrap();
        for i in 0..64 {
            fast.kicked_at(0, t + Duration::from_nanos(100 * i));
        }
        assert_eq!(fast.lanes[0].gap(), MIN_GAP);
        let mut slow = Coalescer::new(1).unwrap();
        for i in 0..64 {
            slow.kicked_at(0, t + MAX_GAP * i as u32);
        }
        assert_eq!(slow.lanes[0].gap(), MAX_GAP);
        let mut idle = Coalescer::new(1).unwrap();
        for i in 0..4 {
            idle.kicked_at(0, t + Duration::from_secs(i));
        }
        assert_eq!(idle.lanes[0].gap(), FIRST_GAP, "idle gaps are not samples");
    }

    #[test]
    fn out_of_range_queues_are_raised_at_once() {
        let mut c = Coalescer::new(1).unwrap();
        c.added(5);
        c.kicked(5);
        assert!(c.signal_now(5));
        assert!(!c.quiet(5));
        assert_eq!(c.polled(5, 1), Poll::Close);
        assert!(!c.close(5));
    }
}
