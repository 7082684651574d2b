//! Firecracker's interface on top of this VMM: `--api-sock`, `--config-file`, `--no-api`.
//!
//! tvm-http serves the socket and tvm-api decides what each request means; this module
//! carries the decisions out. A "fc_api" thread owns the API [`Controller`]: it applies a
//! config file, then serves the socket. `InstanceStart` turns the resources into a
//! [`VmConfig`] ([`vm_config_from_resources`], then the same [`VmConfig::validate`] and
//! [`Vmm::build`] as our own CLI) and hands it to the main thread, which builds the VM,
//! answers with the handle for requests to the running VM ([`crate::commands`]), and runs
//! it until it stops. Pause, resume and Ctrl-Alt-Del go through that handle.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use tvm_api::{
    add_total, parse_request, Controller, ControllerConfig, FullVmConfig, IoEngine, Logger,
    MachineConfig, MetricSections, Metrics, MetricsLog, RateLimiter, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType as ApiSnapshotType, VmResources, VmmActions,
};
use tvm_arch_x86::CpuTopology;
use tvm_http::{Limits, Request, RequestError, Response, Server};
use tvm_virtio_blk::IoEngine as BlockEngine;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::commands::{Command, CommandSender, OpenImage, VmCounters};
use crate::config::{
    DiskConfig, NetConfig, VmConfig, VsockOptions, DEFAULT_CMDLINE, DISK_ID_MAX_BYTES,
};
use crate::seccomp::{Filters, SeccompLevel, ThreadKind};
use crate::timing::BootTimes;
use crate::vcpu::ExitReason;
use crate::{Error, Result, Vmm};

/// How long an API request to the running VM waits for the event loop.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `PUT /snapshot/create` waits: guest memory goes to a file.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// What Firecracker's command line asked for.
#[derive(Clone, Debug)]
pub struct FcOptions {
    /// The API socket; `None` with `--no-api`.
    pub api_sock: Option<PathBuf>,
    /// A JSON configuration (the shape of `GET /vm/config`), applied and started at once.
    pub config_file: Option<PathBuf>,
    /// The instance id `GET /` reports.
    pub id: String,
    /// Largest request body (`--http-api-max-payload-size`).
    pub max_payload: usize,
    /// The seccomp filters of the VM's threads.
    pub seccomp: SeccompLevel,
    /// Where metrics go from the start (`--metrics-path`).
    pub metrics_path: Option<PathBuf>,
}

/// A message of the API thread to the main thread.
enum ToMain {
    /// Build and run this VM; answer with the running VM's request handle or why not.
    Start(
        Box<VmConfig>,
        SyncSender<std::result::Result<CommandSender, String>>,
    ),
    /// Build the VM a snapshot saved and run it (paused unless the flag says resume);
    /// answer as for `Start`.
    Restore(
        Box<VmConfig>,
        Box<crate::snapshot::Restore>,
        bool,
        SyncSender<std::result::Result<CommandSender, String>>,
    ),
    /// The API thread ended without starting a VM (a bad config file, or the socket failed).
    Failed(String),
}

/// Firecracker's `pci=off` would hide every device of this VMM (they are all on PCI, as
/// with Firecracker's `--enable-pci`): it is dropped from the boot arguments.
fn drop_pci_off(args: &str) -> String {
    let kept: Vec<&str> = args
        .split_whitespace()
        .filter(|a| *a != "pci=off")
        .collect();
    if kept.len() != args.split_whitespace().count() {
        info!("boot args: dropped pci=off (this vmm's devices are on pci)");
    }
    kept.join(" ")
}

/// Whether a limiter would limit anything.
fn limits(r: Option<&RateLimiter>) -> bool {
    r.is_some_and(|r| {
        r.bandwidth.as_ref().is_some_and(|b| b.is_enabled())
            || r.ops.as_ref().is_some_and(|b| b.is_enabled())
    })
}

/// The VM configuration the API's resources describe; what our own CLI builds from its
/// flags. Everything not checked here is checked by [`VmConfig::validate`] and the build.
pub fn vm_config_from_resources(
    r: &VmResources,
    seccomp: SeccompLevel,
) -> std::result::Result<VmConfig, String> {
    let kernel = r
        .kernel_image_path()
        .ok_or("no boot source: PUT /boot-source first")?;
    let threads: u8 = if r.smt() { 2 } else { 1 };
    let count = r.vcpu_count();
    let cpus = CpuTopology::new(threads, count / threads, 1)
        .map_err(|e| format!("vcpu_count {count} (smt {}): {e}", r.smt()))?;
    let mem_size = u64::try_from(r.mem_size_mib())
        .ok()
        .and_then(|m| m.checked_mul(1 << 20))
        .ok_or_else(|| format!("mem_size_mib {} is too large", r.mem_size_mib()))?;
    let mut disks = Vec::new();
    for d in r.drives() {
        if d.socket.is_some() {
            return Err(format!(
                "drive {}: vhost-user drives are not supported",
                d.drive_id
            ));
        }
        if limits(d.rate_limiter.as_ref()) {
            warn!(
                "drive {}: the rate limiter is accepted but not enforced",
                d.drive_id
            );
        }
        let id = (d.drive_id.len() <= DISK_ID_MAX_BYTES).then(|| d.drive_id.clone());
        disks.push(DiskConfig {
            path: PathBuf::from(d.path()),
            read_only: d.read_only(),
            id,
            // Firecracker's `Async` is its io_uring engine; without the field, ours picks.
            engine: match d.io_engine {
                Some(IoEngine::Sync) => BlockEngine::Sync,
                Some(IoEngine::Async) => BlockEngine::Uring,
                None => BlockEngine::Auto,
            },
            name: Some(d.drive_id.clone()),
            ..DiskConfig::default()
        });
    }
    let mut nets = Vec::new();
    for n in r.network_interfaces() {
        if limits(n.rx_rate_limiter.as_ref()) || limits(n.tx_rate_limiter.as_ref()) {
            warn!(
                "network interface {}: the rate limiters are accepted but not enforced",
                n.iface_id
            );
        }
        nets.push(NetConfig {
            tap: n.host_dev_name.clone(),
            mac: n.guest_mac.as_ref().map(|m| m.bytes()),
            name: Some(n.iface_id.clone()),
        });
    }
    if let Some(e) = r.entropy() {
        if limits(e.rate_limiter.as_ref()) {
            warn!("entropy: the rate limiter is accepted but not enforced");
        }
    }
    Ok(VmConfig {
        kernel: PathBuf::from(kernel),
        initrd: r.initrd_path().map(PathBuf::from),
        cmdline: drop_pci_off(&r.kernel_cmdline(DEFAULT_CMDLINE)),
        mem_size,
        cpus,
        disks,
        nets,
        rng: r.entropy().is_some(),
        vsock: r.vsock().map(|v| VsockOptions {
            cid: v.guest_cid,
            uds: PathBuf::from(&v.uds_path),
        }),
        seccomp,
        system_map: None,
        track_dirty_pages: r.machine_config().track_dirty_pages,
    })
}

/// The VMM side of the API: what the controller's decisions turn into.
struct Actions {
    to_main: Sender<ToMain>,
    seccomp: SeccompLevel,
    /// The running VM, once started.
    running: Option<CommandSender>,
    /// The drives of the running VM, in the order of its disks: id, read-only.
    drives: Vec<(String, bool)>,
    /// The network interfaces of the running VM, in the order of its nets.
    ifaces: Vec<String>,
    /// What the previous metrics line counted.
    metrics_log: MetricsLog,
    metrics: Option<File>,
    /// Requests answered, and how many of them with an error (for the metrics).
    requests: u64,
    errors: u64,
}

impl Actions {
    fn command(&self, command: Command) -> std::result::Result<(), String> {
        match &self.running {
            Some(vm) => vm.send(command, COMMAND_TIMEOUT),
            None => Err("the microVM is not running".into()),
        }
    }
}

impl VmmActions for Actions {
    fn start(&mut self, resources: &VmResources) -> std::result::Result<(), String> {
        let cfg = vm_config_from_resources(resources, self.seccomp)?;
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.to_main
            .send(ToMain::Start(Box::new(cfg), reply_tx))
            .map_err(|_| "the vmm is shutting down".to_string())?;
        let sender = reply_rx
            .recv()
            .map_err(|_| "the vmm stopped while building the microVM".to_string())??;
        self.running = Some(sender);
        self.drives = resources
            .drives()
            .iter()
            .map(|d| (d.drive_id.clone(), d.read_only()))
            .collect();
        self.ifaces = resources
            .network_interfaces()
            .iter()
            .map(|n| n.iface_id.clone())
            .collect();
        Ok(())
    }

    fn pause(&mut self) -> std::result::Result<(), String> {
        self.command(Command::Pause)
    }

    fn resume(&mut self) -> std::result::Result<(), String> {
        self.command(Command::Resume)
    }

    fn send_ctrl_alt_del(&mut self) -> std::result::Result<(), String> {
        self.command(Command::CtrlAltDel)
    }

    fn flush_metrics(&mut self) -> std::result::Result<(), String> {
        if self.metrics.is_none() {
            return Err("no metrics output: PUT /metrics first".into());
        }
        let counters = match &self.running {
            Some(vm) => {
                let (tx, rx) = mpsc::sync_channel(1);
                vm.send(Command::Metrics(tx), COMMAND_TIMEOUT)?;
                Some(
                    rx.try_recv()
                        .map_err(|e| format!("no counters came back: {e}"))?,
                )
            }
            None => None,
        };
        let sections = metric_sections(
            counters.as_ref(),
            &self.drives,
            &self.ifaces,
            (self.requests, self.errors),
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let line = self.metrics_log.line(now, sections);
        let Some(file) = &mut self.metrics else {
            return Err("no metrics output: PUT /metrics first".into());
        };
        file.write_all(line.as_bytes())
            .map_err(|e| format!("cannot write the metrics: {e}"))
    }

    fn update_drive_path(&mut self, drive_id: &str, path: &str) -> std::result::Result<(), String> {
        let (disk, read_only) = self
            .drives
            .iter()
            .enumerate()
            .find_map(|(i, (id, ro))| (id == drive_id).then_some((i, *ro)))
            .ok_or_else(|| format!("drive {drive_id} is not attached to the running microVM"))?;
        // Opened here: this thread may open files, the event loop may not.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("drive {drive_id}: cannot open {path:?}: {e}"))?;
        self.command(Command::ChangeMedia {
            disk,
            path: PathBuf::from(path),
            file: OpenImage(file),
        })
        .map_err(|e| format!("drive {drive_id}: {e}"))
    }

    fn update_drive_rate_limiter(
        &mut self,
        drive_id: &str,
        _rate_limiter: Option<&RateLimiter>,
    ) -> std::result::Result<(), String> {
        Err(format!("drive {drive_id}: rate limiters are not supported"))
    }

    fn update_net_rate_limiters(
        &mut self,
        iface_id: &str,
        _rx: Option<&RateLimiter>,
        _tx: Option<&RateLimiter>,
    ) -> std::result::Result<(), String> {
        Err(format!(
            "network interface {iface_id}: rate limiters are not supported"
        ))
    }

    fn apply_logger(&mut self, logger: &Logger) -> std::result::Result<(), String> {
        if let Some(path) = &logger.log_path {
            crate::logger::redirect(Path::new(path))
                .map_err(|e| format!("cannot open the log file {path:?}: {e}"))?;
        }
        if let Some(level) = logger.level {
            log::set_max_level(level.to_level_filter());
        }
        Ok(())
    }

    fn apply_metrics(&mut self, metrics: &Metrics) -> std::result::Result<(), String> {
        self.metrics = Some(open_metrics(Path::new(&metrics.metrics_path))?);
        Ok(())
    }

    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
    ) -> std::result::Result<(), String> {
        let kind = match params.snapshot_type.unwrap_or_default() {
            ApiSnapshotType::Full => tvm_snapshot::SnapshotType::Full,
            ApiSnapshotType::Diff => tvm_snapshot::SnapshotType::Diff,
        };
        // Opened here: this thread may open files, the event loop may not.
        let files = crate::snapshot::open_files(
            Path::new(&params.snapshot_path),
            Path::new(&params.mem_file_path),
            kind,
        )
        .map_err(|e| crate::error_chain(&e))?;
        // Writing guest memory takes longer than other requests.
        match &self.running {
            Some(vm) => vm.send(Command::CreateSnapshot(files), SNAPSHOT_TIMEOUT),
            None => Err("the microVM is not running".into()),
        }
    }

    fn load_snapshot(
        &mut self,
        params: &SnapshotLoadParams,
    ) -> std::result::Result<MachineConfig, String> {
        let mem = params.mem_file().map_err(|e| e.to_string())?;
        let mut restore = crate::snapshot::load(Path::new(&params.snapshot_path), Path::new(mem))
            .map_err(|e| crate::error_chain(&e))?;
        restore.clock_realtime = params.clock_realtime.unwrap_or(false);
        let snapshot = &restore.snapshot;
        // Interfaces by the ids they were configured with.
        let names: Vec<Option<&str>> = snapshot
            .devices
            .virtio
            .iter()
            .filter_map(|d| match &d.kind {
                tvm_snapshot::VirtioKind::Net { name, .. } => Some(name.as_deref()),
                _ => None,
            })
            .collect();
        let mut overrides = Vec::new();
        for o in params.network_overrides.iter().flatten() {
            let index = names
                .iter()
                .position(|n| *n == Some(o.iface_id.as_str()))
                .ok_or_else(|| {
                    format!(
                        "network override: the snapshot has no interface {:?}",
                        o.iface_id
                    )
                })?;
            overrides.push(crate::snapshot::NetOverride {
                index,
                tap: o.host_dev_name.clone(),
            });
        }
        let vsock_uds = params
            .vsock_override
            .as_ref()
            .map(|v| PathBuf::from(&v.uds_path));
        let mut cfg = crate::snapshot::restore_config(
            snapshot,
            &overrides,
            vsock_uds.as_deref(),
            self.seccomp,
        )
        .map_err(|e| crate::error_chain(&e))?;
        cfg.track_dirty_pages = params.track_dirty_pages();
        let machine = MachineConfig {
            vcpu_count: snapshot.machine.vcpu_count,
            mem_size_mib: usize::try_from(snapshot.machine.mem_size >> 20).unwrap_or(usize::MAX),
            smt: snapshot.machine.threads_per_core > 1,
            track_dirty_pages: params.track_dirty_pages(),
            ..MachineConfig::default()
        };
        let drives = cfg
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    d.name.clone().unwrap_or_else(|| format!("drive{i}")),
                    d.read_only,
                )
            })
            .collect();
        let ifaces = cfg
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.name.clone().unwrap_or_else(|| format!("net{i}")))
            .collect();
        let resume = params.resume_vm.unwrap_or(false);
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.to_main
            .send(ToMain::Restore(
                Box::new(cfg),
                Box::new(restore),
                resume,
                reply_tx,
            ))
            .map_err(|_| "the vmm is shutting down".to_string())?;
        let sender = reply_rx
            .recv()
            .map_err(|_| "the vmm stopped while restoring the microVM".to_string())??;
        self.running = Some(sender);
        self.drives = drives;
        self.ifaces = ifaces;
        Ok(machine)
    }
}

/// The metrics sections of one `FlushMetrics` line, absolute: `api_server` (requests
/// answered and errors), and once the VM runs `vcpu` (exits by kind, summed over the
/// vCPUs), `block_<drive id>` and their total `block`, `net_<iface id>` and `net`,
/// `entropy`, `vsock`. Firecracker's names where it has the counter.
fn metric_sections(
    vm: Option<&VmCounters>,
    drives: &[(String, bool)],
    ifaces: &[String],
    (requests, errors): (u64, u64),
) -> MetricSections {
    let section = |list: &[(&str, u64)]| -> BTreeMap<String, u64> {
        list.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
    };
    let mut s = MetricSections::new();
    s.insert(
        "api_server".into(),
        section(&[("requests", requests), ("errors", errors)]),
    );
    let Some(vm) = vm else {
        return s;
    };
    s.insert(
        "vcpu".into(),
        vm.exits
            .iter()
            .map(|(kind, n)| (format!("exit_{}", kind.replace('-', "_")), *n))
            .collect(),
    );
    for ((id, _), c) in drives.iter().zip(&vm.disks) {
        s.insert(
            format!("block_{id}"),
            section(&[
                ("read_bytes", c.read_bytes),
                ("write_bytes", c.write_bytes),
                ("read_count", c.read_count),
                ("write_count", c.write_count),
                ("flush_count", c.flush_count),
                ("other_count", c.other_count),
                ("unsupported_count", c.unsupported_count),
                ("execute_fails", c.execute_fails),
                ("invalid_reqs_count", c.invalid_reqs_count),
            ]),
        );
    }
    for (id, c) in ifaces.iter().zip(&vm.nets) {
        s.insert(
            format!("net_{id}"),
            section(&[
                ("rx_bytes_count", c.rx_bytes),
                ("rx_packets_count", c.rx_packets),
                ("rx_dropped_count", c.rx_dropped),
                ("rx_fails", c.rx_errors),
                ("tx_bytes_count", c.tx_bytes),
                ("tx_packets_count", c.tx_packets),
                ("tx_dropped_count", c.tx_dropped),
                ("tx_fails", c.tx_errors),
            ]),
        );
    }
    add_total(&mut s, "block_", "block");
    add_total(&mut s, "net_", "net");
    if let Some(bytes) = vm.entropy_bytes {
        s.insert("entropy".into(), section(&[("entropy_bytes", bytes)]));
    }
    if let Some(c) = &vm.vsock {
        s.insert(
            "vsock".into(),
            section(&[
                ("rx_bytes_count", c.rx_bytes),
                ("rx_packets_count", c.rx_packets),
                ("tx_bytes_count", c.tx_bytes),
                ("tx_packets_count", c.tx_packets),
                ("conns_added", c.conns_added),
                ("conns_removed", c.conns_removed),
                ("conns_killed", c.conns_killed),
                ("tx_fails", c.tx_errors),
                ("rx_fails", c.rx_errors),
                ("host_fails", c.host_errors),
                ("host_refused", c.host_refused),
                ("guest_refused", c.guest_refused),
                ("rst_dropped", c.rst_dropped),
            ]),
        );
    }
    s
}

fn open_metrics(path: &Path) -> std::result::Result<File, String> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("cannot open the metrics file {path:?}: {e}"))
}

/// Turns one HTTP request into the API's answer.
fn answer(
    request: std::result::Result<Request, RequestError>,
    controller: &mut Controller,
    actions: &mut Actions,
) -> Response {
    actions.requests += 1;
    let response = match request {
        Err(e) => {
            // Firecracker answers malformed HTTP with 400 and a fault message.
            let body = tvm_api::ApiError {
                status: e.status(),
                fault_message: e.to_string(),
            };
            Response::json(e.status(), body.to_json()).with_close()
        }
        Ok(req) => match parse_request(&req.method, &req.path, &req.body) {
            Err(e) => Response::json(e.status, e.to_json()),
            Ok(api) => {
                let r = controller.handle(api, actions);
                match r.body {
                    Some(body) => Response::json(r.status, body),
                    None if r.status == 204 => Response::no_content(),
                    None => Response::new(r.status),
                }
            }
        },
    };
    if response.status >= 400 {
        actions.errors += 1;
    }
    response
}

/// The API thread: applies the config file (and starts it), then serves the socket until
/// `stop` is written.
fn api_thread(
    opts: FcOptions,
    server: Option<Server>,
    filter: Option<Arc<seccompiler::BpfProgram>>,
    to_main: Sender<ToMain>,
    stop: EventFd,
) {
    let fail = |to_main: &Sender<ToMain>, why: String| {
        let _ = to_main.send(ToMain::Failed(why));
    };
    let mut actions = Actions {
        to_main: to_main.clone(),
        seccomp: opts.seccomp,
        running: None,
        drives: Vec::new(),
        ifaces: Vec::new(),
        metrics_log: MetricsLog::new(),
        metrics: None,
        requests: 0,
        errors: 0,
    };
    if let Some(path) = &opts.metrics_path {
        match open_metrics(path) {
            Ok(f) => actions.metrics = Some(f),
            Err(e) => return fail(&to_main, e),
        }
    }
    let config = ControllerConfig {
        instance_id: opts.id.clone(),
        ..ControllerConfig::default()
    };
    let mut controller = match &opts.config_file {
        None => Controller::new(config),
        Some(path) => {
            let loaded = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the config file {path:?}: {e}"))
                .and_then(|text| {
                    FullVmConfig::from_json(&text)
                        .and_then(|full| Controller::from_config(config, full, &mut actions))
                        .map_err(|e| format!("config file {path:?}: {}", crate::error_chain(&e)))
                });
            let mut controller = match loaded {
                Ok(c) => c,
                Err(e) => return fail(&to_main, e),
            };
            if let Err(e) = controller.start(&mut actions) {
                return fail(
                    &to_main,
                    format!("config file {path:?}: {}", crate::error_chain(&e)),
                );
            }
            controller
        }
    };
    let Some(mut server) = server else {
        // --no-api: nothing more to do; the VM runs on the main thread.
        return;
    };
    // The config file is read and applied; from here on the thread only serves the
    // socket, under its own filter.
    if let Err(e) = crate::seccomp::apply(ThreadKind::Api, filter.as_deref()) {
        return fail(&to_main, crate::error_chain(&e));
    }
    let mut handler = |r| answer(r, &mut controller, &mut actions);
    if let Err(e) = server.serve(&mut handler, &stop) {
        warn!("the api server stopped: {}", crate::error_chain(&e));
    }
}

/// Runs the VMM the way Firecracker does: configured through the API socket and/or a
/// config file, started by `InstanceStart` (or at once with a config file). Returns why
/// the VM stopped.
pub fn run(opts: FcOptions, times: Arc<BootTimes>) -> Result<ExitReason> {
    if opts.api_sock.is_none() && opts.config_file.is_none() {
        return Err(Error::Api(
            "--no-api needs --config-file: nothing could start the microVM".into(),
        ));
    }
    let server = match &opts.api_sock {
        Some(path) => {
            let limits = Limits {
                max_body: opts.max_payload,
                ..Limits::default()
            };
            let server = Server::bind(path, limits).map_err(Error::ApiSocket)?;
            info!("api socket at {path:?}");
            Some(server)
        }
        None => None,
    };
    let filters = Filters::new(opts.seccomp)?;
    if opts.seccomp == SeccompLevel::On {
        crate::seccomp::install_sigsys_handler()?;
    }
    let filter = filters.get(ThreadKind::Api);
    let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    let thread_stop = stop.try_clone().map_err(Error::EventFd)?;
    // Until a VM runs (and its event loop takes them over), a termination signal stops the
    // API server, which removes the socket file; the loop below then ends on it.
    crate::vmm::install_termination_handlers(&stop)?;
    let (to_main, from_api): (Sender<ToMain>, Receiver<ToMain>) = mpsc::channel();
    let api_opts = opts.clone();
    let api = std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || api_thread(api_opts, server, filter, to_main, thread_stop))
        .map_err(Error::SpawnVcpu)?;

    let result = loop {
        match from_api.recv() {
            Ok(ToMain::Start(cfg, reply)) => match Vmm::build(&cfg, times.clone()) {
                Ok(mut vmm) => {
                    let sender = vmm.take_command_sender().ok_or_else(|| {
                        Error::Api("the vm's request handle was already taken".into())
                    });
                    match sender {
                        Ok(s) => {
                            let _ = reply.send(Ok(s));
                            break vmm.run();
                        }
                        Err(e) => break Err(e),
                    }
                }
                Err(e) => {
                    let text = crate::error_chain(&e);
                    debug!("InstanceStart failed: {text}");
                    let _ = reply.send(Err(text));
                }
            },
            Ok(ToMain::Restore(cfg, restore, resume, reply)) => {
                match Vmm::restore(&cfg, times.clone(), *restore) {
                    Ok(mut vmm) => {
                        if !resume {
                            vmm.start_paused();
                        }
                        match vmm.take_command_sender() {
                            Some(s) => {
                                let _ = reply.send(Ok(s));
                                break vmm.run();
                            }
                            None => {
                                break Err(Error::Api(
                                    "the vm's request handle was already taken".into(),
                                ))
                            }
                        }
                    }
                    Err(e) => {
                        let text = crate::error_chain(&e);
                        debug!("snapshot load failed: {text}");
                        let _ = reply.send(Err(text));
                    }
                }
            }
            Ok(ToMain::Failed(why)) => break Err(Error::Api(why)),
            // The API thread ended: with --no-api after a start that failed it said so;
            // a termination signal stopped the server; otherwise the server failed.
            Err(_) => match crate::vmm::last_signal() {
                0 => break Err(Error::Api("the api thread ended".into())),
                n => break Ok(ExitReason::Signal(n)),
            },
        }
    };
    let _ = stop.write(1);
    // The API thread answers its last request and drops the server (and the socket file);
    // a request stuck on the stopped VM times out within COMMAND_TIMEOUT.
    if api.join().is_err() {
        warn!("the api thread panicked");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tvm_api::{parse_request, Controller};

    struct Recorder;
    impl VmmActions for Recorder {
        fn start(&mut self, _: &VmResources) -> std::result::Result<(), String> {
            Ok(())
        }
        fn pause(&mut self) -> std::result::Result<(), String> {
            Ok(())
        }
        fn resume(&mut self) -> std::result::Result<(), String> {
            Ok(())
        }
        fn send_ctrl_alt_del(&mut self) -> std::result::Result<(), String> {
            Ok(())
        }
        fn flush_metrics(&mut self) -> std::result::Result<(), String> {
            Ok(())
        }
        fn update_drive_path(&mut self, _: &str, _: &str) -> std::result::Result<(), String> {
            Ok(())
        }
        fn update_drive_rate_limiter(
            &mut self,
            _: &str,
            _: Option<&RateLimiter>,
        ) -> std::result::Result<(), String> {
            Ok(())
        }
        fn update_net_rate_limiters(
            &mut self,
            _: &str,
            _: Option<&RateLimiter>,
            _: Option<&RateLimiter>,
        ) -> std::result::Result<(), String> {
            Ok(())
        }
        fn apply_logger(&mut self, _: &Logger) -> std::result::Result<(), String> {
            Ok(())
        }
        fn apply_metrics(&mut self, _: &Metrics) -> std::result::Result<(), String> {
            Ok(())
        }
    }

    fn resources(requests: &[(&str, &str, &str)]) -> VmResources {
        let mut c = Controller::new(ControllerConfig::default());
        for (method, path, body) in requests {
            let r = c.handle(
                parse_request(method, path, body.as_bytes()).unwrap(),
                &mut Recorder,
            );
            assert!(r.status < 300, "{method} {path}: {r:?}");
        }
        c.resources().clone()
    }

    #[test]
    fn resources_map_to_the_config_our_cli_would_build() {
        let r = resources(&[
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 4, "mem_size_mib": 256, "smt": true}"#,
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0 pci=off reboot=k"}"#,
            ),
            (
                "PUT",
                "/drives/data",
                r#"{"drive_id": "data", "path_on_host": "/d.img", "is_root_device": false, "is_read_only": true}"#,
            ),
            (
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true}"#,
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap7", "guest_mac": "06:00:ac:10:00:02"}"#,
            ),
            ("PUT", "/entropy", "{}"),
        ]);
        let cfg = vm_config_from_resources(&r, SeccompLevel::Log).unwrap();
        assert_eq!(cfg.kernel, PathBuf::from("/k"));
        assert_eq!(cfg.initrd, Some(PathBuf::from("/i")));
        assert_eq!(cfg.cmdline, "console=ttyS0 reboot=k root=/dev/vda rw");
        assert_eq!(cfg.mem_size, 256 << 20);
        assert_eq!(cfg.cpus, CpuTopology::new(2, 2, 1).unwrap());
        // The root drive first (vda), then the others in order.
        let disks: Vec<_> = cfg
            .disks
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.read_only))
            .collect();
        assert_eq!(disks, [("/r.ext4", false), ("/d.img", true)]);
        assert_eq!(cfg.disks[0].id.as_deref(), Some("rootfs"));
        assert_eq!(cfg.nets[0].tap, "tap7");
        assert_eq!(cfg.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert!(cfg.rng);
        assert_eq!(cfg.seccomp, SeccompLevel::Log);
    }

    #[test]
    fn defaults_and_refusals() {
        let r = resources(&[("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#)]);
        let cfg = vm_config_from_resources(&r, SeccompLevel::On).unwrap();
        // Firecracker's defaults: 1 vCPU, 128 MiB; our default command line.
        assert_eq!(cfg.cpus.cpu_count(), 1);
        assert_eq!(cfg.mem_size, 128 << 20);
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert!(!cfg.rng && cfg.disks.is_empty() && cfg.nets.is_empty());
        let none = resources(&[]);
        let e = vm_config_from_resources(&none, SeccompLevel::On).unwrap_err();
        assert!(e.contains("boot source"), "{e}");
    }

    #[test]
    fn metrics_sections_name_every_device_and_add_the_totals() {
        use tvm_virtio_blk::BlockCounters;
        use tvm_virtio_net::NetCounters;
        let before = metric_sections(None, &[], &[], (3, 1));
        assert_eq!(before.keys().collect::<Vec<_>>(), ["api_server"]);
        assert_eq!(before["api_server"]["requests"], 3);
        assert_eq!(before["api_server"]["errors"], 1);
        let vm = VmCounters {
            exits: vec![("io-in", 4), ("mmio-write", 2)],
            disks: vec![
                BlockCounters {
                    read_bytes: 4096,
                    read_count: 1,
                    ..BlockCounters::default()
                },
                BlockCounters {
                    read_bytes: 512,
                    write_count: 2,
                    invalid_reqs_count: 1,
                    ..BlockCounters::default()
                },
            ],
            nets: vec![NetCounters {
                rx_bytes: 60,
                tx_packets: 1,
                ..NetCounters::default()
            }],
            entropy_bytes: Some(64),
            vsock: Some(tvm_vsock::VsockCounters {
                rx_bytes: 7,
                conns_added: 2,
                ..Default::default()
            }),
        };
        let drives = [("rootfs".to_string(), false), ("data".to_string(), true)];
        let s = metric_sections(Some(&vm), &drives, &["eth0".to_string()], (0, 0));
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            [
                "api_server",
                "block",
                "block_data",
                "block_rootfs",
                "entropy",
                "net",
                "net_eth0",
                "vcpu",
                "vsock"
            ]
        );
        assert_eq!(s["vcpu"]["exit_io_in"], 4);
        assert_eq!(s["vcpu"]["exit_mmio_write"], 2);
        assert_eq!(s["block_rootfs"]["read_bytes"], 4096);
        assert_eq!(s["block_data"]["invalid_reqs_count"], 1);
        assert_eq!(s["block"]["read_bytes"], 4608);
        assert_eq!(s["block"]["write_count"], 2);
        assert_eq!(s["net_eth0"]["rx_bytes_count"], 60);
        assert_eq!(s["net"]["tx_packets_count"], 1);
        assert_eq!(s["entropy"]["entropy_bytes"], 64);
        assert_eq!(s["vsock"]["rx_bytes_count"], 7);
        assert_eq!(s["vsock"]["conns_added"], 2);
    }

    #[test]
    fn pci_off_is_dropped_and_nothing_else() {
        assert_eq!(drop_pci_off("a pci=off b pci=offx"), "a b pci=offx");
        assert_eq!(drop_pci_off("console=ttyS0"), "console=ttyS0");
    }
}
