//! Splicing opaque streams in the kernel: both legs of a pair go into a sockhash, a
//! pairing map names each one's peer, and an sk_skb stream verdict sends every byte
//! a leg receives straight out of the other leg.
//!
//! Hand-off contract: the caller has flushed its userspace buffers (bytes it already
//! read are its to write, before calling [`Dataplane::splice`]) and writes nothing to
//! either leg afterwards. Closing is the [`crate::SpliceWatcher`]'s job: a half-close
//! is propagated only once the peer has taken in every byte redirected to it, because
//! redirected bytes are sent from a deferred queue that a FIN could otherwise overtake.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use sluice_abi::{SockKey, SplicePeer, SpliceStats, names};

use crate::{
    Dataplane, DataplaneError,
    error::map_err,
    loader::{addr_key, program},
};

/// One leg of a spliced pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// The first socket given to [`Dataplane::splice`] (e.g. the client leg).
    A,
    /// The second socket (e.g. the replica leg).
    B,
}

/// A spliced pair: keys, and what each leg had been given before the splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplicedPair {
    a: SockKey,
    b: SockKey,
    /// Bytes written into each leg before the splice (the drain baseline).
    a_written_before: u64,
    b_written_before: u64,
}

impl SplicedPair {
    /// Bytes written into legs A and B before the splice: what a process adopting the
    /// pair needs (with the two sockets) to keep checking its drains.
    pub fn written_before(&self) -> (u64, u64) {
        (self.a_written_before, self.b_written_before)
    }
}

fn sock_addrs(fd: BorrowedFd<'_>) -> io::Result<(SocketAddr, SocketAddr)> {
    let s = socket2::SockRef::from(&fd);
    let local =
        s.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an inet socket"))?;
    let peer = s.peer_addr()?.as_socket().ok_or_else(|| io::Error::other("not an inet socket"))?;
    Ok((local, peer))
}

/// The key of a connected TCP socket, as the kernel programs compute it.
pub fn sock_key(fd: impl AsFd) -> io::Result<SockKey> {
    let (local, remote) = sock_addrs(fd.as_fd())?;
    let (local, remote) = (addr_key(local), addr_key(remote));
    Ok(SockKey {
        local_ip: local.ip,
        remote_ip: remote.ip,
        local_port: local.port,
        remote_port: remote.port,
    })
}

fn tcp_bytes_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes and describe the buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked)
}

fn tcp_outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to a valid pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(outq.max(0) as u64)
}

/// Every byte ever written into a TCP socket: acknowledged plus still queued.
/// Acked is read first so a concurrent ACK can only make the sum low, never high
/// (a low reading makes a drain check wait longer, which is safe).
fn written_total(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_bytes_acked(fd)?;
    Ok(acked + tcp_outq(fd)?)
}

/// An exact reading for the baseline: retried until no ACK landed in between.
fn written_total_exact(fd: BorrowedFd<'_>) -> io::Result<u64> {
    for _ in 0..100 {
        let a1 = tcp_bytes_acked(fd)?;
        let q = tcp_outq(fd)?;
        if tcp_bytes_acked(fd)? == a1 {
            return Ok(a1 + q);
        }
    }
    Err(io::Error::other("socket too busy to take a stable byte count"))
}

fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a valid int and its size on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn ignore_missing(
    r: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(map_err(name)(e)),
    }
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
    /// through the other without reaching userspace. See the module's hand-off rules.
    pub fn splice(&mut self, a: impl AsFd, b: impl AsFd) -> Result<SplicedPair, DataplaneError> {
        let (a, b) = (a.as_fd(), b.as_fd());
        self.ensure_splice_attached()?;
        let io = |e| DataplaneError::io("splice: reading socket state", e);
        let ka = sock_key(a).map_err(io)?;
        let kb = sock_key(b).map_err(io)?;
        let pair = SplicedPair {
            a: ka,
            b: kb,
            a_written_before: written_total_exact(a).map_err(io)?,
            b_written_before: written_total_exact(b).map_err(io)?,
        };
        // Peers first: the moment a socket is in the sockhash its bytes reach the
        // verdict, which must already know where they go.
        {
            let name = names::SPLICE_PEERS;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut peers: HashMap<&mut MapData, SockKey, SplicePeer> =
                HashMap::try_from(map).map_err(map_err(name))?;
            peers.insert(ka, SplicePeer { peer: kb, bytes: 0 }, 0).map_err(map_err(name))?;
            peers.insert(kb, SplicePeer { peer: ka, bytes: 0 }, 0).map_err(map_err(name))?;
        }
        let inserted = (|| {
            let name = names::SPLICE_SOCKS;
            let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
            let mut socks: SockHash<&mut MapData, SockKey> =
                SockHash::try_from(map).map_err(map_err(name))?;
            socks.insert(kb, b, 0).map_err(map_err(name))?;
            socks.insert(ka, a, 0).map_err(map_err(name))
        })();
        if let Err(e) = inserted {
            let _ = self.unsplice(pair);
            return Err(e);
        }
        // Bytes that arrived before the insert wait in the receive queue until the next
        // data_ready, which may never come (a client that spoke and now waits). Setting
        // SO_RCVLOWAT makes TCP signal data_ready now, so the verdict takes the queue,
        // in order, ahead of anything that arrives later.
        for fd in [a, b] {
            set_rcvlowat(fd, 1)
                .map_err(|e| DataplaneError::io("splice: pushing queued bytes through", e))?;
        }
        Ok(pair)
    }

    /// Takes over a pair another process spliced into the same (shared, see
    /// [`Dataplane::load_for_takeover`]) maps: nothing changes in the kernel, the bytes
    /// keep flowing; this only checks that both sockets are there, paired with each
    /// other, and makes sure this process's verdict program is attached for later
    /// splices. `written_before` is [`SplicedPair::written_before`] of the old process.
    pub fn adopt_splice(
        &mut self,
        a: impl AsFd,
        b: impl AsFd,
        written_before: (u64, u64),
    ) -> Result<SplicedPair, DataplaneError> {
        self.ensure_splice_attached()?;
        let io = |e| DataplaneError::io("adopting a spliced pair: reading socket state", e);
        let ka = sock_key(a.as_fd()).map_err(io)?;
        let kb = sock_key(b.as_fd()).map_err(io)?;
        let name = names::SPLICE_PEERS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let peers: HashMap<&MapData, SockKey, SplicePeer> =
            HashMap::try_from(map).map_err(map_err(name))?;
        let peer_of = |k: &SockKey| match peers.get(k, 0) {
            Ok(v) => Ok(Some(v.peer)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        };
        if peer_of(&ka)? != Some(kb) || peer_of(&kb)? != Some(ka) {
            return Err(DataplaneError::Unsupported(
                "adopting a spliced pair: it is not paired in this process's splice maps".into(),
            ));
        }
        Ok(SplicedPair {
            a: ka,
            b: kb,
            a_written_before: written_before.0,
            b_written_before: written_before.1,
        })
    }

    /// The kernel's id of the splice sockhash: two processes that report the same id
    /// share it, and can hand spliced pairs to each other.
    pub fn splice_map_id(&self) -> Result<u32, DataplaneError> {
        let name = names::SPLICE_SOCKS;
        match self.ebpf.map(name) {
            Some(aya::maps::Map::SockHash(m)) => Ok(m.info().map_err(map_err(name))?.id()),
            Some(_) => Err(DataplaneError::Unsupported(format!("map {name} is not a sockhash"))),
            None => Err(DataplaneError::MissingMap(name)),
        }
    }

    /// Bytes the kernel redirected out of `from`'s peer so far.
    pub fn spliced_bytes(&self, pair: &SplicedPair, from: Leg) -> Result<u64, DataplaneError> {
        let key = match from {
            Leg::A => pair.a,
            Leg::B => pair.b,
        };
        let name = names::SPLICE_PEERS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let peers: HashMap<&MapData, SockKey, SplicePeer> =
            HashMap::try_from(map).map_err(map_err(name))?;
        match peers.get(&key, 0) {
            Ok(v) => Ok(v.bytes),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// True once `to` (the peer of `from`) has taken in every byte the kernel
    /// redirected from `from`: only then may `from`'s half-close be passed on to it.
    pub fn splice_drained(
        &self,
        pair: &SplicedPair,
        from: Leg,
        to: impl AsFd,
    ) -> Result<bool, DataplaneError> {
        let redirected = self.spliced_bytes(pair, from)?;
        let before = match from {
            Leg::A => pair.b_written_before,
            Leg::B => pair.a_written_before,
        };
        let written = written_total(to.as_fd())
            .map_err(|e| DataplaneError::io("splice: peer byte count", e))?;
        Ok(written >= before + redirected)
    }

    /// Removes a pair from the kernel path (missing entries are fine: a closed socket
    /// leaves the sockhash by itself).
    pub fn unsplice(&mut self, pair: SplicedPair) -> Result<(), DataplaneError> {
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
        let mut peers: HashMap<&mut MapData, SockKey, SplicePeer> =
            HashMap::try_from(map).map_err(map_err(name))?;
        ignore_missing(peers.remove(&pair.a), name)?;
        ignore_missing(peers.remove(&pair.b), name)
    }

    /// Splice counters summed over CPUs.
    pub fn splice_stats(&self) -> Result<SpliceStats, DataplaneError> {
        let name = names::SPLICE_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        crate::per_cpu::sum(map, SpliceStats::merge).map_err(map_err(name))
    }
}
