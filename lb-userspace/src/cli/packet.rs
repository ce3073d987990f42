//! Crafting and reading Ethernet/IPv4/TCP|UDP and Ethernet/IPv6/TCP|UDP frames: for packet
//! tests, and for running the datapath on a made-up packet (BPF_PROG_TEST_RUN).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lb_common::csum;

use crate::model::Proto;

pub const ETH_HLEN: usize = 14;

/// How to build a frame. Checksums are always computed correctly unless told otherwise.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: Proto,
    /// TCP flags byte (SYN = 0x02, ACK = 0x10, ...).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (padded to a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// More-fragments flag and fragment offset (in 8-byte units).
    pub more_fragments: bool,
    pub frag_offset: u16,
    /// UDP only: send with a zero ("none") checksum.
    pub udp_no_checksum: bool,
}

impl Frame {
    pub fn new(proto: Proto, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Frame {
            src,
            dst,
            proto,
            tcp_flags: if proto == Proto::Tcp { 0x02 } else { 0 },
            payload: b"xlb".to_vec(),
            ip_options: Vec::new(),
            more_fragments: false,
            frag_offset: 0,
            udp_no_checksum: false,
        }
    }

    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(Proto::Tcp, src, dst)
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(Proto::Udp, src, dst)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0); // end-of-options padding
        }
        let ihl = 20 + opts.len();
        let mut l4 = segment(self.proto, self.src.port(), self.dst.port(), self.tcp_flags, &self.payload);
        let check_at = if self.proto == Proto::Tcp { 16 } else { 6 };
        if !(self.proto == Proto::Udp && self.udp_no_checksum) {
            let mut c = csum::l4_checksum_v4(
                self.src.ip().octets(),
                self.dst.ip().octets(),
                self.proto.number(),
                &l4,
            );
            if self.proto == Proto::Udp && c == 0 {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_ne_bytes());
        }

        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        let frag = (u16::from(self.more_fragments) << 13) | (self.frag_offset & 0x1fff);
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto.number();
        ip[12..16].copy_from_slice(&self.src.ip().octets());
        ip[16..20].copy_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&opts);
        let c = csum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());

        let mut frame = Vec::with_capacity(ETH_HLEN + ip.len() + l4.len());
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// The TCP or UDP segment of a frame: header, payload, checksum left zero.
fn segment(proto: Proto, sport: u16, dport: u16, tcp_flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = match proto {
        Proto::Tcp => {
            let mut h = vec![0u8; 20];
            h[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        Proto::Udp => {
            let mut h = vec![0u8; 8];
            h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            h
        }
    };
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// IPv6 extension header numbers.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTS: u8 = 60;

/// How to build an IPv6 frame. Checksums are always computed correctly.
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub proto: Proto,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Extension headers before the TCP or UDP header: (type, length in bytes: a multiple of 8,
    /// or of 4 for the authentication header; at least 8). Their content is padding, and a
    /// fragment header says "first fragment, more to come".
    pub ext: Vec<(u8, usize)>,
}

impl Frame6 {
    pub fn new(proto: Proto, src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Frame6 {
            src,
            dst,
            proto,
            tcp_flags: if proto == Proto::Tcp { 0x02 } else { 0 },
            payload: b"xlb".to_vec(),
            ext: Vec::new(),
        }
    }

    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self::new(Proto::Tcp, src, dst)
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self::new(Proto::Udp, src, dst)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = segment(self.proto, self.src.port(), self.dst.port(), self.tcp_flags, &self.payload);
        let check_at = if self.proto == Proto::Tcp { 16 } else { 6 };
        let mut c =
            csum::l4_checksum_v6(self.src.ip().octets(), self.dst.ip().octets(), self.proto.number(), &l4);
        if self.proto == Proto::Udp && c == 0 {
            c = 0xffff;
        }
        l4[check_at..check_at + 2].copy_from_slice(&c.to_ne_bytes());

        let mut exts = Vec::new();
        for (i, &(ty, len)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.proto.number(), |e| e.0);
            let mut h = vec![0u8; len];
            h[0] = next;
            h[1] = match ty {
                IPV6_AUTH => (len / 4 - 2) as u8,
                IPV6_FRAGMENT => 0,
                _ => (len / 8 - 1) as u8,
            };
            // Options are Pad1 (zero bytes).
            if ty == IPV6_FRAGMENT {
                h[3] = 1; // offset 0, M flag
                h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            }
            exts.extend_from_slice(&h);
        }

        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
        ip[6] = self.ext.first().map_or(self.proto.number(), |e| e.0);
        ip[7] = 64;
        ip[8..24].copy_from_slice(&self.src.ip().octets());
        ip[24..40].copy_from_slice(&self.dst.ip().octets());

        let mut frame = Vec::with_capacity(ETH_HLEN + ip.len() + exts.len() + l4.len());
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        frame.extend_from_slice(&0x86ddu16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&exts);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// An IPv6 frame read back, with its L4 checksum verified by recomputation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub proto: Proto,
    pub l4_checksum_ok: bool,
}

/// Decodes an Ethernet/IPv6/[extension headers]/TCP|UDP frame; `None` for anything else, a
/// fragment or a truncated frame.
pub fn decode6(frame: &[u8]) -> Option<Decoded6> {
    if frame.len() < ETH_HLEN + 40 || frame[12..14] != [0x86, 0xdd] {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 || ip.len() < 40 + plen {
        return None;
    }
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
    let (s, d) = (addr(8), addr(24));
    let (mut next, mut off) = (ip[6], 40);
    while matches!(next, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH) {
        let h = ip.get(off..off + 2)?;
        let len = if next == IPV6_AUTH { (usize::from(h[1]) + 2) * 4 } else { (usize::from(h[1]) + 1) * 8 };
        next = h[0];
        off += len;
    }
    let proto = Proto::from_number(next)?;
    let l4 = ip.get(off..40 + plen)?;
    let need = if proto == Proto::Tcp { 20 } else { 8 };
    if l4.len() < need {
        return None;
    }
    let check_at = if proto == Proto::Tcp { 16 } else { 6 };
    let stored = u16::from_ne_bytes([l4[check_at], l4[check_at + 1]]);
    let mut copy = l4.to_vec();
    copy[check_at] = 0;
    copy[check_at + 1] = 0;
    let mut c = csum::l4_checksum_v6(s.octets(), d.octets(), proto.number(), &copy);
    if proto == Proto::Udp && c == 0 {
        c = 0xffff;
    }
    Some(Decoded6 {
        src: SocketAddrV6::new(s, u16::from_be_bytes([l4[0], l4[1]]), 0, 0),
        dst: SocketAddrV6::new(d, u16::from_be_bytes([l4[2], l4[3]]), 0, 0),
        proto,
        l4_checksum_ok: c == stored,
    })
}

/// A frame read back, with its checksums verified by recomputation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: Proto,
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
    /// UDP only: the checksum field is zero ("none").
    pub udp_checksum_zero: bool,
}

/// Decodes an Ethernet/IPv4/TCP|UDP frame; `None` for anything else or a truncated frame.
pub fn decode(frame: &[u8]) -> Option<Decoded> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || ip.len() < tot || tot < ihl {
        return None;
    }
    let proto = Proto::from_number(ip[9])?;
    let s = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let d = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let ip_checksum_ok = csum::fold(csum::sum_words(&ip[..ihl], 0)) == 0xffff;
    let l4 = &ip[ihl..tot];
    let need = if proto == Proto::Tcp { 20 } else { 8 };
    if l4.len() < need {
        return None;
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let check_at = if proto == Proto::Tcp { 16 } else { 6 };
    let stored = u16::from_ne_bytes([l4[check_at], l4[check_at + 1]]);
    let udp_checksum_zero = proto == Proto::Udp && stored == 0;
    let l4_checksum_ok = if udp_checksum_zero {
        true
    } else {
        let mut copy = l4.to_vec();
        copy[check_at] = 0;
        copy[check_at + 1] = 0;
        let mut c = csum::l4_checksum_v4(s.octets(), d.octets(), proto.number(), &copy);
        if proto == Proto::Udp && c == 0 {
            c = 0xffff;
        }
        c == stored
    };
    Some(Decoded {
        src: SocketAddrV4::new(s, sport),
        dst: SocketAddrV4::new(d, dport),
        proto,
        ip_checksum_ok,
        l4_checksum_ok,
        udp_checksum_zero,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify() {
        let a = "198.18.0.1:1234".parse().unwrap();
        let b = "198.18.0.2:80".parse().unwrap();
        for f in
            [Frame::tcp(a, b), Frame::udp(a, b), Frame { ip_options: vec![1, 1, 1, 0], ..Frame::tcp(a, b) }]
        {
            let d = decode(&f.build()).expect("decodes");
            assert!(d.ip_checksum_ok && d.l4_checksum_ok, "{d:?}");
            assert_eq!((d.src, d.dst), (a, b));
        }
        // A corrupted byte is caught by both checks.
        let mut bytes = Frame::tcp(a, b).build();
        bytes[ETH_HLEN + 19] ^= 1;
        let d = decode(&bytes).unwrap();
        assert!(!d.ip_checksum_ok && !d.l4_checksum_ok);
    }

    #[test]
    fn built_ipv6_frames_verify() {
        let a: SocketAddrV6 = "[2001:db8::1]:1234".parse().unwrap();
        let b: SocketAddrV6 = "[2001:db8:1::10]:80".parse().unwrap();
        let with_ext = Frame6 {
            ext: vec![(IPV6_HOP_BY_HOP, 8), (IPV6_DEST_OPTS, 16), (IPV6_AUTH, 12)],
            ..Frame6::tcp(a, b)
        };
        for f in [Frame6::tcp(a, b), Frame6::udp(a, b), with_ext] {
            let d = decode6(&f.build()).expect("decodes");
            assert!(d.l4_checksum_ok, "{d:?}");
            assert_eq!((d.src, d.dst), (a, b));
        }
        let mut bytes = Frame6::udp(a, b).build();
        bytes[ETH_HLEN + 39] ^= 1; // the destination address: covered by the pseudo-header
        assert!(!decode6(&bytes).unwrap().l4_checksum_ok);
    }
}
