//! Pausing the vCPUs: a gate every vCPU thread looks at between two `KVM_RUN`s.
//!
//! The controller closes the gate ([`PauseGate::close`]) and kicks every vCPU thread out
//! of `KVM_RUN`; each thread then parks on the gate's condition variable, outside the
//! guest, and counts itself parked. [`PauseGate::wait_parked`] tells the controller when
//! all of them are. [`PauseGate::open`] wakes them; each tells the guest's kvmclock that
//! it was stopped (`KVM_KVMCLOCK_CTRL`) before it enters the guest again, so the guest's
//! soft-lockup watchdog does not take the pause for a hung CPU. A stop (the VM ending)
//! also wakes parked threads: [`PauseGate::wake_for_stop`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// The gate between the vCPU threads and whoever pauses them.
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Whether vCPU threads must park.
    closed: bool,
    /// How many threads are parked now.
    parked: usize,
    /// Moves on each time [`PauseGate::wake_parked`] asks parked threads to look for work.
    errands: u64,
}

impl PauseGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state is two plain fields, consistent at every unlock: a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the gate is closed (the VM is paused or being paused).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Closes the gate: from now on a vCPU thread that calls
    /// [`park_if_closed`](Self::park_if_closed) parks. The caller kicks the threads out of
    /// `KVM_RUN`.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Opens the gate and wakes the parked threads.
    pub fn open(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }

    /// Wakes parked threads so that they see `stop` (set it first).
    pub fn wake_for_stop(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Wakes parked threads without opening the gate, so that each runs the work its
    /// [`park_if_closed`](Self::park_if_closed) was given (a snapshot's state save) and
    /// parks again.
    pub fn wake_parked(&self) {
        self.lock().errands += 1;
        self.changed.notify_all();
    }

    /// How many threads are parked now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Waits until at least `count` threads are parked or `deadline` passes; returns
    /// whether they are. `still_running` is asked how many threads can still park (a
    /// thread that ended never will), each time the state changes or every few ms.
    pub fn wait_parked(&self, deadline: Instant, still_running: &dyn Fn() -> usize) -> bool {
        let mut state = self.lock();
        loop {
            if state.parked >= still_running() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // A short wait so that a thread that ends (and will never park) is noticed.
            let wait = (deadline - now).min(std::time::Duration::from_millis(5));
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// For a vCPU thread, between two `KVM_RUN`s: parks while the gate is closed and
    /// `stop` is not set, running `errand` (without the gate's lock) when it parks and
    /// each time [`wake_parked`](Self::wake_parked) is called. Returns whether it parked
    /// (the caller then tells kvmclock).
    pub fn park_if_closed(&self, stop: &AtomicBool, mut errand: impl FnMut()) -> bool {
        let mut state = self.lock();
        if !state.closed || stop.load(Ordering::Acquire) {
            return false;
        }
        state.parked += 1;
        self.changed.notify_all();
        loop {
            let seen = state.errands;
            drop(state);
            errand();
            state = self.lock();
            if !state.closed || stop.load(Ordering::Acquire) {
                break;
            }
            // An errand asked for while this one ran is run before waiting.
            if state.errands == seen {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        state.parked -= 1;
        self.changed.notify_all();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Duration;

    /// Fake vCPU threads: each counts "guest work" while the gate lets it.
    fn spawn_workers(
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
        n: usize,
    ) -> (Vec<std::thread::JoinHandle<u64>>, Arc<AtomicU64>) {
        let work = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (gate, stop, work) = (gate.clone(), stop.clone(), work.clone());
                std::thread::spawn(move || {
                    let mut parks = 0;
                    while !stop.load(Ordering::Acquire) {
                        if gate.park_if_closed(&stop, || {}) {
                            parks += 1;
                        }
                        work.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    parks
                })
            })
            .collect();
        (threads, work)
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn closed_gate_parks_every_thread_and_work_stops_until_it_opens() {
        let gate = Arc::new(PauseGate::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, work) = spawn_workers(&gate, &stop, 4);
        gate.close();
        assert!(
            gate.wait_parked(deadline(), &|| 4),
            "4 threads never parked"
        );
        assert!(gate.is_closed());
        let frozen = work.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            work.load(Ordering::Relaxed),
            frozen,
            "work went on while paused"
        );
        gate.open();
        // Every thread leaves the gate (one that has not woken yet when the gate closes
        // again would simply stay parked: one park, not two) and work goes on.
        let resumed_by = deadline();
        while gate.parked() != 0 || work.load(Ordering::Relaxed) == frozen {
            assert!(Instant::now() < resumed_by, "work never resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Pause again: the same threads park a second time.
        gate.close();
        assert!(gate.wait_parked(deadline(), &|| 4));
        // A stop wakes parked threads without opening the gate.
        stop.store(true, Ordering::Release);
        gate.wake_for_stop();
        for t in threads {
            assert_eq!(t.join().unwrap(), 2, "each thread parked twice");
        }
        assert_eq!(gate.parked(), 0);
        assert!(gate.is_closed());
    }

    #[test]
    fn waiting_for_threads_that_cannot_park_times_out() {
        let gate = PauseGate::new();
        gate.close();
        let start = Instant::now();
        assert!(!gate.wait_parked(start + Duration::from_millis(30), &|| 1));
        assert!(start.elapsed() >= Duration::from_millis(30));
        // No thread left to park: done at once.
        assert!(gate.wait_parked(start, &|| 0));
    }

    #[test]
    fn an_open_gate_or_a_stop_never_parks() {
        let gate = PauseGate::new();
        let stop = AtomicBool::new(false);
        assert!(!gate.park_if_closed(&stop, || {}));
        gate.close();
        stop.store(true, Ordering::Release);
        assert!(!gate.park_if_closed(&stop, || {}));
    }
}
