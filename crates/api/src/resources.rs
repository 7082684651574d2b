// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The pre-boot resources, and the one place each configuration body is validated and
//! stored (the API handlers and the config file both come through here).

use crate::{
    BootSource, Drive, EntropyDevice, Error, Logger, MachineConfig, MachineConfigUpdate, Metrics,
    NetworkInterface, PartialDrive, PartialNetworkInterface, RateLimiter, Result, Vsock,
};

/// What the microVM is built from: the validated result of every configuration call.
///
/// The VMM maps it to its own configuration in [`crate::VmmActions::start`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmResources {
    machine: MachineConfig,
    boot_source: Option<BootSource>,
    drives: Vec<Drive>,
    network_interfaces: Vec<NetworkInterface>,
    entropy: Option<EntropyDevice>,
    vsock: Option<Vsock>,
    logger: Option<Logger>,
    metrics: Option<Metrics>,
}

impl VmResources {
    /// vCPUs, memory and flags (Firecracker's defaults until configured).
    pub fn machine_config(&self) -> &MachineConfig {
        &self.machine
    }

    /// Number of vCPUs (1 to [`crate::MAX_VCPUS`]).
    pub fn vcpu_count(&self) -> u8 {
        self.machine.vcpu_count
    }

    /// Whether vCPUs come in SMT pairs (then the count is 1 or even).
    pub fn smt(&self) -> bool {
        self.machine.smt
    }

    /// Guest memory in MiB (at least 1).
    pub fn mem_size_mib(&self) -> usize {
        self.machine.mem_size_mib
    }

    /// The boot source, once `PUT /boot-source` succeeded.
    pub fn boot_source(&self) -> Option<&BootSource> {
        self.boot_source.as_ref()
    }

    /// Host path of the kernel image.
    pub fn kernel_image_path(&self) -> Option<&str> {
        self.boot_source
            .as_ref()
            .map(|b| b.kernel_image_path.as_str())
    }

    /// Host path of the initrd.
    pub fn initrd_path(&self) -> Option<&str> {
        self.boot_source.as_ref()?.initrd_path.as_deref()
    }

    /// The user's kernel command line, if given.
    pub fn boot_args(&self) -> Option<&str> {
        self.boot_source.as_ref()?.boot_args.as_deref()
    }

    /// Drives in the order the guest sees them: the root device first (it is `/dev/vda`),
    /// the others in the order they were added. Each has `path_on_host`, `is_read_only` and
    /// `io_engine` set. Rate limiters and `cache_type`/`io_engine` are the VMM's to honour
    /// or refuse in [`crate::VmmActions::start`].
    pub fn drives(&self) -> &[Drive] {
        &self.drives
    }

    /// The root drive, if one is marked `is_root_device`.
    pub fn root_drive(&self) -> Option<&Drive> {
        self.drives.iter().find(|d| d.is_root_device)
    }

    /// Network interfaces in the order they were added (eth0, eth1, ...).
    pub fn network_interfaces(&self) -> &[NetworkInterface] {
        &self.network_interfaces
    }

    /// The vsock device, if configured.
    pub fn vsock(&self) -> Option<&Vsock> {
        self.vsock.as_ref()
    }

    /// The entropy device, if configured.
    pub fn entropy(&self) -> Option<&EntropyDevice> {
        self.entropy.as_ref()
    }

    /// The logger settings accumulated from every `PUT /logger`.
    pub fn logger(&self) -> Option<&Logger> {
        self.logger.as_ref()
    }

    /// The metrics settings.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// The guest kernel command line, as Firecracker builds it: `boot_args` (or
    /// `default_args` when no boot source or no `boot_args` was given), then, when a drive is
    /// the root device, `root=PARTUUID=<partuuid>` or `root=/dev/vda`, then `ro` or `rw`
    /// after its `is_read_only`.
    pub fn kernel_cmdline(&self, default_args: &str) -> String {
        let mut cmdline = self.boot_args().unwrap_or(default_args).to_string();
        if let Some(root) = self.root_drive() {
            let device = match &root.partuuid {
                Some(partuuid) => format!("root=PARTUUID={partuuid}"),
                None => String::from("root=/dev/vda"),
            };
            let mode = if root.read_only() { "ro" } else { "rw" };
            for word in [device.as_str(), mode] {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(word);
            }
        }
        cmdline
    }

    /// `PUT`/`PATCH /machine-config`: all fields are checked before any is stored.
    pub(crate) fn update_machine_config(&mut self, update: &MachineConfigUpdate) -> Result<()> {
        self.machine = self.machine.updated(update)?;
        Ok(())
    }

    /// `PUT /boot-source`: replaces the boot source.
    pub(crate) fn set_boot_source(&mut self, boot_source: BootSource) -> Result<()> {
        boot_source.validate()?;
        self.boot_source = Some(boot_source);
        Ok(())
    }

    /// `PUT /drives/{id}`: adds the drive, or replaces the one with its id in place. At most
    /// one drive is the root device and it is kept first; like Firecracker, a drive that
    /// becomes root swaps places with the first drive.
    pub(crate) fn insert_drive(&mut self, drive: Drive) -> Result<()> {
        let drive = drive.validated()?;
        if drive.is_root_device {
            if let Some(root) = self
                .drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
            {
                return Err(Error::RootDeviceExists(root.drive_id.clone()));
            }
        }
        let is_root = drive.is_root_device;
        match self
            .drives
            .iter()
            .position(|d| d.drive_id == drive.drive_id)
        {
            None if is_root => self.drives.insert(0, drive),
            None => self.drives.push(drive),
            Some(index) => {
                self.drives[index] = drive;
                if is_root {
                    self.drives.swap(0, index);
                }
            }
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds the interface, or replaces the one with its id in
    /// place. Guest MACs and TAP names must be unique.
    pub(crate) fn insert_network_interface(&mut self, iface: NetworkInterface) -> Result<()> {
        let iface = iface.validated()?;
        for other in self
            .network_interfaces
            .iter()
            .filter(|n| n.iface_id != iface.iface_id)
        {
            if let Some(mac) = iface.guest_mac.filter(|mac| other.guest_mac == Some(*mac)) {
                return Err(Error::MacInUse {
                    mac: mac.to_string(),
                    iface: other.iface_id.clone(),
                });
            }
            if other.host_dev_name == iface.host_dev_name {
                return Err(Error::HostDevInUse {
                    name: iface.host_dev_name.clone(),
                    iface: other.iface_id.clone(),
                });
            }
        }
        match self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == iface.iface_id)
        {
            Some(slot) => *slot = iface,
            None => self.network_interfaces.push(iface),
        }
        Ok(())
    }

    /// `PUT /vsock`: adds or replaces the vsock device.
    pub(crate) fn set_vsock(&mut self, vsock: Vsock) -> Result<()> {
        self.vsock = Some(vsock.validated()?);
        Ok(())
    }

    /// `PUT /entropy`: adds or replaces the entropy device.
    pub(crate) fn set_entropy(&mut self, entropy: EntropyDevice) -> Result<()> {
        self.entropy = Some(entropy.validated()?);
        Ok(())
    }

    /// Records the logger settings the VMM applied.
    pub(crate) fn set_logger(&mut self, logger: Logger) {
        self.logger = Some(logger);
    }

    /// Records the metrics settings the VMM applied.
    pub(crate) fn set_metrics(&mut self, metrics: Metrics) {
        self.metrics = Some(metrics);
    }

    /// Checks a drive PATCH before the VMM sees it; returns the normalized new limiter, if
    /// the PATCH has one.
    pub(crate) fn check_drive_patch(&self, patch: &PartialDrive) -> Result<Option<RateLimiter>> {
        crate::validate_id("drive", &patch.drive_id)?;
        let drive = self
            .drives
            .iter()
            .find(|d| d.drive_id == patch.drive_id)
            .ok_or_else(|| Error::DriveNotFound(patch.drive_id.clone()))?;
        if patch.path_on_host.is_none() && patch.rate_limiter.is_none() {
            return Err(Error::EmptyUpdate);
        }
        if let Some(path) = &patch.path_on_host {
            crate::devices::non_empty_path("path_on_host", path)?;
        }
        match &patch.rate_limiter {
            None => Ok(None),
            Some(update) => {
                update.validate("rate_limiter")?;
                Ok(RateLimiter::patched(drive.rate_limiter, update))
            }
        }
    }

    /// Records a drive PATCH the VMM applied (checked with [`Self::check_drive_patch`]).
    pub(crate) fn apply_drive_patch(&mut self, patch: &PartialDrive) {
        if let Some(drive) = self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == patch.drive_id)
        {
            if let Some(path) = &patch.path_on_host {
                drive.path_on_host = Some(path.clone());
            }
            if let Some(update) = &patch.rate_limiter {
                drive.rate_limiter = RateLimiter::patched(drive.rate_limiter, update);
            }
        }
    }

    /// Checks a network interface PATCH before the VMM sees it.
    pub(crate) fn check_network_interface_patch(
        &self,
        patch: &PartialNetworkInterface,
    ) -> Result<()> {
        crate::validate_id("network interface", &patch.iface_id)?;
        if !self
            .network_interfaces
            .iter()
            .any(|n| n.iface_id == patch.iface_id)
        {
            return Err(Error::NetworkInterfaceNotFound(patch.iface_id.clone()));
        }
        if let Some(rx) = &patch.rx_rate_limiter {
            rx.validate("rx_rate_limiter")?;
        }
        if let Some(tx) = &patch.tx_rate_limiter {
            tx.validate("tx_rate_limiter")?;
        }
        Ok(())
    }

    /// Records a network interface PATCH the VMM applied.
    pub(crate) fn apply_network_interface_patch(&mut self, patch: &PartialNetworkInterface) {
        if let Some(iface) = self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == patch.iface_id)
        {
            if let Some(rx) = &patch.rx_rate_limiter {
                iface.rx_rate_limiter = RateLimiter::patched(iface.rx_rate_limiter, rx);
            }
            if let Some(tx) = &patch.tx_rate_limiter {
                iface.tx_rate_limiter = RateLimiter::patched(iface.tx_rate_limiter, tx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenBucket;

    fn drive(id: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            partuuid: None,
            is_root_device: root,
            cache_type: Default::default(),
            is_read_only: None,
            path_on_host: Some(format!("/img/{id}")),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }

    fn ids(r: &VmResources) -> Vec<&str> {
        r.drives().iter().map(|d| d.drive_id.as_str()).collect()
    }

    #[test]
    fn root_drive_goes_first() {
        let mut r = VmResources::default();
        r.insert_drive(drive("a", false)).unwrap();
        r.insert_drive(drive("b", false)).unwrap();
        r.insert_drive(drive("root", true)).unwrap();
        assert_eq!(ids(&r), ["root", "a", "b"]);
        assert_eq!(r.root_drive().unwrap().drive_id, "root");
    }

    #[test]
    fn only_one_root_drive() {
        let mut r = VmResources::default();
        r.insert_drive(drive("root", true)).unwrap();
        let err = r.insert_drive(drive("other", true)).unwrap_err();
        assert!(
            matches!(err, Error::RootDeviceExists(ref id) if id == "root"),
            "{err}"
        );
        assert_eq!(ids(&r), ["root"], "a refused drive is not added");
        // Updating the root drive itself is fine.
        let mut again = drive("root", true);
        again.is_read_only = Some(true);
        r.insert_drive(again).unwrap();
        assert!(r.drives()[0].read_only());
    }

    #[test]
    fn updates_replace_in_place_and_a_new_root_swaps_with_the_first() {
        let mut r = VmResources::default();
        for id in ["a", "b", "c"] {
            r.insert_drive(drive(id, false)).unwrap();
        }
        let mut b = drive("b", false);
        b.path_on_host = Some("/new".into());
        r.insert_drive(b).unwrap();
        assert_eq!(ids(&r), ["a", "b", "c"]);
        assert_eq!(r.drives()[1].path(), "/new");
        r.insert_drive(drive("c", true)).unwrap();
        assert_eq!(
            ids(&r),
            ["c", "b", "a"],
            "Firecracker swaps the new root with index 0"
        );
        // The root drive may be demoted; it keeps its place.
        r.insert_drive(drive("c", false)).unwrap();
        assert_eq!(ids(&r), ["c", "b", "a"]);
        assert!(r.root_drive().is_none());
        r.insert_drive(drive("a", true)).unwrap();
        assert_eq!(ids(&r), ["a", "b", "c"]);
    }

    #[test]
    fn kernel_cmdline_without_root_drive_is_the_args() {
        let mut r = VmResources::default();
        assert_eq!(r.kernel_cmdline("console=ttyS0"), "console=ttyS0");
        r.insert_drive(drive("data", false)).unwrap();
        assert_eq!(r.kernel_cmdline("console=ttyS0"), "console=ttyS0");
        r.set_boot_source(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("quiet".into()),
        })
        .unwrap();
        assert_eq!(
            r.kernel_cmdline("console=ttyS0"),
            "quiet",
            "boot_args replace the default"
        );
    }

    #[test]
    fn kernel_cmdline_root_device() {
        let mut r = VmResources::default();
        r.insert_drive(drive("root", true)).unwrap();
        assert_eq!(
            r.kernel_cmdline("console=ttyS0"),
            "console=ttyS0 root=/dev/vda rw"
        );

        let mut ro = drive("root", true);
        ro.is_read_only = Some(true);
        r.insert_drive(ro.clone()).unwrap();
        assert_eq!(
            r.kernel_cmdline("console=ttyS0"),
            "console=ttyS0 root=/dev/vda ro"
        );

        ro.partuuid = Some("0eaa91a0-01".into());
        r.insert_drive(ro).unwrap();
        assert_eq!(
            r.kernel_cmdline("console=ttyS0"),
            "console=ttyS0 root=PARTUUID=0eaa91a0-01 ro"
        );
    }

    #[test]
    fn kernel_cmdline_empty_boot_args_are_kept_empty() {
        let mut r = VmResources::default();
        r.set_boot_source(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some(String::new()),
        })
        .unwrap();
        assert_eq!(
            r.kernel_cmdline("console=ttyS0"),
            "",
            "Some(\"\") is not the default"
        );
        r.insert_drive(drive("root", true)).unwrap();
        assert_eq!(r.kernel_cmdline("console=ttyS0"), "root=/dev/vda rw");
    }

    #[test]
    fn partuuid_is_ignored_for_non_root_drives() {
        let mut r = VmResources::default();
        let mut d = drive("data", false);
        d.partuuid = Some("1234".into());
        r.insert_drive(d).unwrap();
        r.insert_drive(drive("root", true)).unwrap();
        assert_eq!(r.kernel_cmdline(""), "root=/dev/vda rw");
    }

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterface {
        NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(|m| m.parse().unwrap()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mtu: None,
        }
    }

    #[test]
    fn network_interfaces_keep_their_order_and_unique_macs_and_taps() {
        let mut r = VmResources::default();
        r.insert_network_interface(iface("eth0", "tap0", Some("06:00:00:00:00:01")))
            .unwrap();
        r.insert_network_interface(iface("eth1", "tap1", None))
            .unwrap();
        // Replacing eth0 keeps it first.
        r.insert_network_interface(iface("eth0", "tap2", Some("06:00:00:00:00:01")))
            .unwrap();
        let names: Vec<_> = r
            .network_interfaces()
            .iter()
            .map(|n| (n.iface_id.as_str(), n.host_dev_name.as_str()))
            .collect();
        assert_eq!(names, [("eth0", "tap2"), ("eth1", "tap1")]);

        let err = r
            .insert_network_interface(iface("eth2", "tap3", Some("06:00:00:00:00:01")))
            .unwrap_err();
        assert!(
            matches!(err, Error::MacInUse { ref iface, .. } if iface == "eth0"),
            "{err}"
        );
        assert!(err.to_string().contains("06:00:00:00:00:01"), "{err}");
        let err = r
            .insert_network_interface(iface("eth2", "tap1", None))
            .unwrap_err();
        assert!(
            matches!(err, Error::HostDevInUse { ref iface, .. } if iface == "eth1"),
            "{err}"
        );
        assert_eq!(r.network_interfaces().len(), 2);
    }

    #[test]
    fn drive_patch_checks_and_merges() {
        let mut r = VmResources::default();
        r.insert_drive(drive("a", false)).unwrap();
        let patch = |path: Option<&str>, rl: Option<RateLimiter>| PartialDrive {
            drive_id: "a".into(),
            path_on_host: path.map(String::from),
            rate_limiter: rl,
        };
        assert!(matches!(
            r.check_drive_patch(&patch(None, None)),
            Err(Error::EmptyUpdate)
        ));
        assert!(matches!(
            r.check_drive_patch(&patch(Some(""), None)),
            Err(Error::EmptyPath("path_on_host"))
        ));
        let missing = PartialDrive {
            drive_id: "b".into(),
            ..patch(Some("/x"), None)
        };
        assert!(matches!(
            r.check_drive_patch(&missing),
            Err(Error::DriveNotFound(_))
        ));
        let bucket = TokenBucket {
            size: 10,
            one_time_burst: None,
            refill_time: 10,
        };
        let rl = RateLimiter {
            bandwidth: Some(bucket),
            ops: None,
        };
        let p = patch(Some("/new"), Some(rl));
        assert_eq!(r.check_drive_patch(&p).unwrap(), Some(rl));
        r.apply_drive_patch(&p);
        assert_eq!(r.drives()[0].path(), "/new");
        assert_eq!(r.drives()[0].rate_limiter, Some(rl));
    }
}
