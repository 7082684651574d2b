//! `cargo xtask run [-- VMM ARGS]`: build the VMM, prepare the test guest and boot it on
//! this terminal, directly on /dev/kvm when it can run Linux, else inside the outer QEMU
//! guest (see [`crate::outer`]).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::guest::{self, GuestImages};
use crate::outer::{self, OuterRun};
use crate::util;

/// The VMM package and binary.
pub const VMM_PACKAGE: &str = "tvm-vmm";
/// The VMM binary name.
pub const VMM_BIN: &str = "vmm";

/// Options of `cargo xtask run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments for the VMM (after `--`), e.g. `-- --memory 1G --log-level info`.
    #[arg(last = true)]
    pub vmm_args: Vec<String>,
}

/// One file the VMM run needs, as it is on the host and as the guest sees it.
#[derive(Debug, Clone)]
pub struct Carried {
    /// Host path.
    pub host: PathBuf,
    /// Path inside the outer guest.
    pub guest: String,
}

/// The VMM command line and the files it refers to, for either way of running it.
#[derive(Debug, Clone)]
pub struct VmmInvocation {
    /// The static VMM binary.
    pub vmm: Carried,
    /// Files the arguments refer to (kernel, initrd, later disks).
    pub files: Vec<Carried>,
    /// Disk images named by `--disk` options: attached to the outer guest as drives
    /// (so the guest's writes land in the host file), used directly otherwise.
    pub disks: Vec<outer::Drive>,
    /// TAP names given with `--net tap=NAME`: their host end is set up with
    /// `scripts/tap-up.sh` beside the VMM.
    pub taps: Vec<String>,
    /// Arguments, with `{}`-free plain strings; see [`VmmInvocation::args_for`].
    pub args: Vec<Arg>,
}

/// The VMM's default command line (vmm/src/config.rs, `DEFAULT_CMDLINE`) plus eth0's
/// address for the test guest's /init; used when `--net` is given without `--cmdline`.
pub const NET_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=conf1 tvm.ip=10.0.2.2/24";

/// The host-side TAP helper, carried into the outer guest.
const TAP_UP: &str = include_str!("../../scripts/tap-up.sh");

/// A VMM argument: literal, or the path of carried file `files[i]`.
#[derive(Debug, Clone)]
pub enum Arg {
    /// Passed as is.
    Plain(String),
    /// Replaced by the host or guest path of `files[i]`.
    File(usize),
    /// The value of a `--disk` option: `disks[i]`'s host path or its outer-guest device
    /// node, followed by the option's own suffix (`,readonly=on`, ...).
    Disk(usize, String),
}

impl VmmInvocation {
    /// `vmm --kernel <vmlinuz> --initrd <initramfs> <extra...>`.
    pub fn new(vmm: PathBuf, images: &GuestImages, extra: &[String]) -> Self {
        let mut args = vec![
            Arg::Plain("--kernel".into()),
            Arg::File(0),
            Arg::Plain("--initrd".into()),
            Arg::File(1),
        ];
        let mut disks = Vec::new();
        let mut taps = Vec::new();
        let mut next_is_disk = false;
        let mut next_is_net = false;
        for a in extra {
            let net = if next_is_net {
                Some(a.as_str())
            } else {
                a.strip_prefix("--net=")
            };
            next_is_net = a == "--net";
            if let Some(tap) = net
                .into_iter()
                .flat_map(|v| v.split(','))
                .find_map(|o| o.strip_prefix("tap="))
            {
                taps.push(tap.to_string());
            }
            let value = if next_is_disk {
                Some(a.as_str())
            } else {
                a.strip_prefix("--disk=")
            };
            match value {
                Some(v) => {
                    if !next_is_disk {
                        args.push(Arg::Plain("--disk".into()));
                    }
                    let (path, suffix) = v.split_at(v.find(',').unwrap_or(v.len()));
                    disks.push(outer::Drive {
                        path: path.into(),
                        read_only: suffix.split(',').any(|o| o == "readonly=on"),
                    });
                    args.push(Arg::Disk(disks.len() - 1, suffix.to_string()));
                    next_is_disk = false;
                }
                None => {
                    next_is_disk = a == "--disk";
                    args.push(Arg::Plain(a.clone()));
                }
            }
        }
        let has_cmdline = extra
            .iter()
            .any(|a| a == "--cmdline" || a.starts_with("--cmdline="));
        if !taps.is_empty() && !has_cmdline {
            args.push(Arg::Plain("--cmdline".into()));
            args.push(Arg::Plain(NET_CMDLINE.into()));
        }
        Self {
            vmm: Carried {
                host: vmm,
                guest: "/tvm/vmm".into(),
            },
            files: vec![
                Carried {
                    host: images.vmlinuz.clone(),
                    guest: "/tvm/vmlinuz".into(),
                },
                Carried {
                    host: images.initramfs.clone(),
                    guest: "/tvm/initramfs.cpio.gz".into(),
                },
            ],
            disks,
            taps,
            args,
        }
    }

    /// The arguments with file paths as seen on the host (`guest == false`) or in the
    /// outer guest.
    pub fn args_for(&self, guest: bool) -> Vec<String> {
        self.args
            .iter()
            .map(|a| match a {
                Arg::Plain(s) => s.clone(),
                Arg::File(i) if guest => self.files[*i].guest.clone(),
                Arg::File(i) => self.files[*i].host.to_string_lossy().into_owned(),
                Arg::Disk(i, suffix) if guest => format!("{}{suffix}", outer::outer_disk_path(*i)),
                Arg::Disk(i, suffix) => format!("{}{suffix}", self.disks[*i].path.display()),
            })
            .collect()
    }

    /// An [`OuterRun`] carrying the VMM and its files, running it as the payload.
    pub fn outer_run(&self, interactive: bool) -> OuterRun {
        let tap_up: String = self
            .taps
            .iter()
            .map(|t| format!("sh /tvm/tap-up.sh {} &\n", util::shell_quote(t)))
            .collect();
        let mut run = OuterRun::new(format!(
            "{tap_up}{} {} {}\n",
            outer::PIN_TO_ONE_CPU,
            util::shell_quote(&self.vmm.guest),
            util::shell_join(self.args_for(true))
        ));
        run.interactive = interactive;
        for c in std::iter::once(&self.vmm).chain(&self.files) {
            run = run.file(&c.host, &c.guest);
        }
        run.drives = self.disks.clone();
        if !self.taps.is_empty() {
            run = run.file(
                util::workspace_root().join("scripts/tap-up.sh"),
                "tap-up.sh",
            );
        }
        run
    }
}

/// `cargo xtask run`.
pub fn main(args: Args) -> Result<ExitCode> {
    let vmm = outer::build_static(VMM_PACKAGE, VMM_BIN)?;
    let mut images = guest::prepare()?;
    let vsock = args
        .vmm_args
        .iter()
        .any(|a| a == "--vsock" || a.starts_with("--vsock="));
    if vsock {
        // A listener for the host to reach: `tvm-vsock-guest echo PORT &` in the guest.
        images.initramfs =
            guest::initramfs_with(&["tvm-vsock-guest"], "run-vsock-initramfs.cpio.gz")?;
        println!(
            "xtask: the guest has /bin/tvm-vsock-guest (echo PORT, sink PORT, send PORT BYTES, \
             connect PORT); the host connects to the --vsock uds and writes `CONNECT PORT`"
        );
    }
    let inv = VmmInvocation::new(vmm, &images, &args.vmm_args);
    for d in &inv.disks {
        // Checked here so a typo fails before the (slow) outer guest boots; the VMM checks
        // again (lock, permissions) when it opens the image.
        if !d.path.is_file() {
            bail!(
                "disk image {} not found (or not a regular file)",
                d.path.display()
            );
        }
    }
    if outer::kvm_is_usable_directly() {
        for tap in &inv.taps {
            // Runs beside the VMM, which creates the TAP; not waited for.
            Command::new("sh")
                .args(["-c", TAP_UP, "tap-up", tap])
                .spawn()
                .context("starting the tap-up helper")?;
        }
        let mut cmd = Command::new(&inv.vmm.host);
        cmd.args(inv.args_for(false));
        println!("xtask: {}", util::display_cmd(&cmd));
        let err = cmd.exec();
        return Err(err).context(format!("executing {}", inv.vmm.host.display()));
    }
    if vsock {
        println!(
            "xtask: note: /dev/kvm here cannot run Linux, so the VMM runs inside an outer QEMU \
             guest, and the vsock Unix socket is created there, not on this host"
        );
    }
    let mut run = inv.outer_run(true);
    run.timeout = Duration::MAX;
    let outcome = run.run()?;
    match outcome.exit_code {
        Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        None => bail!("the VMM did not report an exit status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest images under `dir`, as `guest::prepare` lays them out.
    fn images(dir: &str) -> GuestImages {
        GuestImages {
            dir: dir.into(),
            vmlinuz: format!("{dir}/vmlinuz").into(),
            initramfs: format!("{dir}/initramfs.cpio.gz").into(),
            outer_base: format!("{dir}/outer/base.cpio").into(),
            kernel_release: "6.1.0-50-cloud-amd64".into(),
            disk: format!("{dir}/disk.ext4").into(),
        }
    }

    #[test]
    fn invocation_paths() {
        let images = images("/w/target/guest");
        let inv = VmmInvocation::new(
            "/w/target/vmm".into(),
            &images,
            &["--cmdline".into(), "console=ttyS0 quiet".into()],
        );
        assert_eq!(
            inv.args_for(false),
            [
                "--kernel",
                "/w/target/guest/vmlinuz",
                "--initrd",
                "/w/target/guest/initramfs.cpio.gz",
                "--cmdline",
                "console=ttyS0 quiet"
            ]
        );
        let run = inv.outer_run(true);
        assert_eq!(
            run.script,
            "taskset -c 1 /tvm/vmm --kernel /tvm/vmlinuz --initrd /tvm/initramfs.cpio.gz --cmdline \
             'console=ttyS0 quiet'\n"
        );
        assert_eq!(run.files.len(), 3);
        assert!(run.interactive);
    }

    #[test]
    fn disks_become_outer_drives() {
        let images = images("/g");
        let extra: Vec<String> = [
            "--disk",
            "a.img",
            "--memory",
            "1G",
            "--disk=/b,readonly=on,id=x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let inv = VmmInvocation::new("/vmm".into(), &images, &extra);
        assert_eq!(
            inv.disks,
            [
                outer::Drive {
                    path: "a.img".into(),
                    read_only: false
                },
                outer::Drive {
                    path: "/b".into(),
                    read_only: true
                },
            ]
        );
        assert_eq!(
            inv.args_for(false)[4..],
            [
                "--disk",
                "a.img",
                "--memory",
                "1G",
                "--disk",
                "/b,readonly=on,id=x"
            ]
        );
        assert_eq!(
            inv.args_for(true)[4..],
            [
                "--disk",
                "/dev/vda",
                "--memory",
                "1G",
                "--disk",
                "/dev/vdb,readonly=on,id=x"
            ]
        );
        assert_eq!(inv.outer_run(false).drives, inv.disks);
        assert!(inv.taps.is_empty());
    }

    #[test]
    fn nets_get_the_tap_helper_and_an_address() {
        let images = images("/g");
        let extra: Vec<String> = ["--net", "tap=tap0,mac=52:54:00:00:00:01"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let inv = VmmInvocation::new("/vmm".into(), &images, &extra);
        assert_eq!(inv.taps, ["tap0"]);
        assert_eq!(
            inv.args_for(true)[4..],
            [
                "--net",
                "tap=tap0,mac=52:54:00:00:00:01",
                "--cmdline",
                NET_CMDLINE
            ]
        );
        let run = inv.outer_run(true);
        assert!(
            run.script.starts_with("sh /tvm/tap-up.sh tap0 &\n"),
            "{}",
            run.script
        );
        assert!(run.files.iter().any(|(_, g)| g == "tap-up.sh"));
        // A command line of the user's own is left alone.
        let extra: Vec<String> = ["--net=tap=t1", "--cmdline", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let inv = VmmInvocation::new("/vmm".into(), &images, &extra);
        assert_eq!(inv.taps, ["t1"]);
        assert_eq!(inv.args_for(false)[4..], ["--net=tap=t1", "--cmdline", "x"]);
    }
}
