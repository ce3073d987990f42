//! The model kept up to date by events: a changed Service or EndpointSlice costs the work of
//! its own Service (and of the few Services that compete with it for a frontend or a node
//! port), not a pass over the cluster.
//!
//! It gives what [`super::build`] and [`super::add_host_ports`] give from the same objects (the
//! level-triggered builder is its test oracle): the same ports and the same rejections. Two
//! Services that claim one frontend or node port are resolved as the builder resolves them, in
//! (namespace, name) order, the first one keeping it: the claims on each frontend and node port
//! are indexed, and a change of what one Service holds is carried to the later Services that
//! claim the same, in that order, until nothing changes.
//!
//! Out comes the difference: the service ports added, changed or removed since the last
//! update, for [`crate::reconcile::Reconciler::apply_changes`].
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    DesiredPort, Frontend, ModelConfig, PortRef, Proto, Rejection, ServiceModel, SliceResult, TO_ALLOCATE,
    give_node_port, index_endpoints, model_service, ns_name, parse_slice, part_of_frontend, retain_frontends,
    strip_node_port,
};
use crate::{HashMap, HashSet};

pub use super::Key;

/// One object's change: its new version, or `None` when it is gone.
pub type Change<K> = (Key, Option<Arc<K>>);

/// The service ports that changed: `(port, Some(new version))` or `(port, None)` (gone).
pub type PortChanges = Vec<(PortRef, Option<Arc<DesiredPort>>)>;

struct SliceEntry {
    /// The object, kept only when it has no version to be told by (objects given without uid
    /// and resourceVersion: tests); otherwise what the model needs of it was read out (objects
    /// from the API server, and from manifests, which get the identity of their content).
    obj: Option<Arc<EndpointSlice>>,
    meta: Identity,
    parsed: SliceResult,
}

/// What tells two versions of an object apart, and names it in events: uid and
/// resourceVersion (objects from the API server; none for manifests). The API server writes a
/// UUID and a decimal number: those are held as numbers (a large cluster holds two per
/// Service), anything else as written.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    None,
    Numeric { uid: [u64; 2], rv: u64 },
    Text(Box<(Box<str>, Box<str>)>),
}

impl Identity {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        let Some(rv) = meta.resource_version.as_deref() else { return Identity::None };
        let uid = meta.uid.as_deref().unwrap_or("");
        match (parse_uuid(uid), rv.parse::<u64>()) {
            (Some(uid), Ok(n)) if n.to_string() == rv => Identity::Numeric { uid, rv: n },
            _ => Identity::Text(Box::new((uid.into(), rv.into()))),
        }
    }

    fn is_versioned(&self) -> bool {
        !matches!(self, Identity::None)
    }

    /// (uid, resourceVersion) as written.
    fn texts(&self) -> Option<(String, String)> {
        match self {
            Identity::None => None,
            Identity::Numeric { uid, rv } => Some((uuid_text(*uid), rv.to_string())),
            Identity::Text(t) => Some((t.0.to_string(), t.1.to_string())),
        }
    }

    /// The reference of the object `key` of this identity (for an event about it).
    fn reference(
        &self,
        api_version: &str,
        kind: &str,
        key: Key,
    ) -> k8s_openapi::api::core::v1::ObjectReference {
        let (uid, rv) = self.texts().unzip();
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            name: Some(key.1.to_string()),
            namespace: Some(key.0.to_string()),
            uid,
            resource_version: rv,
            ..Default::default()
        }
    }
}

/// A UUID of two numbers as the API server writes it (lower-case hex, 8-4-4-4-12).
pub fn uuid_text(uid: [u64; 2]) -> String {
    let h = format!("{:016x}{:016x}", uid[0], uid[1]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// A UUID as the API server writes it (lower-case hex, 8-4-4-4-12), as two numbers; `None` for
/// any other text (which would not be written back the same).
fn parse_uuid(s: &str) -> Option<[u64; 2]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut v: u128 = 0;
    for (i, &c) in b.iter().enumerate() {
        if [8, 13, 18, 23].contains(&i) {
            continue;
        }
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = v << 4 | u128::from(d);
    }
    Some([(v >> 64) as u64, v as u64])
}

/// Whether `new` is the version of an object held as (`held`, `identity`): the same
/// resourceVersion, or (no version) the same `Arc`.
fn same_version<K: kube::Resource>(held: Option<&Arc<K>>, identity: &Identity, new: &Arc<K>) -> bool {
    match (identity, Identity::of(new.meta())) {
        (Identity::None, _) | (_, Identity::None) => held.is_some_and(|h| Arc::ptr_eq(h, new)),
        (a, b) => *a == b,
    }
}

/// What the model keeps of each changed object (`None`: deleted), in their order: of a slice its
/// parsed form and identity, of a Service its identity and packed form. Read on two threads when
/// there are many (a first sync, a relist): the slices beside the Services.
#[allow(clippy::type_complexity)]
fn read_objects(
    slices: &[Change<EndpointSlice>],
    services: &[Change<Service>],
) -> (Vec<Option<(SliceResult, Identity)>>, Vec<Option<(Identity, Held)>>) {
    let read_slices = || -> Vec<_> {
        slices.iter().map(|(_, o)| o.as_ref().map(|o| (parse_slice(o), Identity::of(&o.metadata)))).collect()
    };
    let read_services = || -> Vec<_> {
        services
            .iter()
            .map(|(_, o)| {
                o.as_ref().map(|o| {
                    let meta = Identity::of(&o.metadata);
                    let held = Held::new(o.clone(), &meta);
                    (meta, held)
                })
            })
            .collect()
    };
    if slices.len().min(services.len()) <= 1000 {
        return (read_slices(), read_services());
    }
    std::thread::scope(|scope| {
        let slices = std::thread::Builder::new().name("xlb-read".into()).spawn_scoped(scope, read_slices);
        let services = read_services();
        match slices {
            Ok(h) => (h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), services),
            // No thread to be had: read here.
            Err(_) => (read_slices(), services),
        }
    })
}

impl SliceEntry {
    fn service(&self) -> Option<&Key> {
        match &self.parsed {
            Some(Ok(p)) => Some(&p.service),
            _ => None,
        }
    }
}

/// What a Service asks for before the conflicts with others are resolved.
#[derive(Default, PartialEq)]
struct Wants {
    frontends: Vec<Frontend>,
    node_ports: Vec<(u16, Proto)>,
}

/// What a Service is given: its ports as served (before node ports are allocated) and every
/// rejection of it or of its parts.
#[derive(Default, PartialEq)]
struct Outcome {
    ports: Vec<Arc<DesiredPort>>,
    rejected: Vec<Rejection>,
}

impl Outcome {
    fn serves(&self, f: &Frontend) -> bool {
        self.ports.iter().any(|p| p.frontends.contains(f))
    }

    fn serves_node_port(&self, np: u16, proto: Proto) -> bool {
        self.ports.iter().any(|p| p.node_port == Some(np) && p.id.proto == proto)
    }

    fn node_ports(&self) -> impl Iterator<Item = (u16, Proto)> + '_ {
        self.ports.iter().filter_map(|p| Some((p.node_port.filter(|&np| np != TO_ALLOCATE)?, p.id.proto)))
    }

    fn waits_for_node_port(&self) -> bool {
        self.ports.iter().any(|p| p.node_port == Some(TO_ALLOCATE))
    }
}

/// A Service as the model holds it: shared (an object without a version: the same `Arc` tells
/// it), or packed as JSON (objects with a version, from the API server or from manifests: a
/// k8s-openapi Service takes over a kilobyte even with little in it; its JSON a few hundred
/// bytes, read back when its endpoints change).
enum Held {
    Shared(Arc<Service>),
    Packed(Box<[u8]>),
}

impl Held {
    fn new(svc: Arc<Service>, identity: &Identity) -> Self {
        if !identity.is_versioned() {
            return Held::Shared(svc);
        }
        // The model reads the spec and status alone (the key and identity are held apart):
        // written from the object as it is, read back as a Service without metadata.
        #[derive(serde::Serialize)]
        struct Bare<'a> {
            spec: &'a Option<k8s_openapi::api::core::v1::ServiceSpec>,
            status: &'a Option<k8s_openapi::api::core::v1::ServiceStatus>,
        }
        match serde_json::to_vec(&Bare { spec: &svc.spec, status: &svc.status }) {
            Ok(json) => Held::Packed(json.into_boxed_slice()),
            Err(_) => Held::Shared(svc),
        }
    }

    fn shared(&self) -> Option<&Arc<Service>> {
        match self {
            Held::Shared(s) => Some(s),
            Held::Packed(_) => None,
        }
    }

    fn service(&self) -> std::borrow::Cow<'_, Service> {
        match self {
            Held::Shared(s) => std::borrow::Cow::Borrowed(&**s),
            // It was written from a Service just before: it reads back.
            Held::Packed(json) => std::borrow::Cow::Owned(serde_json::from_slice(json).unwrap_or_default()),
        }
    }
}

struct ServiceEntry {
    obj: Option<Held>,
    meta: Identity,
    model: ServiceModel,
    wants: Wants,
    outcome: Outcome,
    /// The ports given to the datapath (node ports allocated).
    given: Vec<Arc<DesiredPort>>,
}

/// The incremental model. Feed it with [`Self::update`] (events) or [`Self::replace`] (a whole
/// list: the first sync, a relist, a re-read directory), read the changes it returns.
#[derive(Default)]
pub struct IncrementalModel {
    cfg: ModelConfig,
    slices: HashMap<Key, SliceEntry>,
    /// By Service: the names of the slices that belong to it (sorted: the order they merge in).
    slices_of: HashMap<Key, Few<Arc<str>>>,
    /// Boxed: a B-tree node holds eleven entries and is often half full; an entry is large.
    services: BTreeMap<Key, Box<ServiceEntry>>,
    /// Who claims each frontend and node port (the Services whose ports ask for it).
    claims: HashMap<Frontend, Few<Key>>,
    node_port_claims: HashMap<(u16, Proto), Few<Key>>,
    /// Node ports served, by how many ports (for the allocation's "taken").
    served_node_ports: HashMap<(u16, Proto), u32>,
    /// Services with a port waiting for a node port (standalone mode).
    to_allocate: BTreeSet<Key>,
    /// Give out the node ports again at the next resolve (the configuration changed).
    reallocate: bool,
    /// Frontends given to the datapath, with the Service they went to, for the hostPorts' check.
    given_frontends: HashMap<Frontend, Key>,
    /// This node's pods, and the hostPort ports and rejections made of them.
    pods: Vec<Arc<Pod>>,
    host_ports: Vec<Arc<DesiredPort>>,
    host_rejected: Vec<Rejection>,
    /// Rejected slices, by slice.
    slice_rejected: BTreeMap<Key, Vec<Rejection>>,
    /// Services with a rejection (whole or of a part).
    rejected_services: BTreeSet<Key>,
    /// Services held.
    service_count: usize,
    /// Services changed in this update, as they came (modelled from these, not read back).
    fresh: HashMap<Key, Arc<Service>>,
    /// Node names of endpoints, shared by every endpoint on the node.
    node_names: HashSet<Arc<str>>,
    /// Namespaces, shared by every key in them.
    namespaces: HashSet<Arc<str>>,
    /// Figures: service ports and frontends given to the datapath.
    port_count: usize,
    frontend_count: usize,
}

impl IncrementalModel {
    pub fn new(cfg: ModelConfig) -> Self {
        Self { cfg, ..Default::default() }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Service ports and frontends given to the datapath (hostPorts included).
    pub fn figures(&self) -> (usize, usize) {
        let host_frontends: usize = self.host_ports.iter().map(|p| p.frontends.len()).sum();
        (self.port_count + self.host_ports.len(), self.frontend_count + host_frontends)
    }

    pub fn service_count(&self) -> usize {
        self.service_count
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Every rejection that holds now: Services, their parts, slices, pods.
    pub fn rejected(&self) -> Vec<Rejection> {
        let slices = self.slice_rejected.values().flatten();
        let services = self.rejected_services.iter().flat_map(|k| self.services[k].outcome.rejected.iter());
        slices.chain(services).chain(&self.host_rejected).cloned().collect()
    }

    /// The object a rejection is about, for events.
    pub fn object_ref(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
        use kube::Resource as _;
        let key: Key = (namespace.into(), name.into());
        match kind {
            "Service" => {
                let e = self.services.get(&key)?;
                match e.obj.as_ref()? {
                    Held::Shared(o) => Some(o.object_ref(&())),
                    Held::Packed(_) => Some(e.meta.reference("v1", "Service", key)),
                }
            }
            "EndpointSlice" => {
                Some(self.slices.get(&key)?.meta.reference("discovery.k8s.io/v1", "EndpointSlice", key))
            }
            "Pod" => self.pods.iter().find(|p| ns_name(&p.metadata) == key).map(|p| p.object_ref(&())),
            _ => None,
        }
    }

    /// Every port given to the datapath (sorted), as the builder's `Model::ports`.
    pub fn ports(&self) -> Vec<Arc<DesiredPort>> {
        let mut all: Vec<Arc<DesiredPort>> = self
            .services
            .values()
            .flat_map(|s| s.given.iter().cloned())
            .chain(self.host_ports.iter().cloned())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// A new configuration (the node's addresses changed): every Service is modelled again.
    pub fn set_config(&mut self, cfg: ModelConfig) -> PortChanges {
        if cfg == self.cfg {
            return Vec::new();
        }
        self.cfg = cfg;
        self.reallocate = true; // node ports given out are answered on the new addresses
        let dirty: BTreeSet<Key> = self.services.keys().cloned().collect();
        let mut changes = self.resolve(dirty);
        changes.extend(self.refresh_host_ports(true));
        changes
    }

    /// Takes changed objects: Services, EndpointSlices, and this node's pods when `pods` is
    /// given (all of them: they are few).
    pub fn update(
        &mut self,
        services: impl IntoIterator<Item = Change<Service>>,
        slices: impl IntoIterator<Item = Change<EndpointSlice>>,
        pods: Option<Vec<Arc<Pod>>>,
    ) -> PortChanges {
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        let (slices, services): (Vec<_>, Vec<_>) =
            (slices.into_iter().collect(), services.into_iter().collect());
        let (slices_read, services_read) = read_objects(&slices, &services);
        for ((key, obj), read) in slices.into_iter().zip(slices_read) {
            let old = self.slices.remove_entry(&key);
            let key = match &old {
                Some((k, _)) => k.clone(),
                None => (intern(&mut self.namespaces, &key.0), key.1),
            };
            if let Some((_, old)) = old
                && let Some(svc) = old.service()
            {
                if let Some(names) = self.slices_of.get_mut(svc) {
                    names.remove(&key.1);
                    if names.is_empty() {
                        self.slices_of.remove(svc);
                    }
                }
                dirty.insert(svc.clone());
            }
            self.slice_rejected.remove(&key);
            let (Some(obj), Some((mut parsed, meta))) = (obj, read) else { continue };
            if let Some(Ok(p)) = &mut parsed {
                p.service = self.shared_key(&p.service);
                for (_, _, node, _) in &mut p.endpoints {
                    if let Some(n) = node.as_mut() {
                        *n = intern(&mut self.node_names, n);
                    }
                }
            }
            let rejected: Vec<Rejection> = match &parsed {
                Some(Ok(p)) => p.partial.clone(),
                Some(Err(r)) => vec![r.clone()],
                None => Vec::new(),
            };
            if !rejected.is_empty() {
                self.slice_rejected.insert(key.clone(), rejected);
            }
            let entry = SliceEntry { obj: (!meta.is_versioned()).then_some(obj), meta, parsed };
            if let Some(svc) = entry.service() {
                self.slices_of.entry(svc.clone()).or_default().insert(key.1.clone());
                dirty.insert(svc.clone());
            }
            self.slices.insert(key, entry);
        }
        for ((key, svc), read) in services.into_iter().zip(services_read) {
            let key = self.shared_key(&key);
            let had = self.services.get(&key).is_some_and(|e| e.obj.is_some());
            self.service_count = self.service_count + usize::from(svc.is_some()) - usize::from(had);
            let (meta, obj) = match read {
                Some((meta, held)) => (meta, Some(held)),
                None => (Identity::None, None),
            };
            // Modelled now, from the object at hand (not read back from its packed form).
            if let Some(o) = svc {
                self.fresh.insert(key.clone(), o);
            }
            match self.services.get_mut(&key) {
                Some(e) => {
                    e.obj = obj;
                    e.meta = meta;
                }
                None if obj.is_some() => {
                    self.services.insert(
                        key.clone(),
                        Box::new(ServiceEntry {
                            obj,
                            meta,
                            model: ServiceModel::Nothing,
                            wants: Wants::default(),
                            outcome: Outcome::default(),
                            given: Vec::new(),
                        }),
                    );
                }
                None => continue,
            }
            dirty.insert(key);
        }
        let mut changes = self.resolve(dirty);
        let pods_changed = pods.is_some();
        if let Some(pods) = pods {
            self.pods = pods;
        }
        changes.extend(self.refresh_host_ports(pods_changed || !changes.is_empty()));
        changes
    }

    /// Takes whole lists (the first sync, a relist, a re-read directory): the objects that
    /// differ from those held (another version, by identity) are the changes; those no longer
    /// listed are gone. Costs a pass over the lists, and writes only what changed.
    pub fn replace(
        &mut self,
        services: Option<&[Arc<Service>]>,
        slices: Option<&[Arc<EndpointSlice>]>,
        pods: Option<Vec<Arc<Pod>>>,
    ) -> PortChanges {
        let mut svc_changes = Vec::new();
        if let Some(services) = services {
            let mut listed: HashSet<Key> = HashSet::default();
            for s in services {
                let key = ns_name(&s.metadata);
                let same = self.services.get(&key).is_some_and(|e| {
                    e.obj.is_some() && same_version(e.obj.as_ref().and_then(Held::shared), &e.meta, s)
                });
                if !same {
                    svc_changes.push((key.clone(), Some(s.clone())));
                }
                listed.insert(key);
            }
            for (key, e) in &self.services {
                if e.obj.is_some() && !listed.contains(key) {
                    svc_changes.push((key.clone(), None));
                }
            }
        }
        let mut slice_changes = Vec::new();
        if let Some(slices) = slices {
            let mut listed: HashSet<Key> = HashSet::default();
            for s in slices {
                let key = ns_name(&s.metadata);
                if !self.slices.get(&key).is_some_and(|e| same_version(e.obj.as_ref(), &e.meta, s)) {
                    slice_changes.push((key.clone(), Some(s.clone())));
                }
                listed.insert(key);
            }
            slice_changes
                .extend(self.slices.keys().filter(|k| !listed.contains(*k)).map(|k| (k.clone(), None)));
        }
        let pods = pods.filter(|p| {
            p.len() != self.pods.len() || p.iter().zip(&self.pods).any(|(a, b)| !Arc::ptr_eq(a, b))
        });
        self.update(svc_changes, slice_changes, pods)
    }

    /// Models the dirty Services again and resolves the claims they touch.
    fn resolve(&mut self, dirty: BTreeSet<Key>) -> PortChanges {
        let mut queue: BTreeSet<Key> = BTreeSet::new();
        let gone: Vec<Key> = dirty
            .iter()
            .filter(|k| self.services.get(*k).is_some_and(|e| e.obj.is_none()))
            .cloned()
            .collect();
        for key in dirty {
            let Some(entry) = self.services.get_mut(&key) else { continue };
            let fresh = self.fresh.remove(&key);
            let model = match &entry.obj {
                Some(held) => {
                    let svc: std::borrow::Cow<'_, Service> = match &fresh {
                        Some(o) => std::borrow::Cow::Borrowed(&**o),
                        None => held.service(),
                    };
                    let no_slices = Few::default();
                    let names = self.slices_of.get(&key).unwrap_or(&no_slices);
                    let parsed = names.iter().filter_map(|n| {
                        match &self.slices.get(&(key.0.clone(), n.clone()))?.parsed {
                            Some(Ok(p)) => Some(p),
                            _ => None,
                        }
                    });
                    model_service(&svc, &key, &index_endpoints(parsed), &self.cfg)
                }
                None => ServiceModel::Nothing,
            };
            // The claims index follows what the Service asks for. The others are not touched by
            // that alone: what a Service holds depends on what the earlier ones hold, and a
            // change of that is carried below.
            let wants = wants_of(&model);
            entry.model = model;
            if entry.wants != wants {
                let old = std::mem::replace(&mut entry.wants, wants);
                for f in &old.frontends {
                    if let Some(c) = self.claims.get_mut(f) {
                        c.remove(&key);
                        if c.is_empty() {
                            self.claims.remove(f);
                        }
                    }
                }
                for np in &old.node_ports {
                    if let Some(c) = self.node_port_claims.get_mut(np) {
                        c.remove(&key);
                        if c.is_empty() {
                            self.node_port_claims.remove(np);
                        }
                    }
                }
                let entry = &self.services[&key];
                for f in &entry.wants.frontends {
                    self.claims.entry(*f).or_default().insert(key.clone());
                }
                for np in &entry.wants.node_ports {
                    self.node_port_claims.entry(*np).or_default().insert(key.clone());
                }
            }
            queue.insert(key);
        }

        // In (namespace, name) order: a Service's outcome depends on the earlier ones alone.
        let mut changed: BTreeSet<Key> = BTreeSet::new();
        // Whether the node ports given out may change: the node ports served, or the ports
        // waiting for one, changed.
        let mut allocation_moved = false;
        while let Some(key) = queue.pop_first() {
            let Some(entry) = self.services.get(&key) else { continue };
            let outcome = self.outcome(&key, &entry.model);
            let entry = &self.services[&key];
            if entry.outcome == outcome {
                continue;
            }
            // The later Services that claim what this one held or holds now.
            let mut touched: Vec<&Key> = Vec::new();
            for o in [&entry.outcome, &outcome] {
                for p in &o.ports {
                    for f in &p.frontends {
                        touched.extend(self.claims.get(f).into_iter().flatten());
                    }
                }
                for np in o.node_ports() {
                    touched.extend(self.node_port_claims.get(&np).into_iter().flatten());
                }
            }
            let later: Vec<Key> = touched.into_iter().filter(|k| **k > key).cloned().collect();
            queue.extend(later);
            let old_nps: Vec<(u16, Proto)> = entry.outcome.node_ports().collect();
            let new_nps: Vec<(u16, Proto)> = outcome.node_ports().collect();
            if old_nps != new_nps {
                allocation_moved = true;
                for np in old_nps {
                    if let Some(n) = self.served_node_ports.get_mut(&np) {
                        *n -= 1;
                        if *n == 0 {
                            self.served_node_ports.remove(&np);
                        }
                    }
                }
                for np in new_nps {
                    *self.served_node_ports.entry(np).or_default() += 1;
                }
            }
            if outcome.waits_for_node_port() || entry.outcome.waits_for_node_port() {
                allocation_moved = true;
            }
            if outcome.waits_for_node_port() {
                self.to_allocate.insert(key.clone());
            } else {
                self.to_allocate.remove(&key);
            }
            if outcome.rejected.is_empty() {
                self.rejected_services.remove(&key);
            } else {
                self.rejected_services.insert(key.clone());
            }
            if let Some(e) = self.services.get_mut(&key) {
                e.outcome = outcome;
            }
            changed.insert(key);
        }

        // Node ports to give out (standalone mode): all the waiting ports again when what is
        // taken or who waits changed (they are few; the builder gives them out in order).
        let mut given: BTreeMap<Key, Vec<Arc<DesiredPort>>> = BTreeMap::new();
        if (std::mem::take(&mut self.reallocate) || allocation_moved) && !self.to_allocate.is_empty() {
            given = self.allocate();
        }
        for key in changed.iter().filter(|k| !self.to_allocate.contains(*k)) {
            given.insert(key.clone(), self.services[key].outcome.ports.clone());
        }

        // The difference given to the datapath.
        let mut out = PortChanges::new();
        for (key, ports) in given {
            let Some(entry) = self.services.get_mut(&key) else { continue };
            if entry.given == ports {
                continue;
            }
            let old = std::mem::replace(&mut entry.given, ports);
            for p in &old {
                self.port_count -= 1;
                self.frontend_count -= p.frontends.len();
                for f in &p.frontends {
                    // Unless it went to a Service handled before this one.
                    if self.given_frontends.get(f) == Some(&key) {
                        self.given_frontends.remove(f);
                    }
                }
                if !entry.given.iter().any(|n| n.id == p.id) {
                    out.push((p.id.clone(), None));
                }
            }
            for p in &entry.given {
                self.port_count += 1;
                self.frontend_count += p.frontends.len();
                for f in &p.frontends {
                    self.given_frontends.insert(*f, key.clone());
                }
                if !old.iter().any(|o| o == p) {
                    out.push((p.id.clone(), Some(p.clone())));
                }
            }
        }
        // A first sync or a relist filled it: its table goes too.
        if self.fresh.capacity() > 1024 {
            self.fresh = HashMap::default();
        }
        self.fresh.clear();
        // Services deleted: nothing of them is left (no claim, no port, no rejection).
        for key in gone {
            if self.services.get(&key).is_some_and(|e| e.obj.is_none()) {
                self.services.remove(&key);
            }
        }
        out
    }

    /// What `key` is given, from its model and the earlier Services' outcomes (the builder's
    /// rules, in its order).
    fn outcome(&self, key: &Key, model: &ServiceModel) -> Outcome {
        let (namespace, name) = key;
        let mut out = Outcome::default();
        let ports = match model {
            ServiceModel::Nothing => return out,
            ServiceModel::Rejected(reason) => {
                out.rejected.push(Rejection::whole("Service", namespace, name, reason.clone()));
                return out;
            }
            ServiceModel::Ports(ports, partial) => {
                out.rejected.extend(partial.iter().map(|(p, why)| part(key, p, why.clone())));
                ports
            }
        };
        // The earlier Service that serves `f`, if any.
        let holder = |f: &Frontend| -> Option<&Key> {
            self.claims
                .get(f)?
                .below(key)
                .find(|k| self.services.get(*k).is_some_and(|e| e.outcome.serves(f)))
        };
        let np_holder = |np: u16, proto: Proto| -> Option<&Key> {
            self.node_port_claims
                .get(&(np, proto))?
                .below(key)
                .find(|k| self.services.get(*k).is_some_and(|e| e.outcome.serves_node_port(np, proto)))
        };
        let owner = |k: &Key| format!("Service {}/{}", k.0, k.1);
        // A clusterIP:port another Service serves rejects this one whole.
        let clash = ports.iter().find_map(|p| {
            p.frontends.iter().zip(&p.frontend_kinds).find_map(|(f, k)| {
                let o = holder(f)?;
                (k & lb_common::SVC_F_CLUSTER_IP != 0)
                    .then(|| format!("frontend {f} is already used by {}", owner(o)))
            })
        });
        if let Some(reason) = clash {
            out.rejected.push(Rejection::whole("Service", namespace, name, reason));
            return out;
        }
        for p in ports {
            let mut p = p.clone();
            if let Some(np) = p.node_port.filter(|&np| np != TO_ALLOCATE)
                && let Some(o) = np_holder(np, p.id.proto)
            {
                let why = format!("nodePort {np}/{} is already used by {}", p.id.proto, owner(o));
                out.rejected.push(part(key, "nodePort", why));
                strip_node_port(Arc::make_mut(&mut p));
            }
            let taken: Vec<(Frontend, u16, &Key)> = p
                .frontends
                .iter()
                .zip(&p.frontend_kinds)
                .filter_map(|(f, k)| Some((*f, *k, holder(f)?)))
                .collect();
            for (f, k, o) in &taken {
                let what = part_of_frontend(*k);
                out.rejected.push(part(key, what, format!("frontend {f} is already used by {}", owner(o))));
            }
            if !taken.is_empty() {
                retain_frontends(Arc::make_mut(&mut p), |f, k| {
                    (!taken.iter().any(|(t, _, _)| t == f)).then_some(k)
                });
            }
            out.ports.push(p);
        }
        out
    }

    /// Gives out node ports to the ports waiting for one, as the builder does: in (namespace,
    /// name) order, from a hash of the port's name, the first one not taken.
    fn allocate(&self) -> BTreeMap<Key, Vec<Arc<DesiredPort>>> {
        let mut taken: BTreeSet<(u16, Proto)> = self.served_node_ports.keys().copied().collect();
        let mut given: HashMap<String, Option<u16>> = HashMap::default();
        let mut out = BTreeMap::new();
        for key in &self.to_allocate {
            let mut ports = self.services[key].outcome.ports.clone();
            for p in ports.iter_mut().filter(|p| p.node_port == Some(TO_ALLOCATE)) {
                give_node_port(p, &self.cfg, &mut taken, &mut given);
            }
            out.insert(key.clone(), ports);
        }
        out
    }

    /// Makes the hostPort ports again (this node's pods are few) when the pods or the Services'
    /// frontends changed; returns their difference.
    fn refresh_host_ports(&mut self, changed: bool) -> PortChanges {
        if !changed || (self.pods.is_empty() && self.host_ports.is_empty() && self.host_rejected.is_empty()) {
            return Vec::new();
        }
        let mut model = super::Model::default();
        let given = &self.given_frontends;
        super::add_host_ports_checked(&mut model, &self.pods, &self.cfg, |f| {
            given.get(f).map(|o| format!("Service {}/{}", o.0, o.1))
        });
        let mut out = PortChanges::new();
        for p in &self.host_ports {
            if !model.ports.iter().any(|n| n.id == p.id) {
                out.push((p.id.clone(), None));
            }
        }
        for p in &model.ports {
            if !self.host_ports.iter().any(|o| o == p) {
                out.push((p.id.clone(), Some(p.clone())));
            }
        }
        self.host_ports = model.ports;
        self.host_rejected = model.rejected;
        out
    }
}

/// A sorted set of few elements (most often one): a `Vec`, not a B-tree node of eleven.
#[derive(Debug)]
struct Few<T>(Vec<T>);

impl<T> Default for Few<T> {
    fn default() -> Self {
        Few(Vec::new())
    }
}

impl<T: Ord> Few<T> {
    fn insert(&mut self, t: T) {
        if let Err(i) = self.0.binary_search(&t) {
            // Grown one at a time: most hold one element for good.
            self.0.reserve_exact(1);
            self.0.insert(i, t);
        }
    }

    fn remove(&mut self, t: &T) {
        if let Ok(i) = self.0.binary_search(t) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    /// The elements less than `t`, in order.
    fn below<'a>(&'a self, t: &'a T) -> impl Iterator<Item = &'a T> + 'a {
        self.0.iter().take_while(move |e| *e < t)
    }
}

impl<'a, T> IntoIterator for &'a Few<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The one copy of `name` in `names`.
impl IncrementalModel {
    /// The key of Service `key` as the model holds it already (one copy of its names, whatever
    /// holds it: its entry, its slices, the claims, its ports), or `key` in a namespace held.
    fn shared_key(&mut self, key: &Key) -> Key {
        if let Some((k, _)) = self.services.get_key_value(key) {
            return k.clone();
        }
        if let Some((k, _)) = self.slices_of.get_key_value(key) {
            return k.clone();
        }
        (intern(&mut self.namespaces, &key.0), key.1.clone())
    }
}

fn intern(names: &mut HashSet<Arc<str>>, name: &Arc<str>) -> Arc<str> {
    match names.get(name) {
        Some(n) => n.clone(),
        None => {
            names.insert(name.clone());
            name.clone()
        }
    }
}

/// A partial rejection of Service `key`.
fn part(key: &Key, part: &'static str, reason: String) -> Rejection {
    Rejection { part: Some(part), ..Rejection::whole("Service", &key.0, &key.1, reason) }
}

fn wants_of(model: &ServiceModel) -> Wants {
    let mut w = Wants::default();
    if let ServiceModel::Ports(ports, _) = model {
        for p in ports {
            w.frontends.extend(p.frontends.iter().copied());
            if let Some(np) = p.node_port.filter(|&np| np != TO_ALLOCATE) {
                w.node_ports.push((np, p.id.proto));
            }
        }
    }
    w.frontends.sort();
    w.frontends.dedup();
    w.node_ports.sort();
    w.node_ports.dedup();
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::MemDatapath,
        model::{add_host_ports, build},
        reconcile::Reconciler,
    };
    use serde_json::json;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
        fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
            &of[self.below(of.len() as u64) as usize]
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
    }

    #[test]
    fn an_identity_held_as_numbers_names_the_object_as_written() {
        let meta = |uid: &str, rv: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        let uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let id = Identity::of(&meta(uuid, "123456"));
        assert!(matches!(id, Identity::Numeric { .. }), "{id:?}");
        assert_eq!(id.texts(), Some((uuid.to_string(), "123456".to_string())));
        // Anything that would not be written back the same is kept as written.
        for (uid, rv) in
            [("uid-a", "1"), (uuid, "0123"), ("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", "7"), (uuid, "")]
        {
            let id = Identity::of(&meta(uid, rv));
            assert!(matches!(id, Identity::Text(_)), "{uid} {rv}: {id:?}");
            assert_eq!(id.texts(), Some((uid.to_string(), rv.to_string())));
        }
        assert_ne!(Identity::of(&meta(uuid, "1")), Identity::of(&meta(uuid, "2")));
        assert_eq!(Identity::of(&Default::default()), Identity::None);
    }

    #[test]
    fn a_packed_service_reads_back_with_its_spec_and_status() {
        let mut rng = Rng(7);
        for i in 0..50 {
            let svc = service(&mut rng, "a", &format!("s{i}"));
            let id = Identity::Numeric { uid: [1, 2], rv: 3 };
            let held = Held::new(svc.clone(), &id);
            assert!(matches!(held, Held::Packed(_)));
            let back = held.service();
            assert_eq!((&back.spec, &back.status), (&svc.spec, &svc.status));
        }
    }

    const NAMES: [(&str, &str); 6] =
        [("a", "web"), ("a", "db"), ("a", "dns"), ("b", "web"), ("b", "api"), ("c", "x")];

    /// A random Service: few clusterIPs, externalIPs, ingress IPs and node ports to share, so
    /// that Services compete for them; every type, both families, named and numbered target
    /// ports, the traffic policies, affinity, source ranges, and now and then something invalid.
    fn service(rng: &mut Rng, ns: &str, name: &str) -> Arc<Service> {
        let ty = *rng.pick(&["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]);
        let dual = rng.chance(3);
        let v4 = format!("198.18.0.{}", 1 + rng.below(6));
        let v6 = format!("2001:db8::{}", 1 + rng.below(4));
        let (ips, families) = match (dual, rng.chance(6)) {
            (_, true) => (vec!["None".to_string()], vec!["IPv4"]), // headless
            (true, _) => (vec![v4, v6], vec!["IPv4", "IPv6"]),
            (false, _) if rng.chance(5) => (vec![v6], vec!["IPv6"]),
            _ => (vec![v4], vec!["IPv4"]),
        };
        let mut ports = Vec::new();
        for i in 0..1 + rng.below(2) {
            let mut p = json!({
                "name": if i == 0 && rng.chance(2) { "" } else { *rng.pick(&["http", "dns", "metrics"]) },
                "port": *rng.pick(&[80, 53, 8080]),
                "protocol": *rng.pick(&["TCP", "TCP", "UDP"]),
                "targetPort": if rng.chance(2) { json!(*rng.pick(&[8080, 9090])) } else { json!(*rng.pick(&["web", "metrics"])) },
            });
            if ty == "NodePort" || ty == "LoadBalancer" {
                match rng.below(5) {
                    0 => {}                            // none: assigned, or rejected
                    1 => p["nodePort"] = json!(29999), // out of range
                    _ => p["nodePort"] = json!(30001 + rng.below(3)),
                }
            }
            ports.push(p);
        }
        let mut spec = json!({
            "type": ty,
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ipFamilies": families,
            "ports": ports,
            "selector": {"app": name},
        });
        if ty == "ExternalName" {
            spec["externalName"] = json!("db.example.com");
        }
        if rng.chance(3) {
            let all = ["198.18.5.1", "198.18.5.2", "198.18.9.1", "2001:db8:5::1", "not-an-ip"];
            spec["externalIPs"] = json!([rng.pick(&all), rng.pick(&all)]);
        }
        if rng.chance(3) {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        if rng.chance(4) {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        if rng.chance(4) {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        if ty == "LoadBalancer" && rng.chance(2) {
            spec["loadBalancerSourceRanges"] = json!([*rng.pick(&["198.18.7.0/24", "10.0.0.0/8", "bad"])]);
        }
        let mut svc = json!({"metadata": {"name": name, "namespace": ns}, "spec": spec});
        if ty == "LoadBalancer" && rng.chance(2) {
            svc["status"] =
                json!({"loadBalancer": {"ingress": [{"ip": *rng.pick(&["198.18.6.1", "198.18.6.2"])}]}});
        }
        Arc::new(serde_json::from_value(svc).unwrap())
    }

    /// A random EndpointSlice of Service `svc` (or of none): a few endpoints from a small pool
    /// (their node is a function of the address, as a pod's is), every readiness state.
    fn slice(rng: &mut Rng, ns: &str, name: &str, svc: Option<&str>) -> Arc<EndpointSlice> {
        let v6 = rng.chance(4);
        let mut endpoints = Vec::new();
        for _ in 0..rng.below(4) {
            let n = 1 + rng.below(6);
            let addr = match (v6, rng.chance(12)) {
                (_, true) => "127.0.0.1".to_string(),
                (true, _) => format!("2001:db8:1::{n}"),
                (false, _) => format!("198.18.1.{n}"),
            };
            let (ready, serving, terminating) = *rng.pick(&[
                (true, true, false),
                (true, true, false),
                (false, true, true),
                (false, false, true),
                (false, false, false),
            ]);
            endpoints.push(json!({
                "addresses": [addr],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": if n % 2 == 1 { "node-a" } else { "node-b" },
            }));
        }
        let ports: Vec<_> = (0..1 + rng.below(2))
            .map(|_| {
                json!({
                    "name": *rng.pick(&["", "http", "dns", "metrics"]),
                    "port": *rng.pick(&[8080, 9090, 5353]),
                    "protocol": *rng.pick(&["TCP", "TCP", "UDP"]),
                })
            })
            .collect();
        let mut meta = json!({"name": name, "namespace": ns});
        if let Some(svc) = svc {
            meta["labels"] = json!({"kubernetes.io/service-name": svc});
        }
        let s = json!({
            "metadata": meta,
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "endpoints": endpoints,
            "ports": ports,
        });
        Arc::new(serde_json::from_value(s).unwrap())
    }

    /// A pod of node-a (or not) with hostPorts that may clash with node ports or each other.
    fn pod(rng: &mut Rng, name: &str) -> Arc<Pod> {
        let p = json!({
            "metadata": {"name": name, "namespace": "a"},
            "spec": {
                "nodeName": if rng.chance(4) { "node-b" } else { "node-a" },
                "containers": [{"name": "c", "ports": [
                    {"containerPort": 80, "hostPort": *rng.pick(&[30001, 8080, 9000]), "protocol": "TCP"},
                ]}],
            },
            "status": {"podIP": format!("198.18.1.{}", 1 + rng.below(6))},
        });
        Arc::new(serde_json::from_value(p).unwrap())
    }

    /// `obj` with the next resourceVersion, when objects have versions.
    fn versioned<K: kube::Resource + Clone>(obj: Arc<K>, version: &mut Option<u64>) -> Arc<K> {
        let Some(v) = version.as_mut() else { return obj };
        *v += 1;
        let mut o = (*obj).clone();
        o.meta_mut().resource_version = Some(v.to_string());
        o.meta_mut().uid = Some(format!("uid-{}", o.meta().name.as_deref().unwrap_or_default()));
        Arc::new(o)
    }

    fn config(rng: &mut Rng, allocate: bool) -> ModelConfig {
        let mut node_addrs: Vec<std::net::IpAddr> = vec!["198.18.9.1".parse().unwrap()];
        if rng.chance(2) {
            node_addrs.push("2001:db8:9::1".parse().unwrap());
        }
        if rng.chance(3) {
            node_addrs.push("198.18.9.2".parse().unwrap());
        }
        ModelConfig {
            node_addrs,
            node_name: Some("node-a".into()),
            allocate_node_ports: allocate,
            node_port_range: 30000..=30005,
            ..ModelConfig::default()
        }
    }

    fn sorted_rejections(mut r: Vec<Rejection>) -> Vec<String> {
        let mut out: Vec<String> = r.drain(..).map(|r| format!("{r:?}")).collect();
        out.sort();
        out
    }

    /// The differential test of issue 20: random events (adds, updates, deletes, readiness
    /// flips, slices moving between Services, relists, restarts, node address changes,
    /// dual-stack, named ports, policies, affinity, source ranges, hostPorts, and conflicts over
    /// clusterIPs, externalIPs, ingress IPs and node ports) go to the incremental model and,
    /// after every step, the level-triggered builder makes the same ports and rejections from
    /// all the objects; the changes it hands out, applied one by one to a reconciler, leave the
    /// maps as a full apply of the builder's ports leaves fresh ones.
    #[test]
    fn random_events_give_what_the_level_triggered_builder_gives() {
        let mut steps = 0;
        for seed in 1..=12u64 {
            let allocate = seed % 2 == 0;
            let mut rng = Rng(seed);
            let mut cfg = config(&mut rng, allocate);
            let mut services: BTreeMap<Key, Arc<Service>> = BTreeMap::new();
            let mut slices: BTreeMap<Key, Arc<EndpointSlice>> = BTreeMap::new();
            let mut pods: Vec<Arc<Pod>> = Vec::new();
            let mut model = IncrementalModel::new(cfg.clone());
            let mut rec = Reconciler::new(MemDatapath::default()).unwrap();
            rec.set_filter_grace(std::time::Duration::ZERO);
            let mut applied: BTreeMap<PortRef, Arc<DesiredPort>> = BTreeMap::new();
            // Every third seed, objects carry a resourceVersion, as from the API server (the
            // model then keeps a slice's parsed form only, and a Service packed).
            let mut version = (seed % 3 == 0).then_some(1000u64);
            for step in 0..300 {
                let what = rng.below(20);
                let changes = match what {
                    0..=6 => {
                        let (ns, name) = *rng.pick(&NAMES);
                        let key: Key = (ns.into(), name.into());
                        let obj = if rng.chance(5) {
                            None
                        } else {
                            Some(versioned(service(&mut rng, ns, name), &mut version))
                        };
                        match &obj {
                            Some(o) => services.insert(key.clone(), o.clone()),
                            None => services.remove(&key),
                        };
                        model.update([(key, obj)], [], None)
                    }
                    7..=14 => {
                        let (ns, svc) = *rng.pick(&NAMES);
                        let name = format!("{svc}-{}", rng.pick(&["x", "y"]));
                        // Now and then a slice moves to another Service, or belongs to none.
                        let owner = match rng.below(8) {
                            0 => None,
                            1 => Some(rng.pick(&NAMES).1),
                            _ => Some(svc),
                        };
                        let key: Key = (ns.into(), name.as_str().into());
                        let obj = if rng.chance(5) {
                            None
                        } else {
                            Some(versioned(slice(&mut rng, ns, &name, owner), &mut version))
                        };
                        match &obj {
                            Some(o) => slices.insert(key.clone(), o.clone()),
                            None => slices.remove(&key),
                        };
                        model.update([], [(key, obj)], None)
                    }
                    15 | 16 => {
                        pods = (0..rng.below(3)).map(|i| pod(&mut rng, &format!("p{i}"))).collect();
                        model.update([], [], Some(pods.clone()))
                    }
                    17 => {
                        // A relist: the same objects, some as new copies (a new version with
                        // the same content), none changed.
                        let svcs: Vec<Arc<Service>> = services
                            .values()
                            .map(|s| if rng.chance(2) { Arc::new((**s).clone()) } else { s.clone() })
                            .collect();
                        let sls: Vec<Arc<EndpointSlice>> = slices.values().cloned().collect();
                        let c = model.replace(Some(&svcs), Some(&sls), Some(pods.clone()));
                        assert!(
                            c.is_empty(),
                            "seed {seed} step {step}: a relist with nothing changed changed {c:?}"
                        );
                        c
                    }
                    18 => {
                        cfg = config(&mut rng, allocate);
                        model.set_config(cfg.clone())
                    }
                    _ => {
                        // A restart: a new model from the lists, a reconciler on the same maps.
                        model = IncrementalModel::new(cfg.clone());
                        let svcs: Vec<_> = services.values().cloned().collect();
                        let sls: Vec<_> = slices.values().cloned().collect();
                        let c = model.replace(Some(&svcs), Some(&sls), Some(pods.clone()));
                        rec = Reconciler::new(rec.datapath().clone()).unwrap();
                        rec.set_filter_grace(std::time::Duration::ZERO);
                        let all = model.ports();
                        assert_eq!(
                            c.iter().map(|(id, _)| id.clone()).collect::<BTreeSet<_>>(),
                            all.iter().map(|p| p.id.clone()).collect::<BTreeSet<_>>(),
                            "seed {seed} step {step}: a new model hands out every port"
                        );
                        applied.clear();
                        c
                    }
                };
                steps += 1;
                // The oracle.
                let mut want = build(services.values().map(|s| &**s), slices.values().map(|s| &**s), &cfg);
                add_host_ports(&mut want, &pods, &cfg);
                let got = model.ports();
                let ctx = format!("seed {seed} step {step} (event {what})");
                let (g, w): (Vec<&DesiredPort>, Vec<&DesiredPort>) =
                    (got.iter().map(|p| &**p).collect(), want.ports.iter().map(|p| &**p).collect());
                assert!(
                    g == w,
                    "{ctx}: ports: only incremental {:#?}\nonly builder {:#?}",
                    g.iter().filter(|p| !w.contains(p)).collect::<Vec<_>>(),
                    w.iter().filter(|p| !g.contains(p)).collect::<Vec<_>>()
                );
                assert_eq!(
                    sorted_rejections(model.rejected()),
                    sorted_rejections(want.rejected.clone()),
                    "{ctx}: rejections"
                );
                // The changes handed out are the difference.
                for (id, p) in &changes {
                    match p {
                        Some(p) => applied.insert(id.clone(), p.clone()),
                        None => applied.remove(id),
                    };
                }
                assert_eq!(applied.values().cloned().collect::<Vec<_>>(), got, "{ctx}: the changes");
                // And through the reconciler, to the maps.
                rec.apply_changes(changes).unwrap();
                let mut fresh = Reconciler::new(MemDatapath::default()).unwrap();
                fresh.set_filter_grace(std::time::Duration::ZERO);
                fresh.apply(&want.ports).unwrap();
                assert!(rec.datapath().contents() == fresh.datapath().contents(), "{ctx}: maps");
            }
        }
        assert_eq!(steps, 3600);
    }
}
