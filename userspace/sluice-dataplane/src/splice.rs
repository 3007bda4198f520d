//! Splicing opaque streams in the kernel: both legs of a pair go into a sockhash, a
//! pairing map names each one's peer, and an sk_skb stream verdict sends every byte
//! a leg receives straight out of the other leg.
//!
//! The caller must hand over sockets whose userspace buffers are flushed: bytes it
//! already read are its to write. Userspace keeps watching each leg: a spliced leg
//! becomes readable only at EOF (or with bytes the kernel could not redirect), which
//! is when it propagates the half-close and, once both directions are done, unsplices.

use std::{io, net::TcpStream, os::fd::AsFd};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::SkSkb,
};
use sluice_abi::{SockKey, SpliceStats, names};

use crate::{
    Dataplane, DataplaneError,
    loader::{addr_key, program},
};

/// A spliced pair, for [`Dataplane::unsplice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplicedPair {
    a: SockKey,
    b: SockKey,
}

/// The key of a connected TCP socket, as the kernel programs compute it.
pub fn sock_key(stream: &TcpStream) -> io::Result<SockKey> {
    let (local, remote) = (addr_key(stream.local_addr()?), addr_key(stream.peer_addr()?));
    Ok(SockKey {
        local_ip: local.ip,
        remote_ip: remote.ip,
        local_port: local.port,
        remote_port: remote.port,
    })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Dataplane {
    fn ensure_splice_attached(&mut self) -> Result<(), DataplaneError> {
        if self.splice_attached {
            return Ok(());
        }
        let map_fd = {
            let name = names::SPLICE_SOCKS;
            let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
            let hash: SockHash<&MapData, SockKey> =
                SockHash::try_from(map).map_err(map_err(name))?;
            hash.fd().try_clone().map_err(|e| DataplaneError::io("dup sockhash fd", e))?
        };
        let name = names::PROG_SPLICE;
        let prog: &mut SkSkb = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        prog.attach(&map_fd).map_err(|source| DataplaneError::Program { name, source })?;
        self.splice_attached = true;
        Ok(())
    }

    /// Splices two connected TCP sockets: from now on each one's incoming bytes leave
    /// through the other without reaching userspace.
    pub fn splice(&mut self, a: &TcpStream, b: &TcpStream) -> Result<SplicedPair, DataplaneError> {
        self.ensure_splice_attached()?;
        let ka = sock_key(a).map_err(|e| DataplaneError::io("splice: socket address", e))?;
        let kb = sock_key(b).map_err(|e| DataplaneError::io("splice: socket address", e))?;
        // Peers first: the moment a socket is in the sockhash its bytes reach the
        // verdict, which must already know where they go.
        {
            let name = names::SPLICE_PEERS;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut peers: HashMap<&mut MapData, SockKey, SockKey> =
                HashMap::try_from(map).map_err(map_err(name))?;
            peers.insert(ka, kb, 0).map_err(map_err(name))?;
            peers.insert(kb, ka, 0).map_err(map_err(name))?;
        }
        let pair = SplicedPair { a: ka, b: kb };
        let inserted = (|| {
            let name = names::SPLICE_SOCKS;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut socks: SockHash<&mut MapData, SockKey> =
                SockHash::try_from(map).map_err(map_err(name))?;
            socks.insert(kb, b.as_fd(), 0).map_err(map_err(name))?;
            socks.insert(ka, a.as_fd(), 0).map_err(map_err(name))
        })();
        if let Err(e) = inserted {
            let _ = self.unsplice(pair);
            return Err(e);
        }
        Ok(pair)
    }

    /// Removes a pair from the kernel path (missing entries are fine: a closed socket
    /// leaves the sockhash by itself).
    pub fn unsplice(&mut self, pair: SplicedPair) -> Result<(), DataplaneError> {
        let ignore_missing = |r: Result<(), aya::maps::MapError>, name| match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(name)(e)),
        };
        {
            let name = names::SPLICE_SOCKS;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut socks: SockHash<&mut MapData, SockKey> =
                SockHash::try_from(map).map_err(map_err(name))?;
            ignore_missing(socks.remove(&pair.a), name)?;
            ignore_missing(socks.remove(&pair.b), name)?;
        }
        let name = names::SPLICE_PEERS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut peers: HashMap<&mut MapData, SockKey, SockKey> =
            HashMap::try_from(map).map_err(map_err(name))?;
        ignore_missing(peers.remove(&pair.a), name)?;
        ignore_missing(peers.remove(&pair.b), name)
    }

    /// Splice counters summed over CPUs.
    pub fn splice_stats(&self) -> Result<SpliceStats, DataplaneError> {
        let name = names::SPLICE_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let arr: PerCpuArray<&MapData, SpliceStats> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        let per_cpu = arr.get(&0, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(SpliceStats::default(), |acc, s| acc.merge(*s)))
    }
}
