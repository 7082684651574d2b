//! A disk whose host file system fills up: the main boot's last `--disk` is a sparse
//! 16 MiB image on a 1 MiB tmpfs this driver mounts (it runs as root, in the outer guest
//! or on a host with hardware KVM). The guest's writes past what fits fail on the host with
//! ENOSPC; the guest must see I/O errors, the VMM must warn once for the kind, go on
//! serving its other disks, and list the count at exit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Guest, Report};

/// The image's apparent size.
const IMAGE_BYTES: u64 = 16 << 20;
/// The tmpfs that holds it.
const TMPFS_SIZE: &str = "size=1m";
/// The text of the host error the device reports.
const ENOSPC_TEXT: &str = "No space left on device (os error 28)";
/// Limit for the guest's writes.
const WRITE_LIMIT: Duration = Duration::from_secs(60);

/// The mounted tmpfs and the image on it; unmounted when dropped.
pub struct FullDisk {
    dir: PathBuf,
    image: PathBuf,
}

impl FullDisk {
    /// Mounts a 1 MiB tmpfs and makes the sparse image on it.
    pub fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("tvm-e2e-{}-full", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", TMPFS_SIZE, "tvm-full"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs -o {TMPFS_SIZE} {dir:?} failed (the check needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let disk = FullDisk {
            image: dir.join("full.img"),
            dir,
        };
        let f = std::fs::File::create(&disk.image)
            .map_err(|e| format!("creating {:?}: {e}", disk.image))?;
        f.set_len(IMAGE_BYTES)
            .map_err(|e| format!("sizing {:?}: {e}", disk.image))?;
        Ok(disk)
    }

    /// The image, for `--disk`.
    pub fn image(&self) -> &Path {
        &self.image
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Lines of the VMM's log that warn about host I/O errors of this image.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("host i/o error") && l.contains("full.img"))
        .collect()
}

/// `host-enospc-is-guest-ioerr`: with the guest at its prompt, two `dd` runs of direct
/// writes to `dev` (the second starting at 8 MiB, beyond what the tmpfs could hold).
/// Returns the console position after them.
pub fn check(g: &mut Guest, r: &mut Report, dev: &str, pos: usize) -> Result<usize, String> {
    g.send(
        format!(
            "dd if=/dev/zero of=/dev/{dev} bs=64k count=64 oflag=direct 2>/dev/null; a=$?; \
             dd if=/dev/zero of=/dev/{dev} bs=64k count=16 seek=128 oflag=direct 2>/dev/null; \
             echo full-$((1+1))-$a,$?-end\n"
        )
        .as_bytes(),
    )?;
    let answer = g.console.value_until_end("full-2-", pos, WRITE_LIMIT);
    let (end, codes) = match answer {
        Some((at, v)) => (at, v.trim().to_string()),
        None => {
            r.check(
                "host-enospc-is-guest-ioerr",
                Err(format!(
                    "no answer from the guest; console tail: {}",
                    g.console.tail(1000)
                )),
            );
            return Ok(g.console.len());
        }
    };
    // The warning is logged when the first request fails, before the guest sees it.
    let stderr = g.stderr.text_from(0);
    let warned = warnings(&stderr);
    let result = if codes.split(',').any(|c| c == "0") {
        Err(format!(
            "a dd to a disk whose host file system is full succeeded (exit codes {codes})"
        ))
    } else if warned.len() != 1 || !warned[0].contains(ENOSPC_TEXT) {
        Err(format!(
            "expected one warning naming ENOSPC, the VMM logged {}: {warned:#?}",
            warned.len()
        ))
    } else {
        Ok(format!(
            "both dd runs failed in the guest (exit codes {codes}); one warning: {}",
            warned[0].trim()
        ))
    };
    r.check("host-enospc-is-guest-ioerr", result);
    Ok(end)
}

/// `host-enospc-counted-at-exit`: after the VMM exited, its counters line for the image
/// lists ENOSPC at least twice (two `dd` runs, each failed at least once), and there is
/// still only one warning.
pub fn check_after_exit(stderr: &str, r: &mut Report) {
    let line = stderr
        .lines()
        .find(|l| l.contains("full.img") && l.contains("failed on the host"));
    let count = line.and_then(|l| {
        let rest = &l[l.find(ENOSPC_TEXT)? + ENOSPC_TEXT.len()..];
        rest.trim_start()
            .strip_prefix('x')?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<u64>()
            .ok()
    });
    let warned = warnings(stderr).len();
    r.check(
        "host-enospc-counted-at-exit",
        match (line, count) {
            (Some(l), Some(n)) if n >= 2 && warned == 1 => Ok(format!(
                "{n} requests failed with ENOSPC, one warning: {}",
                l.trim()
            )),
            _ => Err(format!(
                "counters line {line:?}, ENOSPC count {count:?}, {warned} warning(s)"
            )),
        },
    );
}
