// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Saving the transport for a snapshot and bringing it back.
//!
//! [`save_state`](VirtioPciDevice::save_state) records what the driver programmed: the
//! PCI registers it may write (BAR 0, command, interrupt line, MSI-X control), the MSI-X
//! table, features, status, and each queue's configuration and vector.
//! [`restore_state`](VirtioPciDevice::restore_state) replays it through the same paths a
//! driver's writes take (config space, MSI-X table, common configuration, status), so a
//! snapshot can make the transport do nothing a guest could not: a value a guest could not
//! write is refused or ignored the same way, and the device is activated by DRIVER_OK as
//! usual. Each activated queue then starts where the device had left it, at the used
//! ring's index in guest memory: a device paused for a snapshot has completed every chain
//! it took, so its next available and next used positions are both that index.

use log::debug;
use tvm_snapshot::{QueueState, TransportState};
use vm_memory::{Bytes, GuestAddress};

use super::layout::COMMAND_REG;
use super::VirtioPciDevice;
use crate::interrupt::MSIX_ENTRY_SIZE;
use crate::{status, Error, Result, VirtioDevice, VirtioInterrupt};

/// PCI register 15: interrupt line in byte 0.
const INTERRUPT_LINE_REG: usize = 15;

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// The transport as the driver left it (see the module documentation).
    pub fn save_state(&self) -> TransportState {
        let mut msix_table = Vec::with_capacity(self.msix_table_entries());
        for entry in 0..self.msix_table_entries() {
            let mut dwords = [0u32; 4];
            for (i, d) in dwords.iter_mut().enumerate() {
                let mut b = [0u8; 4];
                self.interrupt
                    .table_read(entry as u64 * MSIX_ENTRY_SIZE + 4 * i as u64, &mut b);
                *d = u32::from_le_bytes(b);
            }
            msix_table.push(dwords);
        }
        TransportState {
            device_type: self.device.device_type(),
            bar_addr: self.bar_addr(),
            command: self.config.command(),
            interrupt_line: (self.config.read_reg(INTERRUPT_LINE_REG) & 0xff) as u8,
            msix_control: (self.config.read_reg(self.msix_cap_reg) >> 16) as u16,
            msix_table,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            config_vector: self.interrupt.config_vector(),
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueState {
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    vector: self.interrupt.queue_vector(i),
                })
                .collect(),
        }
    }

    fn msix_table_entries(&self) -> usize {
        self.queues.len() + 1
    }

    /// Brings a newly created transport to `state` (see the module documentation).
    ///
    /// # Errors
    ///
    /// [`Error::StateMismatch`] when `state` is for another device type or queue count,
    /// [`Error::SetupConfigSpace`] for a BAR address that is not aligned, and the
    /// activation's error when the saved status is live but the device refuses the rings.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<()> {
        let device_type = self.device.device_type();
        if state.device_type != device_type
            || state.queues.len() != self.queues.len()
            || state.msix_table.len() != self.msix_table_entries()
        {
            return Err(Error::StateMismatch(format!(
                "saved device type {} with {} queues and {} msi-x vectors; this is type \
                 {device_type} with {} queues",
                state.device_type,
                state.queues.len(),
                state.msix_table.len(),
                self.queues.len()
            )));
        }
        // PCI: the BAR where the guest had it, then the registers it writes.
        self.set_bar_addr(GuestAddress(state.bar_addr))?;
        use tvm_bus::PciDevice;
        self.config_write(COMMAND_REG, 0, &state.command.to_le_bytes());
        self.config_write(INTERRUPT_LINE_REG, 0, &[state.interrupt_line]);
        self.config_write(self.msix_cap_reg, 2, &state.msix_control.to_le_bytes());
        for (entry, dwords) in state.msix_table.iter().enumerate() {
            for (i, d) in dwords.iter().enumerate() {
                self.interrupt.table_write(
                    entry as u64 * MSIX_ENTRY_SIZE + 4 * i as u64,
                    &d.to_le_bytes(),
                );
            }
        }
        if state.status == 0 {
            return Ok(());
        }
        // The driver's side of initialisation (virtio 1.2, 3.1.1), in its order.
        let w16 = |dev: &mut Self, off: u64, v: u16| dev.common_write(off, &v.to_le_bytes());
        let w32 = |dev: &mut Self, off: u64, v: u32| dev.common_write(off, &v.to_le_bytes());
        let early = state.status & (status::ACKNOWLEDGE | status::DRIVER);
        self.write_status(early);
        for sel in 0..2u32 {
            w32(self, 0x08, sel);
            w32(self, 0x0c, (state.driver_features >> (32 * sel)) as u32);
        }
        self.write_status(early | (state.status & status::FEATURES_OK));
        w16(self, 0x10, state.config_vector);
        for (i, q) in state.queues.iter().enumerate() {
            w16(self, 0x16, i as u16);
            w16(self, 0x18, q.size);
            for (off, addr) in [(0x20, q.desc), (0x28, q.driver), (0x30, q.device)] {
                w32(self, off, addr as u32);
                w32(self, off + 4, (addr >> 32) as u32);
            }
            w16(self, 0x1a, q.vector);
            if q.enabled {
                w16(self, 0x1c, 1);
            }
        }
        self.config_generation = state.config_generation;
        if state.status & status::DRIVER_OK != 0 {
            self.resume_positions = true;
            self.write_status(state.status & !status::DEVICE_NEEDS_RESET);
            self.resume_positions = false;
            if !self.active {
                return Err(Error::StateMismatch(format!(
                    "the saved queues could not be activated (status {:#x})",
                    self.status
                )));
            }
        } else {
            self.write_status(state.status & !status::DEVICE_NEEDS_RESET);
        }
        Ok(())
    }

    /// Where a queue being activated for a restore starts: its used ring's index (the
    /// position the device had reached).
    pub(super) fn resumed_position(&self, used_ring: u64) -> Option<u16> {
        if !self.resume_positions {
            return None;
        }
        match self
            .mem
            .read_obj::<u16>(GuestAddress(used_ring.wrapping_add(2)))
        {
            Ok(idx) => Some(idx),
            Err(e) => {
                debug!("used ring at {used_ring:#x} unreadable: {e}");
                None
            }
        }
    }

    /// After a restore, once interrupts and notifications are wired: serves every queue
    /// once (a kick the guest made just before the snapshot is not lost) and signals
    /// every active queue's vector (an interrupt held back then is not either; a spurious
    /// one is harmless to a driver).
    ///
    /// # Errors
    ///
    /// [`Error::TriggerInterrupt`] if an interrupt could not be delivered.
    pub fn kick_after_restore(&mut self) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                debug!("queue notification after restore: {e}");
            }
        }
        for q in 0..self.queues.len() {
            self.interrupt.signal_queue(q as u16)?;
        }
        Ok(())
    }
}
