//! An IP network (`10.0.0.0/8`, `2001:db8::/32`, or a bare address meaning one host): the
//! one type for every prefix sluice is configured with (guard deny lists, local-replica
//! prefixes, trusted edges), in userspace and in the keys the kernel's LPM maps use.

use core::fmt;
use core::net::IpAddr;
use core::str::FromStr;

/// An IP network: an address and a prefix length in bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address (host bits are ignored by [`Cidr::contains`]).
    pub addr: IpAddr,
    /// Prefix length in bits: at most 32 for IPv4, 128 for IPv6.
    pub len: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrError {
    /// The address part is not an IP address.
    Address,
    /// The length part is not a number, or exceeds the family's width.
    Length,
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CidrError::Address => "not an IP address or CIDR",
            CidrError::Length => "prefix length is not a number within the address width",
        })
    }
}

impl Cidr {
    /// A single host.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    /// Parses `ip/len` or a bare `ip` (a host); surrounding spaces are ignored.
    pub fn parse(s: &str) -> Result<Cidr, CidrError> {
        let (ip, len) = match s.trim().split_once('/') {
            Some((ip, len)) => (ip.trim(), Some(len.trim())),
            None => (s.trim(), None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| CidrError::Address)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.parse::<u8>().map_err(|_| CidrError::Length)?,
            None => max,
        };
        if len > max {
            return Err(CidrError::Length);
        }
        Ok(Cidr { addr, len })
    }

    /// Whether `ip` is inside this network. An IPv4-mapped IPv6 address counts as the
    /// IPv4 address it maps (a dual-stack socket reports IPv4 peers that way).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        Cidr::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_contains() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "mapped IPv4 counts as IPv4");
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse(" ::1 ").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(!Cidr::parse("0.0.0.0/0").unwrap().contains(ip("2001:db8::1")));
        let v6 = Cidr::parse("2001:db8:5::/48").unwrap();
        assert!(v6.contains(ip("2001:db8:5::9")) && !v6.contains(ip("2001:db8:6::9")));
        assert_eq!(Cidr::parse("2001:db8::1").unwrap().len, 128);
        assert_eq!(Cidr::parse("1.2.3.4/33"), Err(CidrError::Length));
        assert_eq!(Cidr::parse("10.0.0.0/x"), Err(CidrError::Length));
        assert_eq!(Cidr::parse("nonsense"), Err(CidrError::Address));
        assert_eq!(Cidr::host(ip("192.0.2.7")), Cidr::parse("192.0.2.7/32").unwrap());
    }
}
