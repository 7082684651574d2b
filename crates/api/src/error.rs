// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate's error type, and the HTTP error an API call answers with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Everything that can go wrong while routing a request, validating a body or applying it.
///
/// [`Error::status`] says which HTTP status the error maps to; [`ApiError`] turns it into the
/// `{"fault_message": ...}` body Firecracker clients expect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No endpoint has this path.
    #[error("no API endpoint at {0}")]
    UnknownPath(String),
    /// The path exists but not with this method.
    #[error("method {method} is not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The methods the path takes, comma-separated.
        allowed: String,
    },
    /// Firecracker has this endpoint; this VMM does not implement it yet.
    #[error("{0} is not supported by this VMM yet")]
    EndpointNotSupported(String),
    /// A GET request came with a body.
    #[error("a GET request cannot have a body")]
    UnexpectedBody,
    /// A PUT or PATCH request came without a body.
    #[error("the {0} request has an empty body")]
    EmptyBody(String),
    /// The body is not JSON of the expected shape (syntax, unknown field, wrong type).
    #[error("failed to parse the JSON body")]
    ParseJson(#[source] serde_json::Error),
    /// A resource id is empty (in the path or in the body).
    #[error("the {0} id is empty")]
    EmptyId(&'static str),
    /// A resource id has characters other than ASCII letters, digits and `_`, or is too long.
    #[error(
        "invalid {kind} id {id:?}: use at most {max} ASCII letters, digits or underscores",
        max = crate::MAX_ID_LEN
    )]
    InvalidId {
        /// What the id names ("drive", "network interface").
        kind: &'static str,
        /// The id as given.
        id: String,
    },
    /// The id in the URL path differs from the id in the body.
    #[error("the id in the path ({path_id:?}) does not match the id in the body ({body_id:?})")]
    IdMismatch {
        /// The id from the path.
        path_id: String,
        /// The id from the body.
        body_id: String,
    },
    /// A PATCH body names nothing to change.
    #[error("the PATCH request has nothing to update")]
    EmptyUpdate,
    /// `vcpu_count` is out of range, or odd with SMT enabled.
    #[error(
        "invalid vcpu_count {count} (smt {smt}): use 1 to {max}, and 1 or an even number \
         when smt is enabled",
        max = crate::MAX_VCPUS
    )]
    InvalidVcpuCount {
        /// The requested count.
        count: u8,
        /// Whether SMT would be enabled.
        smt: bool,
    },
    /// `mem_size_mib` is zero or too large to address.
    #[error(
        "invalid mem_size_mib {0}: use 1 to {max}",
        max = crate::MAX_MEM_SIZE_MIB
    )]
    InvalidMemorySize(usize),
    /// A CPU template other than `None` was asked for.
    #[error("cpu_template {0} is not supported by this VMM yet")]
    CpuTemplateNotSupported(String),
    /// Huge pages other than `None` were asked for.
    #[error("huge_pages {0} is not supported by this VMM yet")]
    HugePagesNotSupported(String),
    /// A vsock `guest_cid` that is reserved.
    #[error("invalid guest_cid {0}: use {min} to {max}", min = crate::MIN_GUEST_CID, max = u32::MAX - 1)]
    InvalidGuestCid(u32),
    /// A path field is an empty string.
    #[error("{0} is empty")]
    EmptyPath(&'static str),
    /// A drive names a vhost-user socket.
    #[error("drive {0:?}: vhost-user drives (socket) are not supported by this VMM yet")]
    VhostUserNotSupported(String),
    /// A drive has no `path_on_host`.
    #[error("drive {0:?} has no path_on_host")]
    MissingDrivePath(String),
    /// A drive's `partuuid` is empty or would split the kernel command line.
    #[error("drive {drive:?}: invalid partuuid {partuuid:?}")]
    InvalidPartuuid {
        /// The drive id.
        drive: String,
        /// The partuuid as given.
        partuuid: String,
    },
    /// A second drive claims to be the root device.
    #[error("a root block device already exists (drive {0:?})")]
    RootDeviceExists(String),
    /// `host_dev_name` is not a usable TAP name.
    #[error(
        "invalid host_dev_name {0:?}: use 1 to {max} bytes without '/', whitespace or \
         control characters",
        max = crate::MAX_HOST_DEV_NAME_LEN
    )]
    InvalidHostDevName(String),
    /// A MAC address string is malformed, multicast or all zeros.
    #[error("invalid guest_mac {value:?}: {why}")]
    InvalidMac {
        /// The string as given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Another interface already uses this guest MAC address.
    #[error("the guest MAC address {mac} is already in use by interface {iface:?}")]
    MacInUse {
        /// The MAC address.
        mac: String,
        /// The interface using it.
        iface: String,
    },
    /// Another interface already uses this TAP device.
    #[error("host_dev_name {name:?} is already used by interface {iface:?}")]
    HostDevInUse {
        /// The TAP name.
        name: String,
        /// The interface using it.
        iface: String,
    },
    /// A network interface asks for an MTU.
    #[error("network interface {0:?}: mtu is not supported by this VMM yet")]
    MtuNotSupported(String),
    /// A token bucket holds values the rate limiter cannot use.
    #[error("invalid {what} token bucket: {why}")]
    InvalidTokenBucket {
        /// Which bucket ("rate_limiter.bandwidth", ...).
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// A config-file section this VMM does not implement was given.
    #[error("{0:?} is not supported by this VMM yet")]
    ConfigKeyNotSupported(&'static str),
    /// The request needs a started microVM.
    #[error("the requested operation is not supported before starting the microVM")]
    NotSupportedPreBoot,
    /// The request is for configuration that is fixed once the microVM started.
    #[error("the requested operation is not supported after starting the microVM")]
    NotSupportedPostBoot,
    /// A snapshot request with paths missing or contradicting each other.
    #[error("invalid snapshot request: {0}")]
    InvalidSnapshotParams(String),
    /// A snapshot load whose memory is to come from a userfaultfd handler.
    #[error("the Uffd memory backend is not supported: load the memory from a File")]
    UffdNotSupported,
    /// `PUT /snapshot/create` while the microVM runs.
    #[error("cannot create a snapshot of a running microVM: pause it first (PATCH /vm {{\"state\": \"Paused\"}})")]
    SnapshotOfRunningVm,
    /// `PUT /snapshot/load` after boot resources were configured.
    #[error("loading a snapshot is not allowed after configuring boot-specific resources")]
    LoadAfterConfiguration,
    /// `InstanceStart` without a boot source.
    #[error("cannot start the microVM without a boot source (PUT /boot-source first)")]
    MissingBootSource,
    /// `PUT /metrics` a second time.
    #[error("the metrics system is already configured; reinitialization is not allowed")]
    MetricsAlreadyConfigured,
    /// A PATCH names a drive that was never configured.
    #[error("drive {0:?} does not exist")]
    DriveNotFound(String),
    /// A PATCH names a network interface that was never configured.
    #[error("network interface {0:?} does not exist")]
    NetworkInterfaceNotFound(String),
    /// The VMM refused or failed an action; `message` is its explanation.
    #[error("failed to {action}: {message}")]
    Vmm {
        /// What was asked ("start the microVM", ...).
        action: &'static str,
        /// The VMM's explanation.
        message: String,
    },
    /// A response body could not be serialized (a bug).
    #[error("failed to serialize the response body")]
    SerializeResponse(#[source] serde_json::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The HTTP status this error answers with: 404 for an unknown path, 405 for a wrong
    /// method, 500 for our own bugs, 400 for everything the client can fix.
    pub fn status(&self) -> u16 {
        match self {
            Error::UnknownPath(_) => 404,
            Error::MethodNotAllowed { .. } => 405,
            Error::SerializeResponse(_) => 500,
            _ => 400,
        }
    }
}

/// The JSON error body of every failed call: `{"fault_message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultMessage {
    /// A description of the error condition.
    pub fault_message: String,
}

/// An error as the API reports it: an HTTP status and a fault message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (400, 404, 405 or 500).
    pub status: u16,
    /// The human-readable message for the `fault_message` body.
    pub fault_message: String,
}

impl ApiError {
    /// The response body: `{"fault_message": "..."}`.
    pub fn to_json(&self) -> String {
        let body = FaultMessage {
            fault_message: self.fault_message.clone(),
        };
        serde_json::to_string(&body).expect("a struct holding one string always serializes")
    }
}

impl From<Error> for ApiError {
    /// The message is the error followed by its causes, `": "`-separated, so that a JSON
    /// syntax error says where it is.
    fn from(err: Error) -> Self {
        let mut fault_message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            fault_message.push_str(": ");
            fault_message.push_str(&cause.to_string());
            source = cause.source();
        }
        ApiError {
            status: err.status(),
            fault_message,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.fault_message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(Error::UnknownPath("/x".into()).status(), 404);
        let e = Error::MethodNotAllowed {
            method: "GET".into(),
            path: "/logger".into(),
            allowed: "PUT".into(),
        };
        assert_eq!(e.status(), 405);
        assert_eq!(Error::NotSupportedPostBoot.status(), 400);
        assert_eq!(Error::EndpointNotSupported("/vsock".into()).status(), 400);
        let ser = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(Error::SerializeResponse(ser).status(), 500);
    }

    #[test]
    fn fault_message_includes_the_cause() {
        let cause = serde_json::from_str::<u8>("{").unwrap_err();
        let api = ApiError::from(Error::ParseJson(cause));
        assert_eq!(api.status, 400);
        assert!(
            api.fault_message
                .starts_with("failed to parse the JSON body: "),
            "{}",
            api.fault_message
        );
        assert!(
            api.fault_message.contains("line 1"),
            "{}",
            api.fault_message
        );
    }

    #[test]
    fn json_body_round_trips() {
        let api = ApiError {
            status: 400,
            fault_message: "a \"quoted\" message".into(),
        };
        let body: FaultMessage = serde_json::from_str(&api.to_json()).unwrap();
        assert_eq!(body.fault_message, api.fault_message);
        let value: serde_json::Value = serde_json::from_str(&api.to_json()).unwrap();
        assert_eq!(value.as_object().unwrap().len(), 1);
    }

    #[test]
    fn state_messages_keep_firecrackers_wording() {
        // Firecracker's own tests grep for these substrings.
        assert!(Error::NotSupportedPreBoot
            .to_string()
            .contains("not supported before starting the microVM"));
        assert!(Error::NotSupportedPostBoot
            .to_string()
            .contains("not supported after starting the microVM"));
    }
}
