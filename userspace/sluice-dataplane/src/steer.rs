//! Listener steering over sluice's SO_REUSEPORT group, and the zero-downtime handover
//! between an old and a new sluice process.
//!
//! Handover: the new process loads the data plane (reusing the pinned steering maps),
//! opens its listeners on the same addresses (they join the group), registers them in
//! the idle half of the socket array, attaches its program instance and flips the
//! active range. From then on the kernel sends new connections only to the new
//! listeners. The old process stops accepting and closes its listeners; the migrate
//! path moves whatever was still queued on them to the new listeners.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{Array, MapData, ReusePortSockArray},
    programs::SkReuseport,
};
use sluice_abi::{STEER_HALF, SteerConfig, SteerStats, names};
use tracing::info;

use crate::{Dataplane, DataplaneError, error::map_err, loader::program};

/// A generation of listeners registered for steering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerGeneration {
    /// First slot.
    pub base: u32,
    /// Number of listeners.
    pub count: u32,
}

impl Dataplane {
    /// The active steering range (count 0: none).
    pub fn steer_active(&self) -> Result<SteerConfig, DataplaneError> {
        let name = names::STEER_CONFIG;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let cfg: Array<&MapData, SteerConfig> = Array::try_from(map).map_err(map_err(name))?;
        cfg.get(&0, 0).map_err(map_err(name))
    }

    /// Registers `listeners` (one process's listening sockets: several per address for
    /// workers, and any number of addresses, each its own SO_REUSEPORT group; the
    /// kernel picks among the ones of a connection's group) in the half of the socket
    /// array that is not active, without activating them.
    pub fn steer_register<S: AsRawFd>(
        &mut self,
        listeners: &[S],
    ) -> Result<SteerGeneration, DataplaneError> {
        if listeners.is_empty() || listeners.len() > STEER_HALF as usize {
            return Err(DataplaneError::Unsupported(format!(
                "steering takes 1..={STEER_HALF} listeners, got {}",
                listeners.len()
            )));
        }
        let active = self.steer_active()?;
        let base = if active.count > 0 && active.base == 0 { STEER_HALF } else { 0 };
        let name = names::STEER_SOCKS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut socks: ReusePortSockArray<&mut MapData> =
            ReusePortSockArray::try_from(map).map_err(map_err(name))?;
        // Clear the half first: slots left by an earlier generation must not be
        // picked if this generation is smaller.
        for slot in base..base + STEER_HALF {
            match socks.clear_index(&slot) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        for (i, l) in listeners.iter().enumerate() {
            socks.set(base + i as u32, l, 0).map_err(map_err(name))?;
        }
        Ok(SteerGeneration { base, count: listeners.len() as u32 })
    }

    /// Attaches the steering program to the group `listener` belongs to (replacing an
    /// older process's instance; both read the same pinned maps).
    pub fn steer_attach(&mut self, listener: impl AsFd) -> Result<(), DataplaneError> {
        let name = names::PROG_STEER;
        let prog: &mut SkReuseport = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        prog.attach(listener).map_err(|source| DataplaneError::Program { name, source })
    }

    /// Sends new connections to `generation`'s listeners, by flow hash.
    pub fn steer_activate(&mut self, generation: SteerGeneration) -> Result<(), DataplaneError> {
        let name = names::STEER_CONFIG;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut cfg: Array<&mut MapData, SteerConfig> =
            Array::try_from(map).map_err(map_err(name))?;
        cfg.set(0, SteerConfig { base: generation.base, count: generation.count }, 0)
            .map_err(map_err(name))?;
        info!(
            base = generation.base,
            listeners = generation.count,
            shared = self.shares_steering(),
            "listener steering active"
        );
        Ok(())
    }

    /// Steering counters summed over CPUs.
    pub fn steer_stats(&self) -> Result<SteerStats, DataplaneError> {
        let name = names::STEER_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        crate::per_cpu::sum(map, SteerStats::merge).map_err(map_err(name))
    }
}
