// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A `log` backend that turns the project's logging rule into an invariant: whatever the
//! guest (or a file) does, the code under test never logs at `error!`, and never repeats a
//! `warn!` from one call site within one input (STYLE.md: guest-triggered lines are
//! `debug!`, or `warn!` once).

use std::collections::BTreeMap;
use std::sync::{Mutex, Once, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct RuleLogger {
    /// `warn!` records of the current input, by call site.
    warns: Mutex<BTreeMap<(String, u32), usize>>,
}

static LOGGER: RuleLogger = RuleLogger {
    warns: Mutex::new(BTreeMap::new()),
};

impl RuleLogger {
    fn warns(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), usize>> {
        self.warns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Log for RuleLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record<'_>) {
        let site = || {
            format!(
                "{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            )
        };
        match record.level() {
            Level::Error => panic!(
                "error! reached from fuzzed input at {}: {}",
                site(),
                record.args()
            ),
            Level::Warn => {
                let key = (
                    record.file().unwrap_or("?").to_string(),
                    record.line().unwrap_or(0),
                );
                let mut warns = self.warns();
                let n = warns.entry(key).or_insert(0);
                *n += 1;
                assert!(
                    *n <= 1,
                    "warn! repeated within one input at {}: {}",
                    site(),
                    record.args()
                );
            }
            _ => {}
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (once per process) and forgets the `warn!` records of the previous
/// input. Call it at the start of every harness.
pub fn start_input() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Another logger can only be there if a test installed one; then rules are off.
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(LevelFilter::Warn);
        }
    });
    LOGGER.warns().clear();
}
