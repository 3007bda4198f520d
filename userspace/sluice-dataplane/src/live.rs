//! Live kernel state read back from the pinned maps, for `sluice bpf status` and
//! metrics. Works from any process (the pins are the interface), so an operator's
//! `sluice bpf status` sees what the running sluice programmed.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use serde::Serialize;
use sluice_abi::{
    AddrKey, BanValue, GuardConfig, GuardIface, GuardStats, RedirectStats, SpliceStats,
    SteerConfig, SteerStats, VipBackend, VipService, VipSlot, VipStats, names, vip_mode, xdp_mode,
};

/// A denylist entry as operators read it.
#[derive(Clone, Debug, Serialize)]
pub struct Denied {
    /// `addr/len`.
    pub prefix: String,
    /// Seconds until a temporary ban expires; `None` for a permanent entry.
    pub expires_in_s: Option<u64>,
}

/// One interface the XDP guard is attached to.
#[derive(Clone, Debug, Serialize)]
pub struct GuardIfaceView {
    /// Interface name.
    pub interface: String,
    /// Index in the network namespace sluice attached in.
    pub ifindex: u32,
    /// `native` or `generic`.
    pub mode: &'static str,
}

/// One VIP and where its connects go.
#[derive(Clone, Debug, Serialize)]
pub struct VipView {
    /// The virtual address.
    pub vip: SocketAddr,
    /// `selected` or `hrw`.
    pub mode: &'static str,
    /// The selected slot (mode `selected`).
    pub selected: u32,
    /// Replicas by slot.
    pub replicas: Vec<SocketAddr>,
    /// The server that owns the VIP: not in the kernel maps, so filled in by the
    /// caller from the running sluice (its admin `GET /vips`) when it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// What the kernel side holds now; a section is `None` when its maps are not pinned.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LiveState {
    /// Redirect counters.
    pub redirect: Option<RedirectStats>,
    /// Ports the XDP guard protects.
    pub guard_ports: Vec<u16>,
    /// SYN rate settings.
    pub guard_config: Option<GuardConfig>,
    /// Denylist and bans.
    pub denied: Vec<Denied>,
    /// Guard counters.
    pub guard: Option<GuardStats>,
    /// Interfaces the guard is attached to, with their XDP mode.
    pub guard_interfaces: Vec<GuardIfaceView>,
    /// Virtual addresses.
    pub vips: Vec<VipView>,
    /// VIP counters.
    pub vip: Option<VipStats>,
    /// The active listener generation.
    pub steering: Option<SteerConfig>,
    /// Steering counters.
    pub steer: Option<SteerStats>,
    /// Splice counters.
    pub splice: Option<SpliceStats>,
}

fn open(dir: &Path, name: &str) -> Option<Map> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    Map::from_map_data(data).ok()
}

fn per_cpu_sum<V: aya::Pod + Default + Copy>(
    dir: &Path,
    name: &str,
    merge: fn(V, V) -> V,
) -> Option<V> {
    crate::per_cpu::sum::<_, MapData, V>(open(dir, name)?, merge).ok()
}

/// The socket address a normalised key stands for (IPv4-mapped shown as IPv4).
pub fn socket_addr(key: &AddrKey) -> SocketAddr {
    let mut bytes = [0u8; 16];
    for (i, w) in key.ip.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    let ip = v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6));
    SocketAddr::new(ip, key.port as u16)
}

fn monotonic_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

fn ban_view(prefix: String, v: BanValue, now: u64) -> Denied {
    Denied {
        prefix,
        expires_in_s: (v.expires_s != 0).then(|| u64::from(v.expires_s).saturating_sub(now)),
    }
}

/// A NUL-padded interface name.
fn iface_name(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Reads everything pinned under `pin_dir`.
pub fn read(pin_dir: &Path) -> LiveState {
    let dir: PathBuf = pin_dir.to_path_buf();
    let now = monotonic_secs();
    let mut state = LiveState {
        redirect: per_cpu_sum(&dir, names::REDIR_STATS, RedirectStats::merge),
        guard: per_cpu_sum(&dir, names::GUARD_STATS, GuardStats::merge),
        vip: per_cpu_sum(&dir, names::VIP_STATS, VipStats::merge),
        steer: per_cpu_sum(&dir, names::STEER_STATS, SteerStats::merge),
        splice: per_cpu_sum(&dir, names::SPLICE_STATS, SpliceStats::merge),
        ..LiveState::default()
    };
    if let Some(ports) =
        open(&dir, names::GUARD_PORTS).and_then(|m| HashMap::<MapData, u16, u8>::try_from(m).ok())
    {
        state.guard_ports = ports.keys().filter_map(Result::ok).collect();
        state.guard_ports.sort_unstable();
    }
    if let Some(ifaces) = open(&dir, names::GUARD_IFACES)
        .and_then(|m| HashMap::<MapData, u32, GuardIface>::try_from(m).ok())
    {
        state.guard_interfaces = ifaces
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, v)| GuardIfaceView {
                interface: iface_name(&v.name),
                ifindex,
                mode: if v.mode == xdp_mode::NATIVE { "native" } else { "generic" },
            })
            .collect();
        state.guard_interfaces.sort_by(|a, b| a.interface.cmp(&b.interface));
    }
    state.guard_config = open(&dir, names::GUARD_CONFIG)
        .and_then(|m| Array::<MapData, GuardConfig>::try_from(m).ok())
        .and_then(|a| a.get(&0, 0).ok());
    if let Some(trie) = open(&dir, names::GUARD_DENY_V4)
        .and_then(|m| LpmTrie::<MapData, [u8; 4], BanValue>::try_from(m).ok())
    {
        for (k, v) in trie.iter().filter_map(Result::ok) {
            state.denied.push(ban_view(
                format!("{}/{}", Ipv4Addr::from(k.data()), k.prefix_len()),
                v,
                now,
            ));
        }
    }
    if let Some(trie) = open(&dir, names::GUARD_DENY_V6)
        .and_then(|m| LpmTrie::<MapData, [u8; 16], BanValue>::try_from(m).ok())
    {
        for (k, v) in trie.iter().filter_map(Result::ok) {
            state.denied.push(ban_view(
                format!("{}/{}", Ipv6Addr::from(k.data()), k.prefix_len()),
                v,
                now,
            ));
        }
    }
    let services = open(&dir, names::VIP_SERVICES)
        .and_then(|m| HashMap::<MapData, AddrKey, VipService>::try_from(m).ok());
    let backends = open(&dir, names::VIP_BACKENDS)
        .and_then(|m| HashMap::<MapData, VipSlot, VipBackend>::try_from(m).ok());
    if let (Some(services), Some(backends)) = (services, backends) {
        for (key, svc) in services.iter().filter_map(Result::ok) {
            let replicas = (0..svc.count)
                .filter_map(|index| backends.get(&VipSlot { vip: key, index }, 0).ok())
                .map(|b| socket_addr(&b.addr))
                .collect();
            state.vips.push(VipView {
                vip: socket_addr(&key),
                mode: if svc.mode == vip_mode::HRW { "hrw" } else { "selected" },
                selected: svc.selected,
                replicas,
                server: None,
            });
        }
        state.vips.sort_by_key(|v| v.vip);
    }
    state.steering = open(&dir, names::STEER_CONFIG)
        .and_then(|m| Array::<MapData, SteerConfig>::try_from(m).ok())
        .and_then(|a| a.get(&0, 0).ok());
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addr_inverts_addr_key() {
        for s in ["127.0.0.1:80", "[2001:db8::1]:443"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(socket_addr(&crate::loader::addr_key(a)), a);
        }
    }
}
