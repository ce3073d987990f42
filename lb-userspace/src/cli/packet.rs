//! Crafting and reading Ethernet/IPv4/TCP|UDP|SCTP and Ethernet/IPv6/TCP|UDP|SCTP frames: for
//! packet tests, and for running the datapath on a made-up packet (BPF_PROG_TEST_RUN).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lb_common::{crc32c, csum};

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
            payload: default_payload(proto),
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

    /// An SCTP packet with an INIT chunk (see [`segment`]).
    pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(Proto::Sctp, src, dst)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0); // end-of-options padding
        }
        let ihl = 20 + opts.len();
        let mut l4 = segment(self.proto, self.src.port(), self.dst.port(), self.tcp_flags, &self.payload);
        if !(self.proto == Proto::Udp && self.udp_no_checksum) {
            let (s, d) = (self.src.ip().octets(), self.dst.ip().octets());
            let c = l4_checksum(self.proto, &l4, |seg| csum::l4_checksum_v4(s, d, self.proto.number(), seg));
            l4[check_field(self.proto)].copy_from_slice(&c);
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

/// Where the checksum field of a `proto` header lies (4 bytes for SCTP's CRC32c, else 2).
fn check_field(proto: Proto) -> std::ops::Range<usize> {
    match proto {
        Proto::Tcp => 16..18,
        Proto::Udp => 6..8,
        Proto::Sctp => 8..12,
    }
}

/// The length of a `proto` header (TCP without options; SCTP's common header).
fn header_len(proto: Proto) -> usize {
    match proto {
        Proto::Tcp => 20,
        Proto::Udp => 8,
        Proto::Sctp => 12,
    }
}

/// The checksum of `segment` (its field zeroed) as its field holds it: SCTP's CRC32c
/// (little-endian, as Linux's `sctp_compute_cksum` stores it; no pseudo-header), else the
/// Internet checksum that `inet` computes under the IP version's pseudo-header (UDP's computed
/// zero sent as all ones).
fn l4_checksum(proto: Proto, segment: &[u8], inet: impl FnOnce(&[u8]) -> u16) -> Vec<u8> {
    if proto == Proto::Sctp {
        return crc32c::crc32c(segment).to_le_bytes().to_vec();
    }
    let c = inet(segment);
    let c = if proto == Proto::Udp && c == 0 { 0xffff } else { c };
    c.to_ne_bytes().to_vec()
}

/// The checksum field of the `proto` segment `l4`, in hex as it stands in the packet (4 bytes
/// for SCTP's CRC32c, else 2).
pub fn checksum_field(proto: Proto, l4: &[u8]) -> String {
    let hex: String = l4[check_field(proto)].iter().map(|b| format!("{b:02x}")).collect();
    format!("0x{hex}")
}

/// Whether the checksum of `l4` is right (see [`l4_checksum`]).
fn l4_checksum_ok(proto: Proto, l4: &[u8], inet: impl FnOnce(&[u8]) -> u16) -> bool {
    let field = check_field(proto);
    let mut copy = l4.to_vec();
    copy[field.clone()].fill(0);
    l4_checksum(proto, &copy, inet) == l4[field]
}

/// An ICMP error (`ty`, `code`; next-hop MTU 1500 for "fragmentation needed") from `from` to
/// `to`, quoting the IPv4 header (20 bytes) and the first 8 bytes of the datagram of the frame
/// `quoted`, every checksum computed.
pub fn icmp_error4(from: [u8; 4], to: [u8; 4], ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&quoted[ETH_HLEN..ETH_HLEN + 28]);
    let c = csum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&from);
    ip.extend_from_slice(&to);
    let c = csum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut frame = quoted[..ETH_HLEN].to_vec();
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// What a new frame carries: an INIT chunk for SCTP (a packet that opens an association),
/// three bytes otherwise.
fn default_payload(proto: Proto) -> Vec<u8> {
    if proto == Proto::Sctp { sctp_init() } else { b"xlb".to_vec() }
}

/// An SCTP INIT chunk (RFC 9260 3.3.2): initiate tag, window, streams, initial TSN.
pub fn sctp_init() -> Vec<u8> {
    let mut c = vec![1, 0, 0, 20];
    for v in [0x0a0b_0c0du32, 65_536, 0x000a_000a, 1] {
        c.extend_from_slice(&v.to_be_bytes());
    }
    c
}

/// An SCTP DATA chunk (RFC 9260 3.3.1) carrying `data` as TSN `tsn`, padded to 4 bytes.
pub fn sctp_data(tsn: u32, data: &[u8]) -> Vec<u8> {
    let mut c = vec![0, 0x03]; // type DATA, flags B and E: an unfragmented message
    c.extend_from_slice(&((16 + data.len()) as u16).to_be_bytes());
    c.extend_from_slice(&tsn.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // stream, sequence, payload protocol
    c.extend_from_slice(data);
    while !c.len().is_multiple_of(4) {
        c.push(0);
    }
    c
}

/// The TCP, UDP or SCTP segment of a frame: header, payload, checksum left zero. An SCTP
/// packet's verification tag is 0 when it carries an INIT chunk (as RFC 9260 has it), else a
/// fixed tag.
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
        Proto::Sctp => {
            let mut h = vec![0u8; 12];
            if payload.first() != Some(&1) {
                h[4..8].copy_from_slice(&0x5ca1_ab1eu32.to_be_bytes());
            }
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
            payload: default_payload(proto),
            ext: Vec::new(),
        }
    }

    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self::new(Proto::Tcp, src, dst)
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self::new(Proto::Udp, src, dst)
    }

    /// An SCTP packet with an INIT chunk.
    pub fn sctp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self::new(Proto::Sctp, src, dst)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = segment(self.proto, self.src.port(), self.dst.port(), self.tcp_flags, &self.payload);
        let (s, d) = (self.src.ip().octets(), self.dst.ip().octets());
        let c = l4_checksum(self.proto, &l4, |seg| csum::l4_checksum_v6(s, d, self.proto.number(), seg));
        l4[check_field(self.proto)].copy_from_slice(&c);

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

/// Decodes an Ethernet/IPv6/[extension headers]/TCP|UDP|SCTP frame; `None` for anything else, a
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
    if l4.len() < header_len(proto) {
        return None;
    }
    let l4_checksum_ok =
        l4_checksum_ok(proto, l4, |seg| csum::l4_checksum_v6(s.octets(), d.octets(), proto.number(), seg));
    Some(Decoded6 {
        src: SocketAddrV6::new(s, u16::from_be_bytes([l4[0], l4[1]]), 0, 0),
        dst: SocketAddrV6::new(d, u16::from_be_bytes([l4[2], l4[3]]), 0, 0),
        proto,
        l4_checksum_ok,
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

/// Decodes an Ethernet/IPv4/TCP|UDP|SCTP frame; `None` for anything else or a truncated frame.
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
    if l4.len() < header_len(proto) {
        return None;
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let udp_checksum_zero = proto == Proto::Udp && l4[6..8] == [0, 0];
    let l4_checksum_ok = udp_checksum_zero
        || l4_checksum_ok(proto, l4, |seg| csum::l4_checksum_v4(s.octets(), d.octets(), proto.number(), seg));
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
        let data = Frame { payload: sctp_data(7, b"hello"), ..Frame::sctp(a, b) };
        for f in [
            Frame::tcp(a, b),
            Frame::udp(a, b),
            Frame { ip_options: vec![1, 1, 1, 0], ..Frame::tcp(a, b) },
            Frame::sctp(a, b),
            data,
        ] {
            let d = decode(&f.build()).expect("decodes");
            assert!(d.ip_checksum_ok && d.l4_checksum_ok, "{d:?}");
            assert_eq!((d.src, d.dst), (a, b));
        }
        // A corrupted byte is caught by both checks.
        let mut bytes = Frame::tcp(a, b).build();
        bytes[ETH_HLEN + 19] ^= 1;
        let d = decode(&bytes).unwrap();
        assert!(!d.ip_checksum_ok && !d.l4_checksum_ok);
        // SCTP's checksum covers its packet only: a changed address leaves it right, a changed
        // byte of the packet does not.
        let mut bytes = Frame::sctp(a, b).build();
        bytes[ETH_HLEN + 19] ^= 1;
        assert!(decode(&bytes).unwrap().l4_checksum_ok);
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        assert!(!decode(&bytes).unwrap().l4_checksum_ok);
    }

    #[test]
    fn built_ipv6_frames_verify() {
        let a: SocketAddrV6 = "[2001:db8::1]:1234".parse().unwrap();
        let b: SocketAddrV6 = "[2001:db8:1::10]:80".parse().unwrap();
        let with_ext = Frame6 {
            ext: vec![(IPV6_HOP_BY_HOP, 8), (IPV6_DEST_OPTS, 16), (IPV6_AUTH, 12)],
            ..Frame6::tcp(a, b)
        };
        for f in [Frame6::tcp(a, b), Frame6::udp(a, b), with_ext, Frame6::sctp(a, b)] {
            let d = decode6(&f.build()).expect("decodes");
            assert!(d.l4_checksum_ok, "{d:?}");
            assert_eq!((d.src, d.dst), (a, b));
        }
        let mut bytes = Frame6::udp(a, b).build();
        bytes[ETH_HLEN + 39] ^= 1; // the destination address: covered by the pseudo-header
        assert!(!decode6(&bytes).unwrap().l4_checksum_ok);
    }
}
