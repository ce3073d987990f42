//! Socket termination: when a backend is removed, the sockets that socket-level balancing
//! connected to it (a pod's or node process's `connect()` to a frontend) are destroyed, so that
//! their owners learn at once (ECONNABORTED) and connect again, to a live backend, instead of
//! sending into a pod that is gone. Packets of such sockets never meet the packet path, which
//! moves the flows of removed backends by itself.
//!
//! Only the sockets whose cookie the socket programs recorded for that backend are touched, and
//! only in the network namespaces of the processes below the agent's cgroup (the node's own and
//! its pods'). Each namespace is entered on a thread of its own and asked through
//! NETLINK_SOCK_DIAG: a dump of its TCP and UDP sockets of the backend's family, then
//! SOCK_DESTROY for each match (kernel built with CONFIG_INET_DIAG_DESTROY).
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, SOCK_NAT_REV};

/// A backend that is gone: (address, port, protocol number).
pub type Gone = (IpAddr, u16, u8);

#[derive(Debug, thiserror::Error)]
pub enum TermError {
    #[error("reading the socket translations: {0}")]
    Map(String),
    #[error("netlink sock_diag in the namespace of pid {pid}: {source}")]
    Netlink { pid: u32, source: std::io::Error },
}

/// The cookies of the sockets connected through a frontend to one of `gone`, by backend, from
/// the socket translation maps (both families) pinned under `pin_dir`; their entries are
/// removed from the maps. An agent without the IPv6 map (an older one's pins) has no IPv6
/// sockets to report.
pub fn cookies_for(pin_dir: &Path, gone: &HashSet<Gone>) -> Result<HashSet<u64>, TermError> {
    use aya::maps::{HashMap, Map, MapData};
    let open = |name: &str| {
        MapData::from_pin(pin_dir.join(name)).map_err(|e| TermError::Map(format!("{name}: {e}")))
    };
    let mut map: HashMap<MapData, lb_common::SockNat4Key, lb_common::SockNat4Value> =
        HashMap::try_from(Map::LruHashMap(open(lb_common::MAP_SOCK_NAT)?))
            .map_err(|e| TermError::Map(e.to_string()))?;
    let hits: Vec<lb_common::SockNat4Key> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            k.kind == SOCK_NAT_REV && gone.contains(&(Ipv4Addr::from(k.addr).into(), k.port, k.proto))
        })
        .collect();
    for k in &hits {
        let _ = map.remove(k);
    }
    let mut cookies: HashSet<u64> = hits.iter().map(|k| k.cookie).collect();
    if gone.iter().any(|g| g.0.is_ipv6()) && pin_dir.join(lb_common::MAP_SOCK_NAT6).exists() {
        let mut map6: HashMap<MapData, lb_common::SockNat6Key, lb_common::SockNat6Value> =
            HashMap::try_from(Map::LruHashMap(open(lb_common::MAP_SOCK_NAT6)?))
                .map_err(|e| TermError::Map(e.to_string()))?;
        let hits6: Vec<lb_common::SockNat6Key> = map6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.kind == SOCK_NAT_REV && gone.contains(&(Ipv6Addr::from(k.addr).into(), k.port, k.proto))
            })
            .collect();
        for k in &hits6 {
            let _ = map6.remove(k);
        }
        cookies.extend(hits6.iter().map(|k| k.cookie));
    }
    Ok(cookies)
}

/// One process per network namespace among the processes of `cgroup` and its descendants.
pub fn namespaces_below(cgroup: &Path) -> BTreeMap<(u64, u64), u32> {
    let mut out = BTreeMap::new();
    let mut dirs: Vec<PathBuf> = vec![cgroup.to_owned()];
    while let Some(d) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if let Ok(md) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                    out.entry((md.dev(), md.ino())).or_insert(pid);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            dirs.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    out
}

/// Destroys, in the namespace of each process of `namespaces`, the TCP and UDP sockets whose
/// peer is one of `gone` and whose cookie is in `cookies`. Returns how many were destroyed.
pub fn terminate(
    namespaces: &BTreeMap<(u64, u64), u32>,
    gone: &HashSet<Gone>,
    cookies: &HashSet<u64>,
) -> Result<usize, TermError> {
    let mut total = 0;
    for &pid in namespaces.values() {
        let n = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<usize> {
                let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
                // SAFETY: a valid namespace fd; setns only changes this (scoped) thread's.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut n = 0;
                let v6 = gone.iter().any(|g| g.0.is_ipv6());
                let v4 = gone.iter().any(|g| g.0.is_ipv4());
                let families = [(libc::AF_INET as u8, v4), (libc::AF_INET6 as u8, v6)];
                for (family, _) in families.into_iter().filter(|f| f.1) {
                    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                        n += destroy_matching(family, proto, gone, cookies)?;
                    }
                }
                Ok(n)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
        });
        match n {
            Ok(n) => total += n,
            // The process may have exited since the cgroup was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(TermError::Netlink { pid, source }),
        }
    }
    Ok(total)
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` + `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

fn netlink() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned from here.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, req: &Request) -> std::io::Result<()> {
    // SAFETY: `req` is a plain repr(C) struct of `len` bytes.
    let n = unsafe { libc::send(fd.as_raw_fd(), (req as *const Request).cast(), req.len as usize, 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The netlink messages of one datagram: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
        let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push((ty, &buf[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: receives into a buffer we own, within its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Dumps the IPv4 sockets of `proto` in this thread's namespace and destroys the matches.
fn destroy_matching(
    family: u8,
    proto: u8,
    gone: &HashSet<Gone>,
    cookies: &HashSet<u64>,
) -> std::io::Result<usize> {
    let fd = netlink()?;
    let dump = Request {
        len: std::mem::size_of::<Request>() as u32,
        ty: SOCK_DIAG_BY_FAMILY,
        flags: NLM_F_REQUEST | NLM_F_DUMP,
        seq: 1,
        family,
        protocol: proto,
        states: u32::MAX,
        ..Request::default()
    };
    send(&fd, &dump)?;
    let mut matches: Vec<SockId> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    'dump: loop {
        let n = recv(&fd, &mut buf)?;
        for (ty, payload) in messages(&buf[..n]) {
            match ty {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => return Err(nl_error(payload)),
                // struct inet_diag_msg: family, state, timer, retrans, then the socket id.
                _ if payload.len() >= 4 + std::mem::size_of::<SockId>() => {
                    // SAFETY: the payload holds a whole SockId at offset 4 (checked above);
                    // read unaligned, as a copy.
                    let id: SockId = unsafe { std::ptr::read_unaligned(payload[4..].as_ptr().cast()) };
                    let addr: IpAddr = if family == libc::AF_INET6 as u8 {
                        let mut b = [0u8; 16];
                        for (i, w) in id.dst.iter().enumerate() {
                            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                        }
                        Ipv6Addr::from(b).into()
                    } else {
                        Ipv4Addr::from(u32::from_be(id.dst[0])).into()
                    };
                    let peer = (addr, u16::from_be(id.dport), proto);
                    let cookie = u64::from(id.cookie[0]) | u64::from(id.cookie[1]) << 32;
                    if gone.contains(&peer) && cookies.contains(&cookie) {
                        matches.push(id);
                    }
                }
                _ => {}
            }
        }
    }
    let mut destroyed = 0;
    for (i, id) in matches.into_iter().enumerate() {
        let req =
            Request { ty: SOCK_DESTROY, flags: NLM_F_REQUEST | NLM_F_ACK, seq: 2 + i as u32, id, ..dump };
        send(&fd, &req)?;
        let n = recv(&fd, &mut buf)?;
        for (ty, payload) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR {
                let e = nl_error(payload);
                match e.raw_os_error() {
                    Some(0) => destroyed += 1,
                    // Gone meanwhile.
                    Some(libc::ENOENT) => {}
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(destroyed)
}

/// The error code of an NLMSG_ERROR payload (0: an acknowledgement).
fn nl_error(payload: &[u8]) -> std::io::Error {
    let code = payload.get(..4).map_or(-libc::EIO, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
    std::io::Error::from_raw_os_error(-code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_is_the_kernels() {
        assert_eq!(std::mem::size_of::<SockId>(), 48);
        assert_eq!(std::mem::size_of::<Request>(), 16 + 56);
    }

    #[test]
    fn netlink_messages_are_split_and_aligned() {
        let mut buf = Vec::new();
        for (ty, payload) in [(20u16, vec![1u8, 2, 3]), (NLMSG_DONE, vec![0u8; 4])] {
            let len = 16 + payload.len() as u32;
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 10]);
            buf.extend_from_slice(&payload);
            while buf.len() % 4 != 0 {
                buf.push(0);
            }
        }
        let m = messages(&buf);
        assert_eq!(m, vec![(20, &[1u8, 2, 3][..]), (NLMSG_DONE, &[0u8; 4][..])]);
    }
}
