//! The vCPU topology: how many threads per core, cores per socket and sockets, and the
//! APIC id each vCPU gets.
//!
//! APIC ids are built the way x86 hardware builds them (Intel SDM vol. 3, 9.9.1 and
//! "Hierarchical mapping of shared resources"; AMD APM vol. 2, "Topology"): the thread
//! number in the lowest `thread_bits` bits, the core number in the next `core_bits`, the
//! socket above them, each field `ceil(log2(count))` bits wide. That is what CPUID leaves
//! 0xB/0x1F and AMD's 0x8000_0008 tell the guest, and what Linux decodes the topology from.
//! With power-of-two counts the ids are dense (0..N); otherwise some ids are unused, as on
//! real hardware and in QEMU. The vCPU index (KVM's vCPU number is the APIC id; the MADT's
//! processor uid and Linux's CPU number follow the index) counts threads first, then
//! cores, then sockets.

use crate::{Error, Result};

/// Highest xAPIC id a vCPU may have: 0xFF is the broadcast id.
pub const MAX_XAPIC_ID: u32 = 254;

/// Threads per core, cores per socket, sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTopology {
    threads_per_core: u8,
    cores_per_socket: u8,
    sockets: u8,
}

/// `ceil(log2(n))` for n >= 1: the bits an id field for `n` values needs.
fn bits_for(n: u8) -> u32 {
    u32::from(n.max(1) - 1)
        .checked_ilog2()
        .map_or(0, |log| log + 1)
}

impl CpuTopology {
    /// A topology of `threads_per_core` x `cores_per_socket` x `sockets` vCPUs.
    ///
    /// # Errors
    /// A count of zero, more than 254 vCPUs in all, or an APIC id above
    /// [`MAX_XAPIC_ID`] for the last vCPU.
    pub fn new(threads_per_core: u8, cores_per_socket: u8, sockets: u8) -> Result<Self> {
        let t = CpuTopology {
            threads_per_core,
            cores_per_socket,
            sockets,
        };
        if threads_per_core == 0 || cores_per_socket == 0 || sockets == 0 {
            return Err(Error::InvalidTopology(format!(
                "{t}: every count must be at least 1"
            )));
        }
        let count = u32::from(threads_per_core) * u32::from(cores_per_socket) * u32::from(sockets);
        if count > MAX_XAPIC_ID {
            return Err(Error::InvalidTopology(format!(
                "{t} is {count} vCPUs, more than the {MAX_XAPIC_ID} xAPIC ids allow"
            )));
        }
        let last = t.apic_id_unchecked(count - 1);
        if last > MAX_XAPIC_ID {
            return Err(Error::InvalidTopology(format!(
                "{t}: the last vCPU's APIC id would be {last} (each level's id field is rounded \
                 up to a power of two), above the highest xAPIC id {MAX_XAPIC_ID}"
            )));
        }
        Ok(t)
    }

    /// `n` single-threaded cores on one socket (the default for `--cpus N`).
    ///
    /// # Errors
    /// `n` is 0 or above 254.
    pub fn flat(n: u8) -> Result<Self> {
        Self::new(1, n, 1)
    }

    /// Threads per core.
    pub fn threads_per_core(&self) -> u8 {
        self.threads_per_core
    }

    /// Cores per socket.
    pub fn cores_per_socket(&self) -> u8 {
        self.cores_per_socket
    }

    /// Sockets.
    pub fn sockets(&self) -> u8 {
        self.sockets
    }

    /// Number of vCPUs (at most 254, so it fits a `u8`).
    pub fn cpu_count(&self) -> u8 {
        // At most MAX_XAPIC_ID (checked in `new`).
        (u32::from(self.threads_per_core)
            * u32::from(self.cores_per_socket)
            * u32::from(self.sockets)) as u8
    }

    /// Logical processors per socket (threads x cores).
    pub fn threads_per_socket(&self) -> u32 {
        u32::from(self.threads_per_core) * u32::from(self.cores_per_socket)
    }

    /// Width of the APIC id's thread field.
    pub fn thread_bits(&self) -> u32 {
        bits_for(self.threads_per_core)
    }

    /// Width of the APIC id's core field.
    pub fn core_bits(&self) -> u32 {
        bits_for(self.cores_per_socket)
    }

    /// Width of the thread and core fields together: the APIC id shifted right by this is
    /// the socket.
    pub fn socket_shift(&self) -> u32 {
        self.thread_bits() + self.core_bits()
    }

    /// (socket, core in its socket, thread in its core) of vCPU `index`.
    pub fn position(&self, index: u8) -> (u32, u32, u32) {
        let i = u32::from(index);
        let threads = u32::from(self.threads_per_core);
        let cores = u32::from(self.cores_per_socket);
        (i / (threads * cores), (i / threads) % cores, i % threads)
    }

    fn apic_id_unchecked(&self, index: u32) -> u32 {
        let threads = u32::from(self.threads_per_core);
        let cores = u32::from(self.cores_per_socket);
        let (socket, core, thread) = (
            index / (threads * cores),
            (index / threads) % cores,
            index % threads,
        );
        (socket << self.socket_shift()) | (core << self.thread_bits()) | thread
    }

    /// The APIC id of vCPU `index` (`index < cpu_count()`); at most [`MAX_XAPIC_ID`].
    pub fn apic_id(&self, index: u8) -> u8 {
        // `new` checked that the last vCPU's id, the largest, fits.
        self.apic_id_unchecked(u32::from(index)) as u8
    }

    /// The APIC ids of all vCPUs, in vCPU order.
    pub fn apic_ids(&self) -> Vec<u8> {
        (0..self.cpu_count()).map(|i| self.apic_id(i)).collect()
    }
}

impl std::fmt::Display for CpuTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} thread(s) x {} core(s) x {} socket(s)",
            self.threads_per_core, self.cores_per_socket, self.sockets
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_widths() {
        assert_eq!(
            [1u8, 2, 3, 4, 5, 8, 9, 128, 254].map(bits_for),
            [0, 1, 2, 2, 3, 3, 4, 7, 8]
        );
    }

    #[test]
    fn flat_topologies_have_dense_ids() {
        for n in [1u8, 2, 3, 4, 7, 64, 254] {
            let t = CpuTopology::flat(n).unwrap();
            assert_eq!(t.cpu_count(), n);
            assert_eq!(t.apic_ids(), (0..n).collect::<Vec<_>>(), "{n}");
        }
    }

    #[test]
    fn ids_follow_threads_then_cores_then_sockets() {
        let t = CpuTopology::new(2, 3, 2).unwrap();
        assert_eq!(
            (t.thread_bits(), t.core_bits(), t.socket_shift()),
            (1, 2, 3)
        );
        // Socket 0: cores 0..3 with 2 threads each; socket 1 starts at 1 << 3.
        assert_eq!(t.apic_ids(), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(t.position(7), (1, 0, 1));
        // Power-of-two counts: dense.
        let t = CpuTopology::new(2, 2, 2).unwrap();
        assert_eq!(t.apic_ids(), (0..8).collect::<Vec<_>>());
        // Every id unique, and each decodes back to its position.
        for t in [
            CpuTopology::new(3, 5, 3).unwrap(),
            CpuTopology::new(1, 7, 4).unwrap(),
            CpuTopology::new(4, 1, 16).unwrap(),
        ] {
            let ids = t.apic_ids();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), ids.len(), "{t}");
            for (i, id) in ids.iter().enumerate() {
                let id = u32::from(*id);
                let thread = id & ((1 << t.thread_bits()) - 1);
                let core = (id >> t.thread_bits()) & ((1 << t.core_bits()) - 1);
                let socket = id >> t.socket_shift();
                assert_eq!(t.position(i as u8), (socket, core, thread), "{t} vcpu {i}");
            }
        }
    }

    #[test]
    fn bad_topologies_are_refused() {
        for (t, c, s) in [(0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 255, 1), (2, 128, 1)] {
            assert!(
                matches!(CpuTopology::new(t, c, s), Err(Error::InvalidTopology(_))),
                "{t} {c} {s}"
            );
        }
        // 3 x 3 x 16 = 144 vCPUs, but socket 15 starts at APIC id 15 << 4 = 240 and its
        // last thread is 240 + (2 << 2) + 2 = 250: fits. 3 x 5 x 16 does not (socket
        // shift 5: 15 << 5 = 480).
        assert_eq!(
            CpuTopology::new(3, 3, 16).unwrap().apic_ids().last(),
            Some(&250)
        );
        let e = CpuTopology::new(3, 5, 16).unwrap_err().to_string();
        assert!(e.contains("APIC id"), "{e}");
        assert_eq!(CpuTopology::flat(254).unwrap().cpu_count(), 254);
    }
}
