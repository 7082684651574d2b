// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A `log` backend that turns the project's logging rule into an invariant: whatever the
//! guest (or a file) does, the code under test never logs at `error!`, and never repeats a
//! `warn!` from one call site within one input (STYLE.md: guest-triggered lines are
//! `debug!`, or `warn!` once).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Once;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct RuleLogger;

static LOGGER: RuleLogger = RuleLogger;

thread_local! {
    /// `warn!` records of the input this thread runs, by call site: per thread, because
    /// the replay tests run inputs on several threads at once (two inputs warning from the
    /// same site at the same time are not a repeat).
    static WARNS: RefCell<BTreeMap<(String, u32), usize>> = const { RefCell::new(BTreeMap::new()) };
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
                let n = WARNS.with(|w| {
                    let mut w = w.borrow_mut();
                    let n = w.entry(key).or_insert(0);
                    *n += 1;
                    *n
                });
                assert!(
                    n <= 1,
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
    WARNS.with(|w| w.borrow_mut().clear());
}
