//! The reconciler: makes the datapath equal to the model, writing only the difference, in an
//! order that never exposes a half-written service to a packet:
//!
//! 1. backends (new ones, changed states);
//! 2. per frontend, the backend slots 1..=n, then the slot-0 entry with the new count, then the
//!    slots past the new count;
//! 3. frontends that are gone: slot 0 first (no new flow can start), then their slots;
//! 4. service names for the CLI; then backends no longer referenced are freed, last, so a slot
//!    never names a freed backend.
//!
//! Its picture of the datapath is read back from the maps at start (so a restarted agent keeps
//! every id and rewrites nothing that is already right), and again after any failed write.
pub mod maglev;
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use crate::{HashMap, HashSet};

use lb_common::{
    BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, Backend4, Backend6, SCOPE_EXTERNAL,
    SVC_INFO_DNS_NAME_LEN, SVC_INFO_NAME_LEN, SVC_INFO_PORT_NAME_LEN, Svc4Key, Svc4Value, Svc6Key, SvcInfo,
};

use crate::{
    datapath::{Datapath, DatapathError},
    model::{BackendState, DesiredPort, Family, Frontend, PortRef, Proto},
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("no free {what} id: all {capacity} are in use{}", flag_hint(what))]
    IdsExhausted { what: &'static str, capacity: u32 },
    #[error(
        "the {family} service map has room for {capacity} entries; the services need {needed} (raise {flag}); nothing of this sync was written, and the maps keep what they held"
    )]
    ServicesFull { family: &'static str, flag: &'static str, capacity: u32, needed: u64 },
}

impl ReconcileError {
    /// The agent flag to raise when the error is a map too small for the cluster.
    pub fn capacity_flag(&self) -> Option<&'static str> {
        match self {
            ReconcileError::ServicesFull { flag, .. } => Some(flag),
            ReconcileError::IdsExhausted { what: "backend", .. } => Some("--max-backends"),
            ReconcileError::IdsExhausted { what: "IPv6 backend", .. } => Some("--max-ipv6-entries"),
            _ => None,
        }
    }
}

/// The agent flag that raises the capacity an id of `what` runs out of, as a hint for the error.
fn flag_hint(what: &str) -> &'static str {
    match what {
        "backend" => " (raise --max-backends)",
        "IPv6 backend" => " (raise --max-ipv6-entries)",
        _ => "",
    }
}

/// A backend's identity: the same endpoint used by several services shares one id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    addr: IpAddr,
    port: u16,
    proto: Proto,
}

impl BackendKey {
    /// The backend of endpoint `b` of port `p`.
    fn of(p: &DesiredPort, b: &crate::model::DesiredBackend) -> Self {
        BackendKey { addr: b.addr, port: b.port, proto: p.id.proto }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FrontendState {
    svc_id: u32,
    /// `SVC_F_*` bits of the slot-0 entry.
    flags: u16,
    /// Slots new flows choose from: 1..=count.
    count: u16,
    /// sessionAffinity ClientIP timeout (seconds), 0: none.
    affinity: u32,
    /// Backend ids in slots 1..=len: the selectable ones, then the others (terminating), which
    /// only existing flows use. Every backend is in a slot, so the maps alone say which
    /// backends a service has (for read-back after a restart and for the CLI).
    slots: Vec<u32>,
}

/// What one [`Reconciler::apply`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: u64,
    pub deletes: u64,
}

/// Hands out the lowest free id in `1..capacity`.
#[derive(Debug, Default)]
struct Ids {
    /// One bit per id below `next` (a large cluster has hundreds of thousands of backends).
    used: Vec<u64>,
    next: u32,
    free: BTreeSet<u32>,
}

impl Ids {
    fn rebuild(used: impl IntoIterator<Item = u32>) -> Self {
        let mut ids = Ids { next: 1, ..Default::default() };
        for id in used {
            ids.set(id, true);
            ids.next = ids.next.max(id + 1);
        }
        ids.free = (1..ids.next).filter(|&i| !ids.is_used(i)).collect();
        ids
    }

    fn is_used(&self, id: u32) -> bool {
        self.used.get(id as usize / 64).is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    fn set(&mut self, id: u32, on: bool) {
        let w = id as usize / 64;
        if w >= self.used.len() {
            self.used.resize(w + 1, 0);
        }
        if on {
            self.used[w] |= 1 << (id % 64);
        } else {
            self.used[w] &= !(1 << (id % 64));
        }
    }

    fn alloc(&mut self, what: &'static str, capacity: u32) -> Result<u32, ReconcileError> {
        let id = if let Some(id) = self.free.pop_first() {
            id
        } else if self.next < capacity {
            self.next += 1;
            self.next - 1
        } else {
            return Err(ReconcileError::IdsExhausted { what, capacity });
        };
        self.set(id, true);
        Ok(id)
    }

    fn release(&mut self, id: u32) {
        if self.is_used(id) {
            self.set(id, false);
            self.free.insert(id);
        }
    }
}

/// Values by id (ids are dense: see [`Ids`]): a vector, not a hash table.
#[derive(Debug)]
struct ById<T> {
    values: Vec<Option<T>>,
    len: usize,
}

impl<T> Default for ById<T> {
    fn default() -> Self {
        ById { values: Vec::new(), len: 0 }
    }
}

impl<T> ById<T> {
    fn get(&self, id: u32) -> Option<&T> {
        self.values.get(id as usize)?.as_ref()
    }

    fn insert(&mut self, id: u32, v: T) {
        let i = id as usize;
        if i >= self.values.len() {
            self.values.resize_with(i + 1, || None);
        }
        if self.values[i].replace(v).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, id: u32) {
        if let Some(slot) = self.values.get_mut(id as usize)
            && slot.take().is_some()
        {
            self.len -= 1;
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.values = Vec::new();
        self.len = 0;
    }
}

pub struct Reconciler<D> {
    dp: D,
    port_ids: HashMap<PortRef, u32>,
    /// The names in the service-info map, by service id: a hash of each value (the value is
    /// hundreds of bytes; a write is skipped when the hash is the same).
    infos: HashMap<u32, u64>,
    svc_ids: Ids,
    frontends: BTreeMap<Frontend, FrontendState>,
    backend_values: ById<Backend4>,
    be_ids: Ids,
    /// IPv6 backends have ids of their own ([`lb_common::MAP_BACKENDS6`]).
    backend_values6: ById<Backend6>,
    be_ids6: Ids,
    /// `loadBalancerSourceRanges` entries: (service port id, client prefix).
    ranges: BTreeSet<(u32, crate::model::Cidr)>,
    /// Maglev table size; 0: no tables (random selection).
    maglev_size: u32,
    /// Maglev tables present, by key, with the backends they were built from (`None`: present,
    /// content unknown, as after a restart).
    maglev: BTreeMap<u32, Option<Vec<String>>>,
    /// Backends freed since [`Self::take_freed`] was last called: (address, port, protocol).
    freed: Vec<(IpAddr, u16, u8)>,
    /// The endpoint filter's words as written; empty: the datapath has no filter.
    filter: Vec<u64>,
    /// Freed backends whose filter bit stays set until the time given, so that the replies of
    /// their flows still in flight are still translated (see [`FILTER_GRACE`]).
    lingering: std::collections::VecDeque<(std::time::Instant, BackendKey)>,
    /// The filter as read back (at start, or after a failed write), kept set until the time
    /// given: it may hold the bits of backends an earlier agent (or apply) removed.
    read_bits: Option<(std::time::Instant, Vec<u64>)>,
    filter_grace: std::time::Duration,
    /// The ports the maps are made to hold (what the last applies asked for).
    target: HashMap<PortRef, Arc<DesiredPort>>,
    /// Service map entries the target needs, by family (see [`entries_needed`]).
    needed: [u64; 2],
    /// The next apply passes over the whole target: at start (the maps were read back) and
    /// after a failed write.
    full: bool,
    /// By backend: its id, and the ports of the target that name it.
    backend_refs: HashMap<BackendKey, BackendRefs>,
    /// By filter bit: how many entries (frontends, named and lingering backends) need it.
    filter_refs: HashMap<u32, u32>,
    /// The filter as it must be once the apply in progress is done.
    filter_want: Vec<u64>,
    /// Words of `filter_want` that may differ from `filter`.
    filter_dirty: WordSet,
    /// Any word may (a full pass).
    filter_all_dirty: bool,
    /// Service map entries in the picture, by family.
    picture_entries: [u64; 2],
    /// A write the datapath had held back failed: the picture may be ahead of the maps, which
    /// are read back before the next apply.
    reread: bool,
}

/// How long a removed backend keeps its endpoint-filter bit: its flows are balanced again at
/// their next packet from the client, but a reply already on its way (a SYN-ACK racing with
/// the removal) must still get the frontend's address, or the client would wait for a
/// retransmission instead of getting a reset. The UDP and half-open TCP lifetime.
pub const FILTER_GRACE: std::time::Duration = std::time::Duration::from_secs(lb_common::CT_UDP_S as u64);

/// The endpoint-filter bit of (address, port, protocol number) (both families share the
/// filter).
fn filter_bit(addr: IpAddr, port: u16, proto: u8) -> u32 {
    match addr {
        IpAddr::V4(a) => lb_common::filter_bit(a.octets(), port, proto),
        IpAddr::V6(a) => lb_common::filter_bit6(a.octets(), port, proto),
    }
}

/// The index of a family in per-family counts.
fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// The service map entries a port needs: each frontend's entry and a slot per selectable
/// backend (the capacity check before any write).
fn entries_needed(p: &DesiredPort) -> u64 {
    p.frontends.len() as u64 * (1 + p.selectable().count() as u64)
}

/// A backend: its id in the backend map (0: none), how many ports of the target name it, by
/// state, and how many of them say it is on this node: its value is the least state (the most
/// serving) and local if any says so. Kept while it has an id or a port names it.
#[derive(Clone, Copy, Debug, Default)]
struct BackendRefs {
    id: u32,
    /// By [`BackendState`], in its order.
    states: [u32; 3],
    local: u32,
}

impl BackendRefs {
    fn count(&mut self, b: &crate::model::DesiredBackend, add: bool) {
        let (s, l) = (&mut self.states[b.state as usize], u32::from(b.local));
        if add {
            *s += 1;
            self.local += l;
        } else {
            *s -= 1;
            self.local -= l;
        }
    }

    fn total(&self) -> u32 {
        self.states.iter().sum()
    }

    fn merged(&self) -> (BackendState, bool) {
        let state = match self.states {
            [a, ..] if a > 0 => BackendState::Active,
            [_, t, _] if t > 0 => BackendState::Terminating,
            _ => BackendState::Draining,
        };
        (state, self.local > 0)
    }
}

/// A set of filter word numbers, as bits (a first sync marks most words of the filter).
#[derive(Debug, Default)]
struct WordSet(Vec<u64>);

impl WordSet {
    fn insert(&mut self, w: u32) {
        let (i, b) = ((w >> 6) as usize, w & 63);
        if i >= self.0.len() {
            self.0.resize(i + 1, 0);
        }
        self.0[i] |= 1 << b;
    }

    fn clear(&mut self) {
        self.0.fill(0);
    }

    /// In increasing order.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().filter(|(_, x)| **x != 0).flat_map(|(i, &x)| {
            let mut rest = x;
            std::iter::from_fn(move || {
                let b = (rest != 0).then(|| rest.trailing_zeros())?;
                rest &= rest - 1;
                Some((i as u32) << 6 | b)
            })
        })
    }
}

/// Writes slot `slot` of frontend `f`, in the map of its family.
fn write_slot<D: Datapath>(dp: &mut D, f: &Frontend, slot: u16, v: Svc4Value) -> Result<(), DatapathError> {
    let (port, proto, scope) = (f.port, f.proto.number(), SCOPE_EXTERNAL);
    match f.addr {
        IpAddr::V4(a) => dp.write_service(Svc4Key { addr: a.octets(), port, proto, scope, slot, _pad: 0 }, v),
        IpAddr::V6(a) => {
            dp.write_service6(Svc6Key { addr: a.octets(), port, proto, scope, slot, _pad: 0 }, v)
        }
    }
}

/// Deletes slot `slot` of frontend `f`, in the map of its family.
fn delete_slot<D: Datapath>(dp: &mut D, f: &Frontend, slot: u16) -> Result<(), DatapathError> {
    let (port, proto, scope) = (f.port, f.proto.number(), SCOPE_EXTERNAL);
    match f.addr {
        IpAddr::V4(a) => dp.delete_service(Svc4Key { addr: a.octets(), port, proto, scope, slot, _pad: 0 }),
        IpAddr::V6(a) => dp.delete_service6(Svc6Key { addr: a.octets(), port, proto, scope, slot, _pad: 0 }),
    }
}

fn frontend_of(addr: IpAddr, port: u16, proto: u8) -> Option<Frontend> {
    Some(Frontend { addr, port, proto: Proto::from_number(proto)? })
}

/// The backend value of `b` (its family's), as `(state, flags)` plus the address.
fn backend_state(state: BackendState, local: bool) -> (u8, u8) {
    let state = match state {
        BackendState::Active => BACKEND_STATE_ACTIVE,
        BackendState::Terminating | BackendState::Draining => BACKEND_STATE_TERMINATING,
    };
    (state, if local { lb_common::BACKEND_F_LOCAL } else { 0 })
}

fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    // Kubernetes names are ASCII and shorter than N; cut at a char boundary all the same.
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// Reads a NUL-padded string written by [`fixed`].
pub fn unfixed(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A hash of a service-info value, to tell whether it must be written again.
fn info_hash(i: &SvcInfo) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    // Fixed seeds: the same value hashes the same in every apply.
    let mut h = foldhash::quality::FixedState::with_seed(0x786c_6200).build_hasher();
    (i.namespace, i.name, i.port_name, i.target_port).hash(&mut h);
    i.external_name.hash(&mut h);
    (i.port, i.node_port, i.proto, i.svc_type, i.external_policy, i.internal_policy).hash(&mut h);
    (i.affinity_timeout, i.backends).hash(&mut h);
    h.finish()
}

pub fn svc_info(p: &DesiredPort) -> SvcInfo {
    SvcInfo {
        namespace: fixed::<SVC_INFO_NAME_LEN>(&p.id.namespace),
        name: fixed::<SVC_INFO_NAME_LEN>(&p.id.name),
        port_name: fixed::<SVC_INFO_PORT_NAME_LEN>(&p.id.port_name),
        target_port: fixed::<SVC_INFO_PORT_NAME_LEN>(&p.shown.target_port),
        external_name: fixed::<SVC_INFO_DNS_NAME_LEN>(&p.shown.external_name),
        port: p.port,
        node_port: p.node_port.unwrap_or(0),
        proto: p.id.proto.number(),
        svc_type: p.svc_type.code(),
        external_policy: p.shown.external_policy.code(),
        internal_policy: p.shown.internal_policy.code(),
        affinity_timeout: p.shown.affinity_timeout,
        backends: p.backends.len() as u32,
    }
}

impl<D: Datapath> Reconciler<D> {
    /// Reads the datapath's current content back; nothing is written.
    pub fn new(dp: D) -> Result<Self, ReconcileError> {
        let mut r = Reconciler {
            dp,
            port_ids: HashMap::default(),
            infos: HashMap::default(),
            svc_ids: Ids::default(),
            frontends: BTreeMap::new(),
            backend_values: ById::default(),
            be_ids: Ids::default(),
            backend_values6: ById::default(),
            be_ids6: Ids::default(),
            ranges: BTreeSet::new(),
            maglev_size: 0,
            maglev: BTreeMap::new(),
            freed: Vec::new(),
            filter: Vec::new(),
            lingering: Default::default(),
            read_bits: None,
            filter_grace: FILTER_GRACE,
            target: HashMap::default(),
            needed: [0; 2],
            full: true,
            backend_refs: HashMap::default(),
            filter_refs: HashMap::default(),
            filter_want: Vec::new(),
            filter_dirty: WordSet::default(),
            filter_all_dirty: false,
            picture_entries: [0; 2],
            reread: false,
        };
        r.read_back()?;
        Ok(r)
    }

    /// How long a removed backend keeps its endpoint-filter bit (default [`FILTER_GRACE`]).
    pub fn set_filter_grace(&mut self, grace: std::time::Duration) {
        self.filter_grace = grace;
        if grace.is_zero() {
            self.read_bits = None;
            self.full = true; // the filter is made again without the bits read back
        }
    }

    /// Builds Maglev tables of `size` entries (a prime, see [`lb_common::MAGLEV_SIZES`]) for
    /// every service port from the next apply on; 0 removes them (random selection).
    pub fn set_maglev(&mut self, size: u32) {
        if size != self.maglev_size {
            self.maglev_size = size;
            for v in self.maglev.values_mut() {
                *v = None; // rebuilt at the new size
            }
        }
    }

    /// The backends freed by the applies since the last call: (address, port, protocol).
    pub fn take_freed(&mut self) -> Vec<(IpAddr, u16, u8)> {
        std::mem::take(&mut self.freed)
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Map entries in use, as (map name, entries, capacity), from the reconciler's picture.
    pub fn usage(&self) -> Vec<(&'static str, u64, u64)> {
        let cap = self.dp.capacity();
        let [svc_entries4, svc_entries6] = self.picture_entries;
        vec![
            (lb_common::MAP_SERVICES, svc_entries4, u64::from(cap.service_entries)),
            (lb_common::MAP_BACKENDS, self.backend_values.len() as u64, u64::from(cap.backends)),
            (lb_common::MAP_SERVICES6, svc_entries6, u64::from(cap.ipv6_entries)),
            (lb_common::MAP_BACKENDS6, self.backend_values6.len() as u64, u64::from(cap.ipv6_entries)),
            (lb_common::MAP_SVC_INFO, self.infos.len() as u64, u64::from(lb_common::DEFAULT_MAX_SVC_INFO)),
        ]
    }

    /// The datapath id of a service port, if it has one.
    pub fn port_id(&self, id: &PortRef) -> Option<u32> {
        self.port_ids.get(id).copied()
    }

    fn read_back(&mut self) -> Result<(), ReconcileError> {
        self.filter = self.dp.read_filter()?;
        if !self.filter.is_empty() && !self.filter_grace.is_zero() {
            self.read_bits = Some((std::time::Instant::now() + self.filter_grace, self.filter.clone()));
        }
        self.port_ids.clear();
        self.infos.clear();
        self.frontends.clear();
        self.backend_refs.clear();
        self.backend_values.clear();
        self.backend_values6.clear();

        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        let mut entries: BTreeMap<Frontend, (u32, u16, u16, u32)> = BTreeMap::new();
        let v4 = self
            .dp
            .read_services()?
            .into_iter()
            .map(|(k, v)| (IpAddr::V4(Ipv4Addr::from(k.addr)), k.port, k.proto, k.slot, v));
        let v6 = self
            .dp
            .read_services6()?
            .into_iter()
            .map(|(k, v)| (IpAddr::V6(Ipv6Addr::from(k.addr)), k.port, k.proto, k.slot, v));
        for (addr, port, proto, slot, v) in v4.chain(v6) {
            let Some(f) = frontend_of(addr, port, proto) else { continue };
            if slot == 0 {
                entries.insert(f, (v.svc_id, v.count, v.flags, v.affinity_timeout));
            } else {
                slots.entry(f).or_default().insert(slot, v.backend_id);
            }
        }
        let mut svc_ids_used: BTreeSet<u32> = BTreeSet::new();
        // A port's family is its frontends' (the names do not say it).
        let v6_ids: BTreeSet<u32> =
            entries.iter().filter(|(f, _)| f.addr.is_ipv6()).map(|(_, e)| e.0).collect();
        for (id, info) in self.dp.read_svc_infos()? {
            let Some(proto) = Proto::from_number(info.proto) else { continue };
            let r = PortRef {
                namespace: unfixed(&info.namespace).into(),
                name: unfixed(&info.name).into(),
                port_name: unfixed(&info.port_name),
                proto,
                family: if v6_ids.contains(&id) { Family::V6 } else { Family::V4 },
            };
            self.port_ids.insert(r, id);
            self.infos.insert(id, info_hash(&info));
            svc_ids_used.insert(id);
        }
        // Every slot ever written, including orphans past a count, so they get cleaned up.
        for (f, s) in &slots {
            let (svc_id, count, flags, affinity) = entries.get(f).copied().unwrap_or((0, 0, 0, 0));
            let max = s.keys().last().copied().unwrap_or(0);
            let list = (1..=max).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
            self.frontends.insert(*f, FrontendState { svc_id, flags, count, affinity, slots: list });
        }
        for (f, (svc_id, count, flags, affinity)) in &entries {
            self.frontends.entry(*f).or_insert(FrontendState {
                flags: *flags,
                svc_id: *svc_id,
                count: *count,
                affinity: *affinity,
                slots: Vec::new(),
            });
            svc_ids_used.insert(*svc_id);
        }
        let cap = self.dp.capacity();
        let (mut be_used, mut be_used6) = (BTreeSet::new(), BTreeSet::new());
        for (f, st) in &self.frontends {
            for &id in &st.slots {
                let v6 = f.addr.is_ipv6();
                let (used, cap) =
                    if v6 { (&mut be_used6, cap.ipv6_entries) } else { (&mut be_used, cap.backends) };
                if id == 0 || id >= cap || used.contains(&id) {
                    continue;
                }
                let (addr, port, state) = if v6 {
                    let v = self.dp.read_backend6(id)?;
                    self.backend_values6.insert(id, v);
                    (IpAddr::V6(Ipv6Addr::from(v.addr)), v.port, v.state)
                } else {
                    let v = self.dp.read_backend(id)?;
                    self.backend_values.insert(id, v);
                    (IpAddr::V4(Ipv4Addr::from(v.addr)), v.port, v.state)
                };
                if state == lb_common::BACKEND_STATE_FREE {
                    if v6 {
                        self.backend_values6.remove(id);
                    } else {
                        self.backend_values.remove(id);
                    }
                    continue;
                }
                used.insert(id);
                self.backend_refs.entry(BackendKey { addr, port, proto: f.proto }).or_default().id = id;
            }
        }
        self.svc_ids = Ids::rebuild(svc_ids_used);
        self.be_ids = Ids::rebuild(be_used);
        self.be_ids6 = Ids::rebuild(be_used6);
        self.ranges = self.dp.read_source_ranges()?.into_iter().collect();
        self.maglev = self.dp.read_maglev_keys()?.into_iter().map(|k| (k, None)).collect();
        self.picture_entries = [0; 2];
        for (f, st) in &self.frontends {
            self.picture_entries[usize::from(f.addr.is_ipv6())] += 1 + st.slots.len() as u64;
        }
        self.filter_want = vec![0; self.filter.len()];
        self.full = true;
        Ok(())
    }

    /// Makes the datapath hold exactly `desired` (a full pass over every port: tests, the
    /// oracle). A target too large for the service maps is refused before anything is written.
    /// On another error the datapath may hold a mix of old and new services, each of them whole;
    /// call again (or [`Self::apply_changes`], even with no change) to finish. The picture of the maps is updated after each write
    /// that succeeded (a map update either happens or not), so the next call writes exactly
    /// what is still missing.
    pub fn apply<P: Borrow<DesiredPort>>(&mut self, desired: &[P]) -> Result<ApplyStats, ReconcileError> {
        self.reread_if_needed()?;
        let mut target: HashMap<PortRef, Arc<DesiredPort>> = HashMap::default();
        target.reserve(desired.len());
        let mut needed = [0u64; 2];
        for p in desired.iter().map(Borrow::borrow) {
            let kept = self.target.get(&p.id).filter(|t| ***t == *p).cloned();
            let p = kept.unwrap_or_else(|| Arc::new(p.clone()));
            if let Some(old) = target.insert(p.id.clone(), p.clone()) {
                // The same port twice: the last one counts, as it would be written last.
                needed[family_index(old.id.family)] -= entries_needed(&old);
            }
            needed[family_index(p.id.family)] += entries_needed(&p);
        }
        self.target = target;
        self.needed = needed;
        self.full = true;
        self.converge_full()
    }

    /// Applies changes of some ports: `(port, Some(new version))` adds or replaces it, `(port,
    /// None)` removes it; the other ports stay as they are. Costs the changed ports' size, not
    /// the target's: only their entries are compared and written, in the same order as
    /// [`Self::apply`]. After a failed write (or at start, when the maps were read back) the
    /// next call makes a full pass, so that whatever the failure left half done is finished.
    pub fn apply_changes(
        &mut self,
        changes: impl IntoIterator<Item = (PortRef, Option<Arc<DesiredPort>>)>,
    ) -> Result<ApplyStats, ReconcileError> {
        self.reread_if_needed()?;
        // By port: the version before the changes, and after.
        let mut by_port: HashMap<PortRef, [Option<Arc<DesiredPort>>; 2]> = HashMap::default();
        for (id, new) in changes {
            let old = self.target.get(&id).cloned();
            by_port.entry(id).or_insert([old, None])[1] = new;
        }
        by_port.retain(|_, [old, new]| match (old, new) {
            (Some(o), Some(n)) => !Arc::ptr_eq(o, n) && **o != **n,
            (None, None) => false,
            _ => true,
        });
        let mut needed = self.needed;
        for [old, new] in by_port.values() {
            if let Some(o) = old {
                needed[family_index(o.id.family)] -= entries_needed(o);
            }
            if let Some(n) = new {
                needed[family_index(n.id.family)] += entries_needed(n);
            }
        }
        self.needed = needed;
        let (mut olds, mut news) = (Vec::new(), Vec::new());
        for (id, [old, new]) in by_port {
            match &new {
                Some(n) => self.target.insert(id, n.clone()),
                None => self.target.remove(&id),
            };
            olds.extend(old);
            news.extend(new);
        }
        if self.full {
            return self.converge_full();
        }
        // Too large for the maps: nothing is written; the target stays, so that the next apply
        // (a later change, or a retry with none) writes it all once it fits.
        if let Err(e) = self.check_capacity(self.needed) {
            self.full = true;
            return Err(e);
        }
        // In a fixed order, so that runs are repeatable.
        olds.sort_by(|a, b| a.id.cmp(&b.id));
        news.sort_by(|a, b| a.id.cmp(&b.id));
        let result = self.converge(&olds, &news, false);
        if result.is_err() {
            self.full = true;
        }
        result
    }

    /// After a failed write that the datapath had held back, the picture is read from the maps
    /// again (as at start), and the next pass is a full one.
    fn reread_if_needed(&mut self) -> Result<(), ReconcileError> {
        if self.reread {
            self.read_back()?;
            self.reread = false;
        }
        Ok(())
    }

    /// A pass over the whole target, also removing whatever the maps hold that it does not name
    /// (entries of an earlier agent, of a failed apply).
    fn converge_full(&mut self) -> Result<ApplyStats, ReconcileError> {
        self.check_capacity(self.needed)?;
        let mut news: Vec<Arc<DesiredPort>> = self.target.values().cloned().collect();
        news.sort_by(|a, b| a.id.cmp(&b.id));
        let result = self.converge(&[], &news, true);
        self.full = result.is_err();
        result
    }

    /// Refuses a target that does not fit the service maps, before anything is written.
    fn check_capacity(&self, needed: [u64; 2]) -> Result<(), ReconcileError> {
        let cap = self.dp.capacity();
        for (needed, capacity, family, flag) in [
            (needed[0], cap.service_entries, "IPv4", "--max-service-entries"),
            (needed[1], cap.ipv6_entries, "IPv6", "--max-ipv6-entries"),
        ] {
            if needed > u64::from(capacity) {
                return Err(ReconcileError::ServicesFull { family, flag, capacity, needed });
            }
        }
        Ok(())
    }

    /// Whether a port of the target names backend `k`.
    fn named(&self, k: &BackendKey) -> bool {
        self.backend_refs.get(k).is_some_and(|r| r.total() > 0)
    }

    /// The filter bit of (address, port, protocol), when the datapath has a filter.
    fn bit_of(&self, addr: IpAddr, port: u16, proto: Proto) -> Option<u32> {
        (!self.filter.is_empty()).then(|| filter_bit(addr, port, proto.number()))
    }

    /// A backend's two filter bits: the one frontends share and its own (see
    /// lb_common::filter_bit_backend), when the datapath has a filter.
    fn backend_bits(&self, k: &BackendKey) -> [Option<u32>; 2] {
        let own = k.proto.number() | lb_common::FILTER_BACKEND_ROLE;
        [
            self.bit_of(k.addr, k.port, k.proto),
            (!self.filter.is_empty()).then(|| filter_bit(k.addr, k.port, own)),
        ]
    }

    /// One more backend entry (named or lingering) needs backend `k`'s bits.
    fn backend_hold(&mut self, k: &BackendKey) {
        for bit in self.backend_bits(k) {
            self.filter_hold(bit);
        }
    }

    /// One backend entry fewer needs backend `k`'s bits.
    fn backend_release(&mut self, k: &BackendKey) {
        for bit in self.backend_bits(k) {
            self.filter_release(bit);
        }
    }

    /// One more map entry (frontend, backend, lingering backend) needs `bit`.
    fn filter_hold(&mut self, bit: Option<u32>) {
        let Some(bit) = bit else { return };
        let n = self.filter_refs.entry(bit).or_default();
        *n += 1;
        if *n == 1 {
            let w = (bit >> 6) as usize;
            self.filter_want[w] |= 1 << (bit & 63);
            self.filter_dirty.insert(w as u32);
        }
    }

    /// One map entry fewer needs `bit`: the bit goes with the last one, unless the filter read
    /// back at start still holds it (see [`Self::read_bits`]).
    fn filter_release(&mut self, bit: Option<u32>) {
        let Some(bit) = bit else { return };
        let Some(n) = self.filter_refs.get_mut(&bit) else { return };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.filter_refs.remove(&bit);
        let (w, mask) = ((bit >> 6) as usize, 1u64 << (bit & 63));
        if self.read_bits.as_ref().is_some_and(|(_, bits)| bits[w] & mask != 0) {
            return;
        }
        self.filter_want[w] &= !mask;
        self.filter_dirty.insert(w as u32);
    }

    /// Writes the filter words that must gain bits (`gain`: only gains, before the maps name
    /// the new entries) or change (at the end, when nothing names the removed ones any more).
    fn flush_filter(&mut self, gain: bool, st: &mut ApplyStats) -> Result<(), ReconcileError> {
        let dirty: Box<dyn Iterator<Item = u32>> = match self.filter_all_dirty {
            true => Box::new(0..self.filter.len() as u32),
            false => Box::new(self.filter_dirty.iter()),
        };
        let words: Vec<(u32, u64)> = dirty
            .map(|w| (w, self.filter[w as usize], self.filter_want[w as usize]))
            .filter_map(|(w, have, want)| match gain {
                true => (have | want != have).then_some((w, have | want)),
                false => (have != want).then_some((w, want)),
            })
            .collect();
        self.write_filter(&words, st)?;
        if !gain {
            self.filter_dirty.clear();
            self.filter_all_dirty = false;
        }
        Ok(())
    }

    /// Counts of the picture's service entries by family, kept as the picture changes.
    fn picture_insert(&mut self, f: Frontend, s: FrontendState) {
        let fam = usize::from(f.addr.is_ipv6());
        self.picture_entries[fam] += 1 + s.slots.len() as u64;
        if let Some(old) = self.frontends.insert(f, s) {
            self.picture_entries[fam] -= 1 + old.slots.len() as u64;
        }
    }

    fn picture_remove(&mut self, f: &Frontend) {
        if let Some(old) = self.frontends.remove(f) {
            self.picture_entries[usize::from(f.addr.is_ipv6())] -= 1 + old.slots.len() as u64;
        }
    }

    /// Makes the maps hold the new versions (`news`) of the ports whose old versions (as last
    /// written) are `olds`; `full`: `news` is the whole target, and whatever else the maps hold
    /// is removed.
    fn converge(
        &mut self,
        olds: &[Arc<DesiredPort>],
        news: &[Arc<DesiredPort>],
        full: bool,
    ) -> Result<ApplyStats, ReconcileError> {
        let result = self.converge_writes(olds, news, full);
        // The writes held back go now (any operation after them sent them already).
        let flushed = self.dp.flush().map_err(ReconcileError::from);
        let result = result.and_then(|st| flushed.map(|()| st));
        if result.is_err() && self.dp.defers_writes() {
            self.reread = true;
        }
        result
    }

    /// The writes of [`Self::converge`], in the order that never exposes a half-written
    /// service.
    fn converge_writes(
        &mut self,
        olds: &[Arc<DesiredPort>],
        news: &[Arc<DesiredPort>],
        full: bool,
    ) -> Result<ApplyStats, ReconcileError> {
        let mut st = ApplyStats::default();
        let cap = self.dp.capacity();
        let now = std::time::Instant::now();

        // Service ids.
        let mut ids = Vec::with_capacity(news.len());
        for p in news {
            let id = match self.port_ids.get(&p.id) {
                Some(id) => *id,
                None => {
                    let id = self.svc_ids.alloc("service", u32::MAX)?;
                    self.port_ids.insert(p.id.clone(), id);
                    id
                }
            };
            ids.push(id);
        }
        let old_ids: Vec<Option<u32>> = olds.iter().map(|p| self.port_ids.get(&p.id).copied()).collect();

        // Backend references: how many ports name each backend, in which state.
        let mut touched: Vec<BackendKey> = Vec::new();
        let mut unnamed: Vec<BackendKey> = Vec::new(); // no longer named by any port
        if full {
            self.backend_refs.retain(|_, r| {
                *r = BackendRefs { id: r.id, ..Default::default() };
                r.id != 0
            });
            self.filter_refs.clear();
            self.filter_want.iter_mut().for_each(|w| *w = 0);
            self.filter_all_dirty = true;
            if let Some((until, bits)) = &self.read_bits
                && *until > now
            {
                self.filter_want.iter_mut().zip(bits).for_each(|(w, b)| *w |= b);
            }
            for k in self.lingering.iter().map(|(_, k)| *k).collect::<Vec<_>>() {
                self.backend_hold(&k);
            }
        }
        for p in olds {
            for b in &p.backends {
                let k = BackendKey::of(p, b);
                let refs = self.backend_refs.entry(k).or_default();
                refs.count(b, false);
                if refs.total() == 0 {
                    if refs.id == 0 {
                        self.backend_refs.remove(&k);
                    }
                    unnamed.push(k);
                }
                touched.push(k);
            }
        }
        for p in news {
            for b in &p.backends {
                let k = BackendKey::of(p, b);
                let refs = self.backend_refs.entry(k).or_default();
                refs.count(b, true);
                if refs.total() == 1 {
                    self.backend_hold(&k);
                }
                touched.push(k);
            }
        }

        // In order, once each (a sort, not a tree: a first sync touches every backend).
        touched.sort_unstable();
        touched.dedup();
        // 0. The endpoint filter gains the new frontends' and backends' bits before any map names
        // them; it loses the bits of removed ones only at the end, once no map names them.
        for p in news {
            for f in &p.frontends {
                self.filter_hold(self.bit_of(f.addr, f.port, f.proto));
            }
        }
        if let Some((until, bits)) = &self.read_bits
            && *until <= now
        {
            // The bits read back at start are no longer held for an earlier agent's flows: those
            // no map entry needs go (once, at the first apply after the grace period).
            let bits = bits.clone();
            self.read_bits = None;
            for (w, &b) in bits.iter().enumerate().filter(|(_, b)| **b != 0) {
                for i in (0..64).filter(|i| b & (1 << i) != 0) {
                    if !self.filter_refs.contains_key(&((w as u32) << 6 | i)) {
                        self.filter_want[w] &= !(1 << i);
                        self.filter_dirty.insert(w as u32);
                    }
                }
            }
        }
        self.flush_filter(true, &mut st)?;

        // 1. Backends: ids of those named (a new id's flow count starts again), then their
        // values: each a run of writes of one map, which the datapath may send together.
        for k in &touched {
            if self.backend_refs.get(k).is_none_or(|r| r.total() == 0 || r.id != 0) {
                continue;
            }
            let id = if k.addr.is_ipv6() {
                let id = self.be_ids6.alloc("IPv6 backend", cap.ipv6_entries)?;
                // As for IPv4 below.
                if let Err(e) = self.dp.reset_backend_flows6(id) {
                    self.be_ids6.release(id);
                    return Err(e.into());
                }
                id
            } else {
                let id = self.be_ids.alloc("backend", cap.backends)?;
                // The id's flow count starts again for its new backend (an earlier one may have
                // counted there). Until the backend is written below, no slot names it.
                if let Err(e) = self.dp.reset_backend_flows(id) {
                    self.be_ids.release(id);
                    return Err(e.into());
                }
                id
            };
            self.backend_refs.entry(*k).or_default().id = id;
        }
        for k in &touched {
            let Some(refs) = self.backend_refs.get(k).filter(|r| r.total() > 0) else { continue };
            let ((state, local), id) = (refs.merged(), refs.id);
            let (bstate, flags) = backend_state(state, local);
            match k.addr {
                IpAddr::V4(a) => {
                    let v = Backend4 { addr: a.octets(), port: k.port, state: bstate, flags };
                    if self.backend_values.get(id) != Some(&v) {
                        self.dp.write_backend(id, v)?;
                        self.backend_values.insert(id, v);
                        st.writes += 1;
                    }
                }
                IpAddr::V6(a) => {
                    let v = Backend6 { addr: a.octets(), port: k.port, state: bstate, flags };
                    if self.backend_values6.get(id) != Some(&v) {
                        self.dp.write_backend6(id, v)?;
                        self.backend_values6.insert(id, v);
                        st.writes += 1;
                    }
                }
            }
        }

        // Source ranges before the frontends that check them.
        let wanted_ranges: BTreeSet<(u32, crate::model::Cidr)> = news
            .iter()
            .zip(&ids)
            .flat_map(|(p, &id)| p.source_ranges.iter().map(move |c| (id, *c)))
            .collect();
        for r in wanted_ranges.difference(&self.ranges).copied().collect::<Vec<_>>() {
            self.dp.write_source_range(r.0, r.1)?;
            self.ranges.insert(r);
            st.writes += 1;
        }

        // 2. Frontends: slots, then the entry, then stale slots.
        let mut wanted_frontends = HashSet::default();
        for (p, &svc_id) in news.iter().zip(&ids) {
            let id_of = |b: &crate::model::DesiredBackend| self.backend_refs[&BackendKey::of(p, b)].id;
            // The selectable backends first (count of them), then every other one. A frontend
            // with a traffic policy Local selects among this node's endpoints only.
            let slots_for = |local_only: bool| -> (Vec<u32>, u16) {
                let mut slots: Vec<u32> = p.selectable_where(local_only).map(id_of).collect();
                let count = slots.len() as u16;
                let mut rest: Vec<u32> =
                    p.backends.iter().map(id_of).filter(|id| !slots.contains(id)).collect();
                slots.append(&mut rest);
                (slots, count)
            };
            let cluster = slots_for(false);
            let local = p.frontend_kinds.iter().any(|&k| p.local_only(k)).then(|| slots_for(true));
            for (fi, f) in p.frontends.iter().enumerate() {
                let mut flags = p.frontend_kinds.get(fi).copied().unwrap_or(0);
                let (slots, count) = match &local {
                    Some(l) if p.local_only(flags) => {
                        flags |= lb_common::SVC_F_LOCAL_LIST;
                        if l.1 == 0 && cluster.1 > 0 {
                            flags |= lb_common::SVC_F_NO_LOCAL_ENDPOINT;
                        }
                        (&l.0, l.1)
                    }
                    _ => (&cluster.0, cluster.1),
                };
                wanted_frontends.insert(*f);
                let old = self.frontends.get(f);
                let old_slots = old.map(|o| o.slots.as_slice()).unwrap_or_default();
                // Slots name their service too: a frontend that moved to another service has
                // every slot written again.
                let same_service = old.is_some_and(|o| o.svc_id == svc_id);
                for (i, &be) in slots.iter().enumerate() {
                    if !same_service || old_slots.get(i) != Some(&be) {
                        let v = Svc4Value { backend_id: be, svc_id, ..Default::default() };
                        write_slot(&mut self.dp, f, i as u16 + 1, v)?;
                        st.writes += 1;
                    }
                }
                let affinity = p.shown.affinity_timeout;
                let entry_changed = match old {
                    Some(o) => {
                        o.svc_id != svc_id || o.count != count || o.flags != flags || o.affinity != affinity
                    }
                    None => true,
                };
                if entry_changed {
                    let v =
                        Svc4Value { svc_id, count, flags, affinity_timeout: affinity, ..Default::default() };
                    write_slot(&mut self.dp, f, 0, v)?;
                    st.writes += 1;
                }
                // The new picture holds from here: what follows only removes stale slots, from
                // the last one down; each stays in the picture until its delete succeeded.
                let mut picture = slots.clone();
                picture.extend_from_slice(old_slots.get(slots.len()..).unwrap_or_default());
                let stale = old_slots.len().saturating_sub(slots.len());
                self.picture_insert(*f, FrontendState { svc_id, flags, count, affinity, slots: picture });
                for i in (slots.len()..slots.len() + stale).rev() {
                    delete_slot(&mut self.dp, f, i as u16 + 1)?;
                    if let Some(fs) = self.frontends.get_mut(f) {
                        fs.slots.pop();
                        self.picture_entries[usize::from(f.addr.is_ipv6())] -= 1;
                    }
                    st.deletes += 1;
                }
            }
        }

        // 2b. Maglev tables: one per list of selectable backends (all, and this node's where a
        // traffic policy Local applies), in slot order, swapped in whole. Written after the
        // slots; until then the datapath ignores a slot past the count.
        let mut wanted_tables: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        if self.maglev_size != 0 {
            for (p, &svc_id) in news.iter().zip(&ids) {
                let lists = [(false, true), (true, p.frontend_kinds.iter().any(|&k| p.local_only(k)))];
                for (local, wanted) in lists {
                    let names: Vec<String> =
                        p.selectable_where(local).map(|b| format!("{}:{}", b.addr, b.port)).collect();
                    if wanted && !names.is_empty() {
                        wanted_tables.insert(lb_common::maglev_key(svc_id, local), names);
                    }
                }
            }
        }
        for (k, names) in &wanted_tables {
            if self.maglev.get(k) != Some(&Some(names.clone())) {
                self.dp.write_maglev(*k, &crate::reconcile::maglev::table(names, self.maglev_size))?;
                self.maglev.insert(*k, Some(names.clone()));
                st.writes += 1;
            }
        }
        // The tables that may be stale: any (full pass), else those of the changed ports.
        let maybe_stale: Vec<u32> = if full {
            self.maglev.keys().copied().collect()
        } else {
            let changed = ids.iter().copied().chain(old_ids.iter().flatten().copied());
            changed
                .flat_map(|id| [lb_common::maglev_key(id, false), lb_common::maglev_key(id, true)])
                .filter(|k| self.maglev.contains_key(k))
                .collect()
        };
        for k in maybe_stale.into_iter().filter(|k| !wanted_tables.contains_key(k)) {
            if self.maglev.contains_key(&k) {
                self.dp.delete_maglev(k)?;
                self.maglev.remove(&k);
                st.deletes += 1;
            }
        }

        // 3. Frontends no longer wanted: any the target does not name (full pass), else those of
        // the changed ports' old versions.
        let gone: Vec<Frontend> = if full {
            self.frontends.keys().filter(|f| !wanted_frontends.contains(f)).copied().collect()
        } else {
            olds.iter()
                .flat_map(|p| p.frontends.iter())
                .filter(|f| !wanted_frontends.contains(f) && self.frontends.contains_key(f))
                .copied()
                .collect()
        };
        for f in gone {
            let Some(old) = self.frontends.get(&f).cloned() else { continue }; // twice in `olds`
            delete_slot(&mut self.dp, &f, 0)?;
            st.deletes += 1;
            for i in 0..old.slots.len() {
                delete_slot(&mut self.dp, &f, i as u16 + 1)?;
                st.deletes += 1;
            }
            self.picture_remove(&f);
        }
        for p in olds {
            for f in &p.frontends {
                self.filter_release(self.bit_of(f.addr, f.port, f.proto));
            }
        }

        // 4. Names, then ids of ports that are gone.
        for (p, &id) in news.iter().zip(&ids) {
            let info = svc_info(p);
            if self.infos.get(&id) != Some(&info_hash(&info)) {
                self.dp.write_svc_info(id, info)?;
                self.infos.insert(id, info_hash(&info));
                st.writes += 1;
            }
        }
        let dead: Vec<(PortRef, u32)> = if full {
            let live: HashSet<u32> = ids.iter().copied().collect();
            self.port_ids
                .iter()
                .filter(|(_, id)| !live.contains(id))
                .map(|(r, id)| (r.clone(), *id))
                .collect()
        } else {
            olds.iter()
                .zip(&old_ids)
                .filter(|(p, _)| !self.target.contains_key(&p.id))
                .filter_map(|(p, id)| Some((p.id.clone(), (*id)?)))
                .collect()
        };
        // Source ranges of the changed ports that are no longer wanted (their frontends no
        // longer check them), found before the ids of dead ports go.
        let stale_ranges: Vec<(u32, crate::model::Cidr)> = if full {
            self.ranges.difference(&wanted_ranges).copied().collect()
        } else {
            olds.iter()
                .zip(&old_ids)
                .filter_map(|(p, id)| Some((p, (*id)?)))
                .flat_map(|(p, id)| p.source_ranges.iter().map(move |c| (id, *c)))
                .filter(|r| !wanted_ranges.contains(r) && self.ranges.contains(r))
                .collect()
        };
        for (r, id) in dead {
            if self.infos.contains_key(&id) {
                self.dp.delete_svc_info(id)?;
                self.infos.remove(&id);
                st.deletes += 1;
            }
            self.port_ids.remove(&r);
            self.svc_ids.release(id);
        }
        for r in stale_ranges {
            if self.ranges.contains(&r) {
                self.dp.delete_source_range(r.0, r.1)?;
                self.ranges.remove(&r);
                st.deletes += 1;
            }
        }

        // 5. Backends no longer referenced: freed last.
        let dead: Vec<BackendKey> = if full {
            self.backend_refs.iter().filter(|(_, r)| r.id != 0 && r.total() == 0).map(|(k, _)| *k).collect()
        } else {
            // Each held its filter bit while named; one named again (by another port, or by the
            // new version of its own) took a hold again above.
            for k in &unnamed {
                self.backend_release(k);
            }
            unnamed.into_iter().filter(|k| !self.named(k)).collect()
        };
        for k in dead {
            let Some(id) = self.backend_refs.get(&k).map(|r| r.id).filter(|&id| id != 0) else { continue };
            match k.addr {
                IpAddr::V4(_) => {
                    self.dp.write_backend(id, Backend4::default())?;
                    self.backend_values.remove(id);
                    self.be_ids.release(id);
                }
                IpAddr::V6(_) => {
                    self.dp.write_backend6(id, Backend6::default())?;
                    self.backend_values6.remove(id);
                    self.be_ids6.release(id);
                }
            }
            self.freed.push((k.addr, k.port, k.proto.number()));
            st.writes += 1;
            if !self.filter.is_empty() && !self.filter_grace.is_zero() {
                self.lingering.push_back((now + self.filter_grace, k));
                self.backend_hold(&k);
            }
            self.backend_refs.remove(&k); // no port names it
        }
        while let Some((until, k)) = self.lingering.front().copied() {
            if until > now {
                break;
            }
            self.lingering.pop_front();
            self.backend_release(&k);
        }

        // 6. Filter bits of what is gone.
        self.flush_filter(false, &mut st)?;
        Ok(st)
    }

    /// Writes words of the endpoint filter (one write, whatever their number).
    fn write_filter(&mut self, words: &[(u32, u64)], st: &mut ApplyStats) -> Result<(), ReconcileError> {
        if words.is_empty() {
            return Ok(());
        }
        self.dp.write_filter(words)?;
        for &(i, w) in words {
            self.filter[i as usize] = w;
        }
        st.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::MemDatapath,
        model::{DesiredBackend, SvcType},
    };

    #[test]
    fn a_word_set_gives_its_words_once_each_in_order() {
        let mut w = WordSet::default();
        for n in [700, 3, 64, 3, 63, 130_000, 0] {
            w.insert(n);
        }
        assert_eq!(w.iter().collect::<Vec<_>>(), [0, 3, 63, 64, 700, 130_000]);
        w.clear();
        assert_eq!(w.iter().count(), 0);
        w.insert(5);
        assert_eq!(w.iter().collect::<Vec<_>>(), [5]);
    }

    /// Checks, after every single write, what a packet could observe: every service entry's
    /// count is covered by written slots, every slot names a live backend, and the endpoint
    /// filter has the bit of every frontend and of every backend a slot names.
    struct Checked(MemDatapath);

    /// A datapath with an endpoint filter, for [`Checked`].
    fn filtered() -> MemDatapath {
        MemDatapath { filter: vec![0; lb_common::FILTER_WORDS as usize], ..MemDatapath::default() }
    }

    impl Checked {
        fn filter_has(&self, addr: [u8; 4], port: u16, proto: u8) -> bool {
            self.bit_set(lb_common::filter_bit(addr, port, proto))
        }

        fn bit_set(&self, bit: u32) -> bool {
            self.0.filter[(bit >> 6) as usize] >> (bit & 63) & 1 == 1
        }

        fn filter_has6(&self, addr: [u8; 16], port: u16, proto: u8) -> bool {
            let bit = lb_common::filter_bit6(addr, port, proto);
            self.0.filter[(bit >> 6) as usize] >> (bit & 63) & 1 == 1
        }

        fn check(&self) {
            self.check6();
            for (k, v) in &self.0.services {
                if k.slot == 0 {
                    assert!(self.filter_has(k.addr, k.port, k.proto), "frontend {k:?} not in the filter");
                } else if let Some(be) = self.0.backends.get(&v.backend_id)
                    && be.state != lb_common::BACKEND_STATE_FREE
                {
                    assert!(self.filter_has(be.addr, be.port, k.proto), "backend {be:?} not in the filter");
                    let own = lb_common::filter_bit_backend(be.addr, be.port, k.proto);
                    assert!(self.bit_set(own), "backend {be:?}'s own bit not in the filter");
                }
            }
            for (k, v) in &self.0.services {
                if k.slot != 0 {
                    continue;
                }
                for s in 1..=v.count {
                    let sk = Svc4Key { slot: s, ..*k };
                    let slot = self.0.services.get(&sk).unwrap_or_else(|| {
                        panic!("count {} but slot {s} missing: {:?}", v.count, self.0.log)
                    });
                    let be = self
                        .0
                        .backends
                        .get(&slot.backend_id)
                        .unwrap_or_else(|| panic!("slot {s} names freed backend {}", slot.backend_id));
                    assert_ne!(be.state, lb_common::BACKEND_STATE_FREE);
                }
            }
        }
    }

    impl Checked {
        /// [`Self::check`]'s rules for the IPv6 maps.
        fn check6(&self) {
            for (k, v) in &self.0.services6 {
                if k.slot == 0 {
                    assert!(self.filter_has6(k.addr, k.port, k.proto), "frontend {k:?} not in the filter");
                    for s in 1..=v.count {
                        let slot =
                            self.0.services6.get(&lb_common::Svc6Key { slot: s, ..*k }).unwrap_or_else(
                                || panic!("count {} but slot {s} missing: {:?}", v.count, self.0.log),
                            );
                        let be = self.0.backends6.get(&slot.backend_id);
                        assert!(
                            be.is_some_and(|b| b.state != lb_common::BACKEND_STATE_FREE),
                            "slot {s} names freed backend {}",
                            slot.backend_id
                        );
                    }
                } else if let Some(be) = self.0.backends6.get(&v.backend_id)
                    && be.state != lb_common::BACKEND_STATE_FREE
                {
                    assert!(self.filter_has6(be.addr, be.port, k.proto), "backend {be:?} not in the filter");
                    let own = lb_common::filter_bit_backend6(be.addr, be.port, k.proto);
                    assert!(self.bit_set(own), "backend {be:?}'s own bit not in the filter");
                }
            }
        }
    }

    impl Datapath for Checked {
        fn capacity(&self) -> crate::datapath::Capacity {
            self.0.capacity()
        }
        fn read_maglev_keys(&self) -> Result<Vec<u32>, DatapathError> {
            self.0.read_maglev_keys()
        }
        fn write_maglev(&mut self, key: u32, table: &[u16]) -> Result<(), DatapathError> {
            self.0.write_maglev(key, table)
        }
        fn delete_maglev(&mut self, key: u32) -> Result<(), DatapathError> {
            self.0.delete_maglev(key)
        }
        fn reset_backend_flows6(&mut self, id: u32) -> Result<(), DatapathError> {
            self.0.reset_backend_flows6(id)
        }
        fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError> {
            self.0.read_services()
        }
        fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError> {
            self.0.read_backend(id)
        }
        fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError> {
            self.0.read_svc_infos()
        }
        fn write_backend(&mut self, id: u32, v: Backend4) -> Result<(), DatapathError> {
            self.0.write_backend(id, v)?;
            self.check();
            Ok(())
        }
        fn write_service(&mut self, k: Svc4Key, v: Svc4Value) -> Result<(), DatapathError> {
            self.0.write_service(k, v)?;
            self.check();
            Ok(())
        }
        fn delete_service(&mut self, k: Svc4Key) -> Result<(), DatapathError> {
            self.0.delete_service(k)?;
            self.check();
            Ok(())
        }
        fn write_svc_info(&mut self, id: u32, i: SvcInfo) -> Result<(), DatapathError> {
            self.0.write_svc_info(id, i)
        }
        fn read_filter(&self) -> Result<Vec<u64>, DatapathError> {
            self.0.read_filter()
        }
        fn write_filter(&mut self, words: &[(u32, u64)]) -> Result<(), DatapathError> {
            self.0.write_filter(words)?;
            self.check();
            Ok(())
        }
        fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError> {
            self.0.delete_svc_info(id)
        }
        fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError> {
            self.0.reset_backend_flows(id)
        }
        fn read_source_ranges(&self) -> Result<Vec<(u32, crate::model::Cidr)>, DatapathError> {
            self.0.read_source_ranges()
        }
        fn write_source_range(&mut self, svc_id: u32, r: crate::model::Cidr) -> Result<(), DatapathError> {
            self.0.write_source_range(svc_id, r)
        }
        fn delete_source_range(&mut self, svc_id: u32, r: crate::model::Cidr) -> Result<(), DatapathError> {
            self.0.delete_source_range(svc_id, r)
        }
        fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError> {
            self.0.read_backend_flows(id)
        }
        fn read_ct(&self) -> Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>, DatapathError> {
            self.0.read_ct()
        }
        fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
            self.0.read_stats()
        }
        fn read_services6(&self) -> Result<Vec<(lb_common::Svc6Key, Svc4Value)>, DatapathError> {
            self.0.read_services6()
        }
        fn read_backend6(&self, id: u32) -> Result<lb_common::Backend6, DatapathError> {
            self.0.read_backend6(id)
        }
        fn write_service6(&mut self, k: lb_common::Svc6Key, v: Svc4Value) -> Result<(), DatapathError> {
            self.0.write_service6(k, v)?;
            self.check();
            Ok(())
        }
        fn delete_service6(&mut self, k: lb_common::Svc6Key) -> Result<(), DatapathError> {
            self.0.delete_service6(k)?;
            self.check();
            Ok(())
        }
        fn write_backend6(&mut self, id: u32, v: lb_common::Backend6) -> Result<(), DatapathError> {
            self.0.write_backend6(id, v)?;
            self.check();
            Ok(())
        }
    }

    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn port(name: &str, vip: u8, backends: &[(u8, BackendState)]) -> DesiredPort {
        DesiredPort {
            id: PortRef {
                namespace: "default".into(),
                name: name.into(),
                port_name: String::new(),
                proto: Proto::Tcp,
                family: Family::V4,
            },
            svc_type: SvcType::ClusterIP,
            node_port: None,
            port: 80,
            frontends: vec![Frontend {
                addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, vip)),
                port: 80,
                proto: Proto::Tcp,
            }],
            frontend_kinds: vec![lb_common::SVC_F_CLUSTER_IP],
            backends: backends
                .iter()
                .map(|&(b, state)| DesiredBackend {
                    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 1, b)),
                    port: 8080,
                    state,
                    local: false,
                    topo: true,
                })
                .collect(),
            shown: Default::default(),
            source_ranges: Vec::new(),
        }
    }

    /// What the datapath means, independent of ids: frontend -> (service name, backend addresses).
    /// Frontend (address, port) -> (service name, sorted (backend address, state)).
    type Meaning = BTreeMap<(IpAddr, u16), (String, Vec<(IpAddr, u8)>)>;

    fn meaning(dp: &MemDatapath) -> Meaning {
        let mut out = BTreeMap::new();
        for (k, v) in &dp.services {
            if k.slot != 0 {
                continue;
            }
            let name = unfixed(&dp.svc_info[&v.svc_id].name);
            let mut bes: Vec<(IpAddr, u8)> = (1..)
                .map_while(|s| dp.services.get(&Svc4Key { slot: s, ..*k }).map(|_| s))
                .map(|s| {
                    let b = dp.backends[&dp.services[&Svc4Key { slot: s, ..*k }].backend_id];
                    (Ipv4Addr::from(b.addr).into(), b.state)
                })
                .collect();
            bes.sort();
            out.insert((Ipv4Addr::from(k.addr).into(), k.port), (name, bes));
        }
        for (k, v) in dp.services6.iter().filter(|(k, _)| k.slot == 0) {
            let name = unfixed(&dp.svc_info[&v.svc_id].name);
            let mut bes: Vec<(IpAddr, u8)> = (1..)
                .map_while(|s| dp.services6.get(&lb_common::Svc6Key { slot: s, ..*k }))
                .map(|slot| {
                    let b = dp.backends6[&slot.backend_id];
                    (std::net::Ipv6Addr::from(b.addr).into(), b.state)
                })
                .collect();
            bes.sort();
            out.insert((std::net::Ipv6Addr::from(k.addr).into(), k.port), (name, bes));
        }
        out
    }

    /// As [`port`], over IPv6, backends in any state: frontend [2001:db8::VIP]:80, backends
    /// 2001:db8:1::B.
    fn port6_states(name: &str, vip: u8, backends: &[(u8, BackendState)]) -> DesiredPort {
        let mut p = port(name, vip, backends);
        p.id.family = Family::V6;
        p.frontends[0].addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(vip)).into();
        for b in &mut p.backends {
            let IpAddr::V4(a) = b.addr else { unreachable!() };
            b.addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(a.octets()[3])).into();
        }
        p
    }

    #[test]
    fn source_ranges_are_written_before_the_frontend_and_removed_after() {
        let c = |s: &str| s.parse::<crate::model::Cidr>().unwrap();
        let mut p = port("lb", 10, &[(1, BackendState::Active)]);
        p.frontend_kinds = vec![lb_common::SVC_F_LB_INGRESS | lb_common::SVC_F_SOURCE_RANGES];
        p.source_ranges = vec![c("198.18.100.0/24")];
        let mut r = Reconciler::new(MemDatapath::default()).unwrap();
        r.apply(&[p.clone()]).unwrap();
        let log = &r.datapath().log;
        let range = log.iter().position(|l| l.starts_with("source range")).unwrap();
        let entry = log.iter().position(|l| l.contains("slot 0")).unwrap();
        assert!(range < entry, "{log:?}");
        // A restart reads them back and writes nothing.
        let mut again = Reconciler::new(r.datapath().clone()).unwrap();
        assert_eq!(again.apply(&[p.clone()]).unwrap(), ApplyStats::default());
        // Dropped from the Service: the frontend stops checking first, then the entry goes.
        p.source_ranges.clear();
        p.frontend_kinds = vec![lb_common::SVC_F_LB_INGRESS];
        let mut r = again;
        r.datapath_mut().log.clear();
        r.apply(&[p]).unwrap();
        let log = &r.datapath().log;
        let entry = log.iter().position(|l| l.contains("slot 0")).unwrap();
        let gone = log.iter().position(|l| l.starts_with("delete source range")).unwrap();
        assert!(entry < gone, "{log:?}");
        assert!(r.datapath().source_ranges.is_empty());
    }

    #[test]
    fn second_apply_writes_nothing_and_restart_keeps_ids() {
        let desired = vec![
            port("a", 10, &[(1, BackendState::Active), (2, BackendState::Active)]),
            port("b", 11, &[(2, BackendState::Active)]),
        ];
        let mut r = Reconciler::new(MemDatapath::default()).unwrap();
        let st = r.apply(&desired).unwrap();
        assert!(st.writes > 0);
        assert_eq!(r.apply(&desired).unwrap(), ApplyStats::default(), "nothing changed, nothing written");
        assert_eq!(r.datapath().backends.len(), 2, "one backend shared by two services has one id");

        // A new agent over the same maps: same ids, nothing rewritten.
        let before = r.datapath().clone();
        let mut r2 = Reconciler::new(before.clone()).unwrap();
        assert_eq!(r2.apply(&desired).unwrap(), ApplyStats::default());
        assert_eq!(r2.datapath().services, before.services);
        assert_eq!(r2.port_id(&desired[0].id), r.port_id(&desired[0].id));
    }

    /// A datapath that holds writes back (as `BpfMaps` batches them) and, when told to, loses
    /// the service-map writes it held and reports it only at the flush, as a failed batch does.
    struct Lossy {
        dp: MemDatapath,
        lose: bool,
        lost: bool,
    }

    impl Datapath for Lossy {
        fn flush(&mut self) -> Result<(), DatapathError> {
            if std::mem::take(&mut self.lost) {
                return Err(DatapathError::Unsupported("a batch that failed"));
            }
            Ok(())
        }
        fn defers_writes(&self) -> bool {
            true
        }
        fn write_service(&mut self, k: Svc4Key, v: Svc4Value) -> Result<(), DatapathError> {
            if self.lose {
                self.lost = true;
                return Ok(());
            }
            self.dp.write_service(k, v)
        }
        fn capacity(&self) -> crate::datapath::Capacity {
            self.dp.capacity()
        }
        fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError> {
            self.dp.read_services()
        }
        fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError> {
            self.dp.read_backend(id)
        }
        fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError> {
            self.dp.read_svc_infos()
        }
        fn write_backend(&mut self, id: u32, v: Backend4) -> Result<(), DatapathError> {
            self.dp.write_backend(id, v)
        }
        fn delete_service(&mut self, k: Svc4Key) -> Result<(), DatapathError> {
            self.dp.delete_service(k)
        }
        fn write_svc_info(&mut self, id: u32, i: SvcInfo) -> Result<(), DatapathError> {
            self.dp.write_svc_info(id, i)
        }
        fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError> {
            self.dp.delete_svc_info(id)
        }
        fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError> {
            self.dp.reset_backend_flows(id)
        }
        fn read_source_ranges(&self) -> Result<Vec<(u32, crate::model::Cidr)>, DatapathError> {
            self.dp.read_source_ranges()
        }
        fn write_source_range(&mut self, svc_id: u32, r: crate::model::Cidr) -> Result<(), DatapathError> {
            self.dp.write_source_range(svc_id, r)
        }
        fn delete_source_range(&mut self, svc_id: u32, r: crate::model::Cidr) -> Result<(), DatapathError> {
            self.dp.delete_source_range(svc_id, r)
        }
        fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError> {
            self.dp.read_backend_flows(id)
        }
        fn read_ct(&self) -> Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>, DatapathError> {
            self.dp.read_ct()
        }
        fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
            self.dp.read_stats()
        }
    }

    /// Writes a datapath held back and lost, reported by the flush: the picture of the maps is
    /// ahead of them, so they are read back and the next apply writes what is missing.
    #[test]
    fn writes_lost_by_a_failed_batch_are_written_again_by_the_next_apply() {
        let desired = vec![
            port("a", 10, &[(1, BackendState::Active), (2, BackendState::Active)]),
            port("b", 11, &[(3, BackendState::Active)]),
        ];
        let mut r = Reconciler::new(Lossy { dp: MemDatapath::default(), lose: true, lost: false }).unwrap();
        assert!(r.apply(&desired).is_err(), "the flush reports the lost writes");
        r.datapath_mut().lose = false;
        r.apply(&desired).unwrap();
        let mut fresh = Reconciler::new(MemDatapath::default()).unwrap();
        fresh.apply(&desired).unwrap();
        assert_eq!(r.datapath().dp.contents(), fresh.datapath().contents());
    }

    /// `port` in IPv6: frontend 2001:db8:1::`vip`, backends 2001:db8:2::`b`.
    fn port6(name: &str, vip: u8, backends: &[u8]) -> DesiredPort {
        let mut p = port(name, vip, &[]);
        p.id.family = Family::V6;
        p.frontends = vec![Frontend {
            addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(vip))),
            port: 80,
            proto: Proto::Tcp,
        }];
        p.backends = backends
            .iter()
            .map(|&b| crate::model::DesiredBackend {
                addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, u16::from(b))),
                port: 8080,
                state: BackendState::Active,
                local: false,
                topo: true,
            })
            .collect();
        p
    }

    #[test]
    fn ipv6_ports_go_to_the_ipv6_maps_with_ids_of_their_own_and_survive_a_restart() {
        let mut dual4 = port("dual", 10, &[(1, BackendState::Active)]);
        dual4.id.port_name = "http".into();
        let mut dual6 = port6("dual", 10, &[1, 2]);
        dual6.id.port_name = "http".into();
        let desired = vec![dual4.clone(), dual6.clone()];
        let mut r = Reconciler::new(MemDatapath::default()).unwrap();
        r.apply(&desired).unwrap();
        let dp = r.datapath();
        assert_eq!((dp.services.len(), dp.backends.len()), (2, 1), "IPv4: entry + 1 slot, 1 backend");
        assert_eq!((dp.services6.len(), dp.backends6.len()), (3, 2), "IPv6: entry + 2 slots, 2 backends");
        assert_ne!(r.port_id(&dual4.id), r.port_id(&dual6.id), "a service id per family");
        // The IPv6 ids start at 1 like the IPv4 ones: separate spaces.
        assert_eq!(dp.backends6.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert!(r.usage().contains(&(lb_common::MAP_SERVICES6, 3, u64::from(dp.capacity().ipv6_entries))));

        // A new agent over the same maps: the same ids (the family read from the frontends),
        // nothing rewritten.
        let before = r.datapath().clone();
        let mut r2 = Reconciler::new(before.clone()).unwrap();
        assert_eq!(r2.apply(&desired).unwrap(), ApplyStats::default());
        assert_eq!(r2.port_id(&dual6.id), r.port_id(&dual6.id));
        assert_eq!(r2.datapath().services6, before.services6);

        // The IPv6 family goes: its entries and backends are removed, the IPv4 ones stay.
        r2.apply(&[dual4]).unwrap();
        let dp = r2.datapath();
        assert!(dp.services6.is_empty() && dp.backends6.is_empty(), "{:?}", dp.services6);
        assert_eq!((dp.services.len(), dp.backends.len()), (2, 1));
        // Socket termination is told of the IPv6 backends freed, and only of those.
        let mut freed: Vec<String> = r2.take_freed().iter().map(|(a, p, _)| format!("[{a}]:{p}")).collect();
        freed.sort();
        assert_eq!(freed, ["[2001:db8:2::1]:8080", "[2001:db8:2::2]:8080"]);
    }

    #[test]
    fn a_removed_backend_keeps_its_filter_bit_for_the_grace_period() {
        let has = |dp: &MemDatapath, last: u8| {
            let bit = lb_common::filter_bit([198, 18, 1, last], 8080, Proto::Tcp.number());
            dp.filter[(bit >> 6) as usize] >> (bit & 63) & 1 == 1
        };
        let both = [port("a", 10, &[(1, BackendState::Active), (2, BackendState::Active)])];
        let one = [port("a", 10, &[(1, BackendState::Active)])];
        let mut r = Reconciler::new(filtered()).unwrap();
        r.apply(&both).unwrap();
        assert!(has(r.datapath(), 1) && has(r.datapath(), 2));
        // Removed: its replies in flight are still recognised for FILTER_GRACE.
        r.apply(&one).unwrap();
        assert!(has(r.datapath(), 1) && has(r.datapath(), 2), "backend 2 lost its bit at once");
        assert!(
            r.datapath().backends.values().filter(|b| b.state != lb_common::BACKEND_STATE_FREE).count() == 1
        );
        // Once the grace period is over, the next apply clears it.
        r.set_filter_grace(std::time::Duration::ZERO);
        r.lingering.iter_mut().for_each(|(until, _)| *until = std::time::Instant::now());
        r.apply(&one).unwrap();
        assert!(has(r.datapath(), 1) && !has(r.datapath(), 2), "backend 2 kept its bit");
    }

    #[test]
    fn write_order_never_exposes_a_half_written_service() {
        let mut r = Reconciler::new(Checked(filtered())).unwrap();
        let a5: Vec<_> = (1..=5).map(|b| (b, BackendState::Active)).collect();
        r.apply(&[port("a", 10, &a5)]).unwrap();
        r.apply(&[port("a", 10, &a5[..1])]).unwrap(); // scale down: entry before stale slots
        r.apply(&[port("a", 10, &[(9, BackendState::Active)])]).unwrap(); // replace the only backend
        r.apply::<DesiredPort>(&[]).unwrap(); // delete: entry first, then slots, then backends
        assert!(
            r.datapath().0.services.is_empty()
                && r.datapath().0.backends.is_empty()
                && r.datapath().0.svc_info.is_empty()
        );
        let log = &r.datapath().0.log;
        let entry = log.iter().position(|l| l.starts_with("delete") && l.ends_with("slot 0")).unwrap();
        let freed = log.iter().rposition(|l| l.ends_with("state=0")).unwrap();
        assert!(entry < freed, "backends are freed after the service stops naming them: {log:?}");
    }

    #[test]
    fn random_changes_converge_and_stay_consistent() {
        let mut rng = Lcg(42);
        let mut r = Reconciler::new(Checked(filtered())).unwrap();
        r.set_filter_grace(std::time::Duration::ZERO);
        for round in 0..300 {
            let mut desired = Vec::new();
            for s in 0..rng.below(6) {
                let mut bes = Vec::new();
                for b in 0..8u8 {
                    match rng.below(4) {
                        0 | 1 => bes.push((b + 1, BackendState::Active)),
                        2 => bes.push((b + 1, BackendState::Terminating)),
                        _ => {}
                    }
                }
                desired.push(port(&format!("svc{s}"), 10 + s as u8, &bes));
                // About half the Services are dual-stack: the IPv6 maps, ids of their own.
                if rng.below(2) == 0 {
                    let bes6: Vec<_> = bes.iter().copied().filter(|_| rng.below(4) != 0).collect();
                    desired.push(port6_states(&format!("svc{s}"), 10 + s as u8, &bes6));
                }
            }
            r.apply(&desired).unwrap();
            // Compare with what a fresh reconciler writes into empty maps.
            let mut fresh = Reconciler::new(MemDatapath::default()).unwrap();
            fresh.apply(&desired).unwrap();
            assert_eq!(meaning(&r.datapath().0), meaning(fresh.datapath()), "round {round}");
            // The filter holds exactly the bits of what the maps name: removed ones are cleared.
            let mut exact = vec![0u64; lb_common::FILTER_WORDS as usize];
            let dp = &r.datapath().0;
            for (k, v) in &dp.services {
                let (addr, port) = match k.slot {
                    0 => (k.addr, k.port),
                    _ => (dp.backends[&v.backend_id].addr, dp.backends[&v.backend_id].port),
                };
                let bit = lb_common::filter_bit(addr, port, k.proto);
                exact[(bit >> 6) as usize] |= 1 << (bit & 63);
                if k.slot != 0 {
                    let own = lb_common::filter_bit_backend(addr, port, k.proto);
                    exact[(own >> 6) as usize] |= 1 << (own & 63);
                }
            }
            for (k, v) in &dp.services6 {
                let (addr, port) = match k.slot {
                    0 => (k.addr, k.port),
                    _ => (dp.backends6[&v.backend_id].addr, dp.backends6[&v.backend_id].port),
                };
                let bit = lb_common::filter_bit6(addr, port, k.proto);
                exact[(bit >> 6) as usize] |= 1 << (bit & 63);
                if k.slot != 0 {
                    let own = lb_common::filter_bit_backend6(addr, port, k.proto);
                    exact[(own >> 6) as usize] |= 1 << (own & 63);
                }
            }
            assert!(dp.filter == exact, "round {round}: the filter differs from the maps' entries");
            // And ids stay bounded: freed ids are reused.
            assert!(r.datapath().0.backends.keys().all(|&id| id <= 8), "round {round}");
            assert!(r.datapath().0.backends6.keys().all(|&id| id <= 8), "round {round}");
            // Occasionally restart the agent on the same maps.
            if rng.below(10) == 0 {
                let dp = Checked(r.datapath().0.clone());
                r = Reconciler::new(dp).unwrap();
                r.set_filter_grace(std::time::Duration::ZERO);
                assert_eq!(
                    r.apply(&desired).unwrap(),
                    ApplyStats::default(),
                    "round {round}: restart rewrote"
                );
            }
        }
    }

    #[test]
    fn a_full_service_map_is_refused_before_any_write_and_the_error_names_the_flag() {
        let cap = crate::datapath::Capacity { service_entries: 10, backends: 64, ipv6_entries: 64 };
        let mut r = Reconciler::new(MemDatapath::with_capacity(cap)).unwrap();
        let three: Vec<_> = (1..=3).map(|b| (b, BackendState::Active)).collect();
        r.apply(&[port("a", 10, &three)]).unwrap();
        let before = meaning(r.datapath());
        // Two more ports of four entries each: 12 entries, the map holds 10.
        let err =
            r.apply(&[port("a", 10, &three), port("b", 11, &three), port("c", 12, &three)]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("room for 10 entries; the services need 12 (raise --max-service-entries)"),
            "{text}"
        );
        assert_eq!(meaning(r.datapath()), before, "nothing written: never a partial datapath");
    }

    #[test]
    fn a_failed_write_is_reported_and_the_next_apply_finishes() {
        let cap = crate::datapath::Capacity { service_entries: 1024, backends: 4, ipv6_entries: 64 };
        let mut r = Reconciler::new(MemDatapath::with_capacity(cap)).unwrap();
        // Backend ids 1..=3 exist; five backends cannot fit.
        let too_many: Vec<_> = (1..=5).map(|b| (b, BackendState::Active)).collect();
        let err = r.apply(&[port("a", 10, &too_many)]).unwrap_err();
        assert!(matches!(err, ReconcileError::IdsExhausted { what: "backend", capacity: 4 }), "{err}");
        assert!(err.to_string().ends_with("(raise --max-backends)"), "the error names the flag: {err}");
        // A desired state that fits then applies cleanly, from the re-read picture.
        let ok: Vec<_> = (1..=3).map(|b| (b, BackendState::Active)).collect();
        r.apply(&[port("a", 10, &ok)]).unwrap();
        assert_eq!(meaning(r.datapath()).values().next().unwrap().1.len(), 3);
    }

    #[test]
    fn random_changes_converge_through_injected_faults() {
        use crate::datapath::FaultyDatapath;
        let mut rng = Lcg(7);
        // 3% of writes and 1% of reads fail; every single write is still checked for a
        // half-written service.
        let dp = FaultyDatapath::new(Checked(filtered()), 99, 30, 10);
        let mut r = Reconciler::new(dp).unwrap();
        let (mut failures, mut retries_max) = (0, 0);
        for round in 0..300 {
            let mut desired = Vec::new();
            for s in 0..rng.below(6) {
                let bes: Vec<_> = (0..8u8)
                    .filter_map(|b| match rng.below(4) {
                        0 | 1 => Some((b + 1, BackendState::Active)),
                        2 => Some((b + 1, BackendState::Terminating)),
                        _ => None,
                    })
                    .collect();
                desired.push(port(&format!("svc{s}"), 10 + s as u8, &bes));
            }
            let mut tries = 0;
            loop {
                tries += 1;
                match r.apply(&desired) {
                    Ok(_) => break,
                    Err(e) => {
                        failures += 1;
                        assert!(e.to_string().contains("injected fault"), "round {round}: {e}");
                        assert!(tries < 50, "round {round}: no convergence after {tries} tries");
                    }
                }
            }
            retries_max = retries_max.max(tries);
            let mut fresh = Reconciler::new(MemDatapath::default()).unwrap();
            fresh.apply(&desired).unwrap();
            let (got, want) = (&r.datapath().inner.0, fresh.datapath());
            assert_eq!(meaning(got), meaning(want), "round {round}");
            // Nothing leaked: no stale slot, backend or name is left behind by a failed write.
            assert_eq!(got.services.len(), want.services.len(), "round {round}: service entries");
            assert_eq!(got.backends.len(), want.backends.len(), "round {round}: backends");
            assert_eq!(got.svc_info.len(), want.svc_info.len(), "round {round}: names");
            // And an agent restarted on these maps finds nothing to do.
            let mut again = Reconciler::new(got.clone()).unwrap();
            assert_eq!(again.apply(&desired).unwrap(), ApplyStats::default(), "round {round}");
        }
        assert!(failures > 20, "the faults were exercised ({failures} failed applies)");
        assert!(r.datapath().injected > 20);
        eprintln!("{failures} failed applies, at most {retries_max} tries for one state");
    }

    /// A random version of service `s` (0..8): one to three frontends from a small shared set
    /// (so that a frontend moves between services), backends from a shared pool (so that a
    /// backend is named by several), traffic policy Local, source ranges, both families.
    fn random_port(rng: &mut Lcg, s: u8, v6: bool) -> DesiredPort {
        let bes: Vec<_> = (0..8u8)
            .filter_map(|b| match rng.below(5) {
                0 | 1 => Some((b + 1, BackendState::Active)),
                2 => Some((b + 1, BackendState::Terminating)),
                3 => Some((b + 1, BackendState::Draining)),
                _ => None,
            })
            .collect();
        let mut p = if v6 {
            port6_states(&format!("svc{s}"), 10 + s, &bes)
        } else {
            port(&format!("svc{s}"), 10 + s, &bes)
        };
        for b in &mut p.backends {
            b.local = rng.below(2) == 0;
            // Cluster-wide traffic restricted by topology hints to some of them.
            b.topo = rng.below(4) != 0;
        }
        // Extra frontends: node ports on one of two addresses, shared by every service (the
        // model gives each to one service: here a frontend is given to the lowest service
        // that asks for it, by the caller).
        for extra in 0..2u8 {
            if rng.below(3) == 0 {
                let addr = match p.frontends[0].addr {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1 + extra)),
                    IpAddr::V6(_) => {
                        std::net::Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1 + u16::from(extra)).into()
                    }
                };
                p.frontends.push(Frontend {
                    addr,
                    port: 30000 + u16::from(rng.below(3) as u8),
                    proto: Proto::Tcp,
                });
                p.frontend_kinds.push(lb_common::SVC_F_NODE_PORT | lb_common::SVC_F_LOCAL);
            }
        }
        if rng.below(3) == 0 {
            p.shown.external_policy = crate::model::Policy::Local;
        }
        if rng.below(4) == 0 {
            p.shown.affinity_timeout = 10800;
        }
        if rng.below(4) == 0 && !v6 {
            p.source_ranges = vec![format!("198.18.{}.0/24", rng.below(3)).parse().unwrap()];
        }
        p
    }

    /// Frontends are unique in a target (the model sees to it): each goes to the first port
    /// that has it.
    fn unique_frontends(ports: &mut [DesiredPort]) {
        let mut seen = BTreeSet::new();
        for p in ports {
            retain_kinds(p, |f| seen.insert(*f));
        }
    }

    fn retain_kinds(p: &mut DesiredPort, mut keep: impl FnMut(&Frontend) -> bool) {
        let (f, k) =
            p.frontends.iter().zip(&p.frontend_kinds).filter(|(f, _)| keep(f)).map(|(f, k)| (*f, *k)).unzip();
        p.frontends = f;
        p.frontend_kinds = k;
    }

    #[test]
    fn changes_applied_one_port_at_a_time_leave_the_maps_as_a_full_apply_does() {
        use crate::datapath::FaultyDatapath;
        for (seed, faults) in [(1, false), (2, false), (3, true), (4, true)] {
            let mut rng = Lcg(seed);
            let mut dp = filtered();
            dp.log.clear();
            let dp = FaultyDatapath::new(Checked(dp), seed, if faults { 30 } else { 0 }, 0);
            let mut r = Reconciler::new(dp).unwrap();
            r.set_filter_grace(std::time::Duration::ZERO);
            if seed % 2 == 0 {
                r.set_maglev(lb_common::MAGLEV_SIZES[0]);
            }
            // The target, by (service, family).
            let mut now: BTreeMap<(u8, bool), DesiredPort> = BTreeMap::new();
            let mut prev: BTreeMap<PortRef, DesiredPort> = BTreeMap::new();
            let mut failures = 0;
            for round in 0..150 {
                // Change one to three ports: a new version, or gone.
                for _ in 0..1 + rng.below(3) {
                    let key = (rng.below(8) as u8, rng.below(3) == 0);
                    match rng.below(4) {
                        0 => {
                            now.remove(&key);
                        }
                        _ => {
                            now.insert(key, random_port(&mut rng, key.0, key.1));
                        }
                    }
                }
                let mut desired: Vec<DesiredPort> = now.values().cloned().collect();
                unique_frontends(&mut desired);
                // The model hands the reconciler the ports that differ from what it had (a
                // frontend given up by one port can go to another, unchanged, service's).
                let next: BTreeMap<PortRef, DesiredPort> =
                    desired.iter().map(|p| (p.id.clone(), p.clone())).collect();
                let mut changes: Vec<(PortRef, Option<Arc<DesiredPort>>)> = next
                    .iter()
                    .filter(|(id, p)| prev.get(*id) != Some(*p))
                    .map(|(id, p)| (id.clone(), Some(Arc::new(p.clone()))))
                    .collect();
                changes.extend(prev.keys().filter(|id| !next.contains_key(*id)).map(|id| (id.clone(), None)));
                prev = next;
                let mut tries = 0;
                while let Err(e) = r.apply_changes(changes.clone()) {
                    failures += 1;
                    tries += 1;
                    assert!(e.to_string().contains("injected fault"), "seed {seed} round {round}: {e}");
                    assert!(tries < 50, "seed {seed} round {round}: no convergence");
                }
                let mut fresh = Reconciler::new(filtered()).unwrap();
                fresh.set_filter_grace(std::time::Duration::ZERO);
                if seed % 2 == 0 {
                    fresh.set_maglev(lb_common::MAGLEV_SIZES[0]);
                }
                fresh.apply(&desired).unwrap();
                let (got, want) = (r.datapath().inner.0.contents(), fresh.datapath().contents());
                let only = |a: &[String], b: &[String]| {
                    a.iter().filter(|l| !b.contains(l)).cloned().collect::<Vec<_>>()
                };
                assert!(
                    got == want,
                    "seed {seed} round {round}: only incremental {:#?}\nonly full {:#?}",
                    only(&got, &want),
                    only(&want, &got)
                );
                // The same changes again write nothing.
                assert_eq!(
                    r.apply_changes(changes).unwrap(),
                    ApplyStats::default(),
                    "seed {seed} round {round}"
                );
            }
            assert_eq!(faults, failures > 20, "seed {seed}: {failures} failed applies");
        }
    }
}
