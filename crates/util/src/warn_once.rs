// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Log lines a guest can trigger: the first of each kind goes out at `warn!`, so the host
//! sees that a driver misbehaved, and every repeat at `debug!`, so a guest that does it in
//! a loop cannot flood the log.

/// Whether one kind of guest misbehaviour was already reported at `warn!`; use it with
/// [`warn_once!`](crate::warn_once).
///
/// It is never re-armed, not even by a device reset: a guest could otherwise reset and
/// misbehave again in a loop.
#[derive(Debug, Default)]
pub struct WarnOnce {
    warned: bool,
}

impl WarnOnce {
    /// Not reported yet.
    pub const fn new() -> Self {
        WarnOnce { warned: false }
    }

    /// True the first time it is called, false ever after.
    pub fn first(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }

    /// Whether the `warn!` line has gone out.
    pub fn warned(&self) -> bool {
        self.warned
    }
}

/// Logs a guest-triggered message: at `warn!` (with a note that repeats are quieter) the
/// first time `$once` (a [`WarnOnce`]) sees it, at `debug!` afterwards. The arguments are
/// those of [`format!`].
///
/// ```
/// use tvm_util::{warn_once, WarnOnce};
///
/// let mut bad_size = WarnOnce::new();
/// for size in [100u16, 100, 100] {
///     warn_once!(bad_size, "queue size {size} refused");
/// }
/// assert!(bad_size.warned());
/// ```
#[macro_export]
macro_rules! warn_once {
    ($once:expr, $($arg:tt)+) => {
        if $once.first() {
            $crate::__log::warn!(
                "{} (repeats are logged at debug level)",
                ::std::format_args!($($arg)+)
            );
        } else {
            $crate::__log::debug!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_is_a_warning() {
        let mut once = WarnOnce::new();
        assert!(!once.warned());
        assert!(once.first());
        assert!(once.warned());
        for _ in 0..1000 {
            assert!(!once.first());
        }
        assert!(WarnOnce::default().first());
    }
}
