// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kinds of driver error the device reports once, shared by the device and its receive
//! path.

use tvm_util::WarnOnce;

/// Driver errors the device reports once at `warn!` (then at `debug!`), one flag per kind,
/// never re-armed (not even by a reset).
#[derive(Debug)]
pub(crate) struct DriverWarnings {
    /// How log lines name the device: `virtio-net TAP` (or the MAC, without a TAP).
    pub name: String,
    /// A malformed transmit chain.
    pub tx_chain: WarnOnce,
    /// A malformed receive chain.
    pub rx_chain: WarnOnce,
    /// An available index too far ahead, a head index beyond the queue, a used ring that
    /// cannot be written.
    pub ring: WarnOnce,
    /// A write to the read-only config space.
    pub config: WarnOnce,
}

impl DriverWarnings {
    pub(crate) fn new(name: String) -> Self {
        DriverWarnings {
            name,
            tx_chain: WarnOnce::new(),
            rx_chain: WarnOnce::new(),
            ring: WarnOnce::new(),
            config: WarnOnce::new(),
        }
    }
}
