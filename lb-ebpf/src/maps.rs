//! The maps, one line of purpose each. Names and layouts come from lb-common; capacities here are
//! defaults that the agent overrides at load time.
use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use lb_common::{
    Affinity4Key, Affinity4Value, Affinity6Key, Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value,
    DatapathConfig, FRAG_ENTRIES, Frag4Key, Frag6Key, FragPorts, MAX_SOURCE_RANGES, RejectBucket, STAT_COUNT,
    SVC_INFO_MAP_FLAGS, SockNat4Key, SockNat4Value, SockNat6Key, SockNat6Value, SrcRange4, SrcRange6,
    StatValue, Svc4Key, Svc4Value, Svc6Key, SvcInfo, TraceRecord,
};

/// Frontend (address, port, protocol, slot) -> service entry (slot 0) or backend id (slot > 0).
#[btf_map(name = "xlb_svc4_v2")]
pub static SERVICES: HashMap<
    Svc4Key,
    Svc4Value,
    { lb_common::DEFAULT_MAX_SERVICE_ENTRIES as usize },
    { lb_common::SERVICES_MAP_FLAGS },
> = HashMap::new();

/// Backend id -> endpoint address and port.
#[btf_map(name = "xlb_be4_v1")]
pub static BACKENDS: Array<Backend4, { lb_common::DEFAULT_MAX_BACKENDS as usize }> = Array::new();

/// Tracked flows, both directions, evicted least recently used first.
/// sessionAffinity ClientIP at the socket, by network namespace (see lb_common::MAP_SOCK_AFFINITY).
#[btf_map(name = "xlb_sockaff_v1")]
pub static SOCK_AFFINITY: LruHashMap<lb_common::SockAffinityKey, lb_common::Affinity4Value, 65_536> =
    LruHashMap::new();

#[btf_map(name = "xlb_ct4_v2")]
pub static CT: LruHashMap<Ct4Key, Ct4Value, 262_144> = LruHashMap::new();

/// Per-CPU packet and byte counters by verdict and reason (see lb_common::Stat).
#[btf_map(name = "xlb_stats_v10")]
pub static STATS: PerCpuArray<StatValue, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Service id -> names for display; written by the agent, never read here. Declared in the
/// object so that the map carries BTF and `bpftool map dump` shows its fields.
#[btf_map(name = "xlb_svcinfo_v2")]
pub static SVC_INFO: HashMap<u32, SvcInfo, { lb_common::DEFAULT_MAX_SVC_INFO as usize }, SVC_INFO_MAP_FLAGS> =
    HashMap::new();

/// Backend id -> new flows sent to it (one atomic add per new flow, not per packet).
#[btf_map(name = "xlb_beflows_v1")]
pub static BACKEND_FLOWS: Array<u64, 262_144> = Array::new();

/// The trace program's record of its decision; the datapath program never touches it.
#[btf_map(name = "xlb_trace_v1")]
pub static TRACE: Array<TraceRecord, 1> = Array::new();

/// The first fragment's ports of datagrams in fragments of Service flows, for their later
/// fragments (lb_common::MAP_FRAG4).
#[btf_map(name = "xlb_frag4_v1")]
pub static FRAG4: LruHashMap<Frag4Key, FragPorts, { FRAG_ENTRIES as usize }> = LruHashMap::new();

/// As FRAG4, for IPv6 (lb_common::MAP_FRAG6).
#[btf_map(name = "xlb_frag6_v1")]
pub static FRAG6: LruHashMap<Frag6Key, FragPorts, { FRAG_ENTRIES as usize }> = LruHashMap::new();

/// Token bucket of the ICMP answers for Services without endpoints, per CPU.
#[btf_map(name = "xlb_rejectbkt_v1")]
pub static REJECT_BUCKET: PerCpuArray<RejectBucket, 1> = PerCpuArray::new();

/// loadBalancerSourceRanges: (service id, client prefix) -> 1.
#[btf_map(name = "xlb_srcrange4_v1")]
pub static SOURCE_RANGES: LpmTrie<SrcRange4, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// Socket-level translation: (socket, backend) -> frontend, and for unconnected UDP (socket,
/// frontend) -> backend. Least recently used first out: entries of closed sockets age away.
#[btf_map(name = "xlb_socknat4_v1")]
pub static SOCK_NAT: LruHashMap<SockNat4Key, SockNat4Value, 262_144> = LruHashMap::new();

/// The datapath's settings (conntrack lifetimes, selection), written by the agent.
#[btf_map(name = "xlb_config_v1")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// The cluster's Service IP ranges, written by the agent (lb_common::MAP_SERVICE_CIDRS).
#[btf_map(name = "xlb_svccidr_v1")]
pub static SERVICE_CIDRS: Array<lb_common::ServiceCidrs, 1> = Array::new();

/// sessionAffinity ClientIP: (service port, client) -> the backend its new flows keep.
#[btf_map(name = "xlb_affinity4_v1")]
pub static AFFINITY: LruHashMap<Affinity4Key, Affinity4Value, 65_536> = LruHashMap::new();

/// The endpoint filter: one bit per frontend and backend (lb_common::filter_bit); see
/// lb_common::MAP_FILTER.
#[btf_map(name = "xlb_filter4_v1")]
pub static FILTER: Array<
    u64,
    { lb_common::FILTER_WORDS as usize },
    { lb_common::FILTER_MAP_FLAGS as usize },
> = Array::new();

/// Flags of the Maglev tables: BPF_F_INNER_MAP (the agent's tables may have another size than
/// this template) and BPF_F_MMAPABLE (the agent fills a new table with one copy).
const MAGLEV_TABLE_FLAGS: usize = lb_common::MAGLEV_TABLE_FLAGS as usize;

/// Maglev: (service port, list) -> table of slots, four per u64 (see lb_common::MAP_MAGLEV).
#[btf_map(name = "xlb_maglev4_v1")]
pub static MAGLEV: HashOfMaps<
    u32,
    Array<u64, { lb_common::maglev_elements(lb_common::MAGLEV_DEFAULT_SIZE) as usize }, MAGLEV_TABLE_FLAGS>,
    { lb_common::MAX_MAGLEV_TABLES as usize },
> = HashOfMaps::new();

/// IPv6 frontend (address, port, protocol, slot) -> service entry (slot 0) or backend id.
#[btf_map(name = "xlb_svc6_v1")]
pub static SERVICES6: HashMap<Svc6Key, Svc4Value, 65_536> = HashMap::new();

/// IPv6 backend id -> endpoint address and port.
#[btf_map(name = "xlb_be6_v1")]
pub static BACKENDS6: Array<Backend6, 65_536> = Array::new();

/// Tracked IPv6 flows, both directions, evicted least recently used first.
#[btf_map(name = "xlb_ct6_v1")]
pub static CT6: LruHashMap<Ct6Key, Ct6Value, 65_536> = LruHashMap::new();

/// Scratch space of the IPv6 path, per CPU: its keys and values (40 bytes each) live here rather
/// than on the 512-byte stack. Never pinned; nothing outside one program run reads it.
#[repr(C)]
pub struct Scratch6 {
    /// The packet's own tuple (forward, then reply direction).
    pub key: Ct6Key,
    /// A second key: the other direction of a flow, or a new flow's reply entry.
    pub key2: Ct6Key,
    pub val: Ct6Value,
    pub svc: Svc6Key,
    /// A third key and a second value: a SNATed flow has four entries to build.
    pub key3: Ct6Key,
    pub val2: Ct6Value,
    /// The new flow's backend (a copy), its id and service port.
    pub be: Backend6,
    pub backend_id: u32,
    pub svc_id: u32,
    /// The loadBalancerSourceRanges lookup's key.
    pub range: Key<SrcRange6>,
    /// The sessionAffinity lookup's key.
    pub aff: Affinity6Key,
    /// A datagram's key in [`FRAG6`].
    pub frag: Frag6Key,
    /// An SCTP packet's checksum update, left for the end of the run (`nat::finish_sctp`).
    pub sctp: SctpFix,
}

/// What `nat::finish_sctp` does at the end of a run for an SCTP packet the run translated.
#[repr(C)]
pub struct SctpFix {
    /// 0 (nothing), [`SCTP_TRANSLATE4`] or [`SCTP_CRC6`].
    pub kind: u8,
    /// IPv4: the source is rewritten (else the destination).
    pub source: bool,
    /// Offset of the SCTP header from the frame's start.
    pub l4: u16,
    /// IPv4: the new address (packet order).
    pub addr: [u8; 4],
    /// IPv4: the new port, and the new source port above it unless 0 (host order).
    pub ports: u32,
    /// IPv6: the packet's first four bytes before its rewrite, as they stood in memory.
    pub old_ports: u32,
    /// IPv6: the SCTP packet's length.
    pub len: u32,
    /// IPv6: the addresses' change, as a one's complement sum.
    pub diff: u32,
}

impl SctpFix {
    pub const NONE: SctpFix =
        SctpFix { kind: 0, source: false, l4: 0, addr: [0; 4], ports: 0, old_ports: 0, len: 0, diff: 0 };
}

/// An IPv4 SCTP packet to translate as [`SctpFix`] says.
pub const SCTP_TRANSLATE4: u8 = 4;
/// An IPv6 SCTP packet already translated, its CRC32c to update.
pub const SCTP_CRC6: u8 = 6;

/// Entry of [`SCRATCH6`] that XDP uses.
pub const SCRATCH_XDP: u32 = 0;
/// Entry of [`SCRATCH6`] that TC egress uses (never the same as XDP's, whatever the nesting).
pub const SCRATCH_TC: u32 = 1;

#[btf_map(name = "xlb_scratch6_v1")]
pub static SCRATCH6: PerCpuArray<Scratch6, 2> = PerCpuArray::new();

/// loadBalancerSourceRanges of IPv6 service ports: (service id, client prefix) -> 1.
#[btf_map(name = "xlb_srcrange6_v1")]
pub static SOURCE_RANGES6: LpmTrie<SrcRange6, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// IPv6 backend id -> new flows sent to it.
#[btf_map(name = "xlb_beflows6_v1")]
pub static BACKEND_FLOWS6: Array<u64, 65_536> = Array::new();

/// sessionAffinity ClientIP of IPv6 service ports: (service port, client) -> backend.
#[btf_map(name = "xlb_affinity6_v1")]
pub static AFFINITY6: LruHashMap<Affinity6Key, Affinity4Value, 65_536> = LruHashMap::new();

/// Socket-level translation of IPv6 sockets: as `SOCK_NAT`.
#[btf_map(name = "xlb_socknat6_v1")]
pub static SOCK_NAT6: LruHashMap<SockNat6Key, SockNat6Value, 65_536> = LruHashMap::new();
