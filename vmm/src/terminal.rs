//! Raw mode for the host terminal, restored on every exit path.
//!
//! When stdin is a terminal, the guest owns it: no echo, no line editing, and Ctrl-C goes
//! to the guest (ISIG off); Ctrl-A x is the way out. The original settings are kept in a
//! process-wide slot so that the normal path ([`RawTerminal`]'s `Drop`), the panic hook and
//! error path in `main` can all put them back. Termination signals go through the event
//! loop, so they take the normal path.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether the terminal is in raw mode now.
pub fn raw_active() -> bool {
    RAW_ACTIVE.load(Ordering::Relaxed)
}

/// Guard that keeps stdin's terminal in raw mode while it lives.
#[derive(Debug)]
pub struct RawTerminal {
    _private: (),
}

fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor number; fd 0 may be closed or not a
    // terminal, which it reports as 0.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

impl RawTerminal {
    /// Switches stdin to raw mode when it is a terminal; returns `None` when it is not (a
    /// pipe or /dev/null, as in tests).
    pub fn enter() -> io::Result<Option<RawTerminal>> {
        if !stdin_is_tty() {
            return Ok(None);
        }
        // SAFETY: termios is plain old data; all-zero is a valid value to be overwritten.
        let mut orig: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above) and `orig` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut orig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = orig;
        // Like cfmakeraw, but keep output post-processing so that "\n" from our own log
        // lines still returns the carriage (the guest sends "\r\n" itself).
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
        raw.c_cflag |= libc::CS8;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(orig);
        // SAFETY: fd 0 is a terminal and `raw` is a fully initialised termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        RAW_ACTIVE.store(true, Ordering::Relaxed);
        Ok(Some(RawTerminal { _private: () }))
    }
}

/// Puts the saved terminal settings back, if any. Safe to call more than once and from the
/// panic hook.
pub fn restore() {
    let saved = match SAVED.try_lock() {
        Ok(mut g) => g.take(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(orig) = saved {
        // SAFETY: `orig` was read from fd 0 by tcgetattr; setting it back has no memory
        // safety preconditions and failure leaves the terminal as it is.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &orig) };
        RAW_ACTIVE.store(false, Ordering::Relaxed);
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Installs a panic hook that restores the terminal before the default hook prints.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        default(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_without_raw_mode_is_a_no_op() {
        restore();
        restore();
        assert!(!raw_active());
    }
}
