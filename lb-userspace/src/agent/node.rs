//! The node's own addresses: where node ports are answered.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::Cidr;

/// Whether `a` can carry node ports: not loopback, not IPv6 link-local (which needs a scope the
/// datapath's frontends do not have), not unspecified.
fn usable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The IPv4 and IPv6 addresses of this network namespace's interfaces, loopback and IPv6
/// link-local excluded, sorted (IPv4 first); only those within one of `only` when it is not
/// empty.
pub fn addresses(only: &[Cidr]) -> std::io::Result<Vec<IpAddr>> {
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
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET6 {
                let sin6 = &*(a as *const libc::sockaddr_in6);
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|a| usable(a) && (only.is_empty() || only.iter().any(|c| c.contains(*a))));
    out.sort();
    out.dedup();
    Ok(out)
}

/// Adds `SNAT_PORT_MIN-SNAT_PORT_MAX` to this network namespace's
/// `net.ipv4.ip_local_reserved_ports` (under `proc_sys`, normally /proc/sys), keeping what is
/// there. Returns the range.
pub fn reserve_snat_ports(proc_sys: &std::path::Path) -> std::io::Result<String> {
    let path = proc_sys.join("net/ipv4/ip_local_reserved_ports");
    let range = format!("{}-{}", lb_common::SNAT_PORT_MIN, lb_common::SNAT_PORT_MAX);
    let cur = std::fs::read_to_string(&path)?;
    let cur = cur.trim();
    if cur.split(',').any(|r| r == range) {
        return Ok(range);
    }
    let new = if cur.is_empty() { range.clone() } else { format!("{cur},{range}") };
    std::fs::write(&path, new)?;
    Ok(range)
}

/// The interfaces of this network namespace that carry a default route (IPv4 or IPv6), in the
/// order the routing tables list them: what `--iface auto` means. Reject routes and loopback
/// are left out.
pub fn default_route_interfaces() -> std::io::Result<Vec<String>> {
    let v4 = std::fs::read_to_string("/proc/net/route")?;
    // IPv6 may be disabled (no such file): then there are only IPv4 routes.
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    Ok(parse_default_routes(&v4, &v6))
}

/// [`default_route_interfaces`] of the texts of /proc/net/route and /proc/net/ipv6_route.
fn parse_default_routes(v4: &str, v6: &str) -> Vec<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    let flags_ok = |f: u32| f & RTF_UP != 0 && f & RTF_REJECT == 0;
    let mut out: Vec<String> = Vec::new();
    let mut add = |dev: &str| {
        if dev != "lo" && !out.iter().any(|d| d == dev) {
            out.push(dev.to_owned());
        }
    };
    // "Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT" (hex fields).
    for l in v4.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 8
            && f[1] == "00000000"
            && f[7] == "00000000"
            && u32::from_str_radix(f[3], 16).is_ok_and(flags_ok)
        {
            add(f[0]);
        }
    }
    // "dest plen src splen nexthop metric refcnt use flags dev" (hex fields, no header).
    for l in v6.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 10
            && f[0].bytes().all(|b| b == b'0')
            && f[1] == "00"
            && u32::from_str_radix(f[8], 16).is_ok_and(flags_ok)
        {
            add(f[9]);
        }
    }
    out
}

/// `--iface` as given, with `auto` replaced by [`default_route_interfaces`]; an error when
/// nothing is left, or when `auto` finds no interface.
pub fn resolve_interfaces(given: &[String]) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    let mut out: Vec<String> = Vec::new();
    for i in given {
        let found = if i == "auto" {
            let found = default_route_interfaces().context("reading the routing table for --iface auto")?;
            if found.is_empty() {
                anyhow::bail!(
                    "--iface auto: no interface has a default route in this network namespace; name the interfaces that carry Service traffic with --iface NAME"
                );
            }
            found
        } else {
            vec![i.clone()]
        };
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "no interface given: pass --iface NAME for each interface that carries Service traffic, or --iface auto"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_found_in_both_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
                  eth2\t00000000\t0100A8C0\t0002\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth3\t00000000\t0100A8C0\t0003\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
                  20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth4\n";
        // eth2's route is down, eth3's is not a default route, eth4 has none, lo's is a reject.
        assert_eq!(parse_default_routes(v4, v6), vec!["eth0", "eth1"]);
        assert!(parse_default_routes("Iface\tDestination\n", "").is_empty());
    }

    #[test]
    fn interfaces_given_by_name_are_kept_in_order_without_repeats() {
        let given = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(resolve_interfaces(&given(&["eth1", "eth0", "eth1"])).unwrap(), vec!["eth1", "eth0"]);
        let e = resolve_interfaces(&[]).unwrap_err().to_string();
        assert!(e.contains("--iface auto"), "{e}");
    }

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
        // IPv6, and never across families.
        let c6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!c6.contains("2001:db9::1".parse().unwrap()));
        assert!(!"0.0.0.0/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!("::/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!(!"::/0".parse::<Cidr>().unwrap().contains("10.0.0.1".parse().unwrap()));
        assert_eq!("2001:db8::1".parse::<Cidr>().unwrap().len, 128);
        assert!("2001:db8::/129".parse::<Cidr>().is_err());
        assert_eq!("2001:db8:1:2::5/48".parse::<Cidr>().unwrap().network().to_string(), "2001:db8:1::/48");
        assert_eq!("10.1.2.3/8".parse::<Cidr>().unwrap().network().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn addresses_never_include_loopback() {
        let all = addresses(&[]).unwrap();
        assert!(all.iter().all(usable), "{all:?}");
        let none = addresses(&["203.0.113.0/24".parse().unwrap()]).unwrap();
        let within: Cidr = "203.0.113.0/24".parse().unwrap();
        assert!(none.iter().all(|a| within.contains(*a)), "{none:?}");
        assert!(!usable(&"fe80::1".parse().unwrap()) && !usable(&"::1".parse().unwrap()));
        assert!(usable(&"2001:db8::1".parse().unwrap()));
    }
}
