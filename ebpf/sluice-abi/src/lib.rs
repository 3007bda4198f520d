//! Map keys and values shared by sluice's kernel programs and userspace.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time size check,
//! because the kernel and userspace must agree on the byte layout exactly. With the
//! `user` feature the types implement `aya::Pod` so userspace can use them in maps.
//!
//! Addresses are always stored in one normalised form: a 16-byte IPv6 address, with
//! IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), kept as four `u32` words in network
//! byte order exactly as the kernel's socket contexts expose them. Ports are host
//! byte order. Mixing IPv4 and mapped keys breaks lookups (docs/design.md, What bites), so both
//! sides build keys only through the constructors here.
#![no_std]

mod cidr;
pub use cidr::{Cidr, CidrError};

/// Names of the maps and programs in the kernel object, shared so userspace never
/// spells them differently. BPF object names are capped at 15 visible characters.
pub mod names {
    /// Sockhash of established proxy↔local-replica sockets, keyed by [`super::SockKey`].
    pub const REDIR_SOCKS: &str = "redir_socks";
    /// Local replica addresses whose connections are accelerated ([`super::AddrKey`]).
    pub const LOCAL_REPLICAS: &str = "local_replicas";
    /// Per-CPU [`super::RedirectStats`] for sock_ops + sk_msg.
    pub const REDIR_STATS: &str = "redir_stats";
    /// sock_ops program that records established sockets.
    pub const PROG_TRACK: &str = "sluice_track";
    /// sk_msg program that redirects to the peer socket.
    pub const PROG_REDIRECT: &str = "sluice_redirect";
    /// Probe programs: smallest program of each type, loaded only to learn what the
    /// kernel accepts.
    pub const PROBE_SKB_VERDICT: &str = "probe_skb_verdict";
    /// XDP probe program.
    pub const PROBE_XDP: &str = "probe_xdp";
    /// sk_reuseport probe program.
    pub const PROBE_REUSEPORT: &str = "probe_reuseport";
    /// cgroup connect4 probe program.
    pub const PROBE_CONNECT4: &str = "probe_connect4";
    /// Sockmap the sk_skb probe attaches to.
    pub const PROBE_SOCKMAP: &str = "probe_sockmap";
    /// XDP guard program.
    pub const PROG_GUARD: &str = "sluice_guard";
    /// Denylisted IPv4 prefixes (LPM trie over `[u8; 4]` → [`super::BanValue`]).
    pub const GUARD_DENY_V4: &str = "guard_deny_v4";
    /// Denylisted IPv6 prefixes (LPM trie over `[u8; 16]` → [`super::BanValue`]).
    pub const GUARD_DENY_V6: &str = "guard_deny_v6";
    /// Destination ports the guard protects (host order `u16` → `u8`).
    pub const GUARD_PORTS: &str = "guard_ports";
    /// Guard settings, one [`super::GuardConfig`] at index 0.
    pub const GUARD_CONFIG: &str = "guard_config";
    /// Per-source SYN token buckets (LRU, normalised address → [`super::SynBucket`]).
    pub const GUARD_SYN_RATE: &str = "guard_syn_rate";
    /// Per-CPU [`super::GuardStats`].
    pub const GUARD_STATS: &str = "guard_stats";
    /// Where the guard is attached and how (ifindex `u32` → [`super::GuardIface`]).
    /// Written by userspace only, so another process (`sluice bpf status`, bpftool)
    /// can read it through the pin.
    pub const GUARD_IFACES: &str = "guard_ifaces";
    /// cgroup connect4 program that rewrites connects to server virtual addresses.
    pub const PROG_VIP4: &str = "sluice_vip4";
    /// cgroup connect6 program, the same for IPv6 (and v4-mapped) sockets.
    pub const PROG_VIP6: &str = "sluice_vip6";
    /// Server virtual addresses ([`super::AddrKey`] → [`super::VipService`]).
    pub const VIP_SERVICES: &str = "vip_services";
    /// Replica selections per VIP, flat ([`super::VipSlot`] → [`super::VipBackend`]).
    pub const VIP_BACKENDS: &str = "vip_backends";
    /// Per-CPU [`super::VipStats`].
    pub const VIP_STATS: &str = "vip_stats";
    /// sk_reuseport select-or-migrate program over sluice's listener group.
    pub const PROG_STEER: &str = "sluice_steer";
    /// Listener sockets by slot (REUSEPORT_SOCKARRAY); shared across an upgrade.
    pub const STEER_SOCKS: &str = "steer_socks";
    /// The active slot range, one [`super::SteerConfig`]; shared across an upgrade.
    pub const STEER_CONFIG: &str = "steer_config";
    /// Per-CPU [`super::SteerStats`].
    pub const STEER_STATS: &str = "steer_stats";
    /// sk_skb stream verdict that splices paired sockets.
    pub const PROG_SPLICE: &str = "sluice_splice";
    /// Spliced sockets ([`super::SockKey`] → socket).
    pub const SPLICE_SOCKS: &str = "splice_socks";
    /// Each spliced socket's peer and byte count ([`super::SockKey`] → [`super::SplicePeer`]).
    pub const SPLICE_PEERS: &str = "splice_peers";
    /// Per-CPU [`super::SpliceStats`].
    pub const SPLICE_STATS: &str = "splice_stats";
}

/// Slots in the steering socket array: two halves of [`STEER_HALF`], one per process
/// generation, so an upgrading process fills the idle half and flips one word.
pub const STEER_SLOTS: u32 = 256;
/// Slots per generation.
pub const STEER_HALF: u32 = STEER_SLOTS / 2;

/// Rendezvous (highest random weight) hashing shared by userspace and the kernel, so
/// both pick the same replica for the same session.
///
/// A replica's weight for a session is `score(session_hash, replica_hash)`; the
/// replica with the highest score wins, ties to the lower index. Removing a replica
/// moves only the sessions it had. Hashes of strings use FNV-1a 64; the mix is
/// SplitMix64's finaliser. Both are fixed here and must never change: changing them
/// would move every session at once.
pub mod hrw {
    /// FNV-1a 64-bit hash of `bytes` (session ids, replica ids).
    #[inline(always)]
    pub const fn fnv1a64(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < bytes.len() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        h
    }

    /// SplitMix64 finaliser: a bijective mix with full avalanche.
    #[inline(always)]
    pub const fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The weight of a replica for a session.
    #[inline(always)]
    pub const fn score(session_hash: u64, replica_hash: u64) -> u64 {
        mix(session_hash ^ mix(replica_hash))
    }
}

/// How a VIP picks its replica for a new connection.
pub mod vip_mode {
    /// The replica userspace selected (kept at the least loaded).
    pub const SELECTED: u32 = 0;
    /// Rendezvous hashing on the connecting process (its thread-group id).
    pub const HRW: u32 = 1;
}

/// Most replicas one VIP can spread over (bounds the kernel's HRW loop).
pub const MAX_VIP_BACKENDS: u32 = 64;

/// A normalised IPv6 address as four network-byte-order words.
pub type Ip6Words = [u32; 4];

/// Maps an IPv4 address given as a network-byte-order `u32` (as the kernel exposes
/// it) to its IPv4-mapped IPv6 form.
#[inline(always)]
pub const fn ipv4_mapped(ip4_be: u32) -> Ip6Words {
    [0, 0, 0xffff_u32.to_be(), ip4_be]
}

/// Socket address family values as the kernel reports them.
pub mod family {
    /// AF_INET.
    pub const INET: u32 = 2;
    /// AF_INET6.
    pub const INET6: u32 = 10;
}

/// Identifies one TCP socket by its 4-tuple, seen from that socket.
///
/// The peer of a socket is found by swapping local and remote ([`SockKey::peer`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// Local address, normalised.
    pub local_ip: Ip6Words,
    /// Remote address, normalised.
    pub remote_ip: Ip6Words,
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order.
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the socket at the other end of this connection.
    #[inline(always)]
    pub const fn peer(&self) -> SockKey {
        SockKey {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }

    /// This socket's local endpoint.
    #[inline(always)]
    pub const fn local(&self) -> AddrKey {
        AddrKey { ip: self.local_ip, port: self.local_port }
    }

    /// This socket's remote endpoint.
    #[inline(always)]
    pub const fn remote(&self) -> AddrKey {
        AddrKey { ip: self.remote_ip, port: self.remote_port }
    }
}

/// One endpoint: a normalised address and a host-byte-order port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    /// Address, normalised.
    pub ip: Ip6Words,
    /// Port, host byte order.
    pub port: u32,
}

impl AddrKey {
    /// An endpoint from an IPv4 address in network byte order and a host-order port.
    #[inline(always)]
    pub const fn from_ipv4_be(ip4_be: u32, port: u16) -> AddrKey {
        AddrKey { ip: ipv4_mapped(ip4_be), port: port as u32 }
    }
}

/// Counters of the sock_ops + sk_msg redirect path, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct RedirectStats {
    /// Established sockets recorded into the sockhash.
    pub socks_tracked: u64,
    /// Sockhash inserts the kernel refused (e.g. EBUSY after a restart).
    pub track_failed: u64,
    /// sk_msg invocations (one per sendmsg batch).
    pub messages: u64,
    /// Bytes handed to the peer socket's ingress by the redirect.
    pub bytes_redirected: u64,
    /// Messages whose peer was not in the sockhash; they took the normal stack path.
    pub no_peer: u64,
}

impl RedirectStats {
    /// Adds another CPU's counters to these.
    pub const fn merge(self, other: RedirectStats) -> RedirectStats {
        RedirectStats {
            socks_tracked: self.socks_tracked + other.socks_tracked,
            track_failed: self.track_failed + other.track_failed,
            messages: self.messages + other.messages,
            bytes_redirected: self.bytes_redirected + other.bytes_redirected,
            no_peer: self.no_peer + other.no_peer,
        }
    }
}

/// A denylist entry: permanent, or a temporary ban that expires.
///
/// 4-byte aligned on purpose: an LPM trie's value must align within the 4-byte IPv4
/// key, so a `u64` deadline would not fit. Seconds of CLOCK_MONOTONIC are plenty for
/// bans.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BanValue {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns` / 10⁹) deadline in seconds; 0 = permanent.
    pub expires_s: u32,
}

/// Guard settings written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct GuardConfig {
    /// New connections (SYNs) per second allowed per source; 0 disables the limit.
    pub syn_rate_per_sec: u32,
    /// Bucket size: SYNs a source may send in a burst.
    pub syn_burst: u32,
}

/// Length of an interface name buffer (the kernel's `IFNAMSIZ`).
pub const IFNAMSIZ: usize = 16;

/// One interface the XDP guard is attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GuardIface {
    /// Interface name, NUL-padded (the ifindex alone means nothing in another netns).
    pub name: [u8; IFNAMSIZ],
    /// One of [`xdp_mode`].
    pub mode: u32,
}

/// How XDP runs on an interface ([`GuardIface::mode`]).
pub mod xdp_mode {
    /// Driver (native) XDP.
    pub const NATIVE: u32 = 1;
    /// Generic (skb) XDP, after the driver allocated the skb.
    pub const GENERIC: u32 = 2;
}

/// One source's SYN token bucket, in nanotokens so integer refill stays exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SynBucket {
    /// Tokens × 10⁹ (one token = one SYN).
    pub nanotokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}

/// XDP guard counters, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct GuardStats {
    /// Packets to guarded ports inspected.
    pub inspected: u64,
    /// Dropped: source in the denylist (or banned).
    pub dropped_denied: u64,
    /// Dropped: source over its SYN rate.
    pub dropped_syn_rate: u64,
    /// SYNs seen to guarded ports.
    pub syns: u64,
}

impl GuardStats {
    /// Adds another CPU's counters to these.
    pub const fn merge(self, o: GuardStats) -> GuardStats {
        GuardStats {
            inspected: self.inspected + o.inspected,
            dropped_denied: self.dropped_denied + o.dropped_denied,
            dropped_syn_rate: self.dropped_syn_rate + o.dropped_syn_rate,
            syns: self.syns + o.syns,
        }
    }
}

/// A server virtual address's routing entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipService {
    /// Replicas at indices `0..count` in the backends map.
    pub count: u32,
    /// One of [`vip_mode`].
    pub mode: u32,
    /// Index of the replica userspace selected (mode `SELECTED`).
    pub selected: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Key of one replica slot of a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipSlot {
    /// The VIP.
    pub vip: AddrKey,
    /// Slot index, `0..count`.
    pub index: u32,
}

/// A replica behind a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipBackend {
    /// Where connects are rewritten to.
    pub addr: AddrKey,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// `hrw::fnv1a64(replica id)`, so HRW is stable across slot reordering.
    pub id_hash: u64,
}

/// VIP counters, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct VipStats {
    /// TCP connects to a VIP.
    pub connects: u64,
    /// Connects rewritten to a replica.
    pub rewritten: u64,
    /// Connects to a VIP with no usable replica (left unchanged; they fail).
    pub no_backend: u64,
    /// An IPv6 replica for an IPv4 socket: cannot be rewritten.
    pub family_mismatch: u64,
}

impl VipStats {
    /// Adds another CPU's counters to these.
    pub const fn merge(self, o: VipStats) -> VipStats {
        VipStats {
            connects: self.connects + o.connects,
            rewritten: self.rewritten + o.rewritten,
            no_backend: self.no_backend + o.no_backend,
            family_mismatch: self.family_mismatch + o.family_mismatch,
        }
    }
}

/// Which listeners take new connections: slots `base..base + count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SteerConfig {
    /// First slot of the active generation.
    pub base: u32,
    /// Active listeners; 0 lets the kernel pick (no steering).
    pub count: u32,
}

/// Steering counters, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SteerStats {
    /// New connections steered to a chosen listener.
    pub selected: u64,
    /// Requests and queued connections moved off a closing listener.
    pub migrated: u64,
    /// Selections that failed (empty slot); the kernel's own choice applied.
    pub fallback: u64,
}

impl SteerStats {
    /// Adds another CPU's counters to these.
    pub const fn merge(self, o: SteerStats) -> SteerStats {
        SteerStats {
            selected: self.selected + o.selected,
            migrated: self.migrated + o.migrated,
            fallback: self.fallback + o.fallback,
        }
    }
}

/// A spliced socket's peer, and how many bytes the kernel redirected from this socket
/// to it. Userspace compares that count with what the peer has taken in before it
/// propagates a half-close, so a FIN never overtakes redirected bytes still queued.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SplicePeer {
    /// The peer socket's key.
    pub peer: SockKey,
    /// Bytes redirected from this socket to the peer.
    pub bytes: u64,
}

/// Splice counters, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SpliceStats {
    /// Bytes handed to the peer socket's egress.
    pub bytes: u64,
    /// skbs redirected.
    pub skbs: u64,
    /// skbs on a socket with no peer entry: left for userspace to read.
    pub no_peer: u64,
}

impl SpliceStats {
    /// Adds another CPU's counters to these.
    pub const fn merge(self, o: SpliceStats) -> SpliceStats {
        SpliceStats {
            bytes: self.bytes + o.bytes,
            skbs: self.skbs + o.skbs,
            no_peer: self.no_peer + o.no_peer,
        }
    }
}

// The kernel and userspace must agree on these sizes; a change here is an ABI change.
const _: () = assert!(core::mem::size_of::<SockKey>() == 40);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<RedirectStats>() == 40);
const _: () = assert!(core::mem::align_of::<RedirectStats>() == 8);
const _: () = assert!(core::mem::size_of::<BanValue>() == 4);
const _: () = assert!(core::mem::size_of::<GuardConfig>() == 8);
const _: () = assert!(core::mem::size_of::<SynBucket>() == 16);
const _: () = assert!(core::mem::size_of::<GuardStats>() == 32);
const _: () = assert!(core::mem::size_of::<GuardIface>() == 20);
const _: () = assert!(core::mem::size_of::<VipService>() == 16);
const _: () = assert!(core::mem::size_of::<VipSlot>() == 24);
const _: () = assert!(core::mem::size_of::<VipBackend>() == 32);
const _: () = assert!(core::mem::size_of::<VipStats>() == 32);
const _: () = assert!(core::mem::size_of::<SteerConfig>() == 8);
const _: () = assert!(core::mem::size_of::<SteerStats>() == 24);
const _: () = assert!(core::mem::size_of::<SpliceStats>() == 24);
const _: () = assert!(core::mem::size_of::<SplicePeer>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers, with no padding bytes
    // (checked by the size assertions above), so every bit pattern is valid.
    #![allow(unsafe_code)]
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RedirectStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BanValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SynBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardIface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipService {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipSlot {}
    // SAFETY: as above (the padding field is explicit and zeroed).
    unsafe impl aya::Pod for super::VipBackend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SteerConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SteerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceStats {}
    // SAFETY: as above (40-byte key then an aligned u64: no padding).
    unsafe impl aya::Pod for super::SplicePeer {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_swaps_endpoints_and_is_an_involution() {
        let k = SockKey {
            local_ip: ipv4_mapped(u32::from_be_bytes([127, 0, 0, 1])),
            remote_ip: ipv4_mapped(u32::from_be_bytes([127, 0, 0, 2])),
            local_port: 80,
            remote_port: 43000,
        };
        assert_eq!(k.peer().local(), k.remote());
        assert_eq!(k.peer().peer(), k);
    }

    #[test]
    fn hrw_is_pinned_to_its_documented_functions() {
        // Known values: these must never change (every session would move).
        assert_eq!(hrw::fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hrw::fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hrw::mix(0), 0);
        assert_ne!(hrw::score(1, 2), hrw::score(2, 1));
    }

    #[test]
    fn hrw_moves_only_the_removed_replicas_sessions() {
        let replicas: [u64; 4] = [11, 22, 33, 44].map(|r: u64| hrw::fnv1a64(&r.to_le_bytes()));
        let pick = |set: &[u64], s: u64| {
            let mut best = 0;
            for i in 1..set.len() {
                if hrw::score(s, set[i]) > hrw::score(s, set[best]) {
                    best = i;
                }
            }
            set[best]
        };
        let without: [u64; 3] = [replicas[0], replicas[1], replicas[3]];
        let mut moved = 0;
        for session in 0..2000u64 {
            let before = pick(&replicas, session);
            let after = pick(&without, session);
            if before != replicas[2] {
                assert_eq!(before, after, "session {session} moved without cause");
            } else {
                moved += 1;
            }
        }
        // Roughly a quarter of sessions lived on the removed replica.
        assert!((350..650).contains(&moved), "{moved}");
    }

    #[test]
    fn ipv4_mapped_matches_std() {
        let v4 = core::net::Ipv4Addr::new(10, 1, 2, 3);
        let words = ipv4_mapped(u32::from_ne_bytes(v4.octets()));
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(core::net::Ipv6Addr::from(bytes), v4.to_ipv6_mapped());
    }
}
