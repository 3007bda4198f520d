//! Server virtual addresses: a cgroup connect4/connect6 program rewrites local
//! clients' connects to a VIP into the replica userspace selected, from a flat map
//! that userspace keeps in step with the routing snapshot.

use std::{net::SocketAddr, os::fd::AsFd};

use aya::{
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use sluice_abi::{
    AddrKey, MAX_VIP_BACKENDS, VipBackend, VipService, VipSlot, VipStats, hrw, names, vip_mode,
};
use tracing::info;

use crate::{
    Dataplane, DataplaneError,
    error::map_err,
    loader::{addr_key, program},
};

/// How a VIP picks the replica for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipMode {
    /// The replica userspace selected (keep it at the least loaded).
    Selected,
    /// Rendezvous hashing on the connecting process, with [`sluice_abi::hrw`].
    Hrw,
}

/// A replica behind a VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipReplica {
    /// Where connects go.
    pub addr: SocketAddr,
    /// The replica's id (hashed for HRW, so a session keeps its replica when others
    /// come and go).
    pub id: String,
}

impl Dataplane {
    /// Attaches the connect4 and connect6 programs to `cgroup` (a cgroup v2 directory
    /// descriptor): processes in it that connect to a VIP reach its replica.
    pub fn attach_vip(&mut self, cgroup: impl AsFd) -> Result<(), DataplaneError> {
        for name in [names::PROG_VIP4, names::PROG_VIP6] {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            if prog.fd().is_err() {
                prog.load().map_err(|source| DataplaneError::Program { name, source })?;
            }
            let link = prog
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| DataplaneError::Program { name, source })?;
            self.vip_links.push((name, link));
        }
        info!("VIP connect programs attached");
        Ok(())
    }

    /// Detaches the VIP programs.
    pub fn detach_vip(&mut self) -> Result<(), DataplaneError> {
        for (name, link) in std::mem::take(&mut self.vip_links) {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            prog.detach(link).map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(())
    }

    /// Installs or replaces a VIP's replicas. `selected` is the slot used in
    /// [`VipMode::Selected`]. Slots are written before the count grows and the count
    /// shrinks before slots are removed, so a concurrent connect never reads a slot
    /// that is not there.
    pub fn set_vip(
        &mut self,
        vip: SocketAddr,
        replicas: &[VipReplica],
        mode: VipMode,
        selected: usize,
    ) -> Result<(), DataplaneError> {
        if replicas.len() > MAX_VIP_BACKENDS as usize {
            return Err(DataplaneError::Unsupported(format!(
                "VIP {vip}: {} replicas exceed the kernel limit of {MAX_VIP_BACKENDS}",
                replicas.len()
            )));
        }
        let key = addr_key(vip);
        let old_count = self.vip_service(key)?.map(|s| s.count).unwrap_or(0);
        let count = replicas.len() as u32;
        let service = VipService {
            count,
            mode: match mode {
                VipMode::Selected => vip_mode::SELECTED,
                VipMode::Hrw => vip_mode::HRW,
            },
            selected: selected.min(replicas.len().saturating_sub(1)) as u32,
            _pad: 0,
        };
        {
            let name = names::VIP_BACKENDS;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut backends: HashMap<&mut MapData, VipSlot, VipBackend> =
                HashMap::try_from(map).map_err(map_err(name))?;
            for (i, r) in replicas.iter().enumerate() {
                let value = VipBackend {
                    addr: addr_key(r.addr),
                    _pad: 0,
                    id_hash: hrw::fnv1a64(r.id.as_bytes()),
                };
                backends
                    .insert(VipSlot { vip: key, index: i as u32 }, value, 0)
                    .map_err(map_err(name))?;
            }
        }
        {
            let name = names::VIP_SERVICES;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut services: HashMap<&mut MapData, AddrKey, VipService> =
                HashMap::try_from(map).map_err(map_err(name))?;
            services.insert(key, service, 0).map_err(map_err(name))?;
        }
        self.remove_vip_slots(key, count, old_count)
    }

    /// Points a VIP at another of its replicas for new connections.
    pub fn select_vip(&mut self, vip: SocketAddr, index: usize) -> Result<(), DataplaneError> {
        let key = addr_key(vip);
        let Some(mut service) = self.vip_service(key)? else {
            return Err(DataplaneError::Unsupported(format!("VIP {vip} is not installed")));
        };
        if index >= service.count as usize {
            return Err(DataplaneError::Unsupported(format!(
                "VIP {vip} has no replica slot {index}"
            )));
        }
        service.selected = index as u32;
        let name = names::VIP_SERVICES;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut services: HashMap<&mut MapData, AddrKey, VipService> =
            HashMap::try_from(map).map_err(map_err(name))?;
        services.insert(key, service, 0).map_err(map_err(name))
    }

    /// Removes a VIP: connects to it are no longer rewritten.
    pub fn remove_vip(&mut self, vip: SocketAddr) -> Result<(), DataplaneError> {
        let key = addr_key(vip);
        let old_count = self.vip_service(key)?.map(|s| s.count).unwrap_or(0);
        {
            let name = names::VIP_SERVICES;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut services: HashMap<&mut MapData, AddrKey, VipService> =
                HashMap::try_from(map).map_err(map_err(name))?;
            match services.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        self.remove_vip_slots(key, 0, old_count)
    }

    fn vip_service(&self, key: AddrKey) -> Result<Option<VipService>, DataplaneError> {
        let name = names::VIP_SERVICES;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let services: HashMap<&MapData, AddrKey, VipService> =
            HashMap::try_from(map).map_err(map_err(name))?;
        match services.get(&key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    fn remove_vip_slots(&mut self, key: AddrKey, from: u32, to: u32) -> Result<(), DataplaneError> {
        let name = names::VIP_BACKENDS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut backends: HashMap<&mut MapData, VipSlot, VipBackend> =
            HashMap::try_from(map).map_err(map_err(name))?;
        for index in from..to {
            match backends.remove(&VipSlot { vip: key, index }) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// Closes every connection in this network namespace whose peer is `replica`:
    /// call it when a replica leaves so nothing stays pinned to it.
    pub fn close_connections_to(&self, replica: SocketAddr) -> Result<usize, DataplaneError> {
        crate::sockdiag::destroy_connections_to(replica).map_err(|e| {
            DataplaneError::io(format!("closing connections to {replica} (SOCK_DESTROY)"), e)
        })
    }

    /// Like [`close_connections_to`](Self::close_connections_to), but spares this
    /// process's own sockets: the VIP sync closes the callers' connections to a replica
    /// that left, while the proxy's connections to it drain on the proxy's terms.
    /// Needs no data plane handle (sock_diag only), so callers can walk the sockets
    /// without holding the data plane's lock.
    pub fn close_client_connections_to(replica: SocketAddr) -> Result<usize, DataplaneError> {
        crate::sockdiag::destroy_other_connections_to(replica).map_err(|e| {
            DataplaneError::io(format!("closing connections to {replica} (SOCK_DESTROY)"), e)
        })
    }

    /// VIP counters summed over CPUs.
    pub fn vip_stats(&self) -> Result<VipStats, DataplaneError> {
        let name = names::VIP_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        crate::per_cpu::sum(map, VipStats::merge).map_err(map_err(name))
    }
}
