// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A logger for unit tests that checks what a device logs: it records every message with
//! the thread that logged it, so tests running in parallel each see only their own lines.

use std::sync::{Mutex, Once};
use std::thread::ThreadId;

use log::{Level, LevelFilter, Log, Metadata, Record};

static RECORDS: Mutex<Vec<(ThreadId, Level, String)>> = Mutex::new(Vec::new());

struct Capture;

static CAPTURE: Capture = Capture;

impl Log for Capture {
    fn enabled(&self, _metadata: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let line = record.args().to_string();
        RECORDS.lock().unwrap_or_else(|e| e.into_inner()).push((
            std::thread::current().id(),
            record.level(),
            line,
        ));
    }

    fn flush(&self) {}
}

/// Installs the capturing logger (once per process, at `debug` level) and forgets what this
/// thread logged so far. If another logger was installed first, nothing is captured.
pub fn start() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if log::set_logger(&CAPTURE).is_ok() {
            log::set_max_level(LevelFilter::Debug);
        }
    });
    let me = std::thread::current().id();
    RECORDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(t, _, _)| *t != me);
}

/// The messages this thread logged at `level` since [`start`], in order.
pub fn lines(level: Level) -> Vec<String> {
    let me = std::thread::current().id();
    RECORDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, l, _)| *t == me && *l == level)
        .map(|(_, _, s)| s.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_sees_only_its_own_lines() {
        start();
        log::warn!("here");
        let other = std::thread::spawn(|| {
            start();
            log::warn!("there");
            lines(Level::Warn)
        })
        .join()
        .unwrap();
        assert_eq!(other, ["there"]);
        assert_eq!(lines(Level::Warn), ["here"]);
        assert!(lines(Level::Error).is_empty());
        start();
        assert!(lines(Level::Warn).is_empty());
    }

    #[test]
    fn warn_once_logs_one_warning_then_debug() {
        start();
        let mut once = crate::WarnOnce::new();
        for i in 0..3 {
            crate::warn_once!(once, "bad thing {i}");
        }
        assert_eq!(
            lines(Level::Warn),
            ["bad thing 0 (repeats are logged at debug level)"]
        );
        assert_eq!(lines(Level::Debug), ["bad thing 1", "bad thing 2"]);
    }
}
