// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Interrupt delivery: the MSI-X table and pending-bit array, the ISR, INTx, and the
//! [`VirtioInterrupt`] handle devices signal through.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::debug;

use crate::{Error, Result};

/// "No vector": the driver did not map this queue (or the config change) to an MSI-X
/// vector, or the mapping failed (virtio 1.2, 4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// ISR bit 0: a queue was used.
pub(crate) const ISR_QUEUE: u8 = 0x1;
/// ISR bit 1: the device configuration changed.
pub(crate) const ISR_CONFIG: u8 = 0x2;

/// Bytes per MSI-X table entry.
pub(crate) const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
const MSIX_VECTOR_MASKED: u32 = 1;

/// One MSI-X table entry, as the guest programmed it (PCI 3.0, 6.8.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address, low 32 bits.
    pub msg_addr_lo: u32,
    /// Message address, high 32 bits.
    pub msg_addr_hi: u32,
    /// Message data.
    pub msg_data: u32,
    /// Vector control; bit 0 is the per-vector mask.
    pub vector_ctrl: u32,
}

impl MsixEntry {
    /// Whether the per-vector mask bit is set.
    pub fn masked(&self) -> bool {
        self.vector_ctrl & MSIX_VECTOR_MASKED != 0
    }

    /// The full 64-bit message address.
    pub fn msg_addr(&self) -> u64 {
        u64::from(self.msg_addr_hi) << 32 | u64::from(self.msg_addr_lo)
    }

    fn dword(&self, index: u64) -> u32 {
        match index {
            0 => self.msg_addr_lo,
            1 => self.msg_addr_hi,
            2 => self.msg_data,
            _ => self.vector_ctrl,
        }
    }

    fn set_dword(&mut self, index: u64, value: u32) {
        match index {
            0 => self.msg_addr_lo = value,
            1 => self.msg_addr_hi = value,
            2 => self.msg_data = value,
            // Only the mask bit is writable; the rest is reserved.
            _ => self.vector_ctrl = value & MSIX_VECTOR_MASKED,
        }
    }
}

/// Where the transport's interrupts go; the VMM implements it with KVM irqfds (MSI-X
/// vectors through GSI routes, INTx through a line). Tests use a fake that records calls.
///
/// Called with the transport's interrupt lock held: implementations must not call back into
/// the transport.
pub trait InterruptSink: Send + Sync {
    /// Delivers MSI-X vector `vector`, which is unmasked and programmed.
    ///
    /// # Errors
    ///
    /// The error of the underlying mechanism (an irqfd write).
    fn msix(&self, vector: u16) -> io::Result<()>;

    /// Sets the INTx (INTA#) line level.
    ///
    /// # Errors
    ///
    /// The error of the underlying mechanism.
    fn intx(&self, level: bool) -> io::Result<()>;

    /// The guest wrote MSI-X table entry `vector`; `entry` is its new value. The VMM updates
    /// the vector's GSI route here.
    fn msix_table_changed(&self, vector: u16, entry: MsixEntry) {
        let _ = (vector, entry);
    }
}

/// The handle a device raises its interrupts through; the transport implements it.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that queue `queue` has new used buffers.
    ///
    /// # Errors
    ///
    /// [`Error::TriggerInterrupt`] when the sink fails.
    fn signal_queue(&self, queue: u16) -> Result<()>;

    /// Signals a device configuration change (or DEVICE_NEEDS_RESET).
    ///
    /// # Errors
    ///
    /// [`Error::TriggerInterrupt`] when the sink fails.
    fn signal_config(&self) -> Result<()>;
}

#[derive(Debug)]
struct InterruptState {
    msix_enabled: bool,
    msix_function_masked: bool,
    intx_disabled: bool,
    intx_asserted: bool,
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
}

/// The transport side of interrupts, shared between the transport (vCPU thread) and the
/// device (event loop) through an `Arc`.
pub(crate) struct TransportInterrupt {
    state: Mutex<InterruptState>,
    sink: Arc<dyn InterruptSink>,
}

impl TransportInterrupt {
    /// `num_vectors` MSI-X vectors (all masked, as after a PCI reset) for `num_queues` queues.
    pub(crate) fn new(sink: Arc<dyn InterruptSink>, num_vectors: u16, num_queues: usize) -> Self {
        let n = usize::from(num_vectors);
        TransportInterrupt {
            state: Mutex::new(InterruptState {
                msix_enabled: false,
                msix_function_masked: false,
                intx_disabled: false,
                intx_asserted: false,
                table: vec![
                    MsixEntry {
                        vector_ctrl: MSIX_VECTOR_MASKED,
                        ..Default::default()
                    };
                    n
                ],
                pending: vec![false; n],
                config_vector: VIRTIO_MSI_NO_VECTOR,
                queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
                isr: 0,
            }),
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, InterruptState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn num_vectors(state: &InterruptState) -> usize {
        state.table.len()
    }

    /// Delivers `vector`, or marks it pending when masked.
    fn deliver_msix(&self, state: &mut InterruptState, vector: u16) -> Result<()> {
        let v = usize::from(vector);
        if vector == VIRTIO_MSI_NO_VECTOR || v >= Self::num_vectors(state) {
            debug!("virtio interrupt dropped: no msi-x vector ({vector:#x})");
            return Ok(());
        }
        if state.msix_function_masked || state.table[v].masked() {
            state.pending[v] = true;
            return Ok(());
        }
        state.pending[v] = false;
        self.sink.msix(vector).map_err(Error::TriggerInterrupt)
    }

    fn signal(&self, vector: impl Fn(&InterruptState) -> u16, isr_bit: u8) -> Result<()> {
        let mut state = self.lock();
        state.isr |= isr_bit;
        if state.msix_enabled {
            let v = vector(&state);
            self.deliver_msix(&mut state, v)
        } else if !state.intx_disabled {
            state.intx_asserted = true;
            self.sink.intx(true).map_err(Error::TriggerInterrupt)
        } else {
            Ok(())
        }
    }

    fn deassert_intx(&self, state: &mut InterruptState) {
        if state.intx_asserted {
            state.intx_asserted = false;
            if let Err(e) = self.sink.intx(false) {
                debug!("failed to deassert intx: {e}");
            }
        }
    }

    /// Delivers every pending vector that is no longer masked.
    fn deliver_unmasked_pending(&self, state: &mut InterruptState) {
        if !state.msix_enabled || state.msix_function_masked {
            return;
        }
        for v in 0..Self::num_vectors(state) {
            if state.pending[v] && !state.table[v].masked() {
                // v < table size <= u16::MAX.
                if let Err(e) = self.deliver_msix(state, v as u16) {
                    debug!("failed to deliver pending msi-x vector {v}: {e}");
                }
            }
        }
    }

    /// Reads the ISR: returns it and clears it, deasserting INTx (virtio 1.2, 4.1.4.5).
    pub(crate) fn read_isr(&self) -> u8 {
        let mut state = self.lock();
        let isr = state.isr;
        state.isr = 0;
        self.deassert_intx(&mut state);
        isr
    }

    /// Follows the MSI-X message control and the command register's interrupt-disable bit.
    pub(crate) fn set_control(
        &self,
        msix_enabled: bool,
        function_masked: bool,
        intx_disabled: bool,
    ) {
        let mut state = self.lock();
        state.msix_enabled = msix_enabled;
        state.msix_function_masked = function_masked;
        state.intx_disabled = intx_disabled;
        if msix_enabled || intx_disabled {
            self.deassert_intx(&mut state);
        }
        self.deliver_unmasked_pending(&mut state);
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.lock().config_vector
    }

    /// Maps the config interrupt to `vector`; an out-of-range vector becomes NO_VECTOR.
    pub(crate) fn set_config_vector(&self, vector: u16) {
        let mut state = self.lock();
        state.config_vector = Self::checked_vector(&state, vector);
    }

    pub(crate) fn queue_vector(&self, queue: usize) -> u16 {
        self.lock()
            .queue_vectors
            .get(queue)
            .copied()
            .unwrap_or(VIRTIO_MSI_NO_VECTOR)
    }

    /// Maps `queue` to `vector`; an out-of-range vector becomes NO_VECTOR.
    pub(crate) fn set_queue_vector(&self, queue: usize, vector: u16) {
        let mut state = self.lock();
        let vector = Self::checked_vector(&state, vector);
        if let Some(v) = state.queue_vectors.get_mut(queue) {
            *v = vector;
        }
    }

    fn checked_vector(state: &InterruptState, vector: u16) -> u16 {
        if vector != VIRTIO_MSI_NO_VECTOR && usize::from(vector) >= Self::num_vectors(state) {
            debug!("virtio msi-x vector {vector} out of range");
            VIRTIO_MSI_NO_VECTOR
        } else {
            vector
        }
    }

    /// Device reset: vector mappings back to NO_VECTOR, ISR clear, INTx low. The MSI-X
    /// table itself belongs to PCI and keeps its contents.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.config_vector = VIRTIO_MSI_NO_VECTOR;
        state.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        state.isr = 0;
        state.pending.fill(false);
        self.deassert_intx(&mut state);
    }

    /// Reads `data` (4 or 8 bytes, naturally aligned) at `offset` in the MSI-X table.
    pub(crate) fn table_read(&self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        let len = data.len() as u64;
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
        if !matches!(len, 4 | 8) || offset % len != 0 || entry >= state.table.len() {
            debug!("msi-x table read at {offset:#x}, {len} bytes ignored");
            data.fill(0);
            return;
        }
        let e = state.table[entry];
        let first = (offset % MSIX_ENTRY_SIZE) / 4;
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&e.dword(first + i as u64).to_le_bytes());
        }
    }

    /// Writes `data` (4 or 8 bytes, naturally aligned) at `offset` in the MSI-X table,
    /// reports the new entry and delivers a pending vector the write unmasked.
    pub(crate) fn table_write(&self, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        let len = data.len() as u64;
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
        if !matches!(len, 4 | 8) || offset % len != 0 || entry >= state.table.len() {
            debug!("msi-x table write at {offset:#x}, {len} bytes ignored");
            return;
        }
        let first = (offset % MSIX_ENTRY_SIZE) / 4;
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            state.table[entry].set_dword(first + i as u64, value);
        }
        let e = state.table[entry];
        // entry < table size <= u16::MAX.
        self.sink.msix_table_changed(entry as u16, e);
        if !e.masked() && state.pending[entry] {
            self.deliver_unmasked_pending(&mut state);
        }
    }

    /// Reads `data` (4 or 8 bytes, naturally aligned) at `offset` in the pending-bit array.
    pub(crate) fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || offset % len != 0 {
            debug!("msi-x pba read at {offset:#x}, {len} bytes ignored");
            data.fill(0);
            return;
        }
        let mut bits = 0u64;
        for i in 0..len * 8 {
            let v = offset
                .checked_mul(8)
                .and_then(|b| b.checked_add(i))
                .and_then(|b| usize::try_from(b).ok());
            if v.and_then(|v| state.pending.get(v))
                .copied()
                .unwrap_or(false)
            {
                bits |= 1 << i;
            }
        }
        data.copy_from_slice(&bits.to_le_bytes()[..data.len()]);
    }
}

impl VirtioInterrupt for TransportInterrupt {
    fn signal_queue(&self, queue: u16) -> Result<()> {
        self.signal(
            |s| {
                s.queue_vectors
                    .get(usize::from(queue))
                    .copied()
                    .unwrap_or(VIRTIO_MSI_NO_VECTOR)
            },
            ISR_QUEUE,
        )
    }

    fn signal_config(&self) -> Result<()> {
        self.signal(|s| s.config_vector, ISR_CONFIG)
    }
}

/// Read-only views for diagnostics (the VMM's state dump).
impl TransportInterrupt {
    /// The transport-wide interrupt state in words: MSI-X or INTx, masks, ISR.
    pub(crate) fn debug_summary(&self) -> String {
        let s = self.lock();
        let mode = if s.msix_enabled {
            format!(
                "msi-x on{}",
                if s.msix_function_masked {
                    " (function masked)"
                } else {
                    ""
                }
            )
        } else if s.intx_disabled {
            "msi-x off, intx disabled".to_string()
        } else {
            format!(
                "msi-x off, intx {}",
                if s.intx_asserted { "asserted" } else { "low" }
            )
        };
        format!(
            "{mode}, isr {:#04x}, config vector {}",
            s.isr,
            vector_name(s.config_vector)
        )
    }

    /// Queue `queue`'s vector and that vector's mask and pending bits, in words.
    pub(crate) fn debug_queue_vector(&self, queue: usize) -> String {
        let s = self.lock();
        let vector = s
            .queue_vectors
            .get(queue)
            .copied()
            .unwrap_or(VIRTIO_MSI_NO_VECTOR);
        let v = usize::from(vector);
        match (s.table.get(v), s.pending.get(v)) {
            (Some(entry), Some(&pending)) => format!(
                "vector {vector} ({}, {})",
                if entry.masked() { "masked" } else { "unmasked" },
                if pending { "pending" } else { "not pending" }
            ),
            _ => format!("vector {}", vector_name(vector)),
        }
    }
}

fn vector_name(vector: u16) -> String {
    if vector == VIRTIO_MSI_NO_VECTOR {
        "none".to_string()
    } else {
        vector.to_string()
    }
}
