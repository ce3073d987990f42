//! The node's own addresses: where node ports are answered.
use std::net::Ipv4Addr;

/// An IPv4 prefix, as kube-proxy's `--nodeport-addresses` takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(&self) -> u32 {
        if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) }
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The same prefix with the host bits cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn network(&self) -> Cidr {
        Cidr { addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()), len: self.len }
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
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr = a.parse().map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let len =
            l.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("{s:?}: bad prefix length {l:?}"))?;
        Ok(Cidr { addr, len })
    }
}

/// The IPv4 addresses of this network namespace's interfaces, loopback excluded, sorted; only
/// those within one of `only` when it is not empty.
pub fn addresses(only: &[Cidr]) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs allocates a list that is walked read-only and freed once.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|a| !a.is_loopback() && (only.is_empty() || only.iter().any(|c| c.contains(*a))));
    out.sort();
    out.dedup();
    Ok(out)
}

/// Adds `SNAT_PORT_MIN-SNAT_PORT_MAX` to this network namespace's
/// `net.ipv4.ip_local_reserved_ports`, keeping what is there. Returns the range.
pub fn reserve_snat_ports() -> std::io::Result<String> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let range = format!("{}-{}", lb_common::SNAT_PORT_MIN, lb_common::SNAT_PORT_MAX);
    let cur = std::fs::read_to_string(PATH)?;
    let cur = cur.trim();
    if cur.split(',').any(|r| r == range) {
        return Ok(range);
    }
    let new = if cur.is_empty() { range.clone() } else { format!("{cur},{range}") };
    std::fs::write(PATH, new)?;
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        let one: Cidr = "10.0.0.1".parse().unwrap();
        assert_eq!(one.len, 32);
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn addresses_never_include_loopback() {
        let all = addresses(&[]).unwrap();
        assert!(all.iter().all(|a| !a.is_loopback()), "{all:?}");
        let none = addresses(&["203.0.113.0/24".parse().unwrap()]).unwrap();
        assert!(none.iter().all(|a| a.octets()[..3] == [203, 0, 113]), "{none:?}");
    }
}
