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
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, Backend4, SCOPE_EXTERNAL, SVC_INFO_NAME_LEN,
    SVC_INFO_PORT_NAME_LEN, Svc4Key, Svc4Value, SvcInfo,
};

use crate::{
    datapath::{Datapath, DatapathError},
    model::{BackendState, DesiredPort, Frontend, PortRef, Proto},
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("no free {what} id: all {capacity} are in use")]
    IdsExhausted { what: &'static str, capacity: u32 },
    #[error("service map has room for {capacity} entries; the services need {needed}")]
    ServicesFull { capacity: u32, needed: u64 },
}

/// A backend's identity: the same endpoint used by several services shares one id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    addr: Ipv4Addr,
    port: u16,
    proto: Proto,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FrontendState {
    svc_id: u32,
    /// Backend ids in slots 1..=len.
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
    used: BTreeSet<u32>,
    next: u32,
    free: BTreeSet<u32>,
}

impl Ids {
    fn rebuild(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(1, |m| m + 1);
        let free = (1..next).filter(|i| !used.contains(i)).collect();
        Ids { used, next, free }
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
        self.used.insert(id);
        Ok(id)
    }

    fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.free.insert(id);
        }
    }
}

pub struct Reconciler<D> {
    dp: D,
    port_ids: HashMap<PortRef, u32>,
    infos: HashMap<u32, SvcInfo>,
    svc_ids: Ids,
    frontends: BTreeMap<Frontend, FrontendState>,
    backend_ids: HashMap<BackendKey, u32>,
    backend_values: HashMap<u32, Backend4>,
    be_ids: Ids,
    /// Set when a write failed: the picture is re-read before the next apply.
    stale: bool,
}

fn key(f: &Frontend, slot: u16) -> Svc4Key {
    Svc4Key {
        addr: u32::from_ne_bytes(f.addr.octets()),
        port: f.port.to_be(),
        proto: f.proto.number(),
        scope: SCOPE_EXTERNAL,
        slot,
        _pad: 0,
    }
}

fn frontend_of(k: &Svc4Key) -> Option<Frontend> {
    Some(Frontend {
        addr: Ipv4Addr::from(k.addr.to_ne_bytes()),
        port: u16::from_be(k.port),
        proto: Proto::from_number(k.proto)?,
    })
}

fn backend_value(b: &BackendKey, state: BackendState) -> Backend4 {
    Backend4 {
        addr: u32::from_ne_bytes(b.addr.octets()),
        port: b.port.to_be(),
        state: match state {
            BackendState::Active => BACKEND_STATE_ACTIVE,
            BackendState::Terminating | BackendState::Draining => BACKEND_STATE_TERMINATING,
        },
        flags: 0,
    }
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

pub fn svc_info(p: &DesiredPort) -> SvcInfo {
    SvcInfo {
        namespace: fixed::<SVC_INFO_NAME_LEN>(&p.id.namespace),
        name: fixed::<SVC_INFO_NAME_LEN>(&p.id.name),
        port_name: fixed::<SVC_INFO_PORT_NAME_LEN>(&p.id.port_name),
        port: p.port,
        proto: p.id.proto.number(),
        svc_type: p.svc_type.code(),
        backends: p.backends.len() as u32,
    }
}

impl<D: Datapath> Reconciler<D> {
    /// Reads the datapath's current content back; nothing is written.
    pub fn new(dp: D) -> Result<Self, ReconcileError> {
        let mut r = Reconciler {
            dp,
            port_ids: HashMap::new(),
            infos: HashMap::new(),
            svc_ids: Ids::default(),
            frontends: BTreeMap::new(),
            backend_ids: HashMap::new(),
            backend_values: HashMap::new(),
            be_ids: Ids::default(),
            stale: false,
        };
        r.read_back()?;
        Ok(r)
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// The datapath id of a service port, if it has one.
    pub fn port_id(&self, id: &PortRef) -> Option<u32> {
        self.port_ids.get(id).copied()
    }

    fn read_back(&mut self) -> Result<(), ReconcileError> {
        self.port_ids.clear();
        self.infos.clear();
        self.frontends.clear();
        self.backend_ids.clear();
        self.backend_values.clear();

        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        let mut entries: BTreeMap<Frontend, u32> = BTreeMap::new();
        for (k, v) in self.dp.read_services()? {
            let Some(f) = frontend_of(&k) else { continue };
            if k.slot == 0 {
                entries.insert(f, v.svc_id);
            } else {
                slots.entry(f).or_default().insert(k.slot, v.backend_id);
            }
        }
        let mut svc_ids_used: BTreeSet<u32> = BTreeSet::new();
        for (id, info) in self.dp.read_svc_infos()? {
            let Some(proto) = Proto::from_number(info.proto) else { continue };
            let r = PortRef {
                namespace: unfixed(&info.namespace),
                name: unfixed(&info.name),
                port_name: unfixed(&info.port_name),
                proto,
            };
            self.port_ids.insert(r, id);
            self.infos.insert(id, info);
            svc_ids_used.insert(id);
        }
        // Every slot ever written, including orphans past a count, so they get cleaned up.
        for (f, s) in &slots {
            let svc_id = entries.get(f).copied().unwrap_or(0);
            let max = s.keys().last().copied().unwrap_or(0);
            let list = (1..=max).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
            self.frontends.insert(*f, FrontendState { svc_id, slots: list });
        }
        for (f, svc_id) in &entries {
            self.frontends.entry(*f).or_insert(FrontendState { svc_id: *svc_id, slots: Vec::new() });
            svc_ids_used.insert(*svc_id);
        }
        let cap = self.dp.capacity().backends;
        let mut be_used = BTreeSet::new();
        for (f, st) in &self.frontends {
            for &id in &st.slots {
                if id == 0 || id >= cap || be_used.contains(&id) {
                    continue;
                }
                let v = self.dp.read_backend(id)?;
                if v.state == lb_common::BACKEND_STATE_FREE {
                    continue;
                }
                be_used.insert(id);
                let bk = BackendKey {
                    addr: Ipv4Addr::from(v.addr.to_ne_bytes()),
                    port: u16::from_be(v.port),
                    proto: f.proto,
                };
                self.backend_ids.insert(bk, id);
                self.backend_values.insert(id, v);
            }
        }
        self.svc_ids = Ids::rebuild(svc_ids_used);
        self.be_ids = Ids::rebuild(be_used);
        self.stale = false;
        Ok(())
    }

    /// Makes the datapath hold exactly `desired`. On error the datapath may hold a mix of old and
    /// new services, each of them whole; call again to finish.
    pub fn apply(&mut self, desired: &[DesiredPort]) -> Result<ApplyStats, ReconcileError> {
        if self.stale {
            self.read_back()?;
        }
        let result = self.apply_inner(desired);
        if result.is_err() {
            self.stale = true;
        }
        result
    }

    fn apply_inner(&mut self, desired: &[DesiredPort]) -> Result<ApplyStats, ReconcileError> {
        let mut st = ApplyStats::default();
        let cap = self.dp.capacity();

        let needed: u64 = desired
            .iter()
            .map(|p| p.frontends.len() as u64 * (1 + p.selectable().count() as u64))
            .sum();
        if needed > u64::from(cap.service_entries) {
            return Err(ReconcileError::ServicesFull { capacity: cap.service_entries, needed });
        }

        // Service ids.
        let mut ids = Vec::with_capacity(desired.len());
        for p in desired {
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

        // 1. Backends.
        let mut wanted_backends: HashMap<BackendKey, BackendState> = HashMap::new();
        for p in desired {
            for b in &p.backends {
                let k = BackendKey { addr: b.addr, port: b.port, proto: p.id.proto };
                let e = wanted_backends.entry(k).or_insert(b.state);
                *e = (*e).min(b.state);
            }
        }
        let mut sorted_backends: Vec<_> = wanted_backends.iter().collect();
        sorted_backends.sort();
        for (k, state) in sorted_backends {
            let id = match self.backend_ids.get(k) {
                Some(id) => *id,
                None => {
                    let id = self.be_ids.alloc("backend", cap.backends)?;
                    self.backend_ids.insert(*k, id);
                    id
                }
            };
            let v = backend_value(k, *state);
            if self.backend_values.get(&id) != Some(&v) {
                self.dp.write_backend(id, v)?;
                self.backend_values.insert(id, v);
                st.writes += 1;
            }
        }

        // 2. Frontends: slots, then the entry, then stale slots.
        let mut wanted_frontends = BTreeSet::new();
        for (p, &svc_id) in desired.iter().zip(&ids) {
            let slots: Vec<u32> = p
                .selectable()
                .map(|b| self.backend_ids[&BackendKey { addr: b.addr, port: b.port, proto: p.id.proto }])
                .collect();
            for f in &p.frontends {
                wanted_frontends.insert(*f);
                let old = self.frontends.get(f).cloned();
                let old_slots = old.as_ref().map(|o| o.slots.as_slice()).unwrap_or_default();
                for (i, &be) in slots.iter().enumerate() {
                    if old_slots.get(i) != Some(&be) {
                        let v = Svc4Value { backend_id: be, svc_id, ..Default::default() };
                        self.dp.write_service(key(f, i as u16 + 1), v)?;
                        st.writes += 1;
                    }
                }
                let entry_changed = match &old {
                    Some(o) => o.svc_id != svc_id || o.slots.len() != slots.len(),
                    None => true,
                };
                if entry_changed {
                    let v = Svc4Value { svc_id, count: slots.len() as u16, ..Default::default() };
                    self.dp.write_service(key(f, 0), v)?;
                    st.writes += 1;
                }
                // The new picture holds from here: what follows only removes stale slots.
                self.frontends.insert(*f, FrontendState { svc_id, slots: slots.clone() });
                for i in slots.len()..old_slots.len() {
                    self.dp.delete_service(key(f, i as u16 + 1))?;
                    st.deletes += 1;
                }
            }
        }

        // 3. Frontends no longer wanted.
        let gone: Vec<Frontend> =
            self.frontends.keys().filter(|f| !wanted_frontends.contains(f)).copied().collect();
        for f in gone {
            let old = self.frontends[&f].clone();
            self.dp.delete_service(key(&f, 0))?;
            st.deletes += 1;
            for i in 0..old.slots.len() {
                self.dp.delete_service(key(&f, i as u16 + 1))?;
                st.deletes += 1;
            }
            self.frontends.remove(&f);
        }

        // 4. Names, then ids of ports that are gone.
        let mut live_ids = BTreeSet::new();
        for (p, &id) in desired.iter().zip(&ids) {
            live_ids.insert(id);
            let info = svc_info(p);
            if self.infos.get(&id) != Some(&info) {
                self.dp.write_svc_info(id, info)?;
                self.infos.insert(id, info);
                st.writes += 1;
            }
        }
        let dead: Vec<(PortRef, u32)> = self
            .port_ids
            .iter()
            .filter(|(_, id)| !live_ids.contains(id))
            .map(|(r, id)| (r.clone(), *id))
            .collect();
        for (r, id) in dead {
            if self.infos.remove(&id).is_some() {
                self.dp.delete_svc_info(id)?;
                st.deletes += 1;
            }
            self.port_ids.remove(&r);
            self.svc_ids.release(id);
        }

        // 5. Backends no longer referenced: freed last.
        let dead: Vec<(BackendKey, u32)> = self
            .backend_ids
            .iter()
            .filter(|(k, _)| !wanted_backends.contains_key(k))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (k, id) in dead {
            self.dp.write_backend(id, Backend4::default())?;
            st.writes += 1;
            self.backend_ids.remove(&k);
            self.backend_values.remove(&id);
            self.be_ids.release(id);
        }
        Ok(st)
    }
}
