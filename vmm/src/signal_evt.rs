//! Signals that wake the event loop: a handler writes an eventfd and nothing else, and
//! the event loop does the work. One pair of helpers for every such signal (termination,
//! the SIGUSR2 state dump).

use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

/// A handler's slot: the raw fd of the eventfd it writes, -1 until installed.
pub(crate) type Slot = AtomicI32;

/// Writes 1 to the eventfd in `slot`, if one is installed. Async-signal-safe: one atomic
/// load and one write(2).
pub(crate) fn wake(slot: &Slot) {
    let fd = slot.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd kept open for the life
        // of the process (`install` leaks its clone on purpose), and `one` is a valid
        // 8-byte buffer.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Keeps a clone of `evt` open for the rest of the process, stores its fd in `slot`, and
/// registers `handler` (which calls [`wake`] on `slot`) for each of `signals`.
///
/// # Errors
///
/// [`Error::EventFd`] if `evt` cannot be cloned, [`Error::Signals`] if a handler cannot
/// be registered.
pub(crate) fn install(
    evt: &EventFd,
    slot: &'static Slot,
    signals: &[libc::c_int],
    handler: vmm_sys_util::signal::SignalHandler,
) -> Result<()> {
    let owned = evt.try_clone().map_err(Error::EventFd)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&owned);
    // Keep this clone open forever: the handler may run at any time until exit.
    std::mem::forget(owned);
    slot.store(fd, Ordering::Relaxed);
    for &sig in signals {
        vmm_sys_util::signal::register_signal_handler(sig, handler)
            .map_err(|e| Error::Signals(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_writes_the_installed_eventfd_and_nothing_before() {
        static SLOT: Slot = Slot::new(-1);
        // Not installed: nothing happens.
        wake(&SLOT);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let clone = evt.try_clone().unwrap();
        SLOT.store(std::os::fd::AsRawFd::as_raw_fd(&clone), Ordering::Relaxed);
        wake(&SLOT);
        wake(&SLOT);
        assert_eq!(evt.read().unwrap(), 2);
        SLOT.store(-1, Ordering::Relaxed);
    }
}
