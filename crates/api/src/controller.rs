// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The state machine: which request is allowed when, what it changes, and what the VMM is
//! asked to do.

use log::{info, warn};
use serde::Serialize;

use crate::{
    ActionType, ApiError, ApiRequest, BootSource, Drive, EntropyDevice, Error, FirecrackerVersion,
    FullVmConfig, InstanceInfo, InstanceState, Logger, MachineConfig, MachineConfigUpdate, Metrics,
    NetworkInterface, PartialDrive, PartialNetworkInterface, RateLimiter, Result,
    SnapshotCreateParams, SnapshotLoadParams, VmResources, VmState, Vsock,
};

/// What the VMM does when the API asks. Each method returns `Err(explanation)` when it cannot
/// do it; the explanation becomes a 400 `fault_message`.
///
/// The controller calls a method only in a state that allows it (see [`Controller::handle`])
/// and records the change only when the method succeeds.
pub trait VmmActions {
    /// Builds and boots the microVM from `resources` (`InstanceStart`). On success the
    /// microVM is running.
    fn start(&mut self, resources: &VmResources) -> std::result::Result<(), String>;
    /// Pauses the vCPUs (`PATCH /vm {"state": "Paused"}` while running).
    fn pause(&mut self) -> std::result::Result<(), String>;
    /// Resumes the vCPUs (`PATCH /vm {"state": "Resumed"}` while paused).
    fn resume(&mut self) -> std::result::Result<(), String>;
    /// Injects Ctrl+Alt+Del through the i8042 keyboard controller.
    fn send_ctrl_alt_del(&mut self) -> std::result::Result<(), String>;
    /// Writes the metrics now (`FlushMetrics`).
    fn flush_metrics(&mut self) -> std::result::Result<(), String>;
    /// Points a running drive at a new host file (`PATCH /drives/{id}` with
    /// `path_on_host`).
    fn update_drive_path(
        &mut self,
        drive_id: &str,
        path_on_host: &str,
    ) -> std::result::Result<(), String>;
    /// Applies a running drive's new rate limiter (`PATCH /drives/{id}` with
    /// `rate_limiter`); `None` removes every limit.
    fn update_drive_rate_limiter(
        &mut self,
        drive_id: &str,
        rate_limiter: Option<&RateLimiter>,
    ) -> std::result::Result<(), String>;
    /// Applies a running interface's new rate limiters (`PATCH /network-interfaces/{id}`);
    /// each is the interface's full limiter after the patch, `None` for no limit.
    fn update_net_rate_limiters(
        &mut self,
        iface_id: &str,
        rx: Option<&RateLimiter>,
        tx: Option<&RateLimiter>,
    ) -> std::result::Result<(), String>;
    /// Applies the logger settings (`PUT /logger`): the fields of every earlier call merged
    /// with this one's.
    fn apply_logger(&mut self, logger: &Logger) -> std::result::Result<(), String>;
    /// Opens the metrics output (`PUT /metrics`, once).
    fn apply_metrics(&mut self, metrics: &Metrics) -> std::result::Result<(), String>;
    /// Writes a snapshot of the paused microVM (`PUT /snapshot/create`).
    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
    ) -> std::result::Result<(), String> {
        let _ = params;
        Err("snapshots are not supported".into())
    }
    /// Builds the microVM a snapshot saved (`PUT /snapshot/load`) and resumes it if asked;
    /// returns its machine configuration.
    fn load_snapshot(
        &mut self,
        params: &SnapshotLoadParams,
    ) -> std::result::Result<MachineConfig, String> {
        let _ = params;
        Err("snapshots are not supported".into())
    }
}

/// The answer to one API call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status: 200 with a body, 204 without, or an error status with a fault message.
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<String>,
}

impl Response {
    fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
        }
    }

    fn json<T: Serialize>(value: &T) -> Result<Response> {
        let body = serde_json::to_string(value).map_err(Error::SerializeResponse)?;
        Ok(Response {
            status: 200,
            body: Some(body),
        })
    }
}

impl From<ApiError> for Response {
    fn from(err: ApiError) -> Response {
        Response {
            status: err.status,
            body: Some(err.to_json()),
        }
    }
}

/// Who the instance is, for `GET /` and `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Instance id (Firecracker's `--id`; default `anonymous-instance`).
    pub instance_id: String,
    /// Application name reported by `GET /`.
    pub app_name: String,
    /// Version reported by `GET /` and `GET /version`.
    pub vmm_version: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            instance_id: String::from("anonymous-instance"),
            app_name: String::from("tvm"),
            vmm_version: String::from(env!("CARGO_PKG_VERSION")),
        }
    }
}

/// The API's state machine: pre-boot resources and the microVM's lifecycle state.
///
/// Before `InstanceStart` the configuration endpoints fill [`VmResources`]; after it they
/// are refused, and the runtime ones (pause/resume, drive and interface PATCH, flush,
/// Ctrl+Alt+Del) are allowed, as in Firecracker.
#[derive(Clone, Debug)]
pub struct Controller {
    config: ControllerConfig,
    state: InstanceState,
    resources: VmResources,
}

type Handled = Result<Response>;

impl Controller {
    /// A controller with Firecracker's default resources (1 vCPU, 128 MiB, nothing else).
    pub fn new(config: ControllerConfig) -> Controller {
        Controller {
            config,
            state: InstanceState::NotStarted,
            resources: VmResources::default(),
        }
    }

    /// A controller configured from a config file, each section going through the same code
    /// as its PUT endpoint, in Firecracker's order: logger, metrics, machine-config,
    /// boot-source, drives, network-interfaces, entropy. The microVM is not started; call
    /// [`Controller::start`].
    ///
    /// # Errors
    ///
    /// The first section that the matching PUT would refuse, or an unsupported section.
    /// Nothing reaches the VMM when an unsupported section is present.
    pub fn from_config(
        config: ControllerConfig,
        vm_config: FullVmConfig,
        vmm: &mut dyn VmmActions,
    ) -> Result<Controller> {
        vm_config.check_supported()?;
        let mut controller = Controller::new(config);
        if let Some(logger) = vm_config.logger {
            controller.put_logger(logger, vmm)?;
        }
        if let Some(metrics) = vm_config.metrics {
            controller.put_metrics(metrics, vmm)?;
        }
        if let Some(machine) = vm_config.machine_config {
            controller.update_machine_config(&MachineConfigUpdate::from(machine))?;
        }
        if let Some(boot_source) = vm_config.boot_source {
            controller.put_boot_source(boot_source)?;
        }
        for drive in vm_config.drives {
            controller.put_drive(drive)?;
        }
        for iface in vm_config.network_interfaces {
            controller.put_network_interface(iface)?;
        }
        if let Some(entropy) = vm_config.entropy {
            controller.put_entropy(entropy)?;
        }
        if let Some(vsock) = vm_config.vsock {
            controller.put_vsock(vsock)?;
        }
        Ok(controller)
    }

    /// The lifecycle state.
    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// The configured resources.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// What `GET /` answers.
    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.config.instance_id.clone(),
            state: self.state,
            vmm_version: self.config.vmm_version.clone(),
            app_name: self.config.app_name.clone(),
        }
    }

    /// What `GET /vm/config` answers: a document [`Controller::from_config`] turns back into
    /// the same resources.
    pub fn vm_config(&self) -> FullVmConfig {
        let r = &self.resources;
        FullVmConfig {
            drives: r.drives().to_vec(),
            boot_source: r.boot_source().cloned(),
            logger: r.logger().cloned(),
            machine_config: Some(r.machine_config().clone()),
            metrics: r.metrics().cloned(),
            network_interfaces: r.network_interfaces().to_vec(),
            pmem: Some(Vec::new()),
            entropy: r.entropy().cloned(),
            vsock: r.vsock().cloned(),
            ..FullVmConfig::default()
        }
    }

    /// Handles one request; never panics, every failure is an error response.
    ///
    /// | request | not started | running / paused |
    /// |---|---|---|
    /// | GETs | yes | yes |
    /// | PUT/PATCH machine-config, PUT boot-source, drives, network-interfaces, entropy, vsock, logger, metrics | yes | refused |
    /// | InstanceStart | yes | refused |
    /// | PATCH drives, network-interfaces, vm; FlushMetrics, SendCtrlAltDel | refused | yes |
    pub fn handle(&mut self, request: ApiRequest, vmm: &mut dyn VmmActions) -> Response {
        match self.dispatch(request, vmm) {
            Ok(response) => response,
            Err(err) => {
                let err = ApiError::from(err);
                warn!("api request failed: {err}");
                Response::from(err)
            }
        }
    }

    fn dispatch(&mut self, request: ApiRequest, vmm: &mut dyn VmmActions) -> Handled {
        match request {
            ApiRequest::GetInstanceInfo => Response::json(&self.instance_info()),
            ApiRequest::GetVersion => Response::json(&FirecrackerVersion {
                firecracker_version: self.config.vmm_version.clone(),
            }),
            ApiRequest::GetMachineConfig => Response::json(self.resources.machine_config()),
            ApiRequest::GetVmConfig => Response::json(&self.vm_config()),
            ApiRequest::PutMachineConfig(cfg) => {
                done(self.update_machine_config(&MachineConfigUpdate::from(cfg)))
            }
            ApiRequest::PatchMachineConfig(update) => done(self.update_machine_config(&update)),
            ApiRequest::PutBootSource(boot_source) => done(self.put_boot_source(boot_source)),
            ApiRequest::PutDrive(drive) => done(self.put_drive(drive)),
            ApiRequest::PutNetworkInterface(iface) => done(self.put_network_interface(iface)),
            ApiRequest::PutEntropy(entropy) => done(self.put_entropy(entropy)),
            ApiRequest::PutVsock(vsock) => done(self.put_vsock(vsock)),
            ApiRequest::PutLogger(logger) => done(self.put_logger(logger, vmm)),
            ApiRequest::PutMetrics(metrics) => done(self.put_metrics(metrics, vmm)),
            ApiRequest::PatchDrive(patch) => done(self.patch_drive(&patch, vmm)),
            ApiRequest::PatchNetworkInterface(patch) => {
                done(self.patch_network_interface(&patch, vmm))
            }
            ApiRequest::PatchVm(vm) => done(self.set_vm_state(vm.state, vmm)),
            ApiRequest::CreateSnapshot(params) => done(self.create_snapshot(&params, vmm)),
            ApiRequest::LoadSnapshot(params) => done(self.load_snapshot(&params, vmm)),
            ApiRequest::PutActions(action) => done(match action.action_type {
                ActionType::InstanceStart => self.start(vmm),
                ActionType::FlushMetrics => self.flush_metrics(vmm),
                ActionType::SendCtrlAltDel => self.send_ctrl_alt_del(vmm),
            }),
        }
    }

    /// Boots the microVM (`InstanceStart`): needs a boot source, and is allowed once.
    ///
    /// # Errors
    ///
    /// After a successful start, without a boot source, or when [`VmmActions::start`] fails
    /// (the microVM then stays not started).
    pub fn start(&mut self, vmm: &mut dyn VmmActions) -> Result<()> {
        self.pre_boot()?;
        if self.resources.boot_source().is_none() {
            return Err(Error::MissingBootSource);
        }
        // Not logged here: `handle` logs a failed request, and the config-file caller
        // reports the error itself.
        vmm.start(&self.resources).map_err(|message| Error::Vmm {
            action: "start the microVM",
            message,
        })?;
        self.state = InstanceState::Running;
        info!("microVM started");
        Ok(())
    }

    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        vmm: &mut dyn VmmActions,
    ) -> Result<()> {
        self.post_boot()?;
        if self.state != InstanceState::Paused {
            return Err(Error::SnapshotOfRunningVm);
        }
        params.validate()?;
        vmm.create_snapshot(params).map_err(|message| Error::Vmm {
            action: "create the snapshot",
            message,
        })?;
        info!("snapshot created at {:?}", params.snapshot_path);
        Ok(())
    }

    /// `PUT /snapshot/load`: only on a fresh instance, before anything that configures a
    /// boot (as Firecracker: the logger and metrics may be set first).
    fn load_snapshot(
        &mut self,
        params: &SnapshotLoadParams,
        vmm: &mut dyn VmmActions,
    ) -> Result<()> {
        self.pre_boot()?;
        let r = &self.resources;
        if r.boot_source().is_some()
            || !r.drives().is_empty()
            || !r.network_interfaces().is_empty()
            || r.vsock().is_some()
            || r.entropy().is_some()
            || *r.machine_config() != MachineConfig::default()
        {
            return Err(Error::LoadAfterConfiguration);
        }
        params.mem_file()?;
        let machine = vmm.load_snapshot(params).map_err(|message| Error::Vmm {
            action: "load the snapshot",
            message,
        })?;
        self.resources
            .update_machine_config(&MachineConfigUpdate::from(machine))?;
        self.state = if params.resume_vm.unwrap_or(false) {
            InstanceState::Running
        } else {
            InstanceState::Paused
        };
        info!("snapshot loaded from {:?}", params.snapshot_path);
        Ok(())
    }

    fn pre_boot(&self) -> Result<()> {
        match self.state {
            InstanceState::NotStarted => Ok(()),
            InstanceState::Running | InstanceState::Paused => Err(Error::NotSupportedPostBoot),
        }
    }

    fn post_boot(&self) -> Result<()> {
        match self.state {
            InstanceState::NotStarted => Err(Error::NotSupportedPreBoot),
            InstanceState::Running | InstanceState::Paused => Ok(()),
        }
    }

    fn update_machine_config(&mut self, update: &MachineConfigUpdate) -> Result<()> {
        self.pre_boot()?;
        self.resources.update_machine_config(update)
    }

    fn put_boot_source(&mut self, boot_source: BootSource) -> Result<()> {
        self.pre_boot()?;
        self.resources.set_boot_source(boot_source)
    }

    fn put_drive(&mut self, drive: Drive) -> Result<()> {
        self.pre_boot()?;
        self.resources.insert_drive(drive)
    }

    fn put_network_interface(&mut self, iface: NetworkInterface) -> Result<()> {
        self.pre_boot()?;
        self.resources.insert_network_interface(iface)
    }

    fn put_vsock(&mut self, vsock: Vsock) -> Result<()> {
        self.pre_boot()?;
        self.resources.set_vsock(vsock)
    }

    fn put_entropy(&mut self, entropy: EntropyDevice) -> Result<()> {
        self.pre_boot()?;
        self.resources.set_entropy(entropy)
    }

    fn put_logger(&mut self, logger: Logger, vmm: &mut dyn VmmActions) -> Result<()> {
        self.pre_boot()?;
        logger.validate()?;
        let merged = match self.resources.logger() {
            Some(current) => current.merged(&logger),
            None => logger,
        };
        vmm.apply_logger(&merged).map_err(|message| Error::Vmm {
            action: "configure the logger",
            message,
        })?;
        self.resources.set_logger(merged);
        Ok(())
    }

    fn put_metrics(&mut self, metrics: Metrics, vmm: &mut dyn VmmActions) -> Result<()> {
        self.pre_boot()?;
        if self.resources.metrics().is_some() {
            return Err(Error::MetricsAlreadyConfigured);
        }
        metrics.validate()?;
        vmm.apply_metrics(&metrics).map_err(|message| Error::Vmm {
            action: "configure the metrics",
            message,
        })?;
        self.resources.set_metrics(metrics);
        Ok(())
    }

    fn patch_drive(&mut self, patch: &PartialDrive, vmm: &mut dyn VmmActions) -> Result<()> {
        self.post_boot()?;
        let new_limiter = self.resources.check_drive_patch(patch)?;
        if let Some(path) = &patch.path_on_host {
            vmm.update_drive_path(&patch.drive_id, path)
                .map_err(|message| Error::Vmm {
                    action: "update the drive's backing file",
                    message,
                })?;
            // Record the path now: a limiter failure below must not hide the new file.
            self.resources.apply_drive_patch(&PartialDrive {
                rate_limiter: None,
                ..patch.clone()
            });
        }
        if patch.rate_limiter.is_some() {
            vmm.update_drive_rate_limiter(&patch.drive_id, new_limiter.as_ref())
                .map_err(|message| Error::Vmm {
                    action: "update the drive's rate limiter",
                    message,
                })?;
            self.resources.apply_drive_patch(&PartialDrive {
                path_on_host: None,
                ..patch.clone()
            });
        }
        Ok(())
    }

    fn patch_network_interface(
        &mut self,
        patch: &PartialNetworkInterface,
        vmm: &mut dyn VmmActions,
    ) -> Result<()> {
        self.post_boot()?;
        self.resources.check_network_interface_patch(patch)?;
        if patch.rx_rate_limiter.is_none() && patch.tx_rate_limiter.is_none() {
            // Firecracker treats this as "no change".
            return Ok(());
        }
        let mut patched = self.resources.clone();
        patched.apply_network_interface_patch(patch);
        let iface = patched
            .network_interfaces()
            .iter()
            .find(|n| n.iface_id == patch.iface_id)
            .ok_or_else(|| Error::NetworkInterfaceNotFound(patch.iface_id.clone()))?;
        vmm.update_net_rate_limiters(
            &patch.iface_id,
            iface.rx_rate_limiter.as_ref(),
            iface.tx_rate_limiter.as_ref(),
        )
        .map_err(|message| Error::Vmm {
            action: "update the network interface's rate limiters",
            message,
        })?;
        self.resources = patched;
        Ok(())
    }

    fn set_vm_state(&mut self, state: VmState, vmm: &mut dyn VmmActions) -> Result<()> {
        self.post_boot()?;
        match (state, self.state) {
            // Pausing a paused or resuming a running microVM is allowed and changes nothing.
            (VmState::Paused, InstanceState::Paused)
            | (VmState::Resumed, InstanceState::Running) => Ok(()),
            (VmState::Paused, _) => {
                vmm.pause().map_err(|message| Error::Vmm {
                    action: "pause the microVM",
                    message,
                })?;
                self.state = InstanceState::Paused;
                info!("microVM paused");
                Ok(())
            }
            (VmState::Resumed, _) => {
                vmm.resume().map_err(|message| Error::Vmm {
                    action: "resume the microVM",
                    message,
                })?;
                self.state = InstanceState::Running;
                info!("microVM resumed");
                Ok(())
            }
        }
    }

    fn flush_metrics(&mut self, vmm: &mut dyn VmmActions) -> Result<()> {
        self.post_boot()?;
        vmm.flush_metrics().map_err(|message| Error::Vmm {
            action: "flush the metrics",
            message,
        })
    }

    fn send_ctrl_alt_del(&mut self, vmm: &mut dyn VmmActions) -> Result<()> {
        self.post_boot()?;
        vmm.send_ctrl_alt_del().map_err(|message| Error::Vmm {
            action: "send Ctrl+Alt+Del",
            message,
        })
    }
}

fn done(result: Result<()>) -> Handled {
    result.map(|()| Response::no_content())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_request, TokenBucket};

    /// Records every call; fails the ones named in `fail`.
    #[derive(Debug, Default)]
    struct FakeVmm {
        calls: Vec<String>,
        fail: Vec<&'static str>,
        started_with: Option<VmResources>,
    }

    impl FakeVmm {
        fn failing(name: &'static str) -> FakeVmm {
            FakeVmm {
                fail: vec![name],
                ..FakeVmm::default()
            }
        }

        fn record(
            &mut self,
            name: &'static str,
            detail: String,
        ) -> std::result::Result<(), String> {
            self.calls.push(if detail.is_empty() {
                name.to_string()
            } else {
                format!("{name} {detail}")
            });
            if self.fail.contains(&name) {
                Err(format!("{name} broke"))
            } else {
                Ok(())
            }
        }
    }

    fn rl(r: Option<&RateLimiter>) -> String {
        match r {
            None => "none".into(),
            Some(r) => format!(
                "bw={:?},ops={:?}",
                r.bandwidth.map(|b| b.size),
                r.ops.map(|b| b.size)
            ),
        }
    }

    impl VmmActions for FakeVmm {
        fn start(&mut self, resources: &VmResources) -> std::result::Result<(), String> {
            self.started_with = Some(resources.clone());
            self.record("start", String::new())
        }
        fn pause(&mut self) -> std::result::Result<(), String> {
            self.record("pause", String::new())
        }
        fn resume(&mut self) -> std::result::Result<(), String> {
            self.record("resume", String::new())
        }
        fn send_ctrl_alt_del(&mut self) -> std::result::Result<(), String> {
            self.record("ctrl_alt_del", String::new())
        }
        fn flush_metrics(&mut self) -> std::result::Result<(), String> {
            self.record("flush_metrics", String::new())
        }
        fn update_drive_path(&mut self, id: &str, path: &str) -> std::result::Result<(), String> {
            self.record("drive_path", format!("{id} {path}"))
        }
        fn update_drive_rate_limiter(
            &mut self,
            id: &str,
            r: Option<&RateLimiter>,
        ) -> std::result::Result<(), String> {
            self.record("drive_rl", format!("{id} {}", rl(r)))
        }
        fn update_net_rate_limiters(
            &mut self,
            id: &str,
            rx: Option<&RateLimiter>,
            tx: Option<&RateLimiter>,
        ) -> std::result::Result<(), String> {
            self.record("net_rl", format!("{id} rx={} tx={}", rl(rx), rl(tx)))
        }
        fn apply_logger(&mut self, logger: &Logger) -> std::result::Result<(), String> {
            self.record(
                "logger",
                format!("{:?} {:?}", logger.log_path, logger.level),
            )
        }
        fn apply_metrics(&mut self, metrics: &Metrics) -> std::result::Result<(), String> {
            self.record("metrics", metrics.metrics_path.clone())
        }
        fn create_snapshot(&mut self, p: &SnapshotCreateParams) -> std::result::Result<(), String> {
            self.record(
                "snapshot_create",
                format!(
                    "{} {} {:?}",
                    p.snapshot_path, p.mem_file_path, p.snapshot_type
                ),
            )
        }
        fn load_snapshot(
            &mut self,
            p: &SnapshotLoadParams,
        ) -> std::result::Result<MachineConfig, String> {
            self.record(
                "snapshot_load",
                format!("{} {:?}", p.snapshot_path, p.mem_file()),
            )?;
            Ok(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..MachineConfig::default()
            })
        }
    }

    /// Parses and handles one request.
    fn call(
        c: &mut Controller,
        vmm: &mut FakeVmm,
        method: &str,
        path: &str,
        body: &str,
    ) -> Response {
        match parse_request(method, path, body.as_bytes()) {
            Ok(req) => c.handle(req, vmm),
            Err(e) => Response::from(e),
        }
    }

    fn fault(resp: &Response) -> String {
        let body = resp.body.as_deref().expect("an error has a body");
        serde_json::from_str::<crate::FaultMessage>(body)
            .unwrap()
            .fault_message
    }

    #[track_caller]
    fn assert_204(resp: Response) {
        assert_eq!(resp, Response::no_content(), "{:?}", resp.body);
    }

    #[track_caller]
    fn assert_400(resp: &Response, needle: &str) {
        assert_eq!(resp.status, 400, "{:?}", resp.body);
        let msg = fault(resp);
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }

    fn json(resp: &Response) -> serde_json::Value {
        assert_eq!(resp.status, 200, "{:?}", resp.body);
        serde_json::from_str(resp.body.as_deref().unwrap()).unwrap()
    }

    const BOOT: &str = r#"{"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"}"#;
    const ROOT: &str =
        r#"{"drive_id": "rootfs", "path_on_host": "/rootfs", "is_root_device": true}"#;
    const ETH0: &str = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
    const START: &str = r#"{"action_type": "InstanceStart"}"#;

    fn started() -> (Controller, FakeVmm) {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        assert_204(call(&mut c, &mut vmm, "PUT", "/drives/rootfs", ROOT));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/network-interfaces/eth0",
            ETH0,
        ));
        assert_204(call(&mut c, &mut vmm, "PUT", "/actions", START));
        vmm.calls.clear();
        (c, vmm)
    }

    #[test]
    fn get_instance_info_reports_the_state() {
        let mut c = Controller::new(ControllerConfig {
            instance_id: "vm1".into(),
            app_name: "app".into(),
            vmm_version: "9.9.9".into(),
        });
        let mut vmm = FakeVmm::default();
        let info = json(&call(&mut c, &mut vmm, "GET", "/", ""));
        assert_eq!(
            info,
            serde_json::json!({"id": "vm1", "state": "Not started", "vmm_version": "9.9.9", "app_name": "app"})
        );
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        assert_204(call(&mut c, &mut vmm, "PUT", "/actions", START));
        assert_eq!(
            json(&call(&mut c, &mut vmm, "GET", "/", ""))["state"],
            "Running"
        );
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
        ));
        assert_eq!(
            json(&call(&mut c, &mut vmm, "GET", "/", ""))["state"],
            "Paused"
        );
        let version = json(&call(&mut c, &mut vmm, "GET", "/version", ""));
        assert_eq!(version, serde_json::json!({"firecracker_version": "9.9.9"}));
    }

    #[test]
    fn machine_config_defaults_put_patch_get() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        let cfg = json(&call(&mut c, &mut vmm, "GET", "/machine-config", ""));
        assert_eq!(cfg["vcpu_count"], 1);
        assert_eq!(cfg["mem_size_mib"], 128);
        assert_eq!(cfg["smt"], false);
        assert!(cfg.get("cpu_template").is_none());
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 4, "mem_size_mib": 2048, "smt": true}"#,
        ));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/machine-config",
            r#"{"mem_size_mib": 512}"#,
        ));
        let cfg = json(&call(&mut c, &mut vmm, "GET", "/machine-config", ""));
        assert_eq!(
            (cfg["vcpu_count"].as_u64(), cfg["mem_size_mib"].as_u64()),
            (Some(4), Some(512))
        );
        assert_eq!(cfg["smt"], true);
        assert_eq!(c.resources().vcpu_count(), 4);
        assert!(c.resources().smt());
        assert_eq!(c.resources().mem_size_mib(), 512);
        assert!(vmm.calls.is_empty(), "configuration does not call the VMM");
    }

    #[test]
    fn machine_config_errors_leave_the_config_unchanged() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
        );
        assert_400(&r, "invalid vcpu_count 0");
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 3, "smt": true}"#,
        );
        assert_400(&r, "1 or an even number");
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/machine-config",
            r#"{"mem_size_mib": 0}"#,
        );
        assert_400(&r, "invalid mem_size_mib 0");
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/machine-config",
            r#"{"cpu_template": "C3"}"#,
        );
        assert_400(&r, "cpu_template C3 is not supported by this VMM yet");
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/machine-config",
            r#"{"huge_pages": "Transparent"}"#,
        );
        assert_400(&r, "huge_pages Transparent is not supported");
        assert_eq!(
            c.resources().machine_config(),
            &crate::MachineConfig::default()
        );
    }

    #[test]
    fn boot_source_drives_nets_entropy_are_stored() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/drives/data",
            r#"{"drive_id": "data", "path_on_host": "/data", "is_root_device": false, "is_read_only": true}"#,
        ));
        assert_204(call(&mut c, &mut vmm, "PUT", "/drives/rootfs", ROOT));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/network-interfaces/eth0",
            ETH0,
        ));
        assert_204(call(&mut c, &mut vmm, "PUT", "/entropy", "{}"));
        let r = c.resources();
        assert_eq!(r.kernel_image_path(), Some("/vmlinux"));
        assert_eq!(r.boot_args(), Some("console=ttyS0"));
        assert_eq!(r.initrd_path(), None);
        let order: Vec<_> = r.drives().iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(order, ["rootfs", "data"]);
        assert!(r.drives()[1].read_only());
        assert_eq!(r.network_interfaces()[0].host_dev_name, "tap0");
        assert_eq!(r.entropy(), Some(&EntropyDevice::default()));
        assert_eq!(r.kernel_cmdline("unused"), "console=ttyS0 root=/dev/vda rw");
    }

    #[test]
    fn vsock_is_stored_before_start_refused_after_and_in_the_vm_config() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        let v = r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#;
        assert_eq!(
            call(
                &mut c,
                &mut vmm,
                "PUT",
                "/vsock",
                r#"{"guest_cid": 2, "uds_path": "/v"}"#
            )
            .status,
            400
        );
        assert_eq!(c.resources().vsock(), None);
        assert_204(call(&mut c, &mut vmm, "PUT", "/vsock", v));
        assert_eq!(c.resources().vsock().map(|v| v.guest_cid), Some(3));
        let config = json(&call(&mut c, &mut vmm, "GET", "/vm/config", ""));
        assert_eq!(config["vsock"]["uds_path"], "/tmp/v.sock");
        // The same document configures a new controller the same way.
        let again = Controller::from_config(
            ControllerConfig::default(),
            FullVmConfig::from_json(&config.to_string()).unwrap(),
            &mut vmm,
        )
        .unwrap();
        assert_eq!(again.resources().vsock(), c.resources().vsock());
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        assert_204(call(&mut c, &mut vmm, "PUT", "/actions", START));
        let after = call(&mut c, &mut vmm, "PUT", "/vsock", v);
        assert_eq!(after.status, 400);
        assert!(after.body.unwrap().contains("after starting"));
    }

    #[test]
    fn configuration_errors() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": ""}"#,
        );
        assert_400(&r, "kernel_image_path is empty");
        assert_204(call(&mut c, &mut vmm, "PUT", "/drives/rootfs", ROOT));
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/drives/other",
            r#"{"drive_id": "other", "path_on_host": "/o", "is_root_device": true}"#,
        );
        assert_400(&r, "a root block device already exists");
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/drives/vhost",
            r#"{"drive_id": "vhost", "is_root_device": false, "socket": "/s.sock"}"#,
        );
        assert_400(
            &r,
            "vhost-user drives (socket) are not supported by this VMM yet",
        );
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/network-interfaces/eth0",
            ETH0,
        ));
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
        );
        assert_400(&r, "already used by interface \"eth0\"");
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "tap1", "mtu": 9000}"#,
        );
        assert_400(&r, "mtu is not supported");
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#,
        );
        assert_400(&r, "rate_limiter.ops token bucket");
        assert_eq!(c.resources().drives().len(), 1);
        assert_eq!(c.resources().network_interfaces().len(), 1);
        assert_eq!(c.resources().entropy(), None);
    }

    #[test]
    fn start_needs_a_boot_source_and_happens_once() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        let r = call(&mut c, &mut vmm, "PUT", "/actions", START);
        assert_400(&r, "without a boot source");
        assert!(vmm.calls.is_empty());
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        assert_204(call(&mut c, &mut vmm, "PUT", "/actions", START));
        assert_eq!(vmm.calls, ["start"]);
        assert_eq!(c.state(), InstanceState::Running);
        assert_eq!(
            vmm.started_with.as_ref().unwrap().kernel_image_path(),
            Some("/vmlinux"),
            "the VMM gets the configured resources"
        );
        let r = call(&mut c, &mut vmm, "PUT", "/actions", START);
        assert_400(&r, "not supported after starting the microVM");
        assert_eq!(vmm.calls, ["start"], "no second start");
    }

    #[test]
    fn a_failed_start_stays_not_started() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::failing("start");
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        let r = call(&mut c, &mut vmm, "PUT", "/actions", START);
        assert_400(&r, "failed to start the microVM: start broke");
        assert_eq!(c.state(), InstanceState::NotStarted);
        // Still configurable, and a retry may start it.
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 2}"#,
        ));
        vmm.fail.clear();
        assert_204(call(&mut c, &mut vmm, "PUT", "/actions", START));
        assert_eq!(c.state(), InstanceState::Running);
    }

    #[test]
    fn configuration_is_refused_after_start() {
        for (method, path, body) in [
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
            ),
            ("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#),
            ("PUT", "/boot-source", BOOT),
            ("PUT", "/drives/rootfs", ROOT),
            ("PUT", "/network-interfaces/eth0", ETH0),
            ("PUT", "/entropy", "{}"),
            ("PUT", "/logger", r#"{"level": "Debug"}"#),
            ("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
            ("PUT", "/actions", START),
        ] {
            let (mut c, mut vmm) = started();
            let before = c.resources().clone();
            let r = call(&mut c, &mut vmm, method, path, body);
            assert_400(
                &r,
                "the requested operation is not supported after starting the microVM",
            );
            assert!(vmm.calls.is_empty(), "{method} {path}: {:?}", vmm.calls);
            assert_eq!(c.resources(), &before, "{method} {path}");
            // Also while paused.
            assert_204(call(
                &mut c,
                &mut vmm,
                "PATCH",
                "/vm",
                r#"{"state": "Paused"}"#,
            ));
            let r = call(&mut c, &mut vmm, method, path, body);
            assert_400(&r, "not supported after starting the microVM");
        }
    }

    #[test]
    fn runtime_operations_are_refused_before_start() {
        for (method, path, body) in [
            ("PATCH", "/vm", r#"{"state": "Paused"}"#),
            ("PATCH", "/vm", r#"{"state": "Resumed"}"#),
            ("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
            ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
            (
                "PATCH",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/new"}"#,
            ),
            (
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0"}"#,
            ),
        ] {
            let mut c = Controller::new(ControllerConfig::default());
            let mut vmm = FakeVmm::default();
            assert_204(call(&mut c, &mut vmm, "PUT", "/drives/rootfs", ROOT));
            assert_204(call(
                &mut c,
                &mut vmm,
                "PUT",
                "/network-interfaces/eth0",
                ETH0,
            ));
            let r = call(&mut c, &mut vmm, method, path, body);
            assert_400(
                &r,
                "the requested operation is not supported before starting the microVM",
            );
            assert!(vmm.calls.is_empty(), "{method} {path}: {:?}", vmm.calls);
            assert_eq!(c.state(), InstanceState::NotStarted);
        }
    }

    #[test]
    fn pause_and_resume() {
        let (mut c, mut vmm) = started();
        let pause = r#"{"state": "Paused"}"#;
        let resume = r#"{"state": "Resumed"}"#;
        assert_204(call(&mut c, &mut vmm, "PATCH", "/vm", pause));
        assert_eq!(c.state(), InstanceState::Paused);
        // Pausing twice is allowed, as in Firecracker, and does not bother the VMM.
        assert_204(call(&mut c, &mut vmm, "PATCH", "/vm", pause));
        assert_204(call(&mut c, &mut vmm, "PATCH", "/vm", resume));
        assert_eq!(c.state(), InstanceState::Running);
        assert_204(call(&mut c, &mut vmm, "PATCH", "/vm", resume));
        assert_eq!(vmm.calls, ["pause", "resume"]);
    }

    #[test]
    fn failed_pause_or_resume_keeps_the_state() {
        let (mut c, mut vmm) = started();
        vmm.fail = vec!["pause"];
        let r = call(&mut c, &mut vmm, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_400(&r, "failed to pause the microVM: pause broke");
        assert_eq!(c.state(), InstanceState::Running);
        vmm.fail = vec!["resume"];
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
        ));
        let r = call(&mut c, &mut vmm, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        assert_400(&r, "failed to resume the microVM");
        assert_eq!(c.state(), InstanceState::Paused);
    }

    #[test]
    fn flush_and_ctrl_alt_del_when_running_or_paused() {
        let (mut c, mut vmm) = started();
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#,
        ));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        ));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
        ));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        ));
        assert_eq!(
            vmm.calls,
            ["flush_metrics", "ctrl_alt_del", "pause", "ctrl_alt_del"]
        );
        vmm.fail = vec!["ctrl_alt_del", "flush_metrics"];
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_400(&r, "failed to send Ctrl+Alt+Del: ctrl_alt_del broke");
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#,
        );
        assert_400(&r, "failed to flush the metrics");
    }

    #[test]
    fn patch_drive_after_start() {
        let (mut c, mut vmm) = started();
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/new"}"#,
        ));
        assert_eq!(vmm.calls, ["drive_path rootfs /new"]);
        assert_eq!(c.resources().drives()[0].path(), "/new");
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 7, "refill_time": 100}}}"#,
        ));
        assert_eq!(vmm.calls[1], "drive_rl rootfs bw=None,ops=Some(7)");
        assert_eq!(
            c.resources().drives()[0].rate_limiter.unwrap().ops,
            Some(TokenBucket {
                size: 7,
                one_time_burst: None,
                refill_time: 100
            })
        );
        // Disabling the only bucket removes the limiter.
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#,
        ));
        assert_eq!(vmm.calls[2], "drive_rl rootfs none");
        assert_eq!(c.resources().drives()[0].rate_limiter, None);
    }

    #[test]
    fn patch_drive_errors() {
        let (mut c, mut vmm) = started();
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/drives/nope",
            r#"{"drive_id": "nope", "path_on_host": "/x"}"#,
        );
        assert_400(&r, "drive \"nope\" does not exist");
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs"}"#,
        );
        assert_400(&r, "nothing to update");
        assert!(vmm.calls.is_empty());
        vmm.fail = vec!["drive_path"];
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/new"}"#,
        );
        assert_400(
            &r,
            "failed to update the drive's backing file: drive_path broke",
        );
        assert_eq!(
            c.resources().drives()[0].path(),
            "/rootfs",
            "a failed PATCH is not recorded"
        );
    }

    #[test]
    fn patch_network_interface_after_start() {
        let (mut c, mut vmm) = started();
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 5, "refill_time": 10}}}"#,
        ));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 6, "refill_time": 10}}}"#,
        ));
        assert_eq!(
            vmm.calls,
            [
                "net_rl eth0 rx=bw=Some(5),ops=None tx=none",
                "net_rl eth0 rx=bw=Some(5),ops=None tx=bw=None,ops=Some(6)"
            ]
        );
        // Nothing to change: no VMM call, as Firecracker's no-op update.
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0"}"#,
        ));
        assert_eq!(vmm.calls.len(), 2);
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/network-interfaces/eth9",
            r#"{"iface_id": "eth9"}"#,
        );
        assert_400(&r, "network interface \"eth9\" does not exist");
        vmm.fail = vec!["net_rl"];
        let before = c.resources().clone();
        let r = call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        );
        assert_400(&r, "failed to update the network interface's rate limiters");
        assert_eq!(c.resources(), &before);
    }

    #[test]
    fn logger_merges_and_metrics_once() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/logger",
            r#"{"log_path": "/log", "level": "Info"}"#,
        ));
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/logger",
            r#"{"level": "Debug"}"#,
        ));
        assert_eq!(
            vmm.calls,
            [
                "logger Some(\"/log\") Some(Info)",
                "logger Some(\"/log\") Some(Debug)"
            ]
        );
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/m"}"#,
        ));
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/m2"}"#,
        );
        assert_400(&r, "reinitialization is not allowed");
        assert_eq!(vmm.calls.len(), 3);
        assert_eq!(c.resources().metrics().unwrap().metrics_path, "/m");
    }

    #[test]
    fn logger_and_metrics_failures_are_not_recorded() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::failing("logger");
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/logger",
            r#"{"log_path": "/nope"}"#,
        );
        assert_400(&r, "failed to configure the logger: logger broke");
        assert_eq!(c.resources().logger(), None);
        let mut vmm = FakeVmm::failing("metrics");
        let r = call(
            &mut c,
            &mut vmm,
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/nope"}"#,
        );
        assert_400(&r, "failed to configure the metrics");
        assert_eq!(c.resources().metrics(), None);
        // A failed attempt does not count as the one allowed initialization.
        vmm.fail.clear();
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/m"}"#,
        ));
        let r = call(&mut c, &mut vmm, "PUT", "/logger", r#"{"log_path": ""}"#);
        assert_400(&r, "log_path is empty");
    }

    /// A controller with one of everything, set through the API.
    fn configured() -> (Controller, FakeVmm) {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        for (method, path, body) in [
            (
                "PUT",
                "/logger",
                r#"{"log_path": "/log", "level": "Warning", "show_level": true}"#,
            ),
            ("PUT", "/metrics", r#"{"metrics_path": "/metrics"}"#),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 512, "track_dirty_pages": true}"#,
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "quiet"}"#,
            ),
            (
                "PUT",
                "/drives/a",
                r#"{"drive_id": "a", "path_on_host": "/a", "is_root_device": false}"#,
            ),
            (
                "PUT",
                "/drives/b",
                r#"{"drive_id": "b", "path_on_host": "/b", "is_root_device": false, "cache_type": "Writeback"}"#,
            ),
            (
                "PUT",
                "/drives/b",
                r#"{"drive_id": "b", "path_on_host": "/b2", "is_root_device": true, "partuuid": "1-2",
                    "is_read_only": true, "rate_limiter": {"bandwidth": {"size": 10, "one_time_burst": 5, "refill_time": 100}}}"#,
            ),
            (
                "PUT",
                "/drives/c",
                r#"{"drive_id": "c", "path_on_host": "/c", "is_root_device": false, "io_engine": "Async"}"#,
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01",
                    "tx_rate_limiter": {"ops": {"size": 3, "refill_time": 30}}}"#,
            ),
            (
                "PUT",
                "/network-interfaces/eth1",
                r#"{"iface_id": "eth1", "host_dev_name": "tap1"}"#,
            ),
            (
                "PUT",
                "/entropy",
                r#"{"rate_limiter": {"bandwidth": {"size": 100, "refill_time": 10}}}"#,
            ),
        ] {
            assert_204(call(&mut c, &mut vmm, method, path, body));
        }
        (c, vmm)
    }

    #[test]
    fn vm_config_round_trips_through_a_config_file() {
        let (mut c, mut vmm) = configured();
        let order: Vec<_> = c
            .resources()
            .drives()
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(order, ["b", "a", "c"]);
        let resp = call(&mut c, &mut vmm, "GET", "/vm/config", "");
        let text = resp.body.clone().unwrap();
        let value = json(&resp);
        // Firecracker's keys, the unsupported ones as null.
        for key in [
            "balloon",
            "vsock",
            "mmds-config",
            "cpu-config",
            "memory-hotplug",
        ] {
            assert_eq!(value[key], serde_json::Value::Null, "{key}");
        }
        assert_eq!(value["pmem"], serde_json::json!([]));
        assert_eq!(value["drives"][0]["is_read_only"], true);
        assert_eq!(value["drives"][1]["io_engine"], "Sync");
        assert_eq!(value["drives"][1]["partuuid"], serde_json::Value::Null);
        assert_eq!(value["machine-config"]["vcpu_count"], 2);
        assert_eq!(value["boot-source"]["boot_args"], "quiet");
        assert_eq!(value["logger"]["level"], "Warning");

        let parsed = FullVmConfig::from_json(&text).unwrap();
        let mut vmm2 = FakeVmm::default();
        let c2 = Controller::from_config(ControllerConfig::default(), parsed, &mut vmm2).unwrap();
        assert_eq!(c2.resources(), c.resources());
        assert_eq!(c2.vm_config(), c.vm_config());
        assert_eq!(
            vmm2.calls,
            ["logger Some(\"/log\") Some(Warning)", "metrics /metrics"],
            "logger and metrics are applied through the VMM"
        );
        assert_eq!(
            c2.resources().kernel_cmdline(""),
            "quiet root=PARTUUID=1-2 ro"
        );
    }

    #[test]
    fn from_config_validates_like_the_api() {
        let mut vmm = FakeVmm::default();
        let cases = [
            (
                r#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#,
                "invalid vcpu_count",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": ""}}"#,
                "kernel_image_path is empty",
            ),
            (
                r#"{"drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
                               {"drive_id": "b", "path_on_host": "/b", "is_root_device": true}]}"#,
                "a root block device already exists",
            ),
            (
                r#"{"drives": [{"drive_id": "a-1", "path_on_host": "/a", "is_root_device": true}]}"#,
                "invalid drive id",
            ),
            (
                r#"{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1500}]}"#,
                "mtu is not supported",
            ),
            (
                r#"{"metrics": {"metrics_path": ""}}"#,
                "metrics_path is empty",
            ),
            (
                r#"{"vsock": {"guest_cid": 2, "uds_path": "/v"}}"#,
                "invalid guest_cid 2",
            ),
        ];
        for (text, needle) in cases {
            let cfg = FullVmConfig::from_json(text).unwrap();
            let err =
                Controller::from_config(ControllerConfig::default(), cfg, &mut vmm).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert_eq!(err.status(), 400);
        }
        // An unsupported section stops everything before the VMM is called.
        let cfg = FullVmConfig::from_json(
            r#"{"logger": {"level": "Info"}, "balloon": {"amount_mib": 1, "deflate_on_oom": true}}"#,
        )
        .unwrap();
        vmm.calls.clear();
        assert!(Controller::from_config(ControllerConfig::default(), cfg, &mut vmm).is_err());
        assert!(vmm.calls.is_empty());
    }

    #[test]
    fn from_config_then_start() {
        let cfg = FullVmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}],
                "balloon": null, "pmem": []}"#,
        )
        .unwrap();
        let mut vmm = FakeVmm::default();
        let mut c = Controller::from_config(ControllerConfig::default(), cfg, &mut vmm).unwrap();
        assert_eq!(c.state(), InstanceState::NotStarted);
        c.start(&mut vmm).unwrap();
        assert_eq!(vmm.calls, ["start"]);
        assert_eq!(c.state(), InstanceState::Running);
        assert_eq!(
            c.resources().kernel_cmdline("console=ttyS0"),
            "console=ttyS0 root=/dev/vda ro"
        );
        assert!(matches!(
            c.start(&mut vmm),
            Err(Error::NotSupportedPostBoot)
        ));
    }

    #[test]
    fn gets_work_in_every_state() {
        let (mut c, mut vmm) = configured();
        for state in ["before", "running", "paused"] {
            match state {
                "running" => {
                    assert_204(call(&mut c, &mut vmm, "PUT", "/actions", START));
                }
                "paused" => {
                    assert_204(call(
                        &mut c,
                        &mut vmm,
                        "PATCH",
                        "/vm",
                        r#"{"state": "Paused"}"#,
                    ));
                }
                _ => {}
            }
            for path in ["/", "/version", "/machine-config", "/vm/config"] {
                let r = call(&mut c, &mut vmm, "GET", path, "");
                assert_eq!(r.status, 200, "{state} {path}");
            }
        }
    }

    #[test]
    fn routing_errors_become_responses() {
        let r = Response::from(parse_request("GET", "/nope", b"").unwrap_err());
        assert_eq!(r.status, 404);
        assert!(fault(&r).contains("/nope"));
    }

    const CREATE: &str = r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#;
    const LOAD: &str = r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#;

    #[test]
    fn a_snapshot_is_taken_of_a_paused_microvm_only() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        let r = call(&mut c, &mut vmm, "PUT", "/snapshot/create", CREATE);
        assert_400(&r, "not supported before starting");
        let (mut c, mut vmm) = started();
        let r = call(&mut c, &mut vmm, "PUT", "/snapshot/create", CREATE);
        assert_400(&r, "pause it first");
        assert!(vmm.calls.is_empty(), "{:?}", vmm.calls);
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
        ));
        assert_204(call(&mut c, &mut vmm, "PUT", "/snapshot/create", CREATE));
        assert_eq!(vmm.calls, ["pause", "snapshot_create /s /m None"]);
        assert_eq!(c.state(), InstanceState::Paused);
        let mut failing = FakeVmm::failing("snapshot_create");
        let r = call(&mut c, &mut failing, "PUT", "/snapshot/create", CREATE);
        assert_400(&r, "snapshot_create broke");
        assert_eq!(c.state(), InstanceState::Paused);
    }

    #[test]
    fn a_snapshot_is_loaded_into_a_fresh_instance_only_and_sets_its_state() {
        let mut c = Controller::new(ControllerConfig::default());
        let mut vmm = FakeVmm::default();
        // The logger may be set first, as in Firecracker.
        assert_204(call(
            &mut c,
            &mut vmm,
            "PUT",
            "/logger",
            r#"{"level": "Info"}"#,
        ));
        assert_204(call(&mut c, &mut vmm, "PUT", "/snapshot/load", LOAD));
        assert_eq!(c.state(), InstanceState::Running);
        assert_eq!(c.resources().machine_config().vcpu_count, 2);
        assert_eq!(c.resources().machine_config().mem_size_mib, 256);
        // Once loaded: no second load, no start, and the runtime requests work.
        let r = call(&mut c, &mut vmm, "PUT", "/snapshot/load", LOAD);
        assert_400(&r, "not supported after starting");
        assert_204(call(
            &mut c,
            &mut vmm,
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
        ));

        // Without resume_vm the microVM stays paused.
        let mut c = Controller::new(ControllerConfig::default());
        let load = LOAD.replace(r#", "resume_vm": true"#, "");
        assert_204(call(&mut c, &mut vmm, "PUT", "/snapshot/load", &load));
        assert_eq!(c.state(), InstanceState::Paused);

        // Not after boot resources were configured; a failed load leaves it not started.
        let mut c = Controller::new(ControllerConfig::default());
        assert_204(call(&mut c, &mut vmm, "PUT", "/boot-source", BOOT));
        let r = call(&mut c, &mut vmm, "PUT", "/snapshot/load", LOAD);
        assert_400(&r, "after configuring boot-specific resources");
        let mut c = Controller::new(ControllerConfig::default());
        let mut failing = FakeVmm::failing("snapshot_load");
        let r = call(&mut c, &mut failing, "PUT", "/snapshot/load", LOAD);
        assert_400(&r, "snapshot_load broke");
        assert_eq!(c.state(), InstanceState::NotStarted);
        // A Uffd backend is refused before the VMM is asked.
        let uffd = LOAD.replace("File", "Uffd");
        let mut vmm = FakeVmm::default();
        let r = call(&mut c, &mut vmm, "PUT", "/snapshot/load", &uffd);
        assert_400(&r, "Uffd memory backend is not supported");
        assert!(vmm.calls.is_empty());
    }
}
