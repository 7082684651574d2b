// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The smaller request and response bodies: boot source, logger, metrics, actions, VM state,
//! instance information and version.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::devices::non_empty_path;
use crate::Result;

/// Body of `PUT /boot-source`; the config file's `boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image.
    pub kernel_image_path: String,
    /// Host path of the initrd, if any.
    pub initrd_path: Option<String>,
    /// Kernel command line; the VMM's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    pub(crate) fn validate(&self) -> Result<()> {
        non_empty_path("kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            non_empty_path("initrd_path", initrd)?;
        }
        Ok(())
    }
}

/// A log level. Parsing ignores case and accepts `Warn` for `Warning`, as Firecracker does;
/// it prints with the OpenAPI spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Informational messages and above (Firecracker's default).
    Info,
    /// Debug messages and above.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
            LogLevel::Off => "Off",
        }
    }

    fn parse(text: &str) -> Option<LogLevel> {
        Some(match text.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => return None,
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        LogLevel::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid log level {text:?}: use Error, Warning, Info, Debug, Trace or Off"
            ))
        })
    }
}

/// Body of `PUT /logger`; the config file's `logger`. Absent fields keep their value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Named pipe or file for the log output.
    pub log_path: Option<String>,
    /// Level filter (Firecracker's default is `Info`).
    pub level: Option<LogLevel>,
    /// Whether each line shows its level.
    pub show_level: Option<bool>,
    /// Whether each line shows its source file and line.
    pub show_log_origin: Option<bool>,
    /// Only log messages from this module path.
    pub module: Option<String>,
}

impl Logger {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(path) = &self.log_path {
            non_empty_path("log_path", path)?;
        }
        Ok(())
    }

    /// `self` with the fields given in `update` replaced.
    pub(crate) fn merged(&self, update: &Logger) -> Logger {
        Logger {
            log_path: update.log_path.clone().or_else(|| self.log_path.clone()),
            level: update.level.or(self.level),
            show_level: update.show_level.or(self.show_level),
            show_log_origin: update.show_log_origin.or(self.show_log_origin),
            module: update.module.clone().or_else(|| self.module.clone()),
        }
    }
}

/// Body of `PUT /metrics`; the config file's `metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Named pipe or file the JSON metrics are flushed to.
    pub metrics_path: String,
}

impl Metrics {
    pub(crate) fn validate(&self) -> Result<()> {
        non_empty_path("metrics_path", &self.metrics_path)
    }
}

/// The synchronous actions of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the microVM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
}

/// Body of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// The state `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Let the vCPUs run again.
    Resumed,
}

/// Body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The desired state.
    pub state: VmState,
}

/// The microVM's lifecycle state as `GET /` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Being configured; `InstanceStart` not yet accepted.
    #[default]
    #[serde(rename = "Not started")]
    NotStarted,
    /// Booted, vCPUs running.
    Running,
    /// Booted, vCPUs paused.
    Paused,
}

/// Body of `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// MicroVM / instance id.
    pub id: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// VMM build version.
    pub vmm_version: String,
    /// Application name.
    pub app_name: String,
}

/// Body of `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// The VMM's version (the field keeps Firecracker's name).
    pub firecracker_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn boot_source_shape() {
        let b: BootSource = serde_json::from_str(
            r#"{"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "console=ttyS0"}"#,
        )
        .unwrap();
        assert_eq!(b.initrd_path.as_deref(), Some("/initrd"));
        assert_eq!(b.boot_args.as_deref(), Some("console=ttyS0"));
        let b: BootSource = serde_json::from_str(r#"{"kernel_image_path": "/vmlinux"}"#).unwrap();
        assert_eq!((b.initrd_path, b.boot_args), (None, None));
        assert!(serde_json::from_str::<BootSource>(r#"{"boot_args": "x"}"#).is_err());
        assert!(serde_json::from_str::<BootSource>(
            r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#
        )
        .is_err());
    }

    #[test]
    fn boot_source_paths_must_not_be_empty() {
        let mut b = BootSource {
            kernel_image_path: String::new(),
            initrd_path: None,
            boot_args: None,
        };
        assert!(matches!(
            b.validate(),
            Err(Error::EmptyPath("kernel_image_path"))
        ));
        b.kernel_image_path = "/k".into();
        b.initrd_path = Some(String::new());
        assert!(matches!(b.validate(), Err(Error::EmptyPath("initrd_path"))));
        b.initrd_path = None;
        b.validate().unwrap();
    }

    #[test]
    fn log_levels_accept_firecrackers_spellings() {
        for (text, level) in [
            ("Error", LogLevel::Error),
            ("Warning", LogLevel::Warning),
            ("warn", LogLevel::Warning),
            ("WARN", LogLevel::Warning),
            ("Info", LogLevel::Info),
            ("DEBUG", LogLevel::Debug),
            ("trace", LogLevel::Trace),
            ("Off", LogLevel::Off),
        ] {
            let parsed: LogLevel = serde_json::from_str(&format!("{text:?}")).unwrap();
            assert_eq!(parsed, level, "{text}");
        }
        let err = serde_json::from_str::<LogLevel>("\"verbose\"").unwrap_err();
        assert!(err.to_string().contains("invalid log level"), "{err}");
        assert_eq!(
            serde_json::to_string(&LogLevel::Warning).unwrap(),
            "\"Warning\""
        );
        assert_eq!(LogLevel::Warning.to_level_filter(), log::LevelFilter::Warn);
        assert_eq!(LogLevel::Off.to_level_filter(), log::LevelFilter::Off);
    }

    #[test]
    fn logger_shape_and_merge() {
        let l: Logger = serde_json::from_str(
            r#"{"log_path": "/log", "level": "Warning", "show_level": true,
                "show_log_origin": false, "module": "api_server::request"}"#,
        )
        .unwrap();
        assert_eq!(l.level, Some(LogLevel::Warning));
        assert_eq!(
            serde_json::from_str::<Logger>("{}").unwrap(),
            Logger::default()
        );
        assert!(serde_json::from_str::<Logger>(r#"{"log_fifo": "/x"}"#).is_err());
        let merged = l.merged(&Logger {
            level: Some(LogLevel::Debug),
            ..Logger::default()
        });
        assert_eq!(merged.level, Some(LogLevel::Debug));
        assert_eq!(merged.log_path.as_deref(), Some("/log"));
        assert_eq!(merged.module.as_deref(), Some("api_server::request"));
        assert!(matches!(
            Logger {
                log_path: Some(String::new()),
                ..Logger::default()
            }
            .validate(),
            Err(Error::EmptyPath("log_path"))
        ));
    }

    #[test]
    fn metrics_shape() {
        let m: Metrics = serde_json::from_str(r#"{"metrics_path": "/m"}"#).unwrap();
        m.validate().unwrap();
        assert!(serde_json::from_str::<Metrics>("{}").is_err());
        assert!(serde_json::from_str::<Metrics>(r#"{"metrics_path": "/m", "x": 1}"#).is_err());
        assert!(Metrics {
            metrics_path: String::new()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn actions_and_vm_state() {
        for (text, action) in [
            ("FlushMetrics", ActionType::FlushMetrics),
            ("InstanceStart", ActionType::InstanceStart),
            ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
        ] {
            let a: InstanceActionInfo =
                serde_json::from_str(&format!(r#"{{"action_type": "{text}"}}"#)).unwrap();
            assert_eq!(a.action_type, action);
        }
        assert!(
            serde_json::from_str::<InstanceActionInfo>(r#"{"action_type": "Reboot"}"#).is_err()
        );
        assert!(serde_json::from_str::<InstanceActionInfo>(
            r#"{"action_type": "InstanceStart", "payload": 1}"#
        )
        .is_err());
        let v: Vm = serde_json::from_str(r#"{"state": "Paused"}"#).unwrap();
        assert_eq!(v.state, VmState::Paused);
        let v: Vm = serde_json::from_str(r#"{"state": "Resumed"}"#).unwrap();
        assert_eq!(v.state, VmState::Resumed);
        assert!(serde_json::from_str::<Vm>(r#"{"state": "Running"}"#).is_err());
        assert!(serde_json::from_str::<Vm>(r#"{"invalid": "Paused"}"#).is_err());
    }

    #[test]
    fn instance_info_spells_states_like_firecracker() {
        let info = InstanceInfo {
            id: "anonymous-instance".into(),
            state: InstanceState::NotStarted,
            vmm_version: "1.0.0".into(),
            app_name: "tvm".into(),
        };
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(
            text,
            r#"{"id":"anonymous-instance","state":"Not started","vmm_version":"1.0.0","app_name":"tvm"}"#
        );
        for (state, name) in [
            (InstanceState::Running, "\"Running\""),
            (InstanceState::Paused, "\"Paused\""),
        ] {
            assert_eq!(serde_json::to_string(&state).unwrap(), name);
        }
        let v = FirecrackerVersion {
            firecracker_version: "1.2.3".into(),
        };
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"firecracker_version":"1.2.3"}"#
        );
    }
}
