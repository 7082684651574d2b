//! Requests to a running VM from another thread (the API server): pause, resume, a
//! Ctrl-Alt-Del on the keyboard, a disk's new medium. Each goes through a channel and an EventFd that wakes
//! the event loop; the loop carries it out between two event batches, where it can reach
//! the vCPU threads, and answers on a channel of the request's own.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use std::time::Duration;
use tvm_virtio_blk::BlockCounters;
use tvm_virtio_net::NetCounters;

use vmm_sys_util::eventfd::EventFd;

/// What a request to the running VM asks for.
#[derive(Debug)]
pub enum Command {
    /// Park every vCPU outside the guest.
    Pause,
    /// Let the parked vCPUs run again.
    Resume,
    /// Press Ctrl-Alt-Del on the guest's keyboard.
    CtrlAltDel,
    /// Put a new medium in a disk (a media change the guest is told of).
    ChangeMedia {
        /// The disk, in the order of `VmConfig::disks`.
        disk: usize,
        /// The new image's path, for the device and the log.
        path: PathBuf,
        /// The new image, opened by the asking thread (the event loop opens no files):
        /// read-write unless the disk is read-only.
        file: OpenImage,
    },
    /// Read the VM's counters and send them here (for `FlushMetrics`).
    Metrics(SyncSender<VmCounters>),
    /// Write a snapshot of the paused VM into these files (opened by the asker).
    CreateSnapshot(crate::snapshot::SnapshotFiles),
}

/// The running VM's counters, absolute (since it started).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// vCPU exits by kind ([`crate::dump::ExitKind::name`]), summed over the vCPUs.
    pub exits: Vec<(&'static str, u64)>,
    /// Each disk's, in the order of `VmConfig::disks`.
    pub disks: Vec<BlockCounters>,
    /// Each network interface's, in the order of `VmConfig::nets`.
    pub nets: Vec<NetCounters>,
    /// Bytes the entropy device served, if there is one.
    pub entropy_bytes: Option<u64>,
    /// The socket device's, if there is one.
    pub vsock: Option<tvm_vsock::VsockCounters>,
}

/// An opened image file whose `Debug` names only the descriptor (std's `File` looks its
/// path up in /proc, a system call the API thread's seccomp filter does not allow).
pub struct OpenImage(pub File);

impl std::fmt::Debug for OpenImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::fd::AsRawFd;
        write!(f, "OpenImage(fd {})", self.0.as_raw_fd())
    }
}

/// The answer to a [`Command`]: done, or why not (one line for the API's fault message).
pub type Answer = std::result::Result<(), String>;

type Envelope = (Command, SyncSender<Answer>);

/// The sending side, for the thread that asks.
#[derive(Debug)]
pub struct CommandSender {
    tx: Sender<Envelope>,
    wake: EventFd,
}

/// The receiving side, for the event loop: [`CommandReceiver::wake_evt`] becomes readable
/// when a request is waiting.
#[derive(Debug)]
pub struct CommandReceiver {
    rx: Receiver<Envelope>,
    wake: EventFd,
}

/// A connected pair around `wake`, an EventFd the event loop watches.
///
/// # Errors
/// `wake` cannot be duplicated.
pub fn channel(wake: EventFd) -> std::io::Result<(CommandSender, CommandReceiver)> {
    let (tx, rx) = mpsc::channel();
    let sender = CommandSender {
        tx,
        wake: wake.try_clone()?,
    };
    Ok((sender, CommandReceiver { rx, wake }))
}

impl CommandSender {
    /// Sends `command` and waits up to `timeout` for its answer. The VM having ended, or
    /// not answering in time, is an error.
    pub fn send(&self, command: Command, timeout: Duration) -> Answer {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let what = format!("{command:?}");
        self.tx
            .send((command, reply_tx))
            .map_err(|_| "the vm is no longer running".to_string())?;
        self.wake
            .write(1)
            .map_err(|e| format!("failed to wake the event loop: {e}"))?;
        match reply_rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the vm did not carry out {what} within {timeout:?}"
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(format!("the vm stopped before it carried out {what}"))
            }
        }
    }
}

impl CommandReceiver {
    /// The EventFd written for each request.
    pub fn wake_evt(&self) -> &EventFd {
        &self.wake
    }

    /// Carries out every waiting request with `handle`, answering each.
    pub fn drain(&self, mut handle: impl FnMut(Command) -> Answer) {
        let _ = self.wake.read();
        while let Ok((command, reply)) = self.rx.try_recv() {
            let answer = handle(command);
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_request_wakes_the_loop_and_gets_the_answer_of_its_handler() {
        let (tx, rx) = channel(EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        let asker = std::thread::spawn(move || {
            let paused = tx.send(Command::Pause, Duration::from_secs(10));
            let refused = tx.send(Command::CtrlAltDel, Duration::from_secs(10));
            (paused, refused)
        });
        let mut seen = Vec::new();
        while seen.len() < 2 {
            // The wake EventFd is readable before each request can be taken.
            while rx.wake_evt().read().is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            rx.wake_evt().write(1).unwrap();
            rx.drain(|c| {
                seen.push(format!("{c:?}"));
                match c {
                    Command::Pause => Ok(()),
                    _ => Err("no keyboard".into()),
                }
            });
        }
        let (paused, refused) = asker.join().unwrap();
        assert_eq!(paused, Ok(()));
        assert_eq!(refused, Err("no keyboard".to_string()));
        assert_eq!(seen, ["Pause", "CtrlAltDel"]);
    }

    #[test]
    fn no_answer_in_time_and_a_gone_vm_are_errors() {
        let (tx, rx) = channel(EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        let e = tx
            .send(Command::Resume, Duration::from_millis(20))
            .unwrap_err();
        assert!(e.contains("within"), "{e}");
        drop(rx);
        let e = tx
            .send(Command::Resume, Duration::from_secs(10))
            .unwrap_err();
        assert!(e.contains("no longer running"), "{e}");
    }
}
