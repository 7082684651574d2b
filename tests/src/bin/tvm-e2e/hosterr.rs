//! Host I/O errors. A disk whose host file system fills up: the main boot's last `--disk` is a sparse
//! 16 MiB image on a 1 MiB tmpfs this driver mounts (it runs as root, in the outer guest
//! or on a host with hardware KVM). The guest's writes past what fits fail on the host with
//! ENOSPC; the guest must see I/O errors, the VMM must warn once for the kind, go on
//! serving its other disks, and list the count at exit. And a disk whose host writes and
//! reads fail with EIO ([`EioDisk`], device-mapper's `error` target): the same, for EIO.

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

/// Moves this process (and the VMMs it starts) into a mount namespace of its own, with
/// private propagation, so that the tmpfs of [`FullDisk`] goes away with the process even
/// when it is killed or ends through its watchdog (which skip the unmount in `Drop`).
/// Without the privilege (not root) nothing changes: the tests that mount need root anyway.
pub fn private_mounts() {
    // SAFETY: unshare(2) with a flag and mount(2) with a static NUL-terminated path and
    // null pointers for the unused arguments touch no memory of ours beyond reading the
    // path; they change only this process's view of the mount table.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) == 0 {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
        }
    }
}

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

/// Lines of the VMM's log that warn about host I/O errors of the disk whose name (its
/// path) contains `name`.
fn warnings<'a>(stderr: &'a str, name: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("host i/o error") && l.contains(name))
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
    let warned = warnings(&stderr, "full.img");
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

/// The count after `text` in a disk's exit counters line (`... ENOSPC-TEXT x7, ...`).
fn kind_count(line: &str, text: &str) -> Option<u64> {
    let rest = &line[line.find(text)? + text.len()..];
    rest.trim_start()
        .strip_prefix('x')?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse::<u64>()
        .ok()
}

/// `host-enospc-counted-at-exit`: after the VMM exited, its counters line for the image
/// lists ENOSPC at least twice (two `dd` runs, each failed at least once), and there is
/// still only one warning.
pub fn check_after_exit(stderr: &str, r: &mut Report) {
    let line = stderr
        .lines()
        .find(|l| l.contains("full.img") && l.contains("failed on the host"));
    let count = line.and_then(|l| kind_count(l, ENOSPC_TEXT));
    let warned = warnings(stderr, "full.img").len();
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

/// Sectors at the start of the EIO disk that read and write normally (the guest's partition
/// scan reads them at probe time).
const EIO_GOOD_SECTORS: u64 = 8;
/// The text of the host error the EIO disk gives.
const EIO_TEXT: &str = "Input/output error (os error 5)";

/// A disk whose host writes and reads fail with EIO (given to the VMM with `cache=none`,
/// so that the errors come with each request): a device-mapper device (`dmsetup`)
/// whose first [`EIO_GOOD_SECTORS`] sectors map linearly onto a backing block device and
/// the rest onto the `error` target. The backing is a block device (the outer guest's
/// `/dev/ram1`) or a file, attached to a loop device here. Removed when dropped.
pub struct EioDisk {
    dmsetup: String,
    name: String,
    loop_dev: Option<String>,
    path: PathBuf,
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd:?} failed (the check needs root and device-mapper): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl EioDisk {
    /// Sets the device up over `backing` with `dmsetup`.
    pub fn new(dmsetup: &str, backing: &str) -> Result<Self, String> {
        let meta = std::fs::metadata(backing).map_err(|e| format!("{backing}: {e}"))?;
        let mut disk = EioDisk {
            dmsetup: dmsetup.to_string(),
            name: format!("tvm-eio-{}", std::process::id()),
            loop_dev: None,
            path: PathBuf::new(),
        };
        let dev = if meta.is_file() {
            let dev = run(Command::new("losetup").args(["-f", "--show", backing]))?;
            disk.loop_dev = Some(dev.clone());
            dev
        } else {
            backing.to_string()
        };
        // The size in sectors, as the block device has it.
        let mut f = std::fs::File::open(&dev).map_err(|e| format!("{dev}: {e}"))?;
        let bytes = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
            .map_err(|e| format!("{dev}: {e}"))?;
        let sectors = bytes / 512;
        if sectors <= EIO_GOOD_SECTORS {
            return Err(format!("{dev}: {sectors} sectors, too small"));
        }
        let table = format!(
            "0 {EIO_GOOD_SECTORS} linear {dev} 0\n{EIO_GOOD_SECTORS} {} error",
            sectors - EIO_GOOD_SECTORS
        );
        // No udev here: dmsetup makes the node itself.
        run(Command::new(dmsetup).args(["--noudevsync", "create", &disk.name, "--table", &table]))?;
        run(Command::new(dmsetup).args(["mknodes", &disk.name]))?;
        disk.path = PathBuf::from(format!("/dev/mapper/{}", disk.name));
        if !disk.path.exists() {
            return Err(format!("{:?} is missing after dmsetup create", disk.path));
        }
        Ok(disk)
    }

    /// The device, for `--disk`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EioDisk {
    fn drop(&mut self) {
        let _ = Command::new(&self.dmsetup)
            .args(["--noudevsync", "remove", &self.name])
            .output();
        if let Some(dev) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", dev]).output();
        }
    }
}

/// `host-eio-is-guest-ioerr`: a direct write and a direct read past the good sectors of
/// `dev` fail in the guest, a read of sector 0 works, and the VMM warned exactly once, for
/// EIO. Returns the console position after them.
pub fn check_eio(
    g: &mut Guest,
    r: &mut Report,
    dev: &str,
    disk: &EioDisk,
    pos: usize,
) -> Result<usize, String> {
    g.send(
        format!(
            "dd if=/dev/zero of=/dev/{dev} bs=4k count=4 seek=16 oflag=direct 2>/dev/null; \
             a=$?; dd if=/dev/{dev} of=/dev/null bs=4k count=1 skip=16 iflag=direct \
             2>/dev/null; b=$?; dd if=/dev/{dev} of=/dev/null bs=4k count=1 iflag=direct \
             2>/dev/null; echo eio-$((1+1))-$a,$b,$?-end\n"
        )
        .as_bytes(),
    )?;
    let answer = g.console.value_until_end("eio-2-", pos, WRITE_LIMIT);
    let Some((end, codes)) = answer else {
        r.check(
            "host-eio-is-guest-ioerr",
            Err(format!(
                "no answer from the guest; console tail: {}",
                g.console.tail(1000)
            )),
        );
        return Ok(g.console.len());
    };
    let codes: Vec<String> = codes.trim().split(',').map(str::to_string).collect();
    let stderr = g.stderr.text_from(0);
    let warned = warnings(&stderr, &disk.name);
    let result = if codes.len() != 3 || codes[0] == "0" || codes[1] == "0" || codes[2] != "0" {
        Err(format!(
            "dd exit codes write,read,read-sector-0 = {codes:?}: expected the first two to \
             fail and the last to work"
        ))
    } else if warned.len() != 1 || !warned[0].contains(EIO_TEXT) {
        Err(format!(
            "expected one warning naming EIO, the VMM logged {}: {warned:#?}",
            warned.len()
        ))
    } else {
        Ok(format!(
            "a write and a read on the error target failed in the guest (exit codes {}), \
             sector 0 read fine; one warning: {}",
            codes.join(","),
            warned[0].trim()
        ))
    };
    r.check("host-eio-is-guest-ioerr", result);
    Ok(end)
}

/// `host-eio-counted-at-exit`: the EIO disk's counters line lists EIO at least twice (the
/// write and the read), and there is still only one warning.
pub fn check_eio_after_exit(stderr: &str, disk: &EioDisk, r: &mut Report) {
    let line = stderr
        .lines()
        .find(|l| l.contains(&disk.name) && l.contains("failed on the host"));
    let count = line.and_then(|l| kind_count(l, EIO_TEXT));
    let warned = warnings(stderr, &disk.name).len();
    r.check(
        "host-eio-counted-at-exit",
        match count {
            Some(n) if n >= 2 && warned == 1 => Ok(format!(
                "EIO x{n} in the exit counters, one warning: {}",
                line.unwrap_or_default().trim()
            )),
            _ => Err(format!(
                "counters line {line:?}, EIO count {count:?}, {warned} warnings (expected at \
                 least 2 and 1)"
            )),
        },
    );
}
