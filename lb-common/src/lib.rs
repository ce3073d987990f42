//! Types shared by the xlb kernel program (lb-ebpf) and the agent/CLI (lb-userspace).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so that the kernel program,
//! the agent and `bpftool map dump` all agree on the bytes. Addresses are byte arrays in packet
//! order and ports are in host order, so that `bpftool map dump` prints them readably
//! (`"addr": [198,18,0,10]`, `"port": 80`); the kernel program converts ports with one swap.
//!
//! Map names carry a layout version suffix (`_v1`). Whenever a key or value layout changes, the
//! suffix is bumped, so an upgraded agent never misreads maps pinned by an older one.
#![no_std]

pub mod crc32c;
pub mod csum;

/// Default bpffs directory under which the agent pins its maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Name of the XDP program in the object file.
pub const PROG_XDP: &str = "xlb_xdp";
/// Name of the TC egress program: translates replies of flows whose frontend is an address of
/// this node, after the kernel routed them.
pub const PROG_TC_EGRESS: &str = "xlb_tc_egress";
/// The tc datapath: the balancing core at TC ingress (`--datapath tc`), instead of [`PROG_XDP`].
pub const PROG_TC_INGRESS: &str = "xlb_tc_ingress";

/// Service frontends and their backend slots (hash, [`Svc4Key`] -> [`Svc4Value`]), not
/// preallocated ([`SERVICES_MAP_FLAGS`]): its capacity costs kernel memory only as it fills.
pub const MAP_SERVICES: &str = "xlb_svc4_v2";
/// [`MAP_SERVICES`] as agents before 2026-12-07 pinned it: the same entries in a preallocated
/// map. An agent that finds it copies its entries over before the first sync, so that every
/// service and backend keeps its id through the upgrade (see `agent::run`).
pub const MAP_SERVICES_V1: &str = "xlb_svc4_v1";
/// Backends by id (array, index -> [`Backend4`]); id 0 is never used.
pub const MAP_BACKENDS: &str = "xlb_be4_v1";
/// Connection tracking (LRU hash, [`Ct4Key`] -> [`Ct4Value`]).
pub const MAP_CT: &str = "xlb_ct4_v2";
/// Per-CPU counters by verdict and reason (per-CPU array, [`Stat`] index -> [`StatValue`]).
pub const MAP_STATS: &str = "xlb_stats_v10";
/// Names of services for display (hash, service id -> [`SvcInfo`]); not read by the datapath.
pub const MAP_SVC_INFO: &str = "xlb_svcinfo_v2";
/// New flows sent to each backend (array, backend id -> u64); the agent zeroes an id's count
/// when it gives the id to a new backend.
pub const MAP_BACKEND_FLOWS: &str = "xlb_beflows_v1";
/// The decision of one run of the trace program (array of one [`TraceRecord`]). Never pinned:
/// each `xlb trace` loads its own.
pub const MAP_TRACE: &str = "xlb_trace_v1";

/// The token bucket limiting ICMP errors sent for Services without endpoints (per-CPU array of
/// one [`RejectBucket`]). Not pinned: a new program starts with a full bucket.
pub const MAP_REJECT_BUCKET: &str = "xlb_rejectbkt_v1";
/// The ports of IPv4 datagrams sent in fragments (LRU hash, [`Frag4Key`] -> [`FragPorts`]),
/// remembered from the first fragment of a datagram of a frontend's or backend's flow, so that
/// its later fragments (which carry no ports) are translated as it was. Not pinned: an entry
/// lives for the fragments of one datagram.
pub const MAP_FRAG4: &str = "xlb_frag4_v1";
/// As [`MAP_FRAG4`] for IPv6 ([`Frag6Key`] -> [`FragPorts`]).
pub const MAP_FRAG6: &str = "xlb_frag6_v1";
/// Entries of [`MAP_FRAG4`] and [`MAP_FRAG6`]: datagrams in fragments at once through the node.
pub const FRAG_ENTRIES: u32 = 8192;

/// Key of [`MAP_FRAG4`]: what every fragment of one datagram carries, as it reaches the
/// program. 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    /// Source and destination addresses, bytes as in the packet.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IP identification, as in the packet.
    pub id: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Always zero.
    pub _pad: u8,
}

/// Key of [`MAP_FRAG6`]. 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The fragment header's identification, as in the packet.
    pub id: u32,
    /// The protocol after the fragment header.
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}

/// Value of [`MAP_FRAG4`] and [`MAP_FRAG6`]: the first fragment's ports, as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// ICMP port-unreachable answers each CPU may send per second (like the kernel's own ICMP rate
/// limit, `net.ipv4.icmp_msgs_per_sec`); TCP resets are not limited, as the kernel's are not.
pub const REJECT_ICMP_PER_SEC: u64 = 1000;
/// Answers a CPU may send at once before the rate applies.
pub const REJECT_ICMP_BURST: u64 = 100;

/// Value of [`MAP_REJECT_BUCKET`]. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RejectBucket {
    /// Tokens, in nanoseconds' worth of the rate: one answer costs 1e9 / REJECT_ICMP_PER_SEC.
    pub credit_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds at the last refill.
    pub last_ns: u64,
}

/// `loadBalancerSourceRanges` (LPM trie, [`SrcRange4`] with prefix length 32 + the range's ->
/// 1): the client prefixes allowed on a service port's LoadBalancer frontends.
pub const MAP_SOURCE_RANGES: &str = "xlb_srcrange4_v1";

/// Socket-level translation by the cgroup programs (LRU hash, [`SockNat4Key`] ->
/// [`SockNat4Value`]): for each socket whose connect or sendmsg to a frontend was given a
/// backend, the frontend to show for that backend, and for unconnected UDP the backend that the
/// socket's next datagrams to the frontend keep.
pub const MAP_SOCK_NAT: &str = "xlb_socknat4_v1";

/// sessionAffinity ClientIP (LRU hash, [`Affinity4Key`] -> [`Affinity4Value`]): the backend a
/// client's new flows to a service port keep while they come within its timeout.
pub const MAP_AFFINITY: &str = "xlb_affinity4_v1";

/// Key of [`MAP_AFFINITY`]. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Affinity4Key {
    /// Service port, host order.
    pub svc_id: u32,
    /// Client address, bytes as in the packet.
    pub client: [u8; 4],
}

/// sessionAffinity ClientIP of IPv6 service ports (LRU hash, [`Affinity6Key`] ->
/// [`Affinity4Value`], the backend id naming [`MAP_BACKENDS6`]).
pub const MAP_AFFINITY6: &str = "xlb_affinity6_v1";

/// Key of [`MAP_AFFINITY6`]. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Affinity6Key {
    /// Service port, host order.
    pub svc_id: u32,
    /// Client IPv6 address, bytes as in the packet.
    pub client: [u8; 16],
}

/// Value of [`MAP_AFFINITY`]. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Value {
    /// The backend chosen (index into [`MAP_BACKENDS`]). Host order.
    pub backend_id: u32,
    /// The slot it was chosen from: it still holds the backend if the service still has it.
    pub slot: u16,
    /// Always zero.
    pub _pad: u16,
    /// Seconds of CLOCK_MONOTONIC when a new flow last used it.
    pub last_used: u32,
    /// Always zero.
    pub _pad2: u32,
}

/// sessionAffinity ClientIP at the socket (LRU hash, [`SockAffinityKey`] -> [`Affinity4Value`],
/// the backend id naming [`MAP_BACKENDS`] or [`MAP_BACKENDS6`] by the key's family): the backend
/// a client's connections to a service port keep while they come within its timeout, when the
/// cgroup programs choose it. The client is the socket's network namespace (a pod, or the
/// node's own processes), as Cilium's socket-level balancing has it: at `connect()` the source
/// address is not chosen yet, and a pod's namespace is its address.
pub const MAP_SOCK_AFFINITY: &str = "xlb_sockaff_v1";

/// Key of [`MAP_SOCK_AFFINITY`]. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAffinityKey {
    /// The socket's network namespace cookie (bpf_get_netns_cookie).
    pub netns: u64,
    /// Service port, host order (of the family's service map).
    pub svc_id: u32,
    /// 4 or 6.
    pub family: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}

/// Maglev lookup tables (hash of maps, [`maglev_key`] -> array of u64, each holding four u16
/// slots: entry `i` of the table is bits `16 * (i % 4)..` of element `i / 4`): for each service
/// port's list of selectable backends, the slot (1..=count) each flow hash leads to. Filled
/// only when the agent runs with `--lb-algorithm maglev`.
pub const MAP_MAGLEV: &str = "xlb_maglev4_v1";

/// Table sizes allowed for Maglev: primes, so that every backend's permutation covers the table.
pub const MAGLEV_SIZES: [u32; 10] = [251, 509, 1021, 2039, 4093, 8191, 16_381, 32_749, 65_521, 131_071];
/// The default Maglev table size (64 KiB of kernel memory per table at two bytes a slot).
pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;
/// Elements (u64, four slots each) of a Maglev table of `size` entries.
pub const fn maglev_elements(size: u32) -> u32 {
    size.div_ceil(4)
}

/// `map_flags` of the Maglev tables: BPF_F_MMAPABLE | BPF_F_INNER_MAP.
pub const MAGLEV_TABLE_FLAGS: u32 = 0x400 | 0x1000;

/// Capacity of [`MAP_MAGLEV`]: two lists (all endpoints, this node's) per service port.
pub const MAX_MAGLEV_TABLES: u32 = 131_072;

/// Key of a service port's Maglev table in [`MAP_MAGLEV`]: `local` for the list of this node's
/// endpoints that frontends with a traffic policy `Local` use.
pub const fn maglev_key(svc_id: u32, local: bool) -> u32 {
    (svc_id << 1) | local as u32
}

/// The hash that places a flow in a Maglev table: the client's address, port and protocol, so
/// that every node sends the same flow to the same backend. Murmur3's finalizer over a mix.
pub const fn maglev_flow_hash(saddr: [u8; 4], sport: u16, proto: u8) -> u32 {
    let mut h = u32::from_ne_bytes(saddr).wrapping_mul(0x9e37_79b1)
        ^ ((sport as u32) << 8 | proto as u32).wrapping_mul(0x85eb_ca6b);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// [`maglev_flow_hash`] of an IPv6 client: its address folded to 32 bits (the four words
/// XORed).
pub const fn maglev_flow_hash6(saddr: [u8; 16], sport: u16, proto: u8) -> u32 {
    maglev_flow_hash(fold6(saddr), sport, proto)
}

/// An IPv6 address folded to 32 bits (its four words XORed), for the hashes made for IPv4.
#[inline(always)]
pub const fn fold6(a: [u8; 16]) -> [u8; 4] {
    let mut folded = [0u8; 4];
    let mut i = 0;
    while i < 16 {
        folded[i % 4] ^= a[i];
        i += 1;
    }
    folded
}

/// [`filter_bit`] of an IPv6 address: the IPv6 frontends and backends share the filter.
#[inline(always)]
pub const fn filter_bit6(addr: [u8; 16], port: u16, proto: u8) -> u32 {
    filter_bit(fold6(addr), port, proto)
}

/// Settings of the datapath (array of one [`DatapathConfig`]), written by the agent at start.
pub const MAP_CONFIG: &str = "xlb_config_v1";

/// Value of [`MAP_CONFIG`]. A zero field means its default. 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// Seconds a TCP flow whose client has not yet acknowledged the handshake lives idle.
    pub tcp_syn_s: u32,
    /// Seconds an established TCP flow lives idle.
    pub tcp_established_s: u32,
    /// Seconds a TCP flow lives idle once a FIN or RST was seen.
    pub tcp_close_s: u32,
    /// Seconds a UDP flow lives idle.
    pub udp_s: u32,
    /// Size of the Maglev lookup tables (a prime); 0: new flows pick a backend at random.
    pub maglev_size: u32,
    /// Always zero.
    pub _pad: u32,
}

/// Default idle lifetimes of tracked flows, in seconds (those of Cilium's conntrack).
pub const CT_TCP_SYN_S: u32 = 60;
pub const CT_TCP_ESTABLISHED_S: u32 = 21_600;
pub const CT_TCP_CLOSE_S: u32 = 10;
pub const CT_UDP_S: u32 = 60;
/// SCTP associations: netfilter's established timeout (an idle association sends a heartbeat
/// every 30 s, RFC 9260's default, so a live one never reaches it).
pub const CT_SCTP_S: u32 = 210;

/// The endpoint filter: a bitmap (array of u64 words) with a bit set for every frontend and every
/// backend (address, port, protocol), at [`filter_bit`]. A packet whose destination and source
/// both miss it can be neither a Service's nor a tracked flow's, and passes after two array reads
/// instead of three hash lookups. Bits of removed entries are cleared only after the maps no
/// longer name them, so the filter is always a superset (collisions only cost the lookups).
pub const MAP_FILTER: &str = "xlb_filter4_v1";

/// log2 of the filter's bits: 2^23 bits, 1 MiB; with 600,000 entries (100,000 Services of 5
/// endpoints) about 7% of the bits are set.
pub const FILTER_BITS_LOG2: u32 = 23;
/// Words (u64) of [`MAP_FILTER`].
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);
/// `map_flags` of [`MAP_FILTER`]: BPF_F_MMAPABLE (the agent writes words through a shared
/// mapping, not a syscall each).
pub const FILTER_MAP_FLAGS: u32 = 0x400;

/// The filter bit of (address as in the packet, port in host order, protocol): a multiplicative
/// (Fibonacci) hash of the three, its top bits.
#[inline(always)]
pub const fn filter_bit(addr: [u8; 4], port: u16, proto: u8) -> u32 {
    let k = ((u32::from_ne_bytes(addr) as u64) << 32) | ((port as u64) << 8) | proto as u64;
    (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILTER_BITS_LOG2)) as u32
}

/// Mixed into the protocol of a backend's second filter bit ([`filter_bit_backend`]); no
/// protocol xlb serves has this bit.
pub const FILTER_BACKEND_ROLE: u8 = 0x80;

/// A backend's second bit in the filter: besides its [`filter_bit`] (which frontends and backends
/// share), every backend sets this one, which no frontend sets. TC egress, whose source rewrites
/// are all of packets that a backend sent, looks the conntrack up only for a source that has it:
/// a reply that XDP or TC ingress already translated (its source is the frontend now) is spared
/// its lookups.
#[inline(always)]
pub const fn filter_bit_backend(addr: [u8; 4], port: u16, proto: u8) -> u32 {
    filter_bit(addr, port, proto | FILTER_BACKEND_ROLE)
}

/// [`filter_bit_backend`] of an IPv6 backend.
#[inline(always)]
pub const fn filter_bit_backend6(addr: [u8; 16], port: u16, proto: u8) -> u32 {
    filter_bit(fold6(addr), port, proto | FILTER_BACKEND_ROLE)
}

/// Whether `port` (host order) is one that SNAT gives a flow ([`SNAT_PORT_MIN`] to
/// [`SNAT_PORT_MAX`]): only a packet from such a port can be a SNATed flow's on its way to its
/// backend.
#[inline(always)]
pub const fn is_snat_port(port: u16) -> bool {
    port >= SNAT_PORT_MIN
}

/// IPv6 frontends (hash, [`Svc6Key`] -> [`Svc4Value`]): as [`MAP_SERVICES`], for IPv6
/// addresses. Backend slots name ids of [`MAP_BACKENDS6`].
pub const MAP_SERVICES6: &str = "xlb_svc6_v1";
/// IPv6 backends by id (array, index -> [`Backend6`]); id 0 is never used.
pub const MAP_BACKENDS6: &str = "xlb_be6_v1";
/// Connection tracking of IPv6 flows (LRU hash, [`Ct6Key`] -> [`Ct6Value`]).
pub const MAP_CT6: &str = "xlb_ct6_v1";

/// Socket-level translation for IPv6 sockets (LRU hash, [`SockNat6Key`] -> [`SockNat6Value`]):
/// as [`MAP_SOCK_NAT`].
pub const MAP_SOCK_NAT6: &str = "xlb_socknat6_v1";

/// `loadBalancerSourceRanges` of IPv6 service ports (LPM trie, [`SrcRange6`] with prefix length
/// 32 + the range's -> 1): as [`MAP_SOURCE_RANGES`].
pub const MAP_SOURCE_RANGES6: &str = "xlb_srcrange6_v1";

/// IPv6 backend id -> new flows sent to it (array of u64): as [`MAP_BACKEND_FLOWS`].
pub const MAP_BACKEND_FLOWS6: &str = "xlb_beflows6_v1";

/// The cluster's Service IP ranges (array of one [`ServiceCidrs`]), written by the agent at
/// start (`--service-cidr`): a new flow to an address of these ranges that no frontend holds is
/// answered at once (TCP reset, ICMP port unreachable), instead of being routed out of the node.
pub const MAP_SERVICE_CIDRS: &str = "xlb_svccidr_v1";

/// Ranges of each family [`ServiceCidrs`] holds (kube-apiserver takes two per family at most).
pub const MAX_SERVICE_CIDRS: usize = 4;

/// Value of [`MAP_SERVICE_CIDRS`]. A range whose mask is zero is an empty slot (a /0 is never a
/// Service range). 160 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceCidrs {
    /// IPv4 (network, mask), each the address's four bytes read as a `u32` in memory order (as
    /// the packet holds them).
    pub v4: [[u32; 2]; MAX_SERVICE_CIDRS],
    /// IPv6 (network high, network low, mask high, mask low), each eight bytes of the address
    /// read as a `u64` in memory order.
    pub v6: [[u64; 4]; MAX_SERVICE_CIDRS],
}

impl ServiceCidrs {
    /// Whether the IPv4 address `addr` (bytes in memory order) is in one of the ranges.
    #[inline(always)]
    pub fn contains4(&self, addr: u32) -> bool {
        let mut i = 0;
        while i < MAX_SERVICE_CIDRS {
            let [net, mask] = self.v4[i];
            if mask != 0 && addr & mask == net {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether the IPv6 address (bytes as in the packet) is in one of the ranges.
    #[inline(always)]
    pub fn contains6(&self, addr: &[u8; 16]) -> bool {
        let [hi, lo] = ipv6_halves(addr);
        let mut i = 0;
        while i < MAX_SERVICE_CIDRS {
            let [nh, nl, mh, ml] = self.v6[i];
            if (mh | ml) != 0 && hi & mh == nh && lo & ml == nl {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// The two halves of an IPv6 address, each eight bytes read as a `u64` in memory order, as
/// [`ServiceCidrs::v6`] holds networks and masks.
#[inline(always)]
pub fn ipv6_halves(a: &[u8; 16]) -> [u64; 2] {
    let half = |at: usize| {
        u64::from_ne_bytes([
            a[at],
            a[at + 1],
            a[at + 2],
            a[at + 3],
            a[at + 4],
            a[at + 5],
            a[at + 6],
            a[at + 7],
        ])
    };
    [half(0), half(8)]
}

/// Every map the agent pins, in the order the CLI reports them.
pub const ALL_MAPS: [&str; 21] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_CT,
    MAP_STATS,
    MAP_SVC_INFO,
    MAP_BACKEND_FLOWS,
    MAP_SOURCE_RANGES,
    MAP_SOCK_NAT,
    MAP_CONFIG,
    MAP_AFFINITY,
    MAP_MAGLEV,
    MAP_FILTER,
    MAP_SERVICES6,
    MAP_BACKENDS6,
    MAP_CT6,
    MAP_SOCK_NAT6,
    MAP_SOURCE_RANGES6,
    MAP_AFFINITY6,
    MAP_BACKEND_FLOWS6,
    MAP_SERVICE_CIDRS,
    MAP_SOCK_AFFINITY,
];

/// The cgroup programs of socket-level load balancing: connections and datagrams of the node's
/// own processes and of its pods to a frontend are given a backend before any packet exists.
pub const PROG_SOCK_CONNECT4: &str = "xlb_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "xlb_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "xlb_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "xlb_sock_getpeername4";
/// The same for IPv6 sockets (IPv6 frontends).
pub const PROG_SOCK_CONNECT6: &str = "xlb_sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "xlb_sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "xlb_sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "xlb_sock_getpeername6";

/// Name of a program that passes every packet: on the receiving end of a veth, it makes the
/// kernel deliver the frames the peer's XDP program sends back (XDP_TX) at once; it is also the
/// floor the benchmarks subtract.
pub const PROG_XDP_PASS: &str = "xlb_xdp_pass";
/// A TC program that passes every packet: the floor of the tc datapath's benchmark.
pub const PROG_TC_PASS: &str = "xlb_tc_pass";

/// Name of the trace program: the datapath's decision, run by `xlb trace` on a crafted packet
/// with BPF_PROG_TEST_RUN. It reads the live maps and writes nothing but [`MAP_TRACE`].
pub const PROG_XDP_TRACE: &str = "xlb_xdp_trace";

/// Default capacities. The agent can override them at load time (`--max-*` flags). The
/// defaults serve 100,000 Services of 5 endpoints: [`MAP_SERVICES`] (one entry per frontend and
/// one per backend slot, 600,000 then) is not preallocated, and an array of backends costs 8
/// bytes an entry.
pub const DEFAULT_MAX_SERVICE_ENTRIES: u32 = 1_048_576;
pub const DEFAULT_MAX_BACKENDS: u32 = 524_288;
pub const DEFAULT_MAX_CT_ENTRIES: u32 = 262_144;
/// Service ports (names for display); not preallocated, so a large capacity costs nothing
/// until used.
pub const DEFAULT_MAX_SVC_INFO: u32 = 262_144;
pub const DEFAULT_MAX_SOCK_NAT: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Capacity of each IPv6 map ([`MAP_SERVICES6`], [`MAP_BACKENDS6`], [`MAP_CT6`]).
pub const DEFAULT_MAX_IPV6_ENTRIES: u32 = 65_536;
/// Capacity of [`MAP_SOURCE_RANGES`] (allocated per entry: LPM tries are never preallocated).
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// `map_flags` of [`MAP_SVC_INFO`]: BPF_F_NO_PREALLOC, so that display names only take kernel
/// memory for the service ports that exist.
pub const SVC_INFO_MAP_FLAGS: usize = 1;
/// `map_flags` of [`MAP_SERVICES`]: BPF_F_NO_PREALLOC (only the agent writes it, never a
/// program, so the per-update allocation is no concern).
pub const SERVICES_MAP_FLAGS: usize = 1;

/// Most backends a single service frontend may have (slots 1..=this).
pub const MAX_BACKENDS_PER_SERVICE: u16 = 4096;

/// TCP header flags, as in [`Ct4Value::tcp_flags`].
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// [`Svc4Key::scope`]: the frontend as seen by any client.
pub const SCOPE_EXTERNAL: u8 = 0;

/// Key of [`MAP_SERVICES`]. 12 bytes.
///
/// Slot 0 is the service entry itself; slots `1..=count` each name one backend that new flows
/// may choose; slots after `count` name the service's other (terminating) backends, which only
/// existing flows use. The agent writes
/// backends, then slots, then the slot-0 entry, then removes stale slots, so a reader never sees a
/// count that points past written slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc4Key {
    /// Frontend IPv4 address, bytes as in the packet.
    pub addr: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    /// IP protocol number ([`IPPROTO_TCP`], [`IPPROTO_UDP`]).
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`]; other scopes are reserved for traffic policies.
    pub scope: u8,
    /// 0 for the service entry, 1..=count for backend slots. Host order.
    pub slot: u16,
    /// Always zero.
    pub _pad: u16,
}

/// Key of [`MAP_SERVICES6`]. 24 bytes. As [`Svc4Key`], with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc6Key {
    /// Frontend IPv6 address, bytes as in the packet.
    pub addr: [u8; 16],
    /// Frontend port, host order.
    pub port: u16,
    /// IP protocol number ([`IPPROTO_TCP`], [`IPPROTO_UDP`]).
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`].
    pub scope: u8,
    /// 0 for the service entry, 1..=count for backend slots. Host order.
    pub slot: u16,
    /// Always zero.
    pub _pad: u16,
}

/// Value of [`MAP_BACKENDS6`]. 20 bytes. As [`Backend4`], with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend6 {
    /// Endpoint IPv6 address, bytes as in the packet.
    pub addr: [u8; 16],
    /// Endpoint port (the resolved targetPort), host order.
    pub port: u16,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
}

/// Key of [`MAP_CT6`]. 40 bytes. As [`Ct4Key`], with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct6Key {
    /// Source address, bytes as in the packet.
    pub saddr: [u8; 16],
    /// Destination address, bytes as in the packet.
    pub daddr: [u8; 16],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// Always zero.
    pub _pad: u16,
}

/// Value of [`MAP_CT6`]. 40 bytes. As [`Ct4Value`], with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Value {
    /// Forward: the backend address written as destination. Reply: the frontend address written
    /// as source. Bytes as in the packet.
    pub nat_addr: [u8; 16],
    /// Forward: the backend port written as destination. Reply: the frontend port written as
    /// source. Host order.
    pub nat_port: u16,
    /// Union of the TCP flags seen on this direction (0 for UDP).
    pub tcp_flags: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Backend chosen for the flow (index into [`MAP_BACKENDS6`]). Host order.
    pub backend_id: u32,
    /// Service port the flow belongs to. Host order.
    pub svc_id: u32,
    /// Seconds of CLOCK_MONOTONIC when the entry was created.
    pub created: u32,
    /// Seconds of CLOCK_MONOTONIC when a packet last used the entry.
    pub last_seen: u32,
    /// Reserved for SNAT (0).
    pub snat_port: u16,
    /// Always zero.
    pub _pad: u16,
}

/// Key of [`MAP_SOCK_NAT6`]. 32 bytes. As [`SockNat4Key`], with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockNat6Key {
    pub cookie: u64,
    /// Bytes as in the packet.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub proto: u8,
    /// [`SOCK_NAT_REV`] or [`SOCK_NAT_FWD`].
    pub kind: u8,
    /// Always zero.
    pub _pad: u32,
}

/// Value of [`MAP_SOCK_NAT6`]. 32 bytes. As [`SockNat4Value`], with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockNat6Value {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    /// The backend (index into [`MAP_BACKENDS6`]).
    pub backend_id: u32,
    pub svc_id: u32,
    pub _pad2: u32,
}

/// Value of [`MAP_SERVICES`]. 16 bytes. All fields host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Svc4Value {
    /// Slot > 0: the backend id in this slot. Slot 0: zero.
    pub backend_id: u32,
    /// Id of the service port this frontend belongs to (shared by all its frontends).
    pub svc_id: u32,
    /// Slot 0: number of backend slots (1..=count) that new flows choose from. 0 = no usable
    /// endpoint.
    pub count: u16,
    /// Slot 0: `SVC_F_*` bits: what the frontend address is to the Service (for display; the
    /// datapath treats every kind alike).
    pub flags: u16,
    /// Slot 0: sessionAffinity ClientIP timeout in seconds ([`MAP_AFFINITY`]); 0: none.
    pub affinity_timeout: u32,
}

/// [`Svc4Value::flags`]: the frontend is a clusterIP.
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
/// [`Svc4Value::flags`]: the frontend is an externalIP.
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 1;
/// [`Svc4Value::flags`]: the frontend is a LoadBalancer ingress IP.
pub const SVC_F_LB_INGRESS: u16 = 1 << 2;
/// [`Svc4Value::flags`]: the frontend is a node address on the nodePort.
pub const SVC_F_NODE_PORT: u16 = 1 << 3;
/// [`Svc4Value::flags`]: the frontend address is one of this node's own addresses (a node
/// port, or an externalIP or ingress IP the node carries). Replies of its flows are translated
/// at TC egress, after the kernel routed them: a reply given a local source address at XDP
/// ingress would be dropped by the kernel as a martian. Read by the datapath.
pub const SVC_F_LOCAL: u16 = 1 << 4;
/// [`Svc4Value::flags`]: a traffic policy `Local` applies and this node has no endpoint for
/// the frontend, though other nodes have: new flows are dropped, as kube-proxy drops them, not
/// answered (a load balancer's health check must see this node as down). Read by the datapath.
pub const SVC_F_NO_LOCAL_ENDPOINT: u16 = 1 << 5;
/// [`Svc4Value::flags`]: new flows are allowed only from the clients in the service port's
/// `loadBalancerSourceRanges` ([`MAP_SOURCE_RANGES`]); others are dropped. Read by the datapath.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 6;
/// [`Svc4Value::flags`]: a pod's hostPort on this node's address (display only).
pub const SVC_F_HOST_PORT: u16 = 1 << 7;
/// [`Svc4Value::flags`]: the frontend's slots are this node's endpoints only (a traffic policy
/// `Local` applies): its Maglev table is the service port's local one.
pub const SVC_F_LOCAL_LIST: u16 = 1 << 8;

/// The data of a [`MAP_SOURCE_RANGES`] key: the service port, then the client prefix. The key's
/// prefix length is 32 (the whole service id) plus the range's own. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange4 {
    /// Service port id, host order (matched whole).
    pub svc_id: u32,
    /// Client address prefix, bytes as in the packet.
    pub addr: [u8; 4],
}

/// The data of a [`MAP_SOURCE_RANGES6`] key: as [`SrcRange4`], with an IPv6 prefix. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange6 {
    /// Service port id, host order (matched whole).
    pub svc_id: u32,
    /// Client address prefix, bytes as in the packet.
    pub addr: [u8; 16],
}

/// Value of [`MAP_BACKENDS`]. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    /// Endpoint IPv4 address, bytes as in the packet.
    pub addr: [u8; 4],
    /// Endpoint port (the resolved targetPort), host order.
    pub port: u16,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
}

/// [`Backend4::flags`]: the endpoint runs on this node. New flows from a node-address frontend
/// to an endpoint elsewhere are SNATed to the node address, so that the reply comes back here.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// The backend array slot is free; flows pinned to it are stale.
pub const BACKEND_STATE_FREE: u8 = 0;
/// The backend is in use.
pub const BACKEND_STATE_ACTIVE: u8 = 1;
/// The endpoint is terminating: existing flows keep it, new ones avoid it.
pub const BACKEND_STATE_TERMINATING: u8 = 2;

/// [`Ct4Key::dir`]: packet from the client towards the frontend.
pub const CT_DIR_FORWARD: u8 = 0;
/// [`Ct4Key::dir`]: packet from the backend back towards the client.
pub const CT_DIR_REPLY: u8 = 1;

/// [`Ct4Value::flags`] of a reply entry: the reply is translated at TC egress, not at XDP
/// (the frontend is an address of this node, see [`SVC_F_LOCAL`]).
pub const CT_F_EGRESS_REVNAT: u8 = 1 << 0;
/// [`Ct4Value::flags`] of a reply entry keyed by (backend -> node address:SNAT port): the
/// destination is written back to the client (`nat_addr`, `nat_port`) at XDP.
pub const CT_F_DNAT_BACK: u8 = 1 << 1;
/// [`Ct4Value::flags`] of a forward entry: the flow is SNATed (its [`CT_DIR_SNAT`] entry holds
/// the SNAT address and port).
pub const CT_F_SNAT: u8 = 1 << 2;

/// [`Ct4Key::dir`]: a SNATed flow's packet as it leaves towards its backend on another node,
/// keyed (client:SNAT port -> backend) since XDP already gave it the SNAT port; TC egress writes
/// `nat_addr` (the node address) as its source.
pub const CT_DIR_SNAT: u8 = 2;

/// [`Ct4Key::dir`]: a SNATed flow's reply as it leaves towards its client (backend -> client,
/// once XDP wrote the client back as destination); TC egress writes `nat_addr`:`nat_port` (the
/// frontend) as its source. Apart from [`CT_DIR_REPLY`], because the same client port may have a
/// flow to the same backend through another frontend, whose reply entry has that same tuple.
pub const CT_DIR_SNAT_REPLY: u8 = 3;

/// Source ports given to SNATed flows, chosen per flow so that (node address, port, backend)
/// never collide. The agent reserves them from the node's own sockets
/// (`net.ipv4.ip_local_reserved_ports`); they lie above the default ephemeral range.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Key of [`MAP_CT`]: the tuple as it stands in the packet when it reaches the program. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    /// Source address, bytes as in the packet.
    pub saddr: [u8; 4],
    /// Destination address, bytes as in the packet.
    pub daddr: [u8; 4],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`CT_DIR_FORWARD`], [`CT_DIR_REPLY`], [`CT_DIR_SNAT`] or [`CT_DIR_SNAT_REPLY`].
    pub dir: u8,
    /// Always zero.
    pub _pad: u16,
}

/// Value of [`MAP_CT`]. 28 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Value {
    /// Forward: the backend address written as destination. Reply: the frontend address written
    /// as source. Bytes as in the packet.
    pub nat_addr: [u8; 4],
    /// Forward: the backend port written as destination. Reply: the frontend port written as
    /// source. Host order.
    pub nat_port: u16,
    /// Union of the TCP flags seen on this direction (0 for UDP).
    pub tcp_flags: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Backend chosen for the flow (index into [`MAP_BACKENDS`]). Host order.
    pub backend_id: u32,
    /// Service port the flow belongs to. Host order.
    pub svc_id: u32,
    /// Seconds of CLOCK_MONOTONIC (boot time excluded) when the entry was created.
    pub created: u32,
    /// Seconds of CLOCK_MONOTONIC when a packet last used the entry.
    pub last_seen: u32,
    /// Forward entry of a SNATed flow ([`CT_F_SNAT`]): the source port its packets get at XDP
    /// (the address follows at TC egress). Host order; 0 otherwise.
    pub snat_port: u16,
    /// Always zero.
    pub _pad: u16,
}

/// [`SockNat4Key::kind`]: keyed by a backend; the value is the frontend the socket called.
pub const SOCK_NAT_REV: u8 = 0;
/// [`SockNat4Key::kind`]: keyed by a frontend; the value is the backend an unconnected UDP
/// socket's datagrams to it keep going to.
pub const SOCK_NAT_FWD: u8 = 1;

/// Key of [`MAP_SOCK_NAT`]. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockNat4Key {
    /// The socket's cookie (`bpf_get_socket_cookie`), unique while the machine runs.
    pub cookie: u64,
    /// [`SOCK_NAT_REV`]: backend address; [`SOCK_NAT_FWD`]: frontend address. Bytes as in the
    /// packet.
    pub addr: [u8; 4],
    /// The port of `addr`, host order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`SOCK_NAT_REV`] or [`SOCK_NAT_FWD`].
    pub kind: u8,
}

/// Value of [`MAP_SOCK_NAT`]. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockNat4Value {
    /// [`SOCK_NAT_REV`]: the frontend address; [`SOCK_NAT_FWD`]: the backend address.
    pub addr: [u8; 4],
    /// The port of `addr`, host order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
    /// The backend (index into [`MAP_BACKENDS`]). Host order.
    pub backend_id: u32,
    /// The service port. Host order.
    pub svc_id: u32,
}

/// Value of [`MAP_STATS`] (one per CPU per counter). 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StatValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Bytes reserved for a namespace or name in [`SvcInfo`] (Kubernetes allows at most 63).
pub const SVC_INFO_NAME_LEN: usize = 64;
/// Bytes reserved for a port name or a named targetPort in [`SvcInfo`] (Kubernetes allows at
/// most 15).
pub const SVC_INFO_PORT_NAME_LEN: usize = 16;
/// Bytes reserved for an ExternalName's DNS name in [`SvcInfo`] (DNS allows at most 253).
pub const SVC_INFO_DNS_NAME_LEN: usize = 256;

/// Value of [`MAP_SVC_INFO`]: what the CLI needs to show a service port the way `kubectl
/// describe service` does. 432 bytes. Strings are NUL-padded UTF-8; numbers are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcInfo {
    pub namespace: [u8; SVC_INFO_NAME_LEN],
    pub name: [u8; SVC_INFO_NAME_LEN],
    pub port_name: [u8; SVC_INFO_PORT_NAME_LEN],
    /// The port's `targetPort` as the Service says it: a number or a container port name.
    pub target_port: [u8; SVC_INFO_PORT_NAME_LEN],
    /// ExternalName Services: the DNS name. Empty for every other type.
    pub external_name: [u8; SVC_INFO_DNS_NAME_LEN],
    /// The Service's `port`.
    pub port: u16,
    /// The port's `nodePort`, 0 when none.
    pub node_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `SVC_TYPE_*`.
    pub svc_type: u8,
    /// `externalTrafficPolicy`: `POLICY_*`.
    pub external_policy: u8,
    /// `internalTrafficPolicy`: `POLICY_*`.
    pub internal_policy: u8,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 for `None`.
    pub affinity_timeout: u32,
    /// Number of backends written for the service port (all states).
    pub backends: u32,
}

impl Default for SvcInfo {
    fn default() -> Self {
        Self {
            namespace: [0; SVC_INFO_NAME_LEN],
            name: [0; SVC_INFO_NAME_LEN],
            port_name: [0; SVC_INFO_PORT_NAME_LEN],
            target_port: [0; SVC_INFO_PORT_NAME_LEN],
            external_name: [0; SVC_INFO_DNS_NAME_LEN],
            port: 0,
            node_port: 0,
            proto: 0,
            svc_type: 0,
            external_policy: 0,
            internal_policy: 0,
            affinity_timeout: 0,
            backends: 0,
        }
    }
}

/// Traffic policy `Cluster` (the default).
pub const POLICY_CLUSTER: u8 = 0;
/// Traffic policy `Local`.
pub const POLICY_LOCAL: u8 = 1;

pub const SVC_TYPE_CLUSTER_IP: u8 = 1;
pub const SVC_TYPE_NODE_PORT: u8 = 2;
pub const SVC_TYPE_LOAD_BALANCER: u8 = 3;
pub const SVC_TYPE_EXTERNAL_NAME: u8 = 4;
/// Not a Service: a pod's container port exposed on `hostPort` of its node's addresses.
pub const SVC_TYPE_HOST_PORT: u8 = 5;

/// Index into [`MAP_STATS`]. Every packet the program sees is counted in `Rx` and in exactly one
/// other counter, which names its verdict and the reason for it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Every packet the program saw.
    Rx = 0,
    /// Passed: neither IPv4 nor IPv6 (ARP, VLAN, ...).
    PassNotIpv4 = 1,
    /// Passed: a header was truncated or inconsistent; the kernel's own checks will handle it.
    PassMalformed = 2,
    /// Passed: IPv4 or IPv6 but neither TCP nor UDP (nor an ICMP error about a tracked IPv4
    /// flow); for IPv6 also ESP, and a chain of extension headers too long to follow.
    PassOtherProto = 3,
    /// Passed: a later fragment (no ports in it) whose datagram's first fragment was not seen
    /// translated (not a Service's flow, or it came before its first), or an IPv6 fragment
    /// header further down a chain of extension headers. First fragments, which hold the ports,
    /// take the path of any packet.
    PassFragment = 4,
    /// Passed: no frontend and no tracked flow matched.
    PassNoService = 5,
    /// Passed after DNAT of the first packet of a new flow.
    DnatNew = 6,
    /// Passed after DNAT of a packet of a tracked flow.
    DnatEstablished = 7,
    /// Passed after a reply's source was translated back to the frontend.
    RevNat = 8,
    /// Dropped: the service has no usable endpoint, and no answer could be sent (the packet is a
    /// TCP reset, carries IP options, or the ICMP rate limit was reached).
    DropNoBackend = 9,
    /// Dropped: a backend slot or backend vanished during an update (a race with the agent).
    DropStaleSlot = 10,
    /// Dropped: the connection could not be tracked (map update failed).
    DropCtFull = 11,
    /// Tracked flow whose backend was removed; the flow was re-balanced.
    CtStaleBackend = 12,
    /// Answered (XDP_TX): the service has no usable endpoint, so the client got a TCP reset or
    /// an ICMP port unreachable, as kube-proxy's REJECT rules send.
    RejectNoBackend = 13,
    /// Passed untouched: a reply of a flow to one of this node's addresses; TC egress
    /// translates it once the kernel has routed it.
    PassEgressRevNat = 14,
    /// TC egress (not counted in `Rx`): a reply's source was translated back to the node
    /// address and port the client used.
    EgressRevNat = 15,
    /// Dropped: a new flow to a LoadBalancer frontend from a client outside its
    /// `loadBalancerSourceRanges`.
    DropSourceRange = 16,
    /// Passed after translation: an ICMP error (unreachable, fragmentation needed, time
    /// exceeded) about a tracked flow, sent on to the backend or the client it concerns.
    IcmpTranslated = 17,
    /// TC egress (not counted in `Rx`): a packet of a flow to an endpoint on another node got
    /// the node's address and a SNAT port as its source.
    EgressSnat = 18,
    /// Socket level (cgroup programs, not counted in `Rx`; bytes are 0): a connect or a UDP
    /// datagram of a local process or pod to a frontend was given a backend.
    SockTranslated = 19,
    /// Socket level: a connect or UDP datagram to a frontend without usable endpoints failed at
    /// once with ECONNREFUSED.
    SockRefused = 20,
    /// Event (bytes 0): a new flow was tracked.
    CtCreated = 21,
    /// Event (bytes 0): a tracked flow idle past its lifetime was forgotten when its next packet
    /// came (which then starts a new flow). Flows the LRU map evicted are counted by the agent
    /// and the CLI: created - expired - stale - live.
    CtExpired = 22,
    /// Answered (XDP_TX): a new flow to an address of the Service ranges (`--service-cidr`)
    /// that no frontend holds (a deleted Service, a port the Service does not have) got a TCP
    /// reset or an ICMP port unreachable, instead of being routed out of the node.
    RejectNoService = 23,
    /// Dropped: as [`Stat::RejectNoService`], where no answer could be sent (the packet is a
    /// TCP reset, carries IP options, or the ICMP rate limit was reached).
    DropNoService = 24,
    /// A later fragment (no ports in it) of a datagram whose first fragment was translated,
    /// translated as that one ([`MAP_FRAG4`], [`MAP_FRAG6`]). A later fragment whose first was
    /// not seen (not of a Service's flow, or come before it) is [`Stat::PassFragment`].
    FragTranslated = 25,
}

/// Number of [`Stat`] counters; size of [`MAP_STATS`].
pub const STAT_COUNT: u32 = 26;

/// Names of the [`Stat`] counters, by index, as the CLI and /metrics show them.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "rx",
    "pass_not_ipv4",
    "pass_malformed",
    "pass_other_proto",
    "pass_fragment",
    "pass_no_service",
    "dnat_new",
    "dnat_established",
    "rev_nat",
    "drop_no_backend",
    "drop_stale_slot",
    "drop_ct_full",
    "ct_stale_backend",
    "reject_no_backend",
    "pass_egress_rev_nat",
    "egress_rev_nat",
    "drop_source_range",
    "icmp_translated",
    "egress_snat",
    "sock_translated",
    "sock_refused",
    "ct_created",
    "ct_expired",
    "reject_no_service",
    "drop_no_service",
    "frag_translated",
];

/// Value of [`MAP_TRACE`]: what the trace program decided for one packet. 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceRecord {
    /// `TRACE_*` bits: the steps the packet went through.
    pub steps: u32,
    /// The [`Stat`] the packet is counted under (besides `Rx`).
    pub stat: u32,
    /// The XDP action returned.
    pub verdict: u32,
    /// Service port id of the frontend or tracked flow; 0 when none.
    pub svc_id: u32,
    /// Backend the packet is sent to; 0 when none.
    pub backend_id: u32,
    /// Backend id the conntrack entry named, when one was found (it may be stale).
    pub ct_backend_id: u32,
    /// Selectable slots of the matched frontend.
    pub count: u16,
    /// The slot chosen for a new flow (1..=count); 0 when none.
    pub slot: u16,
    /// Always zero.
    pub _pad: u32,
}

/// [`TraceRecord::steps`]: a conntrack entry for the packet's direction client -> frontend.
pub const TRACE_CT_FORWARD: u32 = 1 << 0;
/// [`TraceRecord::steps`]: a conntrack entry for the direction backend -> client (a reply).
pub const TRACE_CT_REPLY: u32 = 1 << 1;
/// [`TraceRecord::steps`]: the tracked flow's backend is gone; the entry would be removed and
/// the flow balanced again.
pub const TRACE_CT_STALE: u32 = 1 << 2;
/// [`TraceRecord::steps`]: the tracked flow is over (idle past its lifetime, or a new
/// connection on a closed tuple); it is balanced again as a new flow.
pub const TRACE_CT_EXPIRED: u32 = 1 << 7;
/// [`TraceRecord::steps`]: sessionAffinity ClientIP kept the client's backend (`slot`).
pub const TRACE_AFFINITY: u32 = 1 << 8;
/// [`TraceRecord::steps`]: the slot came from the service port's Maglev table.
pub const TRACE_MAGLEV: u32 = 1 << 9;
/// [`TraceRecord::steps`]: the destination is a service frontend.
pub const TRACE_FRONTEND: u32 = 1 << 3;
/// [`TraceRecord::steps`]: a backend was chosen for a new flow, and conntrack entries would be
/// created for it.
pub const TRACE_NEW_FLOW: u32 = 1 << 4;
/// [`TraceRecord::steps`]: a header was rewritten.
pub const TRACE_REWRITE: u32 = 1 << 5;
/// [`TraceRecord::steps`]: the packet was turned into an answer to its sender (a TCP reset or
/// an ICMP port unreachable) and sent back.
pub const TRACE_REJECT: u32 = 1 << 6;

const _: () = {
    assert!(core::mem::size_of::<Svc4Key>() == 12);
    assert!(core::mem::size_of::<Svc4Value>() == 16);
    assert!(core::mem::size_of::<Backend4>() == 8);
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<Ct4Value>() == 28);
    assert!(core::mem::size_of::<StatValue>() == 16);
    assert!(core::mem::size_of::<SvcInfo>() == 432);
    assert!(core::mem::size_of::<TraceRecord>() == 32);
    assert!(Stat::FragTranslated as u32 + 1 == STAT_COUNT);
    assert!(core::mem::size_of::<Frag4Key>() == 12);
    assert!(core::mem::size_of::<Frag6Key>() == 40);
    assert!(core::mem::size_of::<FragPorts>() == 4);
    assert!(core::mem::size_of::<SrcRange4>() == 8);
    assert!(core::mem::size_of::<SrcRange6>() == 20);
    assert!(core::mem::size_of::<RejectBucket>() == 16);
    assert!(core::mem::size_of::<SockNat4Key>() == 16);
    assert!(core::mem::size_of::<DatapathConfig>() == 24);
    assert!(core::mem::size_of::<ServiceCidrs>() == 160);
    assert!(core::mem::size_of::<Affinity4Key>() == 8);
    assert!(core::mem::size_of::<Affinity6Key>() == 20);
    assert!(core::mem::size_of::<Affinity4Value>() == 16);
    assert!(core::mem::size_of::<SockAffinityKey>() == 16);
    assert!(core::mem::size_of::<SockNat4Value>() == 16);
    assert!(core::mem::size_of::<Svc6Key>() == 24);
    assert!(core::mem::size_of::<Backend6>() == 20);
    assert!(core::mem::size_of::<Ct6Key>() == 40);
    assert!(core::mem::size_of::<Ct6Value>() == 40);
    assert!(core::mem::size_of::<SockNat6Key>() == 32);
    assert!(core::mem::size_of::<SockNat6Value>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these types are repr(C), Copy, made only of integers, with explicit padding
    // fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for Svc4Key {}
    unsafe impl aya::Pod for Svc4Value {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for StatValue {}
    unsafe impl aya::Pod for SvcInfo {}
    unsafe impl aya::Pod for TraceRecord {}
    unsafe impl aya::Pod for SrcRange4 {}
    unsafe impl aya::Pod for SrcRange6 {}
    unsafe impl aya::Pod for SockNat4Key {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for ServiceCidrs {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity6Key {}
    unsafe impl aya::Pod for Affinity4Value {}
    unsafe impl aya::Pod for SockNat4Value {}
    unsafe impl aya::Pod for Svc6Key {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Value {}
    unsafe impl aya::Pod for SockNat6Key {}
    unsafe impl aya::Pod for SockNat6Value {}
}
