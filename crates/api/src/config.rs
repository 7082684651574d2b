// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `GET /vm/config` and `--config-file`: the whole configuration as one JSON document.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    BootSource, Drive, EntropyDevice, Error, Logger, MachineConfig, Metrics, NetworkInterface,
    Result, Vsock,
};

/// The JSON of `GET /vm/config` and of Firecracker's `--config-file`.
///
/// Every section may be absent. The sections Firecracker has and this VMM does not
/// (`balloon`, `cpu-config`, `memory-hotplug`, `mmds-config`, `pmem`, `serial`) are
/// kept as raw JSON: absent, `null` (and an empty `pmem` list) are accepted, anything else is
/// refused by [`FullVmConfig::check_supported`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    /// Balloon device (not supported).
    #[serde(default)]
    pub balloon: Option<Value>,
    /// Block devices, root first.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Kernel, initrd and command line.
    #[serde(default, rename = "boot-source")]
    pub boot_source: Option<BootSource>,
    /// Custom CPU template (not supported).
    #[serde(default, rename = "cpu-config")]
    pub cpu_config: Option<Value>,
    /// Logger.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// vCPUs and memory.
    #[serde(default, rename = "machine-config")]
    pub machine_config: Option<MachineConfig>,
    /// Metrics.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Hotpluggable memory (not supported).
    #[serde(default, rename = "memory-hotplug")]
    pub memory_hotplug: Option<Value>,
    /// MMDS (not supported).
    #[serde(default, rename = "mmds-config")]
    pub mmds_config: Option<Value>,
    /// Network interfaces, in guest order.
    #[serde(default, rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    /// virtio-pmem devices (not supported; `[]` accepted).
    #[serde(default)]
    pub pmem: Option<Vec<Value>>,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// Entropy device.
    #[serde(default)]
    pub entropy: Option<EntropyDevice>,
    /// Serial console output (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Value>,
}

impl FullVmConfig {
    /// Parses a config file. The sections are validated when applied
    /// ([`crate::Controller::from_config`]).
    pub fn from_json(text: &str) -> Result<FullVmConfig> {
        serde_json::from_str(text).map_err(Error::ParseJson)
    }

    /// Refuses the sections this VMM does not implement yet.
    pub fn check_supported(&self) -> Result<()> {
        let raw = [
            ("balloon", &self.balloon),
            ("cpu-config", &self.cpu_config),
            ("memory-hotplug", &self.memory_hotplug),
            ("mmds-config", &self.mmds_config),
            ("serial", &self.serial),
        ];
        if let Some((key, _)) = raw.iter().find(|(_, value)| value.is_some()) {
            return Err(Error::ConfigKeyNotSupported(key));
        }
        if self.pmem.as_ref().is_some_and(|list| !list.is_empty()) {
            return Err(Error::ConfigKeyNotSupported("pmem"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_document_is_a_default_config() {
        let cfg = FullVmConfig::from_json("{}").unwrap();
        assert_eq!(cfg, FullVmConfig::default());
        cfg.check_supported().unwrap();
    }

    #[test]
    fn firecracker_keys_parse() {
        let cfg = FullVmConfig::from_json(
            r#"{
              "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
                          "is_root_device": true, "is_read_only": false}],
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024},
              "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                      "guest_mac": "06:00:ac:10:00:02"}],
              "logger": {"level": "Info"},
              "metrics": {"metrics_path": "/metrics"},
              "entropy": {},
              "balloon": null, "vsock": null, "mmds-config": null, "cpu-config": null,
              "memory-hotplug": null, "pmem": []
            }"#,
        )
        .unwrap();
        assert_eq!(cfg.drives.len(), 1);
        assert_eq!(cfg.network_interfaces[0].iface_id, "eth0");
        assert_eq!(cfg.machine_config.as_ref().unwrap().vcpu_count, 2);
        assert!(cfg.entropy.is_some());
        cfg.check_supported().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = FullVmConfig::from_json(r#"{"machine_config": {}}"#).unwrap_err();
        assert!(matches!(err, Error::ParseJson(_)), "{err}");
        let api = crate::ApiError::from(err);
        assert!(
            api.fault_message.contains("machine_config"),
            "{}",
            api.fault_message
        );
    }

    #[test]
    fn unsupported_sections_are_refused_by_name() {
        for (key, value) in [
            ("balloon", r#"{"amount_mib": 0, "deflate_on_oom": false}"#),
            ("mmds-config", r#"{"network_interfaces": ["eth0"]}"#),
            ("cpu-config", r#"{"kvm_capabilities": []}"#),
            ("memory-hotplug", r#"{"total_size_mib": 1024}"#),
            ("pmem", r#"[{"id": "p", "path_on_host": "/p"}]"#),
            ("serial", r#"{"serial_out_path": "/s"}"#),
        ] {
            let cfg = FullVmConfig::from_json(&format!(r#"{{"{key}": {value}}}"#)).unwrap();
            let err = cfg.check_supported().unwrap_err();
            assert!(
                matches!(err, Error::ConfigKeyNotSupported(k) if k == key),
                "{key}: {err}"
            );
            assert!(
                err.to_string().contains("is not supported by this VMM yet"),
                "{err}"
            );
        }
    }
}
