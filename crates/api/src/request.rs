// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Routing: an HTTP method, path and body to an [`ApiRequest`].

use serde::de::DeserializeOwned;

use crate::{
    validate_id, ApiError, BootSource, Drive, EntropyDevice, Error, InstanceActionInfo, Logger,
    MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, Result, SnapshotCreateParams, SnapshotLoadParams, Vm, Vsock,
};

/// One supported API call, its body parsed (values are validated when it is handled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: instance information.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config` (pre-boot).
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config` (pre-boot).
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source` (pre-boot).
    PutBootSource(BootSource),
    /// `PUT /drives/{drive_id}` (pre-boot).
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}` (after start).
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{iface_id}` (pre-boot).
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}` (after start).
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /logger` (pre-boot).
    PutLogger(Logger),
    /// `PUT /metrics` (pre-boot, once).
    PutMetrics(Metrics),
    /// `PUT /actions`.
    PutActions(InstanceActionInfo),
    /// `PATCH /vm` (after start).
    PatchVm(Vm),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /entropy` (pre-boot).
    PutEntropy(EntropyDevice),
    /// `PUT /vsock` (pre-boot).
    PutVsock(Vsock),
    /// `PUT /snapshot/create` (paused).
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load` (instead of configuring and starting).
    LoadSnapshot(SnapshotLoadParams),
}

/// Endpoints of Firecracker's OpenAPI file (1.17) that this VMM does not implement yet;
/// `{}` matches one path segment.
const NOT_SUPPORTED: &[&str] = &[
    "/balloon",
    "/balloon/statistics",
    "/balloon/hinting/start",
    "/balloon/hinting/status",
    "/balloon/hinting/stop",
    "/cpu-config",
    "/hotplug/memory",
    "/mmds",
    "/mmds/config",
    "/pmem/{}",
    "/serial",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    Root,
    Version,
    MachineConfig,
    BootSource,
    Drive(&'a str),
    NetworkInterface(&'a str),
    Logger,
    Metrics,
    Actions,
    Vm,
    VmConfig,
    Entropy,
    Vsock,
    SnapshotCreate,
    SnapshotLoad,
}

impl Route<'_> {
    fn methods(self) -> &'static [&'static str] {
        match self {
            Route::Root | Route::Version | Route::VmConfig => &["GET"],
            Route::MachineConfig => &["GET", "PUT", "PATCH"],
            Route::Drive(_) | Route::NetworkInterface(_) => &["PUT", "PATCH"],
            Route::BootSource
            | Route::Logger
            | Route::Metrics
            | Route::Actions
            | Route::Entropy
            | Route::Vsock
            | Route::SnapshotCreate
            | Route::SnapshotLoad => &["PUT"],
            Route::Vm => &["PATCH"],
        }
    }
}

/// Drops the query string and one trailing `/` (Firecracker's parser ignores a trailing `/`;
/// see the crate docs for the query string). Nothing else is rewritten.
fn normalize(path: &str) -> Result<&str> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if !path.starts_with('/') {
        return Err(Error::UnknownPath(path.to_string()));
    }
    Ok(match path.strip_suffix('/') {
        Some(trimmed) if !trimmed.is_empty() => trimmed,
        _ => path,
    })
}

fn matches_pattern(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some("{}"), Some(seg)) if !seg.is_empty() => {}
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

fn route(path: &str) -> Result<Route<'_>> {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let route = match segments.as_slice() {
        [""] => Route::Root,
        ["version"] => Route::Version,
        ["machine-config"] => Route::MachineConfig,
        ["boot-source"] => Route::BootSource,
        ["drives"] => Route::Drive(""),
        ["drives", id] => Route::Drive(id),
        ["network-interfaces"] => Route::NetworkInterface(""),
        ["network-interfaces", id] => Route::NetworkInterface(id),
        ["logger"] => Route::Logger,
        ["metrics"] => Route::Metrics,
        ["actions"] => Route::Actions,
        ["vm"] => Route::Vm,
        ["vm", "config"] => Route::VmConfig,
        ["entropy"] => Route::Entropy,
        ["vsock"] => Route::Vsock,
        ["snapshot", "create"] => Route::SnapshotCreate,
        ["snapshot", "load"] => Route::SnapshotLoad,
        _ if NOT_SUPPORTED.iter().any(|p| matches_pattern(p, path)) => {
            return Err(Error::EndpointNotSupported(path.to_string()))
        }
        _ => return Err(Error::UnknownPath(path.to_string())),
    };
    Ok(route)
}

/// The methods a path accepts, for an `Allow` header; `None` when the path is unknown or
/// not supported.
pub fn allowed_methods(path: &str) -> Option<&'static [&'static str]> {
    let path = normalize(path).ok()?;
    route(path).ok().map(Route::methods)
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(Error::ParseJson)
}

/// The id in the path must be valid and equal to the id in the body.
fn check_ids(kind: &'static str, path_id: &str, body_id: &str) -> Result<()> {
    validate_id(kind, path_id)?;
    if path_id != body_id {
        return Err(Error::IdMismatch {
            path_id: path_id.to_string(),
            body_id: body_id.to_string(),
        });
    }
    Ok(())
}

/// Routes one HTTP request.
///
/// `path` is the request target as sent (`/drives/rootfs`, optionally with a query string
/// and a trailing `/`); `body` is empty when the request has none.
///
/// # Errors
///
/// 404 for an unknown path, 405 for a method the path does not take, 400 for an endpoint
/// Firecracker has and this VMM does not, a GET with a body, a PUT or PATCH without one,
/// JSON that does not parse or has unknown fields, an invalid id in the path, or a path id
/// that differs from the body's.
///
/// # Example
///
/// ```
/// use tvm_api::{parse_request, ApiRequest};
///
/// let req = parse_request("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap();
/// assert!(matches!(req, ApiRequest::PutActions(_)));
/// assert_eq!(parse_request("GET", "/nope", b"").unwrap_err().status, 404);
/// ```
pub fn parse_request(
    method: &str,
    path: &str,
    body: &[u8],
) -> std::result::Result<ApiRequest, ApiError> {
    parse(method, path, body).map_err(ApiError::from)
}

fn parse(method: &str, path: &str, bytes: &[u8]) -> Result<ApiRequest> {
    let path = normalize(path)?;
    let route = route(path)?;
    let allowed = route.methods();
    if !allowed.contains(&method) {
        return Err(Error::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed: allowed.join(", "),
        });
    }
    if method == "GET" {
        if !bytes.is_empty() {
            return Err(Error::UnexpectedBody);
        }
    } else if bytes.is_empty() {
        return Err(Error::EmptyBody(method.to_string()));
    }
    let request = match (route, method) {
        (Route::Root, _) => ApiRequest::GetInstanceInfo,
        (Route::Version, _) => ApiRequest::GetVersion,
        (Route::VmConfig, _) => ApiRequest::GetVmConfig,
        (Route::MachineConfig, "GET") => ApiRequest::GetMachineConfig,
        (Route::MachineConfig, "PUT") => ApiRequest::PutMachineConfig(body(bytes)?),
        (Route::MachineConfig, _) => {
            let update: MachineConfigUpdate = body(bytes)?;
            if update.is_empty() {
                return Err(Error::EmptyUpdate);
            }
            ApiRequest::PatchMachineConfig(update)
        }
        (Route::BootSource, _) => ApiRequest::PutBootSource(body(bytes)?),
        (Route::Drive(id), "PUT") => {
            validate_id("drive", id)?;
            let drive: Drive = body(bytes)?;
            check_ids("drive", id, &drive.drive_id)?;
            ApiRequest::PutDrive(drive)
        }
        (Route::Drive(id), _) => {
            validate_id("drive", id)?;
            let patch: PartialDrive = body(bytes)?;
            check_ids("drive", id, &patch.drive_id)?;
            ApiRequest::PatchDrive(patch)
        }
        (Route::NetworkInterface(id), "PUT") => {
            validate_id("network interface", id)?;
            let iface: NetworkInterface = body(bytes)?;
            check_ids("network interface", id, &iface.iface_id)?;
            ApiRequest::PutNetworkInterface(iface)
        }
        (Route::NetworkInterface(id), _) => {
            validate_id("network interface", id)?;
            let patch: PartialNetworkInterface = body(bytes)?;
            check_ids("network interface", id, &patch.iface_id)?;
            ApiRequest::PatchNetworkInterface(patch)
        }
        (Route::Logger, _) => ApiRequest::PutLogger(body(bytes)?),
        (Route::Metrics, _) => ApiRequest::PutMetrics(body(bytes)?),
        (Route::Actions, _) => ApiRequest::PutActions(body(bytes)?),
        (Route::Vm, _) => ApiRequest::PatchVm(body(bytes)?),
        (Route::Entropy, _) => ApiRequest::PutEntropy(body(bytes)?),
        (Route::Vsock, _) => ApiRequest::PutVsock(body(bytes)?),
        (Route::SnapshotCreate, _) => ApiRequest::CreateSnapshot(body(bytes)?),
        (Route::SnapshotLoad, _) => ApiRequest::LoadSnapshot(body(bytes)?),
    };
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ActionType, CacheType, IoEngine, LogLevel, VmState};

    fn ok(method: &str, path: &str, body: &str) -> ApiRequest {
        parse_request(method, path, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn err(method: &str, path: &str, body: &str) -> ApiError {
        match parse_request(method, path, body.as_bytes()) {
            Ok(req) => panic!("{method} {path} parsed as {req:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn gets() {
        assert_eq!(ok("GET", "/", ""), ApiRequest::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), ApiRequest::GetVersion);
        assert_eq!(
            ok("GET", "/machine-config", ""),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(ok("GET", "/vm/config", ""), ApiRequest::GetVmConfig);
    }

    #[test]
    fn trailing_slash_and_query_string_are_tolerated() {
        assert_eq!(
            ok("GET", "/machine-config/", ""),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(
            ok("GET", "/vm/config?pretty=1", ""),
            ApiRequest::GetVmConfig
        );
        assert_eq!(ok("GET", "/?x", ""), ApiRequest::GetInstanceInfo);
        assert!(matches!(
            ok(
                "PUT",
                "/drives/rootfs/?a=b",
                r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#
            ),
            ApiRequest::PutDrive(_)
        ));
        // Only one trailing slash, and nothing else is rewritten.
        assert_eq!(err("GET", "/machine-config//", "").status, 404);
        assert_eq!(err("GET", "//machine-config", "").status, 404);
        assert_eq!(err("GET", "/Machine-Config", "").status, 404);
        assert_eq!(err("GET", "machine-config", "").status, 404);
        assert_eq!(err("GET", "", "").status, 404);
    }

    #[test]
    fn machine_config_bodies() {
        let ApiRequest::PutMachineConfig(cfg) = ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false,
                "huge_pages": "None"}"#,
        ) else {
            panic!("not a PUT /machine-config");
        };
        assert_eq!((cfg.vcpu_count, cfg.mem_size_mib), (2, 256));
        let ApiRequest::PatchMachineConfig(update) =
            ok("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#)
        else {
            panic!("not a PATCH /machine-config");
        };
        assert_eq!(update.mem_size_mib, Some(512));
        assert_eq!(update.vcpu_count, None);

        let e = err("PATCH", "/machine-config", "{}");
        assert_eq!(e.status, 400);
        assert!(
            e.fault_message.contains("nothing to update"),
            "{}",
            e.fault_message
        );
        let e = err("PUT", "/machine-config", r#"{"vcpu_count": 2}"#);
        assert!(
            e.fault_message.contains("mem_size_mib"),
            "{}",
            e.fault_message
        );
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 300, "mem_size_mib": 1}"#,
        );
        assert_eq!(e.status, 400);
        let e = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1, "cpus": 1}"#,
        );
        assert!(
            e.fault_message.contains("unknown field `cpus`"),
            "{}",
            e.fault_message
        );
    }

    #[test]
    fn boot_source_body() {
        let req = ok(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "quiet"}"#,
        );
        let ApiRequest::PutBootSource(b) = req else {
            panic!("{req:?}");
        };
        assert_eq!(b.kernel_image_path, "/vmlinux");
        assert_eq!(err("PUT", "/boot-source", "{}").status, 400);
    }

    #[test]
    fn drive_bodies() {
        let req = ok(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true,
                "partuuid": "abcd-01", "is_read_only": false, "cache_type": "Writeback",
                "io_engine": "Sync",
                "rate_limiter": {"bandwidth": {"size": 0, "one_time_burst": 0, "refill_time": 0},
                                 "ops": {"size": 0, "one_time_burst": 0, "refill_time": 0}}}"#,
        );
        let ApiRequest::PutDrive(d) = req else {
            panic!("{req:?}");
        };
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert_eq!(d.io_engine, Some(IoEngine::Sync));
        let req = ok(
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/new"}"#,
        );
        assert_eq!(
            req,
            ApiRequest::PatchDrive(PartialDrive {
                drive_id: "rootfs".into(),
                path_on_host: Some("/new".into()),
                rate_limiter: None,
            })
        );
    }

    #[test]
    fn path_id_must_match_the_body() {
        let e = err(
            "PUT",
            "/drives/foo",
            r#"{"drive_id": "bar", "path_on_host": "/x", "is_root_device": false}"#,
        );
        assert_eq!(e.status, 400);
        assert!(
            e.fault_message.contains("does not match"),
            "{}",
            e.fault_message
        );
        let e = err(
            "PATCH",
            "/drives/foo",
            r#"{"drive_id": "bar", "path_on_host": "/x"}"#,
        );
        assert!(
            e.fault_message.contains("does not match"),
            "{}",
            e.fault_message
        );
        let e = err(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
        );
        assert!(
            e.fault_message.contains("does not match"),
            "{}",
            e.fault_message
        );
        let e = err(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth1"}"#,
        );
        assert!(
            e.fault_message.contains("does not match"),
            "{}",
            e.fault_message
        );
    }

    #[test]
    fn path_ids_are_checked() {
        let e = err(
            "PUT",
            "/drives",
            r#"{"drive_id": "", "path_on_host": "/x", "is_root_device": false}"#,
        );
        assert_eq!(e.status, 400);
        assert!(
            e.fault_message.contains("drive id is empty"),
            "{}",
            e.fault_message
        );
        let e = err(
            "PUT",
            "/drives/a.b",
            r#"{"drive_id": "a.b", "path_on_host": "/x", "is_root_device": false}"#,
        );
        assert!(
            e.fault_message.contains("invalid drive id"),
            "{}",
            e.fault_message
        );
        let e = err("PATCH", "/network-interfaces/", r#"{"iface_id": ""}"#);
        assert!(
            e.fault_message.contains("network interface id is empty"),
            "{}",
            e.fault_message
        );
        // A nested path is not an id.
        assert_eq!(err("PUT", "/drives/a/b", "{}").status, 404);
    }

    #[test]
    fn network_interface_bodies() {
        let req = ok(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                "rx_rate_limiter": {"bandwidth": {"size": 100, "refill_time": 10}},
                "tx_rate_limiter": {"ops": {"size": 100, "one_time_burst": 5, "refill_time": 10}}}"#,
        );
        let ApiRequest::PutNetworkInterface(n) = req else {
            panic!("{req:?}");
        };
        assert_eq!(n.guest_mac.unwrap().to_string(), "06:00:ac:10:00:02");
        let req = ok(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        );
        assert!(
            matches!(req, ApiRequest::PatchNetworkInterface(ref p) if p.rx_rate_limiter.is_none())
        );
        let e = err(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}"#,
        );
        assert!(e.fault_message.contains("unicast"), "{}", e.fault_message);
    }

    #[test]
    fn logger_metrics_actions_vm_entropy() {
        let req = ok(
            "PUT",
            "/logger",
            r#"{"log_path": "/l", "level": "warn", "show_level": true}"#,
        );
        assert!(matches!(req, ApiRequest::PutLogger(ref l) if l.level == Some(LogLevel::Warning)));
        let req = ok("PUT", "/metrics", r#"{"metrics_path": "/m"}"#);
        assert!(matches!(req, ApiRequest::PutMetrics(ref m) if m.metrics_path == "/m"));
        for (name, action) in [
            ("InstanceStart", ActionType::InstanceStart),
            ("FlushMetrics", ActionType::FlushMetrics),
            ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
        ] {
            let req = ok(
                "PUT",
                "/actions",
                &format!(r#"{{"action_type": "{name}"}}"#),
            );
            assert_eq!(
                req,
                ApiRequest::PutActions(InstanceActionInfo {
                    action_type: action
                })
            );
        }
        let req = ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_eq!(
            req,
            ApiRequest::PatchVm(Vm {
                state: VmState::Paused
            })
        );
        let req = ok("PUT", "/entropy", "{}");
        assert_eq!(req, ApiRequest::PutEntropy(EntropyDevice::default()));
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            "/nope",
            "/drive/a",
            "/vm/state",
            "/version/x",
            "/balloon/x",
            "/mmds/config/x",
        ] {
            let e = err("GET", path, "");
            assert_eq!(e.status, 404, "{path}");
            assert!(e.fault_message.contains(path), "{}", e.fault_message);
        }
    }

    #[test]
    fn wrong_methods_are_405() {
        for (method, path) in [
            ("PUT", "/"),
            ("PATCH", "/version"),
            ("DELETE", "/machine-config"),
            ("GET", "/boot-source"),
            ("PATCH", "/boot-source"),
            ("GET", "/drives/a"),
            ("GET", "/network-interfaces/a"),
            ("GET", "/logger"),
            ("GET", "/metrics"),
            ("GET", "/actions"),
            ("PUT", "/vm"),
            ("GET", "/vm"),
            ("PUT", "/vm/config"),
            ("GET", "/entropy"),
            ("get", "/"),
        ] {
            let e = err(method, path, "{}");
            assert_eq!(e.status, 405, "{method} {path}");
            assert!(e.fault_message.contains("allowed"), "{}", e.fault_message);
        }
        assert_eq!(
            allowed_methods("/machine-config"),
            Some(&["GET", "PUT", "PATCH"][..])
        );
        assert_eq!(allowed_methods("/drives/x/"), Some(&["PUT", "PATCH"][..]));
        assert_eq!(allowed_methods("/vsock"), Some(&["PUT"][..]));
        assert_eq!(allowed_methods("/balloon"), None);
        assert_eq!(allowed_methods("/nope"), None);
    }

    #[test]
    fn firecracker_endpoints_we_lack_are_400_not_supported() {
        for (method, path) in [
            ("GET", "/balloon"),
            ("PUT", "/balloon"),
            ("PATCH", "/balloon/statistics"),
            ("GET", "/balloon/statistics"),
            ("PATCH", "/balloon/hinting/start"),
            ("GET", "/balloon/hinting/status"),
            ("PATCH", "/balloon/hinting/stop"),
            ("PUT", "/cpu-config"),
            ("PUT", "/hotplug/memory"),
            ("GET", "/hotplug/memory"),
            ("PUT", "/mmds"),
            ("GET", "/mmds"),
            ("PUT", "/mmds/config"),
            ("PUT", "/pmem/p0"),
            ("PATCH", "/pmem/p0"),
            ("PUT", "/serial"),
        ] {
            let e = err(method, path, "{}");
            assert_eq!(e.status, 400, "{method} {path}");
            assert!(
                e.fault_message
                    .ends_with("is not supported by this VMM yet"),
                "{}",
                e.fault_message
            );
        }
        assert_eq!(err("PUT", "/pmem", "{}").status, 404);
        assert_eq!(err("PUT", "/snapshot", "{}").status, 404);
    }

    #[test]
    fn snapshot_requests_are_routed_with_their_bodies() {
        let req = ok(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        assert!(matches!(req, ApiRequest::CreateSnapshot(p) if p.snapshot_path == "/s"));
        let req = ok(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
        );
        assert!(matches!(req, ApiRequest::LoadSnapshot(p) if p.mem_file().unwrap() == "/m"));
        assert_eq!(err("GET", "/snapshot/create", "").status, 405);
        assert_eq!(
            err("PUT", "/snapshot/load", r#"{"mem_file_path": "/m"}"#).status,
            400
        );
    }

    #[test]
    fn bodies_where_they_belong() {
        let e = err("GET", "/", "{}");
        assert_eq!(e.status, 400);
        assert!(e.fault_message.contains("GET request cannot have a body"));
        for (method, path) in [
            ("PUT", "/machine-config"),
            ("PATCH", "/machine-config"),
            ("PUT", "/boot-source"),
            ("PUT", "/drives/a"),
            ("PATCH", "/drives/a"),
            ("PUT", "/network-interfaces/a"),
            ("PATCH", "/network-interfaces/a"),
            ("PUT", "/logger"),
            ("PUT", "/metrics"),
            ("PUT", "/actions"),
            ("PATCH", "/vm"),
            ("PUT", "/entropy"),
        ] {
            let e = err(method, path, "");
            assert_eq!(e.status, 400, "{method} {path}");
            assert!(
                e.fault_message
                    .contains(&format!("the {method} request has an empty body")),
                "{}",
                e.fault_message
            );
        }
    }

    #[test]
    fn malformed_json_is_400_with_position() {
        let e = err("PUT", "/logger", "{\"level\": ");
        assert_eq!(e.status, 400);
        assert!(
            e.fault_message
                .starts_with("failed to parse the JSON body: "),
            "{}",
            e.fault_message
        );
        assert!(e.fault_message.contains("line 1"), "{}", e.fault_message);
        let e = err("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(e.fault_message.contains("Reboot"), "{}", e.fault_message);
        let e = err("PUT", "/actions", "[]");
        assert_eq!(e.status, 400);
        let e = err(
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"bandwidth": {"size": 1}}}"#,
        );
        assert!(
            e.fault_message.contains("refill_time"),
            "{}",
            e.fault_message
        );
    }
}
