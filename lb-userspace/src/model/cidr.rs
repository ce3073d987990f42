//! IP prefixes: `loadBalancerSourceRanges`, `--nodeport-addresses`, `--service-cidr`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 prefix, as kube-proxy's `--nodeport-addresses` and a Service's
/// `loadBalancerSourceRanges` take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The address with the host bits cleared, as a 128-bit number (IPv4 in the low 32 bits).
    fn masked(addr: IpAddr, len: u8) -> u128 {
        let (bits, width) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host = u32::from(width - len.min(width));
        if host >= 128 { 0 } else { bits >> host << host }
    }

    /// Whether `a` is within this prefix (never across families).
    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.addr.is_ipv4() && Self::masked(a, self.len) == Self::masked(self.addr, self.len)
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The same prefix with the host bits cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn network(&self) -> Cidr {
        let m = Self::masked(self.addr, self.len);
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(m as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(m)),
        };
        Cidr { addr, len: self.len }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: {a:?} is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length {l:?}"))?,
        };
        Ok(Cidr { addr, len })
    }
}
