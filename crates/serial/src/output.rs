// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest output that never blocks the vCPU: a bounded buffer drained by its own thread.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, warn};

use crate::{Error, Result};

/// Default size of the buffer between the vCPU and the output thread.
pub const DEFAULT_OUTPUT_BUFFER_BYTES: usize = 64 * 1024;

/// Name of the thread that writes the guest's output to the real sink.
const OUTPUT_THREAD_NAME: &str = "serial-out";

#[derive(Debug)]
struct Buffer {
    /// Bytes waiting for the output thread; never longer than `capacity`.
    bytes: Vec<u8>,
    capacity: usize,
    /// Set by shutdown: the thread writes what is left, then exits.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when `bytes` stops being empty or `closed` is set.
    ready: Condvar,
    dropped: Arc<AtomicU64>,
    drop_reported: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // The buffer stays consistent whatever a panicking holder did: it only ever
        // appends, swaps or sets a flag.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_dropped(&self, n: usize) {
        if n == 0 {
            return;
        }
        let total = self.dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if !self.drop_reported.swap(true, Ordering::Relaxed) {
            warn!("serial: console output is not keeping up, dropping guest output ({total} bytes so far)");
        }
    }
}

/// The [`Write`] end the vCPU thread writes the guest's output to.
///
/// Writes copy into a bounded buffer and return at once; the `serial-out` thread started by
/// [`NonBlockingWriter::spawn`] does the blocking writes to the real sink (stdout). When the
/// buffer is full the bytes are dropped and counted ([`NonBlockingWriter::dropped_bytes`]),
/// and the first drop is reported once with `warn!`. `flush` does not wait for the sink.
/// Clones share the same buffer.
#[derive(Clone)]
pub struct NonBlockingWriter {
    shared: Arc<Shared>,
}

/// Owns the `serial-out` thread; [`OutputThread::shutdown`] flushes what is buffered.
///
/// Dropping it without `shutdown` lets the thread finish the buffer in the background.
pub struct OutputThread {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
    /// Disconnected when the thread exits (normally or by panic).
    finished: mpsc::Receiver<()>,
}

impl NonBlockingWriter {
    /// Starts the `serial-out` thread writing to `sink` and returns the writer for the
    /// device together with the thread's handle.
    ///
    /// # Arguments
    ///
    /// * `sink` - where the bytes end up, written with blocking writes (stdout in the VMM;
    ///   it is never switched to non-blocking mode since it is shared with the shell).
    /// * `capacity_bytes` - most bytes buffered before new ones are dropped
    ///   ([`DEFAULT_OUTPUT_BUFFER_BYTES`] is a good value); at least 1.
    ///
    /// # Errors
    ///
    /// [`Error::SpawnOutputThread`] when the thread cannot be started.
    pub fn spawn<S>(sink: S, capacity_bytes: usize) -> Result<(Self, OutputThread)>
    where
        S: Write + Send + 'static,
    {
        Self::spawn_with_init(sink, capacity_bytes, || Ok(()))
    }

    /// Like [`spawn`](Self::spawn), but the thread first runs `init` (e.g. to install a
    /// seccomp filter on itself) and this call waits for it: when `init` fails the thread
    /// ends without touching `sink` and the error is returned.
    ///
    /// # Errors
    ///
    /// [`Error::SpawnOutputThread`] when the thread cannot be started,
    /// [`Error::OutputThreadInit`] when `init` fails.
    pub fn spawn_with_init<S, F>(
        sink: S,
        capacity_bytes: usize,
        init: F,
    ) -> Result<(Self, OutputThread)>
    where
        S: Write + Send + 'static,
        F: FnOnce() -> std::result::Result<(), String> + Send + 'static,
    {
        let capacity = capacity_bytes.max(1);
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                bytes: Vec::with_capacity(capacity),
                capacity,
                closed: false,
            }),
            ready: Condvar::new(),
            dropped: Arc::new(AtomicU64::new(0)),
            drop_reported: AtomicBool::new(false),
        });
        let (done_tx, finished) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let (init_tx, init_rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(OUTPUT_THREAD_NAME.to_string())
            .spawn(move || {
                // Dropped when the thread ends, however it ends.
                let _done = done_tx;
                let started = init();
                let ok = started.is_ok();
                // The spawner waits for this; it cannot have gone away.
                let _ = init_tx.send(started);
                if ok {
                    output_loop(&thread_shared, sink);
                }
            })
            .map_err(Error::SpawnOutputThread)?;
        match init_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(Error::OutputThreadInit(why)),
            Err(_) => return Err(Error::OutputThreadInit("the thread ended early".into())),
        }
        Ok((
            Self {
                shared: Arc::clone(&shared),
            },
            OutputThread {
                shared,
                handle: Some(handle),
                finished,
            },
        ))
    }

    /// Bytes dropped so far because the buffer was full or the sink failed.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The drop counter itself, for a metrics system to read.
    pub fn dropped_bytes_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.dropped)
    }
}

impl Write for NonBlockingWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buffer = self.shared.lock();
        let room = if buffer.closed {
            0
        } else {
            buffer.capacity - buffer.bytes.len()
        };
        let taken = room.min(data.len());
        // The thread only sleeps on an empty buffer, so only that case needs a wake-up.
        let wake = taken > 0 && buffer.bytes.is_empty();
        buffer.bytes.extend_from_slice(&data[..taken]);
        drop(buffer);
        if wake {
            self.shared.ready.notify_one();
        }
        self.shared.count_dropped(data.len() - taken);
        // Report everything as written: the guest cannot be made to wait.
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for NonBlockingWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonBlockingWriter")
            .field("dropped_bytes", &self.dropped_bytes())
            .finish_non_exhaustive()
    }
}

fn output_loop<S: Write>(shared: &Shared, mut sink: S) {
    let mut chunk = Vec::with_capacity(shared.lock().capacity);
    let mut sink_failed = false;
    loop {
        {
            let mut buffer = shared.lock();
            while buffer.bytes.is_empty() && !buffer.closed {
                buffer = shared
                    .ready
                    .wait(buffer)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if buffer.bytes.is_empty() {
                break;
            }
            // Take the whole buffer and leave the (empty) spare one behind, so the lock is
            // never held across the blocking write.
            std::mem::swap(&mut buffer.bytes, &mut chunk);
        }
        if let Err(e) = sink.write_all(&chunk).and_then(|()| sink.flush()) {
            if !sink_failed {
                sink_failed = true;
                warn!("serial: cannot write guest output: {e}");
            }
            shared.count_dropped(chunk.len());
        }
        chunk.clear();
    }
    debug!("serial: output thread done");
}

impl OutputThread {
    /// Bytes dropped so far because the buffer was full or the sink failed.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Stops accepting output, waits at most `timeout` for the thread to write what is
    /// buffered, and joins it.
    ///
    /// Returns `true` when the thread finished (everything buffered was written, or
    /// counted as dropped if the sink failed), `false` when the sink stayed blocked past
    /// `timeout`; the thread is then left behind, blocked in its write.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        self.close();
        match self.finished.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                match self.handle.take().map(JoinHandle::join) {
                    Some(Err(_)) => {
                        warn!("serial: output thread panicked");
                        false
                    }
                    _ => true,
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let pending = self.shared.lock().bytes.len();
                warn!("serial: console output still blocked after {timeout:?}, {pending} bytes not written");
                false
            }
        }
    }

    fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

impl Drop for OutputThread {
    fn drop(&mut self) {
        // Without a shutdown the thread still writes what is left, then exits on its own.
        self.close();
    }
}

impl fmt::Debug for OutputThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputThread")
            .field("dropped_bytes", &self.dropped_bytes())
            .field("running", &self.handle.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::mpsc::{Receiver, Sender};
    use std::time::Instant;

    use crate::test_utils::SharedBuf;

    /// A sink whose every write waits for the gate: blocked until the sender is dropped.
    struct StallingSink {
        gate: Receiver<()>,
        out: SharedBuf,
    }

    impl Write for StallingSink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            // Err once the sender is gone: the gate is open for good.
            let _ = self.gate.recv();
            self.out.write(data)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn stalled(capacity: usize) -> (NonBlockingWriter, OutputThread, Sender<()>, SharedBuf) {
        let (gate_tx, gate) = mpsc::channel();
        let out = SharedBuf::default();
        let sink = StallingSink {
            gate,
            out: out.clone(),
        };
        let (writer, thread) = NonBlockingWriter::spawn(sink, capacity).unwrap();
        (writer, thread, gate_tx, out)
    }

    #[test]
    fn a_failing_start_hook_is_an_error_and_nothing_reaches_the_sink() {
        let out = SharedBuf::default();
        let Err(err) =
            NonBlockingWriter::spawn_with_init(out.clone(), 16, || Err("no filter".into()))
        else {
            panic!("the hook failed, so spawning must fail");
        };
        assert!(matches!(&err, Error::OutputThreadInit(why) if why == "no filter"));
        assert!(out.contents().is_empty());
    }

    #[test]
    fn the_start_hook_runs_on_the_output_thread_before_any_write() {
        let out = SharedBuf::default();
        let (tx, rx) = mpsc::channel();
        let (mut writer, thread) = NonBlockingWriter::spawn_with_init(out.clone(), 16, move || {
            tx.send(thread::current().name().map(str::to_owned))
                .unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some(OUTPUT_THREAD_NAME));
        writer.write_all(b"hi").unwrap();
        assert!(thread.shutdown(Duration::from_secs(5)));
        assert_eq!(out.contents(), b"hi");
    }

    #[test]
    fn test_output_reaches_sink_in_order() {
        let out = SharedBuf::default();
        let (mut writer, thread) = NonBlockingWriter::spawn(out.clone(), 16).unwrap();
        let data: Vec<u8> = (0..200u8).collect();
        for chunk in data.chunks(7) {
            writer.write_all(chunk).unwrap();
            writer.flush().unwrap();
            // Give the thread time so that nothing is dropped with this small buffer.
            while !thread.shared.lock().bytes.is_empty() {
                thread::yield_now();
            }
        }
        assert!(thread.shutdown(Duration::from_secs(5)));
        assert_eq!(out.contents(), data);
        assert_eq!(writer.dropped_bytes(), 0);
    }

    #[test]
    fn test_shutdown_flushes_buffered_bytes() {
        let (mut writer, thread, gate, out) = stalled(1024);
        writer.write_all(b"hello, ").unwrap();
        writer.write_all(b"world\n").unwrap();
        drop(gate);
        assert!(thread.shutdown(Duration::from_secs(5)));
        assert_eq!(out.contents(), b"hello, world\n");
        assert_eq!(writer.dropped_bytes(), 0);
        // After shutdown everything is dropped, never blocked on.
        writer.write_all(b"late").unwrap();
        assert_eq!(writer.dropped_bytes(), 4);
    }

    #[test]
    fn test_stalled_sink_never_blocks_writer_and_counts_drops() {
        const CAPACITY: usize = 32;
        const TOTAL: usize = 10_000;
        let (mut writer, thread, gate, out) = stalled(CAPACITY);
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 256) as u8).collect();

        let start = Instant::now();
        // One byte at a time, like a vCPU writing THR.
        for byte in &data {
            writer.write_all(std::slice::from_ref(byte)).unwrap();
            writer.flush().unwrap();
        }
        // The sink is blocked for as long as `gate` lives, so finishing at all proves that
        // no write waited on it; the bound only guards against pathological slowness.
        assert!(start.elapsed() < Duration::from_secs(10));

        // At most one buffer in flight in the thread plus one full buffer are kept.
        let dropped = writer.dropped_bytes();
        assert!(
            dropped >= (TOTAL - 2 * CAPACITY) as u64,
            "dropped {dropped}"
        );
        assert_eq!(thread.dropped_bytes(), dropped);
        assert_eq!(
            writer.dropped_bytes_counter().load(Ordering::Relaxed),
            dropped
        );

        drop(gate);
        assert!(thread.shutdown(Duration::from_secs(5)));
        let written = out.contents();
        // Every byte was either written or counted, and what survived kept its order.
        assert_eq!(written.len() as u64 + dropped, TOTAL as u64);
        assert!(written.len() <= 2 * CAPACITY);
        let mut rest = data.iter();
        assert!(written.iter().all(|b| rest.any(|d| d == b)));
    }

    #[test]
    fn test_shutdown_wait_is_bounded() {
        let (mut writer, thread, gate, _out) = stalled(64);
        writer.write_all(b"stuck").unwrap();
        let start = Instant::now();
        assert!(!thread.shutdown(Duration::from_millis(50)));
        assert!(start.elapsed() < Duration::from_secs(5));
        // Let the detached thread finish.
        drop(gate);
    }

    #[test]
    fn test_failing_sink_counts_drops() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, thread) = NonBlockingWriter::spawn(Broken, 64).unwrap();
        writer.write_all(b"abc").unwrap();
        assert!(thread.shutdown(Duration::from_secs(5)));
        assert_eq!(writer.dropped_bytes(), 3);
    }
}
