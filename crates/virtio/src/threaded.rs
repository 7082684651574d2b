// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`Threaded`]: a device whose queues are served on a thread of its own instead of the
//! event loop.
//!
//! The worker thread polls the queue notification EventFds of the active device (the ones
//! KVM's ioeventfds write) and calls [`VirtioDevice::process_queue`] with the device's lock
//! held; the transport leaves those EventFds out of the event loop
//! ([`VirtioDevice::serves_own_queues`]). Everything else (config accesses, activation,
//! reset, from a vCPU thread) takes the same lock, so it waits at most for the batch the
//! worker is serving (a device's own budget per call), never for the event loop; config
//! reads do not even wait: they are answered from a copy taken when the config could have
//! changed (construction, a config write, [`Threaded::with_mut`]). A slow or stuck image
//! stalls only its own worker: the console, signals, the other devices and the vCPUs go
//! on.
//!
//! The device's [`extra_event_sources`](VirtioDevice::extra_event_sources) (a TAP, the
//! completion EventFd of an I/O engine) are polled by the worker too, not by the event
//! loop: their work runs on the worker, under the same lock, and stops while paused.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ActivateContext, Error, EventSet, Result, VirtioDevice};

/// How long dropping a [`Threaded`] waits for its worker to end; a worker stuck in a
/// request that never completes is left behind (it ends with the process).
pub const WORKER_STOP_GRACE: Duration = Duration::from_secs(2);

/// Bytes of device config kept for lock-free reads: more than any device here has (virtio-blk
/// 60, vsock 8); reads past them answer 0, as reads past a device's own config do.
const CONFIG_COPY_LEN: usize = 0x100;

/// Work handed to the worker by [`Threaded::with_mut_on_worker`].
type Job<D> = Box<dyn FnOnce(&mut D) + Send>;

/// What the worker and the device's other users share.
struct Shared<D> {
    device: Mutex<D>,
    /// Work for the worker to run on the device, between batches (paused or not).
    jobs: Mutex<Vec<Job<D>>>,
    /// The active device's queue notification EventFds (clones of the transport's), by
    /// queue index; empty while the device is not active.
    queue_evts: Mutex<Vec<Arc<EventFd>>>,
    /// Wakes the worker to look at the flags and the EventFds again.
    wake: EventFd,
    stop: AtomicBool,
    paused: AtomicBool,
    /// Set by an activation: the worker hands the device every extra source once, for
    /// what became ready before it (an edge-triggered source does not report it again).
    kick_extras: AtomicBool,
}

impl<D> Shared<D> {
    fn lock_device(&self) -> MutexGuard<'_, D> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_evts(&self) -> MutexGuard<'_, Vec<Arc<EventFd>>> {
        self.queue_evts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("failed to wake a device worker: {e}");
        }
    }
}

/// A [`VirtioDevice`] served on its own worker thread; see the module documentation.
///
/// Dropping it stops and joins the worker.
pub struct Threaded<D: VirtioDevice + 'static> {
    shared: Arc<Shared<D>>,
    name: String,
    device_type: u32,
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_COPY_LEN],
    thread: Option<JoinHandle<()>>,
}

impl<D: VirtioDevice + 'static> std::fmt::Debug for Threaded<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threaded")
            .field("name", &self.name)
            .field("paused", &self.shared.paused.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + 'static> Threaded<D> {
    /// Starts a worker thread named `thread_name` (at most 15 bytes, as Linux keeps them)
    /// for `device`. The thread first runs `init` (installing its seccomp filter, say);
    /// `spawn` returns once it has, with its error if it failed.
    ///
    /// # Errors
    ///
    /// [`Error::CreateEventFd`], [`Error::CreateEpoll`], [`Error::SpawnWorker`],
    /// [`Error::WorkerInit`].
    pub fn spawn<F>(device: D, thread_name: &str, init: F) -> Result<Self>
    where
        F: FnOnce() -> std::result::Result<(), String> + Send + 'static,
    {
        let device_type = device.device_type();
        let queue_sizes = device.queue_max_sizes().to_vec();
        let features = device.device_features();
        let mut config = [0u8; CONFIG_COPY_LEN];
        device.read_config(0, &mut config);
        let extras = device.extra_event_sources();
        let shared = Arc::new(Shared {
            device: Mutex::new(device),
            jobs: Mutex::new(Vec::new()),
            queue_evts: Mutex::new(Vec::new()),
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::CreateEventFd)?,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            kick_extras: AtomicBool::new(false),
        });
        // Created here, before the thread's `init` may forbid creating it there.
        let epoll = Epoll::new().map_err(Error::CreateEpoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                shared.wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE_DATA),
            )
            .map_err(Error::CreateEpoll)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let worker = shared.clone();
        let name = thread_name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let ready = init();
                let ok = ready.is_ok();
                let _ = ready_tx.send(ready);
                if ok {
                    serve(&worker, &epoll, &extras, &name);
                }
            })
            .map_err(Error::SpawnWorker)?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err("the worker ended before it was ready".into()));
        if let Err(why) = ready {
            let _ = thread.join();
            return Err(Error::WorkerInit(thread_name.to_string(), why));
        }
        Ok(Threaded {
            shared,
            name: thread_name.to_string(),
            device_type,
            queue_sizes,
            features,
            config,
            thread: Some(thread),
        })
    }

    /// The device, locked: waits for the batch the worker is serving, if any.
    pub fn lock(&self) -> MutexGuard<'_, D> {
        self.shared.lock_device()
    }

    /// The device, locked, if the batch the worker is serving ends within `limit`; `None`
    /// when a request is stuck (an image on a file system that stopped answering).
    pub fn lock_within(&self, limit: Duration) -> Option<MutexGuard<'_, D>> {
        lock_within(&self.shared.device, limit)
    }

    /// Runs `f` on the locked device, then takes a new copy of its config (for a change
    /// that moves it, such as a media change).
    pub fn with_mut<R>(&mut self, f: impl FnOnce(&mut D) -> R) -> R {
        let mut device = self.shared.lock_device();
        let r = f(&mut device);
        device.read_config(0, &mut self.config);
        r
    }

    /// [`with_mut`](Self::with_mut) if the device can be locked within `limit`
    /// ([`lock_within`](Self::lock_within)); `None`, and `f` not run, otherwise.
    pub fn with_mut_within<R>(
        &mut self,
        limit: Duration,
        f: impl FnOnce(&mut D) -> R,
    ) -> Option<R> {
        let mut device = lock_within(&self.shared.device, limit)?;
        let r = f(&mut device);
        device.read_config(0, &mut self.config);
        Some(r)
    }

    /// [`with_mut`](Self::with_mut) run on the worker thread, for work that must happen
    /// there (it may need system calls only the worker's seccomp filter allows, such as
    /// completing the requests an I/O engine has in flight). Runs between two batches,
    /// paused or not. `None`, and `f` dropped or run later, when the worker does not get to
    /// it within `limit` (a request is stuck, or the worker is gone); the config copy is
    /// then left as it was.
    pub fn with_mut_on_worker<R, F>(&mut self, limit: Duration, f: F) -> Option<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut D) -> R + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job<D> = Box::new(move |device: &mut D| {
            let r = f(device);
            let mut config = [0u8; CONFIG_COPY_LEN];
            device.read_config(0, &mut config);
            let _ = tx.send((r, config));
        });
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job);
        self.shared.wake();
        let (r, config) = rx.recv_timeout(limit).ok()?;
        self.config = config;
        Some(r)
    }

    /// Stops serving the queues: the worker finishes the batch it is serving and starts
    /// no other until [`resume`](Self::resume); notifications meanwhile stay pending in
    /// their EventFds. Returns whether that batch ended within `limit` (false: a request
    /// is stuck; the worker stops after it, whenever it completes).
    pub fn pause(&self, limit: Duration) -> bool {
        self.shared.paused.store(true, Ordering::Release);
        self.shared.wake();
        self.lock_within(limit).is_some()
    }

    /// Serves the queues again, notifications that arrived while paused first.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
        self.shared.wake();
    }

    /// Whether the worker thread is still running (it ends only when dropped, or if its
    /// polling fails for good).
    pub fn worker_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl<D: VirtioDevice + 'static> Drop for Threaded<D> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        let Some(t) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + WORKER_STOP_GRACE;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !t.is_finished() {
            warn!(
                "{}: the worker is still inside a request after {WORKER_STOP_GRACE:?}; \
                 leaving it behind",
                self.name
            );
            return;
        }
        if t.join().is_err() {
            warn!("{}: the worker thread panicked", self.name);
        }
    }
}

/// `mutex`, locked, if it comes free within `limit` (a poisoned lock is taken as it is).
fn lock_within<T>(mutex: &Mutex<T>, limit: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + limit;
    loop {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Event data of the wake EventFd in the worker's epoll; queue `i` uses `i`.
const WAKE_DATA: u64 = u64::MAX;
/// Event data of the device's extra event source `i`: `EXTRA_DATA + i`.
const EXTRA_DATA: u64 = 1 << 32;

/// Adds (`on`) or removes the device's extra event sources in the worker's `epoll`.
fn watch_extras(epoll: &Epoll, extras: &[(RawFd, EventSet)], on: bool, name: &str) {
    for (i, (fd, set)) in extras.iter().enumerate() {
        let r = if on {
            epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(*set, EXTRA_DATA + i as u64),
            )
        } else {
            epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default())
        };
        if let Err(e) = r {
            warn!("{name}: cannot change the watch on event source {i} (fd {fd}): {e}");
        }
    }
}

/// The worker: waits on the wake EventFd, the active queues' EventFds and the device's
/// extra event sources; consumes a notification and serves that queue, or hands the
/// device the readiness of an extra source, with the device locked.
fn serve<D: VirtioDevice>(
    shared: &Shared<D>,
    epoll: &Epoll,
    extras: &[(RawFd, EventSet)],
    name: &str,
) {
    // The queue EventFds registered in `epoll`, kept open here until they are removed from
    // it (a reset drops its own clones at any time).
    let mut registered: Vec<Arc<EventFd>> = Vec::new();
    let mut extras_watched = false;
    let mut events = [EpollEvent::default(); 8];
    let mut wait_failures = 0u32;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let paused = shared.paused.load(Ordering::Acquire);
        if extras_watched == paused {
            watch_extras(epoll, extras, !paused, name);
            extras_watched = !paused;
        }
        let wanted: Vec<Arc<EventFd>> = if paused {
            Vec::new()
        } else {
            shared.lock_evts().clone()
        };
        let same = wanted.len() == registered.len()
            && wanted
                .iter()
                .zip(&registered)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            for evt in registered.drain(..) {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    evt.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            for (i, evt) in wanted.iter().enumerate() {
                if let Err(e) = epoll.ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                ) {
                    warn!("{name}: cannot watch queue {i}: {e}");
                }
            }
            registered = wanted;
        }
        if !paused && shared.kick_extras.swap(false, Ordering::AcqRel) {
            let mut device = shared.lock_device();
            for i in 0..extras.len() {
                device.process_extra_event(i, EventSet::IN);
            }
        }
        let jobs = std::mem::take(&mut *shared.jobs.lock().unwrap_or_else(|e| e.into_inner()));
        for job in jobs {
            job(&mut shared.lock_device());
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                wait_failures += 1;
                warn!("{name}: epoll_wait failed: {e}");
                if wait_failures > 16 {
                    warn!("{name}: giving up: the device's queues are no longer served");
                    return;
                }
                continue;
            }
        };
        for ev in &events[..n] {
            let data = ev.data();
            if data == WAKE_DATA {
                // EAGAIN: another wake-up already consumed it.
                let _ = shared.wake.read();
                continue;
            }
            if shared.stop.load(Ordering::Acquire) || shared.paused.load(Ordering::Acquire) {
                break;
            }
            if let Some(i) = data.checked_sub(EXTRA_DATA) {
                if let Ok(i) = usize::try_from(i) {
                    shared.lock_device().process_extra_event(i, ev.event_set());
                }
                continue;
            }
            let (Ok(queue), Some(evt)) = (
                u16::try_from(data),
                usize::try_from(data).ok().and_then(|i| registered.get(i)),
            ) else {
                continue;
            };
            // Held while the notification is consumed and served: a reset (which clears
            // the set first) waits, and once it has cleared the set no notification is
            // taken from the queue until the device is activated again.
            let current = shared.lock_evts();
            if !current
                .get(usize::from(queue))
                .is_some_and(|c| Arc::ptr_eq(c, evt))
            {
                continue;
            }
            if evt.read().is_err() {
                // Consumed already: nothing to serve.
                continue;
            }
            shared.lock_device().process_queue(queue);
            drop(current);
        }
        if events[..n].iter().any(|e| {
            e.event_set()
                .intersects(EventSet::ERROR | EventSet::HANG_UP)
        }) {
            debug!("{name}: an eventfd reported an error; waiting again");
        }
    }
}

impl<D: VirtioDevice + 'static> VirtioDevice for Threaded<D> {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.with_mut(|d| d.write_config(offset, data));
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        let evts = ctx
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::CloneEventFd)?;
        self.shared.lock_device().activate(ctx)?;
        *self.shared.lock_evts() = evts;
        self.shared.kick_extras.store(true, Ordering::Release);
        self.shared.wake();
        Ok(())
    }

    fn reset(&mut self) {
        // The set first: from then on the worker takes no notification (see `serve`).
        self.shared.lock_evts().clear();
        self.shared.lock_device().reset();
        self.shared.wake();
    }

    fn process_queue(&mut self, queue: u16) {
        self.shared.lock_device().process_queue(queue);
    }

    /// None: the worker polls the device's own.
    fn extra_event_sources(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }

    fn serves_own_queues(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Condvar;
    use std::time::{Duration, Instant};

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::test_utils::RecordingInterrupt;

    /// What the fake device saw, and a gate that holds it inside `process_queue`.
    #[derive(Default)]
    struct Probe {
        /// (queue, thread name) of every notification served while active.
        served: Mutex<Vec<(u16, String)>>,
        /// Notifications that arrived while not active.
        ignored: Mutex<u32>,
        hold: Mutex<bool>,
        released: Condvar,
        dropped: AtomicBool,
        /// A clone of the device's extra event source, to trigger it.
        extra: Mutex<Option<EventFd>>,
        /// Thread names of the extra events the device handled.
        extra_seen: Mutex<Vec<String>>,
    }

    impl Probe {
        fn served(&self) -> Vec<(u16, String)> {
            self.served.lock().unwrap().clone()
        }

        fn set_hold(&self, hold: bool) {
            *self.hold.lock().unwrap() = hold;
            self.released.notify_all();
        }

        /// Waits up to 5 s for `n` served notifications.
        fn wait_served(&self, n: usize) -> bool {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.served.lock().unwrap().len() < n {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            true
        }
    }

    struct FakeDevice {
        probe: Arc<Probe>,
        config: [u8; 8],
        active: bool,
        extra: EventFd,
    }

    impl Drop for FakeDevice {
        fn drop(&mut self) {
            self.probe.dropped.store(true, Ordering::Release);
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            0x5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let (Ok(o), Some(b)) = (usize::try_from(offset), data.first()) {
                if let Some(c) = self.config.get_mut(o) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, _ctx: ActivateContext) -> Result<()> {
            self.active = true;
            Ok(())
        }
        fn reset(&mut self) {
            self.active = false;
        }
        fn extra_event_sources(&self) -> Vec<(RawFd, EventSet)> {
            vec![(self.extra.as_raw_fd(), EventSet::IN)]
        }
        fn process_extra_event(&mut self, _index: usize, _events: EventSet) {
            let _ = self.extra.read();
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.probe.extra_seen.lock().unwrap().push(name);
        }
        fn process_queue(&mut self, queue: u16) {
            if !self.active {
                *self.probe.ignored.lock().unwrap() += 1;
                return;
            }
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.probe.served.lock().unwrap().push((queue, name));
            // Bounded: a test that forgets to release its hold still ends.
            let hold = self.probe.hold.lock().unwrap();
            let _unused = self
                .probe
                .released
                .wait_timeout_while(hold, Duration::from_secs(10), |h| *h)
                .unwrap();
        }
    }

    /// The fake device's extra event source; the probe keeps a clone to trigger it.
    fn fake_extra(probe: &Probe) -> EventFd {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        *probe.extra.lock().unwrap() = Some(evt.try_clone().unwrap());
        evt
    }

    /// A threaded fake device, activated; returns it with the probe and the queue
    /// EventFds as the transport keeps them.
    fn started() -> (Threaded<FakeDevice>, Arc<Probe>, Vec<EventFd>) {
        let probe = Arc::new(Probe::default());
        let dev = FakeDevice {
            probe: probe.clone(),
            config: [7, 6, 5, 4, 3, 2, 1, 0],
            active: false,
            extra: fake_extra(&probe),
        };
        let mut t = Threaded::spawn(dev, "tvm-test-io", || Ok(())).unwrap();
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let ctx = ActivateContext {
            mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap(),
            features: 0,
            queues: vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()],
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(RecordingInterrupt::default()),
        };
        t.activate(ctx).unwrap();
        (t, probe, evts)
    }

    #[test]
    fn a_notification_is_served_on_the_worker_thread() {
        let (t, probe, evts) = started();
        assert!(t.serves_own_queues());
        assert!(t.worker_alive());
        assert_eq!(
            (t.device_type(), t.queue_max_sizes(), t.device_features()),
            (2, &[16u16, 16][..], 0x5)
        );
        evts[1].write(1).unwrap();
        assert!(probe.wait_served(1));
        evts[0].write(1).unwrap();
        assert!(probe.wait_served(2));
        assert_eq!(
            probe.served(),
            [
                (1, "tvm-test-io".to_string()),
                (0, "tvm-test-io".to_string())
            ]
        );
    }

    #[test]
    fn config_reads_do_not_wait_for_a_busy_worker() {
        let (t, probe, evts) = started();
        probe.set_hold(true);
        evts[0].write(1).unwrap();
        assert!(probe.wait_served(1));
        // The worker holds the device's lock now; a config read answers anyway.
        let t = Arc::new(t);
        let reader = {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut data = [0u8; 4];
                t.read_config(2, &mut data);
                data
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let finished = reader.is_finished();
        probe.set_hold(false);
        assert!(finished, "a config read waited for the worker");
        assert_eq!(reader.join().unwrap(), [5, 4, 3, 2]);
    }

    #[test]
    fn pause_holds_notifications_until_resume() {
        let (t, probe, evts) = started();
        assert!(t.pause(Duration::from_secs(5)));
        evts[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(probe.served().is_empty());
        t.resume();
        assert!(probe.wait_served(1));
    }

    #[test]
    fn pause_waits_for_the_batch_being_served() {
        let (t, probe, evts) = started();
        probe.set_hold(true);
        evts[0].write(1).unwrap();
        assert!(probe.wait_served(1));
        let t = Arc::new(t);
        let pauser = {
            let t = t.clone();
            std::thread::spawn(move || t.pause(Duration::from_secs(5)))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pauser.is_finished(), "pause returned while a batch ran");
        probe.set_hold(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pauser.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(pauser.is_finished());
    }

    /// A request that never completes (the device held inside `process_queue`): config
    /// reads still answer, a pause, a lock and a config change give up at their limit
    /// instead of hanging, and dropping it returns after the grace, leaving the worker.
    #[test]
    fn a_stuck_request_stalls_nothing_but_its_own_worker() {
        let (mut t, probe, evts) = started();
        probe.set_hold(true);
        evts[0].write(1).unwrap();
        assert!(probe.wait_served(1));
        let mut b = [0u8; 1];
        t.read_config(0, &mut b);
        assert_eq!(b, [7]);
        let started = Instant::now();
        assert!(!t.pause(Duration::from_millis(100)));
        assert!(t.lock_within(Duration::from_millis(100)).is_none());
        assert!(t
            .with_mut_within(Duration::from_millis(100), |d| d.config[0] = 1)
            .is_none());
        assert!(t
            .with_mut_on_worker(Duration::from_millis(100), |d| d.config[0] = 1)
            .is_none());
        t.read_config(0, &mut b);
        assert_eq!(b, [7]);
        drop(t);
        let took = started.elapsed();
        assert!(
            took < WORKER_STOP_GRACE + Duration::from_secs(2),
            "gave up after {took:?}"
        );
        probe.set_hold(false);
    }

    #[test]
    fn after_a_reset_notifications_are_not_served() {
        let (mut t, probe, evts) = started();
        t.reset();
        evts[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(probe.served().is_empty());
        assert_eq!(*probe.ignored.lock().unwrap(), 0);
        // The kick is still pending for whoever activates the queue again.
        assert_eq!(evts[0].read().unwrap(), 1);
    }

    #[test]
    fn config_writes_and_with_mut_refresh_the_copy() {
        let (mut t, _probe, _evts) = started();
        t.write_config(0, &[0xaa]);
        let mut b = [0u8; 1];
        t.read_config(0, &mut b);
        assert_eq!(b, [0xaa]);
        t.with_mut(|d| d.config[1] = 0xbb);
        t.read_config(1, &mut b);
        assert_eq!(b, [0xbb]);
        t.read_config(CONFIG_COPY_LEN as u64 + 10, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn with_mut_on_worker_runs_there_paused_or_not_and_refreshes_the_copy() {
        let (mut t, _probe, _evts) = started();
        let limit = Duration::from_secs(5);
        let name = t.with_mut_on_worker(limit, |d| {
            d.config[2] = 0xcc;
            std::thread::current().name().unwrap_or("").to_string()
        });
        assert_eq!(name.as_deref(), Some("tvm-test-io"));
        let mut b = [0u8; 1];
        t.read_config(2, &mut b);
        assert_eq!(b, [0xcc]);
        assert!(t.pause(limit));
        assert_eq!(t.with_mut_on_worker(limit, |_| 5), Some(5));
    }

    #[test]
    fn extra_event_sources_are_served_on_the_worker_and_held_while_paused() {
        let (t, probe, _evts) = started();
        // The transport is given none: the worker polls them.
        assert!(t.extra_event_sources().is_empty());
        let trigger = probe
            .extra
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .try_clone()
            .unwrap();
        let seen = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while probe.extra_seen.lock().unwrap().len() < n {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            true
        };
        // The activation in `started` makes one pass over them, readiness or not (for
        // what became ready before it).
        assert!(seen(1));
        trigger.write(1).unwrap();
        assert!(seen(2));
        assert_eq!(probe.extra_seen.lock().unwrap()[1], "tvm-test-io");
        assert!(t.pause(Duration::from_secs(5)));
        trigger.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            probe.extra_seen.lock().unwrap().len(),
            2,
            "served while paused"
        );
        t.resume();
        assert!(seen(3));
    }

    #[test]
    fn dropping_it_stops_the_worker_and_drops_the_device() {
        let (t, probe, _evts) = started();
        drop(t);
        assert!(probe.dropped.load(Ordering::Acquire));
    }

    #[test]
    fn a_failed_thread_init_is_an_error() {
        let probe = Arc::new(Probe::default());
        let dev = FakeDevice {
            probe: probe.clone(),
            config: [0; 8],
            active: false,
            extra: fake_extra(&probe),
        };
        let e = Threaded::spawn(dev, "tvm-test-io", || Err("no filter".into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device worker tvm-test-io failed to start: no filter"
        );
        assert!(probe.dropped.load(Ordering::Acquire));
    }
}
