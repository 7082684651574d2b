//! The binary's logger: one line per record on stderr (stdout is the guest's console),
//! with the time since start, the level and the module.

use std::io::Write;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    start: Instant,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // The level in force: set at init, changed later by the API's `PUT /logger`.
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // In raw mode the terminal does not turn "\n" into "\r\n" for input echo, but our
        // termios keeps OPOST, so a plain newline is right either way.
        let line = format!(
            "[{t:10.6}] {level} {}: {}\n",
            record.target(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`. Calling it twice keeps the first logger.
pub fn init(level: LevelFilter, start: Instant) {
    if log::set_boxed_logger(Box::new(StderrLogger { start })).is_ok() {
        log::set_max_level(level);
    }
}

/// Sends the log (stderr) to `path` from now on, appending: Firecracker's `--log-path` and
/// `PUT /logger`. The file is created if missing.
///
/// # Errors
/// The file cannot be opened, or stderr cannot be replaced.
pub fn redirect(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    // SAFETY: dup2 on two open descriptors: `file`'s, alive for this call, and 2. It
    // touches no memory; fd 2 then refers to the file, atomically for other threads.
    let r = unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
