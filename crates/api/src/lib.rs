// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A model of Firecracker's REST API, so that clients written for Firecracker (its Go and
//! Python SDKs, firecracker-containerd) can drive this VMM unchanged.
//!
//! The crate does no I/O: no sockets, no files, no KVM. It has three parts:
//!
//! - the request and response bodies of Firecracker's OpenAPI file as serde types
//!   ([`MachineConfig`], [`Drive`], [`NetworkInterface`], [`FullVmConfig`], ...), rejecting
//!   unknown fields where Firecracker does;
//! - routing, [`parse_request`]: an HTTP method, path and body to an [`ApiRequest`], or an
//!   [`ApiError`] (status and `fault_message`);
//! - the state machine, [`Controller`]: it validates and stores the pre-boot configuration
//!   in [`VmResources`], tracks not started / running / paused, and asks the VMM to act
//!   through the [`VmmActions`] trait. The config file path ([`Controller::from_config`])
//!   goes through the same code as the PUT endpoints.
//!
//! What it does not do: open the kernel, disk images, TAP devices or log files (the VMM
//! does, in [`VmmActions`]), and the endpoints this VMM lacks (balloon, MMDS, snapshots,
//! pmem, cpu-config, serial, memory hotplug), which answer 400 "... is not supported by
//! this VMM yet".
//!
//! Differences from Firecracker, on purpose: an unknown path is 404 and a wrong method 405
//! (Firecracker answers 400 for both); a query string is ignored (Firecracker treats it as
//! part of the path); up to [`MAX_VCPUS`] vCPUs instead of 32; ids are at most
//! [`MAX_ID_LEN`] ASCII characters; guest MACs must be unicast; fault messages start in
//! lowercase but keep Firecracker's wording for the pre-/post-boot refusals.
//!
//! # Example
//!
//! ```
//! use tvm_api::{
//!     parse_request, Controller, ControllerConfig, Logger, Metrics, RateLimiter, VmResources,
//!     VmmActions,
//! };
//!
//! struct Vmm;
//! impl VmmActions for Vmm {
//!     fn start(&mut self, r: &VmResources) -> Result<(), String> {
//!         assert_eq!(r.kernel_cmdline("console=ttyS0"), "console=ttyS0 root=/dev/vda rw");
//!         Ok(())
//!     }
//!     fn pause(&mut self) -> Result<(), String> { Ok(()) }
//!     fn resume(&mut self) -> Result<(), String> { Ok(()) }
//!     fn send_ctrl_alt_del(&mut self) -> Result<(), String> { Ok(()) }
//!     fn flush_metrics(&mut self) -> Result<(), String> { Ok(()) }
//!     fn update_drive_path(&mut self, _: &str, _: &str) -> Result<(), String> { Ok(()) }
//!     fn update_drive_rate_limiter(&mut self, _: &str, _: Option<&RateLimiter>)
//!         -> Result<(), String> { Err("rate limiting is not supported".into()) }
//!     fn update_net_rate_limiters(&mut self, _: &str, _: Option<&RateLimiter>,
//!         _: Option<&RateLimiter>) -> Result<(), String> { Err("not supported".into()) }
//!     fn apply_logger(&mut self, _: &Logger) -> Result<(), String> { Ok(()) }
//!     fn apply_metrics(&mut self, _: &Metrics) -> Result<(), String> { Ok(()) }
//! }
//!
//! let mut api = Controller::new(ControllerConfig::default());
//! let mut vmm = Vmm;
//! for (method, path, body) in [
//!     ("PUT", "/boot-source", r#"{"kernel_image_path": "/vmlinux"}"#),
//!     ("PUT", "/drives/rootfs",
//!      r#"{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true}"#),
//!     ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
//! ] {
//!     let request = parse_request(method, path, body.as_bytes()).unwrap();
//!     assert_eq!(api.handle(request, &mut vmm).status, 204);
//! }
//! let get = parse_request("GET", "/", b"").unwrap();
//! assert!(api.handle(get, &mut vmm).body.unwrap().contains("\"Running\""));
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod bodies;
mod config;
mod controller;
mod devices;
mod error;
mod machine;
mod metrics;
mod request;
mod resources;
mod snapshot;

pub use bodies::{
    ActionType, BootSource, FirecrackerVersion, InstanceActionInfo, InstanceInfo, InstanceState,
    LogLevel, Logger, Metrics, Vm, VmState,
};
pub use config::FullVmConfig;
pub use controller::{Controller, ControllerConfig, Response, VmmActions};
pub use devices::{
    validate_id, CacheType, Drive, EntropyDevice, IoEngine, MacAddr, NetworkInterface,
    PartialDrive, PartialNetworkInterface, RateLimiter, TokenBucket, Vsock, MAX_HOST_DEV_NAME_LEN,
    MAX_ID_LEN, MAX_REFILL_TIME_MS, MIN_GUEST_CID,
};
pub use error::{ApiError, Error, FaultMessage, Result};
pub use machine::{
    CpuTemplate, HugePages, MachineConfig, MachineConfigUpdate, DEFAULT_MEM_SIZE_MIB,
    DEFAULT_VCPU_COUNT, MAX_MEM_SIZE_MIB, MAX_VCPUS,
};
pub use metrics::{add_total, MetricSections, MetricsLog};
pub use request::{allowed_methods, parse_request, ApiRequest};
pub use resources::VmResources;
pub use snapshot::{
    MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VsockOverride,
};
