//! The XDP guard: denylist, temporary bans and per-source SYN rate limiting before
//! the TCP stack, on the interfaces the operator names.

use std::{net::IpAddr, time::Duration};

use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use serde::Serialize;
use sluice_abi::{BanValue, Cidr, GuardConfig, GuardIface, GuardStats, IFNAMSIZ, names, xdp_mode};
use tracing::info;

use crate::{Dataplane, DataplaneError, error::map_err, loader::program, sys};

/// How the guard got attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuardAttachment {
    /// Interface name.
    pub interface: String,
    /// `native` (driver) or `generic` (skb) XDP.
    pub mode: &'static str,
}

/// The index of `interface` in the current thread's network namespace.
fn ifindex(interface: &str) -> Result<u32, DataplaneError> {
    let c = std::ffi::CString::new(interface)
        .map_err(|_| DataplaneError::Unsupported(format!("interface name {interface:?}")))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(DataplaneError::io(
            format!("looking up interface {interface}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(index)
}

/// Nanoseconds of CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// The whole-second deadline of a ban starting now: rounded up, so a ban never ends
/// early (it may last up to a second longer).
fn ban_deadline_secs(now_ns: u64, ban: Duration) -> u32 {
    let end_ns = now_ns.saturating_add(u64::try_from(ban.as_nanos()).unwrap_or(u64::MAX));
    u32::try_from(end_ns.div_ceil(1_000_000_000)).unwrap_or(u32::MAX)
}

impl Dataplane {
    /// Loads the guard (once) and attaches it to `interface` in the current thread's
    /// network namespace: native mode where the driver supports it, generic otherwise.
    pub fn attach_guard(&mut self, interface: &str) -> Result<GuardAttachment, DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, names::PROG_GUARD)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DataplaneError::Program { name: names::PROG_GUARD, source })?;
        }
        let (link, mode) = match prog.attach(interface, XdpMode::Driver) {
            Ok(link) => (link, "native"),
            Err(_) => {
                let link = prog.attach(interface, XdpMode::Skb).map_err(|source| {
                    DataplaneError::Program { name: names::PROG_GUARD, source }
                })?;
                (link, "generic")
            }
        };
        self.guard_links.push((interface.to_owned(), link));
        // Recorded for other processes (`sluice bpf status`); the attachment stands
        // even if this bookkeeping fails.
        if let Err(e) = self.record_guard_iface(interface, mode) {
            tracing::warn!(interface, error = %e, "XDP guard mode not recorded");
        }
        info!(interface, mode, "XDP guard attached");
        Ok(GuardAttachment { interface: interface.to_owned(), mode })
    }

    /// Attaches the guard to `interface` inside the network namespace at `netns`
    /// (e.g. `/run/netns/NAME`).
    pub fn attach_guard_in(
        &mut self,
        netns: &std::path::Path,
        interface: &str,
    ) -> Result<GuardAttachment, DataplaneError> {
        sys::in_netns(netns, || self.attach_guard(interface))
    }

    /// Writes `interface` and its XDP mode into the pinned interface map, keyed by the
    /// ifindex in the current thread's network namespace.
    fn record_guard_iface(&mut self, interface: &str, mode: &str) -> Result<(), DataplaneError> {
        let name = names::GUARD_IFACES;
        let ifindex = ifindex(interface)?;
        let mut value = GuardIface {
            name: [0; IFNAMSIZ],
            mode: if mode == "native" { xdp_mode::NATIVE } else { xdp_mode::GENERIC },
        };
        // Keep the last byte NUL, as the kernel does for interface names.
        let len = interface.len().min(IFNAMSIZ - 1);
        value.name[..len].copy_from_slice(&interface.as_bytes()[..len]);
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut ifaces: HashMap<&mut MapData, u32, GuardIface> =
            HashMap::try_from(map).map_err(map_err(name))?;
        ifaces.insert(ifindex, value, 0).map_err(map_err(name))
    }

    /// Empties the pinned interface map.
    fn clear_guard_ifaces(&mut self) -> Result<(), DataplaneError> {
        let name = names::GUARD_IFACES;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut ifaces: HashMap<&mut MapData, u32, GuardIface> =
            HashMap::try_from(map).map_err(map_err(name))?;
        let keys: Vec<u32> = ifaces.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = ifaces.remove(&k);
        }
        Ok(())
    }

    /// Detaches the guard from every interface.
    pub fn detach_guard(&mut self) -> Result<(), DataplaneError> {
        if let Err(e) = self.clear_guard_ifaces() {
            tracing::warn!(error = %e, "XDP guard interface records not cleared");
        }
        let links: Vec<(String, XdpLinkId)> = std::mem::take(&mut self.guard_links);
        let prog: &mut Xdp = program(&mut self.ebpf, names::PROG_GUARD)?;
        for (_, link) in links {
            prog.detach(link)
                .map_err(|source| DataplaneError::Program { name: names::PROG_GUARD, source })?;
        }
        Ok(())
    }

    /// Interfaces the guard is attached to.
    pub fn guard_interfaces(&self) -> Vec<String> {
        self.guard_links.iter().map(|(i, _)| i.clone()).collect()
    }

    /// Protects a destination port (one of sluice's listeners).
    pub fn guard_port(&mut self, port: u16) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(names::GUARD_PORTS)
            .ok_or(DataplaneError::MissingMap(names::GUARD_PORTS))?;
        let mut ports: HashMap<&mut MapData, u16, u8> =
            HashMap::try_from(map).map_err(map_err(names::GUARD_PORTS))?;
        ports.insert(port, 1, 0).map_err(map_err(names::GUARD_PORTS))
    }

    /// Sets the per-source SYN rate (per second) and burst; a rate of 0 disables it.
    pub fn guard_syn_rate(&mut self, per_sec: u32, burst: u32) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(names::GUARD_CONFIG)
            .ok_or(DataplaneError::MissingMap(names::GUARD_CONFIG))?;
        let mut cfg: Array<&mut MapData, GuardConfig> =
            Array::try_from(map).map_err(map_err(names::GUARD_CONFIG))?;
        cfg.set(0, GuardConfig { syn_rate_per_sec: per_sec, syn_burst: burst.max(1) }, 0)
            .map_err(map_err(names::GUARD_CONFIG))
    }

    /// Denies a prefix, permanently (`ban = None`) or until the ban expires.
    pub fn guard_deny(
        &mut self,
        prefix: Cidr,
        ban: Option<Duration>,
    ) -> Result<(), DataplaneError> {
        let value = BanValue {
            expires_s: match ban {
                None => 0,
                Some(d) => ban_deadline_secs(monotonic_ns(), d).max(1),
            },
        };
        match prefix.addr {
            IpAddr::V4(v4) => {
                let name = names::GUARD_DENY_V4;
                let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
                let mut trie: LpmTrie<&mut MapData, [u8; 4], BanValue> =
                    LpmTrie::try_from(map).map_err(map_err(name))?;
                trie.insert(&Key::new(u32::from(prefix.len), v4.octets()), value, 0)
                    .map_err(map_err(name))
            }
            IpAddr::V6(v6) => {
                let name = names::GUARD_DENY_V6;
                let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
                let mut trie: LpmTrie<&mut MapData, [u8; 16], BanValue> =
                    LpmTrie::try_from(map).map_err(map_err(name))?;
                trie.insert(&Key::new(u32::from(prefix.len), v6.octets()), value, 0)
                    .map_err(map_err(name))
            }
        }
    }

    /// Lifts a denial (a missing entry is not an error).
    pub fn guard_allow(&mut self, prefix: Cidr) -> Result<(), DataplaneError> {
        let result = match prefix.addr {
            IpAddr::V4(v4) => {
                let name = names::GUARD_DENY_V4;
                let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
                let mut trie: LpmTrie<&mut MapData, [u8; 4], BanValue> =
                    LpmTrie::try_from(map).map_err(map_err(name))?;
                trie.remove(&Key::new(u32::from(prefix.len), v4.octets())).map_err(map_err(name))
            }
            IpAddr::V6(v6) => {
                let name = names::GUARD_DENY_V6;
                let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
                let mut trie: LpmTrie<&mut MapData, [u8; 16], BanValue> =
                    LpmTrie::try_from(map).map_err(map_err(name))?;
                trie.remove(&Key::new(u32::from(prefix.len), v6.octets())).map_err(map_err(name))
            }
        };
        match result {
            Err(DataplaneError::Map { source: aya::maps::MapError::KeyNotFound, .. }) => Ok(()),
            other => other,
        }
    }

    /// Removes expired bans (the program already ignores them; this frees the slots).
    /// Returns how many were removed.
    pub fn guard_expire_bans(&mut self) -> Result<usize, DataplaneError> {
        let now = monotonic_ns() / 1_000_000_000;
        Ok(self.expire_in::<[u8; 4]>(names::GUARD_DENY_V4, now)?
            + self.expire_in::<[u8; 16]>(names::GUARD_DENY_V6, now)?)
    }

    /// Removes the bans in one denylist trie whose deadline has passed.
    fn expire_in<K: aya::Pod>(
        &mut self,
        name: &'static str,
        now: u64,
    ) -> Result<usize, DataplaneError> {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut trie: LpmTrie<&mut MapData, K, BanValue> =
            LpmTrie::try_from(map).map_err(map_err(name))?;
        let expired: Vec<Key<K>> = trie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_s != 0 && u64::from(v.expires_s) <= now)
            .map(|(k, _)| k)
            .collect();
        Ok(expired.iter().filter(|k| trie.remove(k).is_ok()).count())
    }

    /// Guard counters summed over CPUs.
    pub fn guard_stats(&self) -> Result<GuardStats, DataplaneError> {
        let name = names::GUARD_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        crate::per_cpu::sum(map, GuardStats::merge).map_err(map_err(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_with_defaults_and_limits() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
        assert_eq!("2001:db8::1".parse::<Cidr>().unwrap().len, 128);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn ban_deadlines_round_up_to_whole_seconds() {
        let s = 1_000_000_000;
        assert_eq!(ban_deadline_secs(10 * s + s / 100 * 99, Duration::from_secs(1)), 12);
        assert_eq!(ban_deadline_secs(10 * s, Duration::from_secs(1)), 11);
        assert_eq!(ban_deadline_secs(u64::MAX, Duration::from_secs(1)), u32::MAX);
    }
}
