//! The pure model: Services and EndpointSlices in, the frontends and backends the datapath must
//! hold out. No I/O, no kernel: everything here is tested on plain k8s-openapi objects.
//!
//! Rules (those of kube-proxy):
//! - each Service port is one unit (a "service port"), reached at `clusterIP:port`;
//! - its backends come from the EndpointSlices labelled `kubernetes.io/service-name` in the same
//!   namespace, from the slice port whose name equals the Service port's name; the slice port's
//!   number is the targetPort already resolved for that slice's endpoints, so a named targetPort
//!   can lead to different container ports on different endpoints;
//! - new flows go to ready endpoints; when none is ready, to those serving while terminating
//!   (KEP-1669); terminating endpoints stay known to the datapath so their flows keep working;
//! - a Service is reached at `clusterIP:port`, at every externalIP and LoadBalancer ingress IP on
//!   `port`, and (types NodePort and LoadBalancer) at every node address on `nodePort`;
//! - an invalid Service is rejected with its reason and never disturbs the others;
//! - ExternalName Services have no datapath; their ports are kept, with no frontend and no
//!   backend, so that the CLI can show them;
//! - a container port with a `hostPort`, in a pod of this node, is reached at every address of
//!   the node (or at its `hostIP` alone) on `hostPort`, as the CNI portmap plugin makes it.
pub mod cidr;
pub mod incremental;

pub use cidr::Cidr;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use crate::HashMap;

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
            Proto::Sctp => lb_common::IPPROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::IPPROTO_TCP => Some(Proto::Tcp),
            lb_common::IPPROTO_UDP => Some(Proto::Udp),
            lb_common::IPPROTO_SCTP => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// Parses a Kubernetes protocol name; `None` (unset) means TCP.
    fn parse(p: Option<&str>) -> Result<Self, String> {
        match p.unwrap_or("TCP") {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            "SCTP" => Ok(Proto::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum SvcType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
    /// A pod's hostPort (not a Service).
    HostPort,
}

impl SvcType {
    pub fn code(self) -> u8 {
        match self {
            SvcType::ClusterIP => lb_common::SVC_TYPE_CLUSTER_IP,
            SvcType::NodePort => lb_common::SVC_TYPE_NODE_PORT,
            SvcType::LoadBalancer => lb_common::SVC_TYPE_LOAD_BALANCER,
            SvcType::ExternalName => lb_common::SVC_TYPE_EXTERNAL_NAME,
            SvcType::HostPort => lb_common::SVC_TYPE_HOST_PORT,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            lb_common::SVC_TYPE_CLUSTER_IP => Some(SvcType::ClusterIP),
            lb_common::SVC_TYPE_NODE_PORT => Some(SvcType::NodePort),
            lb_common::SVC_TYPE_LOAD_BALANCER => Some(SvcType::LoadBalancer),
            lb_common::SVC_TYPE_EXTERNAL_NAME => Some(SvcType::ExternalName),
            lb_common::SVC_TYPE_HOST_PORT => Some(SvcType::HostPort),
            _ => None,
        }
    }
}

/// Identity of a service port: stable across updates, so its datapath id is too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRef {
    /// Shared with the model's key of the Service (a large cluster holds several per port).
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The Service port's name ("" for a single unnamed port).
    pub port_name: String,
    pub proto: Proto,
    /// A dual-stack Service port is two ports, one per family, each to its own endpoints.
    pub family: Family,
}

/// An IP family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    pub fn of(a: &IpAddr) -> Self {
        if a.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.proto)?;
        if self.family == Family::V6 {
            write!(f, " (IPv6)")?;
        }
        Ok(())
    }
}

/// An address the datapath answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.addr, self.port), self.proto)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum BackendState {
    /// Ready: takes new flows.
    Active,
    /// Terminating but serving: keeps its flows; takes new ones only when no endpoint is ready.
    Terminating,
    /// Terminating and no longer serving: keeps its flows, never takes new ones.
    Draining,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DesiredBackend {
    pub addr: IpAddr,
    pub port: u16,
    pub state: BackendState,
    /// The endpoint runs on this node (its `nodeName` is `ModelConfig::node_name`).
    pub local: bool,
    /// This node's cluster-wide traffic (traffic policy Cluster) may use the endpoint: its
    /// topology hints are for this node or zone, or the port's endpoints are not all hinted.
    pub topo: bool,
}

/// One Service port as the datapath must serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPort {
    pub id: PortRef,
    pub svc_type: SvcType,
    /// The Service's `port`.
    pub port: u16,
    /// The node port (types NodePort and LoadBalancer), answered on every node address.
    pub node_port: Option<u16>,
    /// Every address:port the port is reached at: clusterIPs, externalIPs and LoadBalancer
    /// ingress IPs on `port`, node addresses on `node_port`. Sorted.
    pub frontends: Vec<Frontend>,
    /// For each of `frontends` (same order), what it is to the Service: `lb_common::SVC_F_*`
    /// bits (an address can be several).
    pub frontend_kinds: Vec<u16>,
    /// Every endpoint known for the port, sorted, without duplicates.
    pub backends: Vec<DesiredBackend>,
    /// What the CLI shows of the port beyond the datapath.
    pub shown: Shown,
    /// `loadBalancerSourceRanges` (type LoadBalancer): the clients allowed on the ingress IPs;
    /// empty: all. Normalised (host bits cleared), sorted, without duplicates.
    pub source_ranges: Vec<Cidr>,
}

/// Traffic policy (`externalTrafficPolicy`, `internalTrafficPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Policy {
    #[default]
    Cluster,
    Local,
}

impl Policy {
    fn parse(field: &str, v: Option<&str>) -> Result<Self, String> {
        match v {
            None | Some("") | Some("Cluster") => Ok(Policy::Cluster),
            Some("Local") => Ok(Policy::Local),
            Some(other) => Err(format!("{field} {other:?} is neither Cluster nor Local")),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Policy::Cluster => lb_common::POLICY_CLUSTER,
            Policy::Local => lb_common::POLICY_LOCAL,
        }
    }

    pub fn from_code(c: u8) -> Self {
        if c == lb_common::POLICY_LOCAL { Policy::Local } else { Policy::Cluster }
    }
}

/// A service port's settings that the CLI shows as `kubectl describe service` does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shown {
    /// `targetPort` as written (a number or a port name); "" when unset (then it is `port`).
    pub target_port: String,
    /// The node port was given out by xlb (standalone mode: the manifest has none).
    pub node_port_assigned: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 for `None`.
    pub affinity_timeout: u32,
    pub external_policy: Policy,
    pub internal_policy: Policy,
    /// ExternalName Services: the DNS name.
    pub external_name: String,
    /// `healthCheckNodePort` of a LoadBalancer Service with externalTrafficPolicy Local: the
    /// node answers load balancers' health checks there (see `agent::healthcheck`); 0: none.
    pub health_check_node_port: u16,
}

impl DesiredPort {
    /// The backends new flows choose from: the ready ones, or, when none is ready, the
    /// terminating ones that still serve.
    pub fn selectable(&self) -> impl Iterator<Item = &DesiredBackend> {
        self.selectable_where(false)
    }

    /// As [`Self::selectable`], among the endpoints on this node only when `local_only`.
    pub fn selectable_where(&self, local_only: bool) -> impl Iterator<Item = &DesiredBackend> {
        let pool = move || self.backends.iter().filter(move |b| if local_only { b.local } else { b.topo });
        let any_active = pool().any(|b| b.state == BackendState::Active);
        let want = if any_active { BackendState::Active } else { BackendState::Terminating };
        pool().filter(move |b| b.state == want)
    }

    /// Whether a traffic policy `Local` applies to a frontend of this kind (`SVC_F_*` bits):
    /// externalTrafficPolicy to externalIPs, ingress IPs and node ports, internalTrafficPolicy
    /// to clusterIPs.
    pub fn local_only(&self, kind: u16) -> bool {
        let external =
            lb_common::SVC_F_EXTERNAL_IP | lb_common::SVC_F_LB_INGRESS | lb_common::SVC_F_NODE_PORT;
        let policy =
            if kind & external != 0 { self.shown.external_policy } else { self.shown.internal_policy };
        policy == Policy::Local
    }
}

/// An object the model refused, or the part of it that it refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
    /// `None`: the whole object is left out. `Some(part)`: only that part of it is (one of
    /// [`PARTS`]); the rest of the object is served, as kube-proxy serves what is valid.
    pub part: Option<&'static str>,
}

/// The parts of an object that can be left out alone: a Service's node port, externalIP,
/// LoadBalancer ingress IPs (also when its loadBalancerSourceRanges are invalid), and an
/// EndpointSlice's endpoint.
pub const PARTS: &[&str] =
    &["nodePort", "externalIP", "loadBalancerIngress", "endpoint", "healthCheckNodePort"];

impl Rejection {
    /// The whole object is rejected.
    pub fn whole(kind: &'static str, namespace: &str, name: &str, reason: String) -> Self {
        Self { kind, namespace: namespace.to_owned(), name: name.to_owned(), reason, part: None }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}: {}", self.kind, self.namespace, self.name, self.reason)?;
        if let Some(part) = self.part {
            write!(f, " (this {part} is left out; the rest is served)")?;
        }
        Ok(())
    }
}

/// The default `--service-node-port-range` of kube-apiserver.
pub const DEFAULT_NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Most endpoints one service port may have in the datapath.
    pub max_backends_per_service: usize,
    /// Node ports outside this range are rejected (the cluster's `--service-node-port-range`).
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// The node's addresses: each NodePort is answered on all of them.
    pub node_addrs: Vec<IpAddr>,
    /// This node's name, as EndpointSlices give it in `nodeName`: endpoints there are local
    /// (for the traffic policies `Local`). `None`: no endpoint is local.
    pub node_name: Option<String>,
    /// Give a NodePort or LoadBalancer port without a `nodePort` one from the range, as the API
    /// server would (standalone mode, where no API server does): the same one on every node,
    /// from a hash of the port's name, the first free one from there. Otherwise such a port is
    /// rejected.
    pub allocate_node_ports: bool,
    /// This node's zone (its Node's `topology.kubernetes.io/zone` label), for endpoints' zone
    /// hints. `None`: not known (zone hints are then not used).
    pub zone: Option<String>,
}

impl ModelConfig {
    /// Whether `a` is one of the node's addresses.
    pub fn is_node_addr(&self, a: &IpAddr) -> bool {
        self.node_addrs.contains(a)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            max_backends_per_service: usize::from(lb_common::MAX_BACKENDS_PER_SERVICE),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            node_addrs: Vec::new(),
            node_name: None,
            allocate_node_ports: false,
            zone: None,
        }
    }
}

/// Parses a node port range as kube-apiserver's `--service-node-port-range` takes it:
/// `30000-32767`, or a single port.
pub fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let num = |x: &str| {
        x.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{x:?} is not a port (1-65535)"))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo > hi {
        return Err(format!("range {lo}-{hi} is empty"));
    }
    Ok(lo..=hi)
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Sorted by [`PortRef`].
    pub ports: Vec<Arc<DesiredPort>>,
    pub rejected: Vec<Rejection>,
}

/// (namespace, name) of an object; no namespace is "default".
pub fn ns_name(meta: &ObjectMeta) -> Key {
    (meta.namespace.as_deref().unwrap_or("default").into(), meta.name.as_deref().unwrap_or_default().into())
}

/// (namespace, name) of an object. Shared, not copied, wherever a Service's name is kept (its
/// ports, its slices, the claims, the reconciler's ids): a large cluster keeps it many times.
pub type Key = (Arc<str>, Arc<str>);

/// Endpoints of one service, by (slice port name, protocol).
/// (port name, protocol) -> (address, port) -> (state, the endpoint's node).
type EndpointIndex =
    BTreeMap<(String, Proto), BTreeMap<(IpAddr, u16), (BackendState, Option<Arc<str>>, Option<Arc<Hints>>)>>;

/// Builds the desired datapath state. Objects are taken in a deterministic order (namespace,
/// name), so that when two Services claim the same frontend the same one always wins.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    cfg: &ModelConfig,
) -> Model {
    let services: Vec<Arc<Service>> = services.into_iter().cloned().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.into_iter().cloned().map(Arc::new).collect();
    ModelCache::default().build(&services, &slices, cfg)
}

/// What one EndpointSlice contributes: its Service, its ports and its usable endpoints.
#[derive(Clone, Debug)]
struct ParsedSlice {
    service: Key,
    /// (slice port name, protocol, number).
    ports: Vec<(String, Proto, u16)>,
    /// (address, state, `nodeName`, topology hints).
    endpoints: Vec<SliceEndpoint>,
    /// The endpoints left out, each a partial rejection of the slice.
    partial: Vec<Rejection>,
}

/// An endpoint's topology hints (`hints.forZones`, `hints.forNodes`: the zones and nodes whose
/// clients should use it), as the EndpointSlice controller writes them for
/// `trafficDistribution` and topology-aware routing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

impl Hints {
    fn of(h: Option<&k8s_openapi::api::discovery::v1::EndpointHints>) -> Option<Arc<Self>> {
        let h = h?;
        let zones: Vec<String> = h.for_zones.iter().flatten().map(|z| z.name.clone()).collect();
        let nodes: Vec<String> = h.for_nodes.iter().flatten().map(|n| n.name.clone()).collect();
        (!zones.is_empty() || !nodes.is_empty()).then(|| Arc::new(Hints { zones, nodes }))
    }
}

/// Which endpoints of a port this node's cluster-wide traffic uses, as kube-proxy decides it
/// from the hints of the ready endpoints: when every one has node hints and some are for this
/// node, those; else when every one has zone hints and some are for this node's zone, those;
/// else all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    All,
    SameNode,
    SameZone,
}

impl Topology {
    fn of<'a>(ready: impl Iterator<Item = Option<&'a Hints>> + Clone, cfg: &ModelConfig) -> Self {
        let node = cfg.node_name.as_deref().unwrap_or("");
        let zone = cfg.zone.as_deref().unwrap_or("");
        let mut any = false;
        let (mut all_nodes, mut for_node, mut all_zones, mut for_zone) = (true, false, true, false);
        for h in ready {
            any = true;
            let (nodes, zones) = h.map_or((&[][..], &[][..]), |h| (&h.nodes[..], &h.zones[..]));
            all_nodes &= !nodes.is_empty();
            for_node |= !node.is_empty() && nodes.iter().any(|n| n == node);
            all_zones &= !zones.is_empty();
            for_zone |= !zone.is_empty() && zones.iter().any(|z| z == zone);
        }
        match () {
            _ if any && all_nodes && for_node => Topology::SameNode,
            _ if any && all_zones && for_zone => Topology::SameZone,
            _ => Topology::All,
        }
    }

    fn admits(self, h: Option<&Hints>, cfg: &ModelConfig) -> bool {
        let has = |v: &[String], x: Option<&str>| x.is_some_and(|x| v.iter().any(|e| e == x));
        match self {
            Topology::All => true,
            Topology::SameNode => h.is_some_and(|h| has(&h.nodes, cfg.node_name.as_deref())),
            Topology::SameZone => h.is_some_and(|h| has(&h.zones, cfg.zone.as_deref())),
        }
    }
}

/// An endpoint of a slice: (address, state, `nodeName`, topology hints).
type SliceEndpoint = (IpAddr, BackendState, Option<Arc<str>>, Option<Arc<Hints>>);

/// A slice read: `None` for one xlb does not serve (FQDN).
type SliceResult = Option<Result<ParsedSlice, Rejection>>;

/// The parts of a Service left out: (part, one of [`PARTS`]; reason).
type LeftOut = Vec<(&'static str, String)>;

/// The model of one Service, before the cluster-wide conflict checks.
#[derive(Clone, Debug)]
enum ServiceModel {
    /// The ports, and the parts of the Service left out.
    Ports(Vec<Arc<DesiredPort>>, LeftOut),
    /// Nothing to serve, and that is fine (headless).
    Nothing,
    Rejected(String),
}

struct CachedService {
    svc: Arc<Service>,
    /// Addresses of the slices (`Arc::as_ptr`) the model was built from, sorted.
    slices: Vec<usize>,
    model: ServiceModel,
}

/// The model built incrementally: a Service is modelled again only when it or one of its
/// EndpointSlices changed (compared by object identity, as reflector stores hand out a new
/// `Arc` for every new version), so that one endpoint change in a large cluster costs one
/// Service's work plus a cheap pass over the others.
#[derive(Default)]
pub struct ModelCache {
    cfg: Option<ModelConfig>,
    /// By `Arc::as_ptr`; the `Arc` is held so that the address cannot be reused meanwhile.
    slices: HashMap<usize, (Arc<EndpointSlice>, SliceResult)>,
    services: HashMap<Key, CachedService>,
    /// Services modelled again by the last build (the others came from the cache).
    pub last_rebuilt: usize,
}

impl ModelCache {
    pub fn build(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        cfg: &ModelConfig,
    ) -> Model {
        if self.cfg.as_ref() != Some(cfg) {
            *self = ModelCache { cfg: Some(cfg.clone()), ..ModelCache::default() };
        }
        let mut model = Model::default();

        // Slices: parsed once per object version, grouped by Service.
        let mut old_slices = std::mem::take(&mut self.slices);
        let mut by_service: HashMap<Key, Vec<usize>> = HashMap::default();
        for slice in slices {
            let ptr = Arc::as_ptr(slice) as usize;
            let parsed = match old_slices.remove(&ptr) {
                Some((_, parsed)) => parsed,
                None => parse_slice(slice),
            };
            match &parsed {
                Some(Ok(p)) => {
                    model.rejected.extend(p.partial.iter().cloned());
                    by_service.entry(p.service.clone()).or_default().push(ptr)
                }
                Some(Err(r)) => model.rejected.push(r.clone()),
                None => {}
            }
            self.slices.insert(ptr, (slice.clone(), parsed));
        }
        drop(old_slices);

        // Services, in (namespace, name) order.
        let mut sorted: Vec<(Key, &Arc<Service>)> =
            services.iter().map(|s| (ns_name(&s.metadata), s)).collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut old_services = std::mem::take(&mut self.services);
        self.last_rebuilt = 0;
        // Owners of claimed frontends and node ports (an `Arc` clone, not a copy of the names).
        let mut claimed: HashMap<Frontend, Arc<DesiredPort>> = HashMap::default();
        // Node ports are claimed even when no node address is known: they are cluster-wide.
        let mut claimed_node_ports: HashMap<(u16, Proto), Arc<DesiredPort>> = HashMap::default();

        for (key, svc) in sorted {
            let mut slice_ptrs = by_service.remove(&key).unwrap_or_default();
            slice_ptrs.sort_unstable();
            let cached = old_services
                .remove(&key)
                .filter(|c| Arc::ptr_eq(&c.svc, svc) && c.slices == slice_ptrs)
                .map(|c| c.model);
            let service_model = match cached {
                Some(m) => m,
                None => {
                    self.last_rebuilt += 1;
                    let eps =
                        index_endpoints(slice_ptrs.iter().filter_map(|p| match &self.slices.get(p)?.1 {
                            Some(Ok(parsed)) => Some(parsed),
                            _ => None,
                        }));
                    model_service(svc, &key, &eps, cfg)
                }
            };
            let (namespace, name) = key.clone();
            match &service_model {
                ServiceModel::Ports(ports, partial) => {
                    let part = |part: &'static str, reason: String| Rejection {
                        part: Some(part),
                        ..Rejection::whole("Service", &namespace, &name, reason)
                    };
                    model.rejected.extend(partial.iter().map(|(p, why)| part(p, why.clone())));
                    let owner = |o: &DesiredPort| format!("Service {}/{}", o.id.namespace, o.id.name);
                    let other = |o: &DesiredPort| o.id.namespace != namespace || o.id.name != name;
                    // A clusterIP:port already served by another Service (possible only from
                    // manifests: the API server allocates clusterIPs) is a conflict of the
                    // Service's identity: the later Service is rejected whole.
                    let clash = ports.iter().find_map(|p| {
                        p.frontends.iter().zip(&p.frontend_kinds).find_map(|(f, k)| {
                            let o = claimed.get(f).filter(|o| other(o))?;
                            (k & lb_common::SVC_F_CLUSTER_IP != 0)
                                .then(|| format!("frontend {f} is already used by {}", owner(o)))
                        })
                    });
                    if let Some(reason) = clash {
                        model.rejected.push(Rejection::whole("Service", &namespace, &name, reason));
                    } else {
                        // A node port, externalIP or ingress IP another Service holds is left
                        // out of this one alone; the rest of it is served.
                        for p in ports {
                            let mut p = p.clone();
                            let np = p.node_port.filter(|&np| np != TO_ALLOCATE);
                            if let Some(o) = np.and_then(|np| claimed_node_ports.get(&(np, p.id.proto)))
                                && other(o)
                            {
                                let why = format!(
                                    "nodePort {}/{} is already used by {}",
                                    np.unwrap_or_default(),
                                    p.id.proto,
                                    owner(o)
                                );
                                model.rejected.push(part("nodePort", why));
                                strip_node_port(Arc::make_mut(&mut p));
                            }
                            let taken: Vec<(Frontend, u16)> = p
                                .frontends
                                .iter()
                                .zip(&p.frontend_kinds)
                                .filter(|(f, _)| claimed.get(f).is_some_and(|o| other(o)))
                                .map(|(f, k)| (*f, *k))
                                .collect();
                            for (f, k) in &taken {
                                let what = part_of_frontend(*k);
                                let o = owner(&claimed[f]);
                                model
                                    .rejected
                                    .push(part(what, format!("frontend {f} is already used by {o}")));
                            }
                            if !taken.is_empty() {
                                retain_frontends(Arc::make_mut(&mut p), |f, k| {
                                    (!taken.iter().any(|(t, _)| t == f)).then_some(k)
                                });
                            }
                            for f in &p.frontends {
                                claimed.insert(*f, p.clone());
                            }
                            if let Some(np) = p.node_port.filter(|&np| np != TO_ALLOCATE) {
                                claimed_node_ports.entry((np, p.id.proto)).or_insert_with(|| p.clone());
                            }
                            model.ports.push(p);
                        }
                    }
                }
                ServiceModel::Nothing => {}
                ServiceModel::Rejected(reason) => {
                    model.rejected.push(Rejection::whole("Service", &namespace, &name, reason.clone()))
                }
            }
            self.services
                .insert(key, CachedService { svc: svc.clone(), slices: slice_ptrs, model: service_model });
        }
        allocate_node_ports(&mut model, &claimed_node_ports, cfg);
        model.ports.sort_by(|a, b| a.id.cmp(&b.id));
        model
    }
}

/// The part of a Service ([`PARTS`]) a frontend of kind `k` (`SVC_F_*` bits, not a clusterIP)
/// belongs to.
fn part_of_frontend(k: u16) -> &'static str {
    if k & lb_common::SVC_F_NODE_PORT != 0 {
        "nodePort"
    } else if k & lb_common::SVC_F_LB_INGRESS != 0 {
        "loadBalancerIngress"
    } else {
        "externalIP"
    }
}

/// `DesiredPort::node_port` of a port whose node port is still to be allocated.
const TO_ALLOCATE: u16 = 0;

/// Takes the node port out of a port: its frontends on the node's addresses go (an address that
/// is also something else to the port, an externalIP on the node, keeps that).
fn strip_node_port(p: &mut DesiredPort) {
    p.node_port = None;
    retain_frontends(p, |_, k| {
        let k = k & !lb_common::SVC_F_NODE_PORT;
        (k & !(lb_common::SVC_F_LOCAL | lb_common::SVC_F_SOURCE_RANGES) != 0).then_some(k)
    });
}

/// Keeps the frontends of `p` for which `keep` gives their kind (`SVC_F_*` bits), with that
/// kind, in their order; drops the others.
fn retain_frontends(p: &mut DesiredPort, mut keep: impl FnMut(&Frontend, u16) -> Option<u16>) {
    let (frontends, kinds) =
        p.frontends.iter().zip(&p.frontend_kinds).filter_map(|(f, &k)| keep(f, k).map(|k| (*f, k))).unzip();
    p.frontends = frontends;
    p.frontend_kinds = kinds;
}

/// Gives each port waiting for a node port ([`TO_ALLOCATE`], in the model's order) the first
/// free one of the range from a hash of its name, and its frontends on the node's addresses.
/// Every node computes the same from the same objects.
fn allocate_node_ports(
    model: &mut Model,
    claimed: &HashMap<(u16, Proto), Arc<DesiredPort>>,
    cfg: &ModelConfig,
) {
    let mut taken: BTreeSet<(u16, Proto)> = claimed.keys().copied().collect();
    // The two families of a dual-stack Service port share its node port.
    let mut given: HashMap<String, Option<u16>> = HashMap::default();
    for p in model.ports.iter_mut().filter(|p| p.node_port == Some(TO_ALLOCATE)) {
        give_node_port(p, cfg, &mut taken, &mut given);
    }
}

/// Gives port `p` (waiting for a node port) the first node port of the range not `taken`, from
/// a hash of its name on (or the one its other family got, in `given`), and its frontends on
/// the node's addresses; the range full, it has none.
fn give_node_port(
    p: &mut Arc<DesiredPort>,
    cfg: &ModelConfig,
    taken: &mut BTreeSet<(u16, Proto)>,
    given: &mut HashMap<String, Option<u16>>,
) {
    let (lo, hi) = (u32::from(*cfg.node_port_range.start()), u32::from(*cfg.node_port_range.end()));
    let size = hi - lo + 1;
    let name = format!("{}/{}/{}/{}", p.id.namespace, p.id.name, p.id.port_name, p.id.proto);
    let free = *given.entry(name).or_insert_with_key(|name| {
        let start = (crate::reconcile::maglev::fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325)
            % u64::from(size)) as u32;
        let free = (0..size)
            .map(|i| (lo + (start + i) % size) as u16)
            .find(|np| !taken.contains(&(*np, p.id.proto)));
        if let Some(np) = free {
            taken.insert((np, p.id.proto));
        }
        free
    });
    let port = Arc::make_mut(p);
    match free {
        Some(np) => {
            port.node_port = Some(np);
            port.shown.node_port_assigned = true;
            for &addr in cfg.node_addrs.iter().filter(|a| Family::of(a) == port.id.family) {
                port.frontends.push(Frontend { addr, port: np, proto: port.id.proto });
                port.frontend_kinds.push(lb_common::SVC_F_NODE_PORT | lb_common::SVC_F_LOCAL);
            }
        }
        // The range is full: serve the rest of the port, without a node port.
        None => port.node_port = None,
    }
}

fn model_service(svc: &Service, key: &Key, eps: &EndpointIndex, cfg: &ModelConfig) -> ServiceModel {
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return match spec.and_then(|s| s.external_name.as_deref()).filter(|n| !n.is_empty()) {
            Some(n) => match external_name_ports(spec, key, n) {
                Ok(ports) => ServiceModel::Ports(shared(ports), Vec::new()),
                Err(reason) => ServiceModel::Rejected(reason),
            },
            None => ServiceModel::Rejected("type ExternalName without spec.externalName".into()),
        };
    }
    match service_ports(svc, key, eps, cfg) {
        Ok((ports, partial)) => ServiceModel::Ports(shared(ports), partial),
        Err(reason) if reason.is_empty() => ServiceModel::Nothing,
        Err(reason) => ServiceModel::Rejected(reason),
    }
}

/// The ports of a Service as held until it changes: each shared, and no spare capacity (the
/// vectors were grown by pushes, and a large cluster holds one set per Service).
fn shared(ports: Vec<DesiredPort>) -> Vec<Arc<DesiredPort>> {
    let mut out = Vec::with_capacity(ports.len());
    for mut p in ports {
        p.frontends.shrink_to_fit();
        p.frontend_kinds.shrink_to_fit();
        p.backends.shrink_to_fit();
        p.source_ranges.shrink_to_fit();
        out.push(Arc::new(p));
    }
    out
}

/// An ExternalName Service: a DNS alias with no datapath. Its ports (or one port-less entry)
/// are kept, without frontends or backends, so that the CLI can show it.
fn external_name_ports(
    spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>,
    (namespace, name): &Key,
    external_name: &str,
) -> Result<Vec<DesiredPort>, String> {
    if external_name.len() > 253 {
        return Err(format!(
            "externalName is {} characters long, more than DNS allows (253)",
            external_name.len()
        ));
    }
    let shown = Shown { external_name: external_name.to_owned(), ..Shown::default() };
    let port_ref = |port_name: String, proto| PortRef {
        namespace: namespace.clone(),
        name: name.clone(),
        port_name,
        proto,
        family: Family::V4,
    };
    let empty = |id, port| DesiredPort {
        id,
        svc_type: SvcType::ExternalName,
        port,
        node_port: None,
        frontends: Vec::new(),
        frontend_kinds: Vec::new(),
        backends: Vec::new(),
        shown: shown.clone(),
        source_ranges: Vec::new(),
    };
    let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
    if ports.is_empty() {
        return Ok(vec![empty(port_ref(String::new(), Proto::Tcp), 0)]);
    }
    let mut out: Vec<DesiredPort> = Vec::new();
    for sp in ports {
        let port_name = sp.name.clone().unwrap_or_default();
        let proto = Proto::parse(sp.protocol.as_deref()).map_err(|e| format!("port {port_name:?}: {e}"))?;
        let port =
            u16::try_from(sp.port).map_err(|_| format!("port {port_name:?}: invalid port {}", sp.port))?;
        let id = port_ref(port_name, proto);
        if out.iter().any(|p| p.id == id) {
            return Err(format!("port {:?}/{proto} is listed twice", id.port_name));
        }
        out.push(empty(id, port));
    }
    Ok(out)
}

/// Settings of a Service that apply to all its ports.
fn shown_settings(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<Shown, String> {
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => 0,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10_800);
            u32::try_from(t).ok().filter(|t| (1..=86_400).contains(t)).ok_or_else(|| {
                format!("sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1-86400")
            })?
        }
        Some(other) => return Err(format!("sessionAffinity {other:?} is neither None nor ClientIP")),
    };
    Ok(Shown {
        target_port: String::new(),
        node_port_assigned: false,
        affinity_timeout,
        external_policy: Policy::parse("externalTrafficPolicy", spec.external_traffic_policy.as_deref())?,
        internal_policy: Policy::parse("internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?,
        external_name: String::new(),
        health_check_node_port: 0,
    })
}

/// The EndpointSlices equivalent to a core/v1 Endpoints object, as the EndpointSlice mirroring
/// controller writes them for Services without a selector: one slice per subset, `addresses`
/// ready and `notReadyAddresses` not ready.
pub fn slices_from_endpoints(ep: &Endpoints) -> Vec<EndpointSlice> {
    let (namespace, name) = ns_name(&ep.metadata);
    let mut out = Vec::new();
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        let endpoint = |ip: &str, ready: bool| Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(ready),
                terminating: Some(false),
            }),
            ..Default::default()
        };
        let endpoints = subset
            .addresses
            .iter()
            .flatten()
            .map(|a| endpoint(&a.ip, true))
            .chain(subset.not_ready_addresses.iter().flatten().map(|a| endpoint(&a.ip, false)))
            .collect();
        let ports = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        out.push(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-endpoints-{i}")),
                namespace: Some(namespace.to_string()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), name.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(ports),
        });
    }
    out
}

/// Parses an address a Service names (clusterIP, externalIP, ingress IP) as a frontend.
fn frontend_addr(what: &str, ip: &str) -> Result<Option<IpAddr>, String> {
    let a: IpAddr = ip.parse().map_err(|_| format!("{what} {ip:?} is not a valid IP address"))?;
    let broadcast = matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
    if a.is_unspecified() || broadcast || a.is_multicast() || a.is_loopback() {
        return Err(format!("{what} {a} cannot be a service address"));
    }
    // No packet is addressed to ::ffff:a.b.c.d on the wire (found by the input fuzzer, which
    // saw one served as an IPv6 frontend that nothing could reach).
    if let IpAddr::V6(v6) = a
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(format!("{what} {ip} is an IPv4-mapped IPv6 address: write the IPv4 address {v4}"));
    }
    Ok(Some(a))
}

/// Why an address can never be an endpoint (a pod, or a host reached through a Service), or
/// `None` when it can be. The API server accepts such addresses in EndpointSlices; traffic sent
/// to them would only time out.
pub fn endpoint_addr_problem(a: &IpAddr) -> Option<&'static str> {
    match a {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("is in 0.0.0.0/8 (this network)")
            } else if v4.is_loopback() {
                Some("is a loopback address")
            } else if v4.is_broadcast() {
                Some("is the broadcast address")
            } else if v4.is_multicast() {
                Some("is a multicast address")
            } else if v4.is_link_local() {
                Some("is a link-local address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("is the unspecified address")
            } else if v6.is_loopback() {
                Some("is a loopback address")
            } else if v6.is_multicast() {
                Some("is a multicast address")
            } else if v6.is_unicast_link_local() {
                Some("is a link-local address")
            } else if v6.to_ipv4_mapped().is_some() {
                Some("is an IPv4-mapped address (list it in an IPv4 slice)")
            } else {
                None
            }
        }
    }
}

/// Reads one slice. `None`: a slice xlb does not serve (FQDN), which is no error. An endpoint
/// that cannot be served (an address of the wrong family, or one that can never be a pod) is
/// left out alone, with a partial rejection; the slice's other endpoints are served.
fn parse_slice(slice: &EndpointSlice) -> SliceResult {
    let (namespace, name) = ns_name(&slice.metadata);
    let reject = |reason: String| Rejection::whole("EndpointSlice", &namespace, &name, reason);
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // FQDN slices have no datapath; they are not errors.
        _ => return None,
    };
    let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Some(Err(reject(format!("no {SERVICE_NAME_LABEL} label: it belongs to no Service"))));
    };
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let pname = p.name.as_deref().unwrap_or("");
        let proto = match Proto::parse(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(e) => return Some(Err(reject(format!("port {pname:?}: {e}")))),
        };
        let number = match p.port.map(u16::try_from) {
            Some(Ok(n)) if n != 0 => n,
            _ => return Some(Err(reject(format!("port {pname:?} has invalid number {:?}", p.port)))),
        };
        ports.push((p.name.clone().unwrap_or_default(), proto, number));
    }
    let mut addrs = Vec::new();
    let mut partial = Vec::new();
    for ep in &slice.endpoints {
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let state = if ready && !terminating {
            BackendState::Active
        } else if terminating && serving {
            BackendState::Terminating
        } else if terminating {
            BackendState::Draining
        } else {
            continue; // not ready yet: no flow can exist to it
        };
        // Only the first address is used, as kube-proxy does.
        let Some(first) = ep.addresses.first() else { continue };
        let problem = match first.parse::<IpAddr>() {
            Ok(a) if Family::of(&a) == family => match endpoint_addr_problem(&a) {
                None => {
                    addrs.push((
                        a,
                        state,
                        ep.node_name.as_deref().map(Arc::from),
                        Hints::of(ep.hints.as_ref()),
                    ));
                    continue;
                }
                Some(why) => format!("endpoint address {a} {why}: it can never be a backend"),
            },
            _ => format!("endpoint address {first:?} is not an {} address", slice.address_type),
        };
        partial.push(Rejection { part: Some("endpoint"), ..reject(problem) });
    }
    // Held until the slice changes: no spare capacity.
    ports.shrink_to_fit();
    addrs.shrink_to_fit();
    Some(Ok(ParsedSlice { service: (namespace, service.as_str().into()), ports, endpoints: addrs, partial }))
}

/// Indexes the endpoints of one Service's slices by port, merging duplicates across slices.
fn index_endpoints<'a>(slices: impl Iterator<Item = &'a ParsedSlice>) -> EndpointIndex {
    let mut by_port = EndpointIndex::new();
    for slice in slices {
        for (port_name, proto, number) in &slice.ports {
            let eps = by_port.entry((port_name.clone(), *proto)).or_default();
            for (addr, state, node, hints) in &slice.endpoints {
                // The most usable state wins.
                let e = eps.entry((*addr, *number)).or_insert((*state, node.clone(), hints.clone()));
                e.0 = e.0.min(*state);
                if e.1.is_none() {
                    e.1 = node.clone();
                }
                if e.2.is_none() {
                    e.2 = hints.clone();
                }
            }
        }
    }
    by_port
}

/// The service ports of one Service, and the parts of it left out: (part, reason). `Err("")`
/// means "nothing to serve, and that is fine" (headless, ExternalName); another `Err` rejects
/// the whole Service. What is wrong with one externalIP, ingress IP or node port leaves out
/// that part alone, as kube-proxy serves what is valid.
fn service_ports(
    svc: &Service,
    (namespace, name): &Key,
    eps: &EndpointIndex,
    cfg: &ModelConfig,
) -> Result<(Vec<DesiredPort>, LeftOut), String> {
    let spec = svc.spec.as_ref().ok_or("no spec")?;
    let svc_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => SvcType::ClusterIP,
        "NodePort" => SvcType::NodePort,
        "LoadBalancer" => SvcType::LoadBalancer,
        "ExternalName" => return Err(String::new()),
        other => return Err(format!("unknown type {other:?}")),
    };
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    if cluster_ip == "None" {
        return Err(String::new()); // headless: DNS only
    }
    if cluster_ip.is_empty() {
        return Err("no clusterIP assigned (spec.clusterIP is empty)".into());
    }
    let mut partial = LeftOut::new();
    // Addresses reached on `port`.
    let mut addrs: BTreeMap<IpAddr, u16> = BTreeMap::new();
    for ip in std::iter::once(cluster_ip).chain(spec.cluster_ips.iter().flatten().map(String::as_str)) {
        if let Some(a) = frontend_addr("clusterIP", ip)? {
            *addrs.entry(a).or_default() |= lb_common::SVC_F_CLUSTER_IP;
        }
    }
    // The families the Service has: as kube-proxy (one proxier per family, each skipping the
    // Services without a clusterIP of its family), its externalIPs, ingress IPs and node ports
    // of another family are not served.
    let families: BTreeSet<Family> = addrs.keys().map(Family::of).collect();
    let mut source_ranges = Vec::new();
    let mut ranges_ok = true;
    if svc_type == SvcType::LoadBalancer {
        for r in spec.load_balancer_source_ranges.iter().flatten() {
            match r.trim().parse::<Cidr>() {
                Ok(c) => source_ranges.push(c.network()),
                Err(e) => {
                    // Serving the ingress IPs open would let in what the ranges keep out.
                    partial.push((
                        "loadBalancerIngress",
                        format!("loadBalancerSourceRanges: {e}: the ingress IPs are not served"),
                    ));
                    ranges_ok = false;
                    break;
                }
            }
        }
        source_ranges.sort();
        source_ranges.dedup();
    }
    let family_name = |f: Family| if f == Family::V4 { "IPv4" } else { "IPv6" };
    let mut add_external = |what: &str, part: &'static str, kind: u16, ip: &str| match frontend_addr(what, ip)
    {
        Ok(Some(a)) if families.contains(&Family::of(&a)) => *addrs.entry(a).or_default() |= kind,
        Ok(Some(a)) => {
            let f = family_name(Family::of(&a));
            partial.push((part, format!("{what} {a} is {f}, and the Service has no {f} clusterIP")))
        }
        Ok(None) => {}
        Err(e) => partial.push((part, e)),
    };
    for ip in spec.external_ips.iter().flatten() {
        add_external("externalIP", "externalIP", lb_common::SVC_F_EXTERNAL_IP, ip);
    }
    if svc_type == SvcType::LoadBalancer {
        let ingress =
            svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        // An ingress with only a hostname is reached through DNS at an address xlb does not own.
        // One with ipMode Proxy (or any mode but VIP) is a load balancer that proxies to the
        // nodes: its address is not short-circuited on a node (as kube-proxy's IsVIPMode),
        // traffic to it goes out to the load balancer.
        let vip_mode = |i: &&k8s_openapi::api::core::v1::LoadBalancerIngress| {
            i.ip_mode.as_deref().is_none_or(|m| m == "VIP")
        };
        for ip in ingress
            .into_iter()
            .flatten()
            .filter(vip_mode)
            .filter_map(|i| i.ip.as_deref())
            .filter(|_| ranges_ok)
        {
            add_external("LoadBalancer ingress IP", "loadBalancerIngress", lb_common::SVC_F_LB_INGRESS, ip);
        }
    }
    let wants_node_port = match svc_type {
        SvcType::NodePort => true,
        SvcType::LoadBalancer => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("no ports".into());
    }
    let mut settings = shown_settings(spec)?;
    if svc_type == SvcType::LoadBalancer && settings.external_policy == Policy::Local {
        match spec.health_check_node_port {
            None => {}
            Some(p) => match u16::try_from(p).ok().filter(|p| *p != 0) {
                Some(p) => settings.health_check_node_port = p,
                None => {
                    partial.push(("healthCheckNodePort", format!("healthCheckNodePort {p} is not a port")))
                }
            },
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut seen_names = BTreeSet::new();
    let mut seen_node_ports = BTreeSet::new();
    for sp in ports {
        let port_name = sp.name.clone().unwrap_or_default();
        let proto = Proto::parse(sp.protocol.as_deref()).map_err(|e| format!("port {port_name:?}: {e}"))?;
        let port = u16::try_from(sp.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {port_name:?}: invalid port number {}", sp.port))?;
        if !seen.insert((port, proto)) {
            return Err(format!("port {port}/{proto} is listed twice"));
        }
        // A port is known by its name (the EndpointSlices' ports are matched by it): the API
        // server refuses a name used twice.
        if !seen_names.insert((port_name.clone(), proto)) {
            return Err(format!("port name {port_name:?} is listed twice for {proto}"));
        }
        let node_port = match sp.node_port {
            _ if !wants_node_port => None,
            // Allocated once every Service's own node ports are known (see `allocate_node_ports`).
            None if cfg.allocate_node_ports => Some(TO_ALLOCATE),
            None => {
                partial
                    .push(("nodePort", format!("port {port_name:?}: type {svc_type:?} without a nodePort")));
                None
            }
            Some(np) => match u16::try_from(np).ok().filter(|p| cfg.node_port_range.contains(p)) {
                None => {
                    partial.push((
                        "nodePort",
                        format!(
                            "port {port_name:?}: nodePort {np} is outside the node port range {}-{}",
                            cfg.node_port_range.start(),
                            cfg.node_port_range.end()
                        ),
                    ));
                    None
                }
                Some(np) if !seen_node_ports.insert((np, proto)) => {
                    partial.push((
                        "nodePort",
                        format!("port {port_name:?}: nodePort {np}/{proto} is listed twice"),
                    ));
                    None
                }
                Some(np) => Some(np),
            },
        };
        let port_eps = eps.get(&(port_name.clone(), proto));
        // Topology hints are weighed per family (each family is a port of its own).
        let topology = |f: Family| {
            let ready = port_eps
                .into_iter()
                .flatten()
                .filter(move |((a, _), (st, ..))| Family::of(a) == f && *st == BackendState::Active)
                .map(|(_, (_, _, h))| h.as_deref());
            Topology::of(ready, cfg)
        };
        let modes = [topology(Family::V4), topology(Family::V6)];
        let backends: Vec<DesiredBackend> = port_eps
            .into_iter()
            .flatten()
            .map(|(&(addr, port), (state, node, hints))| DesiredBackend {
                addr,
                port,
                state: *state,
                local: cfg.node_name.is_some() && node.as_deref() == cfg.node_name.as_deref(),
                topo: modes[usize::from(Family::of(&addr) == Family::V6)].admits(hints.as_deref(), cfg),
            })
            .collect();
        if backends.len() > cfg.max_backends_per_service {
            return Err(format!(
                "port {port_name:?} has {} endpoints, more than the {} one service port may have",
                backends.len(),
                cfg.max_backends_per_service
            ));
        }
        let mut kinds: BTreeMap<Frontend, u16> =
            addrs.iter().map(|(&addr, &k)| (Frontend { addr, port, proto }, k)).collect();
        if let Some(np) = node_port.filter(|&np| np != TO_ALLOCATE) {
            for &addr in cfg.node_addrs.iter().filter(|a| families.contains(&Family::of(a))) {
                *kinds.entry(Frontend { addr, port: np, proto }).or_default() |= lb_common::SVC_F_NODE_PORT;
            }
        }
        // Frontends on the node's own addresses: their replies are translated at egress.
        for (f, k) in kinds.iter_mut() {
            if cfg.is_node_addr(&f.addr) {
                *k |= lb_common::SVC_F_LOCAL;
            }
        }
        // One port per family its frontends have (IPv4 when it has none), each with that
        // family's endpoints only.
        let mut port_families: BTreeSet<Family> = kinds.keys().map(|f| Family::of(&f.addr)).collect();
        if port_families.is_empty() {
            port_families.insert(Family::V4);
        }
        for family in port_families {
            // loadBalancerSourceRanges guard the ingress IPs, each family with its own ranges; a
            // family without any is open, as kube-proxy has it (its proxier of each family
            // keeps that family's ranges).
            let ranges: Vec<Cidr> =
                source_ranges.iter().filter(|c| c.is_ipv4() == (family == Family::V4)).copied().collect();
            let guarded = |k: u16| {
                if !ranges.is_empty() && k & lb_common::SVC_F_LB_INGRESS != 0 {
                    k | lb_common::SVC_F_SOURCE_RANGES
                } else {
                    k
                }
            };
            let (frontends, frontend_kinds): (Vec<Frontend>, Vec<u16>) = kinds
                .iter()
                .filter(|(f, _)| Family::of(&f.addr) == family)
                .map(|(f, k)| (*f, guarded(*k)))
                .unzip();
            out.push(DesiredPort {
                id: PortRef {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port_name: port_name.clone(),
                    proto,
                    family,
                },
                svc_type,
                port,
                node_port,
                frontends,
                frontend_kinds,
                backends: backends.iter().filter(|b| Family::of(&b.addr) == family).cloned().collect(),
                source_ranges: ranges,
                shown: Shown {
                    target_port: match &sp.target_port {
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                            n.to_string()
                        }
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                            s.clone()
                        }
                        None => String::new(),
                    },
                    ..settings.clone()
                },
            });
        }
    }
    Ok((out, partial))
}

/// Adds the hostPorts of the pods on this node (`cfg.node_name`) to `model`: each (pod,
/// hostPort, protocol) is one port with a single, local backend (pod IP, containerPort), reached
/// at every node address, or at its `hostIP` alone when one is given. A hostPort whose frontend
/// a Service already uses, or that another pod took first (in namespace/name order), is
/// rejected with the pod. Pods on other nodes, of the host network, finished, or without an IP
/// yet are skipped.
pub fn add_host_ports(model: &mut Model, pods: &[Arc<Pod>], cfg: &ModelConfig) {
    let services: HashMap<Frontend, String> = model
        .ports
        .iter()
        .flat_map(|p| p.frontends.iter().map(|f| (*f, format!("Service {}/{}", p.id.namespace, p.id.name))))
        .collect();
    add_host_ports_checked(model, pods, cfg, |f| services.get(f).cloned());
}

/// [`add_host_ports`], with the owner of a frontend that a Service uses given by `service`
/// ("Service namespace/name").
fn add_host_ports_checked(
    model: &mut Model,
    pods: &[Arc<Pod>],
    cfg: &ModelConfig,
    service: impl Fn(&Frontend) -> Option<String>,
) {
    let Some(node) = cfg.node_name.as_deref() else { return };
    let mut claimed: HashMap<Frontend, String> = HashMap::default();
    let mut sorted: Vec<(Key, &Pod)> = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .map(|p| (ns_name(&p.metadata), p.as_ref()))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, pod) in sorted {
        let (namespace, name) = &key;
        match pod_host_ports(pod, &key, cfg) {
            Ok(ports) => {
                let clash = ports.iter().flat_map(|p| p.frontends.iter()).find_map(|f| {
                    let o = service(f).or_else(|| claimed.get(f).cloned())?;
                    Some(format!("hostPort frontend {f} is already used by {o}"))
                });
                if let Some(reason) = clash {
                    model.rejected.push(Rejection::whole("Pod", namespace, name, reason));
                    continue;
                }
                for p in ports {
                    for f in &p.frontends {
                        claimed.insert(*f, format!("Pod {namespace}/{name}"));
                    }
                    model.ports.push(Arc::new(p));
                }
            }
            Err(reason) => model.rejected.push(Rejection::whole("Pod", namespace, name, reason)),
        }
    }
    model.ports.sort_by(|a, b| a.id.cmp(&b.id));
}

/// The hostPorts of one pod of this node: for each of its IPs (one per family on a dual-stack
/// pod), a port served on the node's addresses of that family, or on `hostIP` when one is given
/// (a `hostIP` of the other family leaves that family out).
fn pod_host_ports(pod: &Pod, (namespace, name): &Key, cfg: &ModelConfig) -> Result<Vec<DesiredPort>, String> {
    let Some(spec) = pod.spec.as_ref() else { return Ok(Vec::new()) };
    let status = pod.status.as_ref();
    let finished = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    // Host-network pods listen on the node's addresses themselves.
    if spec.host_network == Some(true) || finished {
        return Ok(Vec::new());
    }
    // podIPs holds one address per family (podIP is its first); unparsable ones are skipped.
    let mut pod_ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut families = BTreeSet::new();
    pod_ips.retain(|a| families.insert(Family::of(a)));
    let mut by_port: BTreeMap<(u16, Proto, Family), DesiredPort> = BTreeMap::new();
    let containers = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    for cp in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(hp) = cp.host_port.filter(|p| *p != 0) else { continue };
        if pod_ips.is_empty() {
            return Ok(Vec::new()); // not running yet
        }
        let host_port = u16::try_from(hp).map_err(|_| format!("hostPort {hp} is not a port"))?;
        let container_port = u16::try_from(cp.container_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("containerPort {} is not a port", cp.container_port))?;
        let proto = Proto::parse(cp.protocol.as_deref()).map_err(|e| format!("hostPort {host_port}: {e}"))?;
        let host_ip: Option<IpAddr> = match cp.host_ip.as_deref().map(str::trim).filter(|ip| !ip.is_empty()) {
            Some(ip) => Some(ip.parse().map_err(|_| {
                format!("hostPort {host_port}: hostIP {ip:?} is not an IPv4 or IPv6 address")
            })?),
            None => None,
        };
        for &pod_ip in &pod_ips {
            let family = Family::of(&pod_ip);
            let addrs: Vec<IpAddr> = match host_ip {
                Some(ip) if !ip.is_unspecified() => {
                    if Family::of(&ip) != family {
                        continue;
                    }
                    vec![ip]
                }
                _ => cfg.node_addrs.iter().copied().filter(|a| Family::of(a) == family).collect(),
            };
            let entry = by_port.entry((host_port, proto, family)).or_insert_with(|| DesiredPort {
                id: PortRef {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    // Upper case: no Service port name (a lower-case DNS label) can take it.
                    port_name: format!("hostPort-{host_port}"),
                    proto,
                    family,
                },
                svc_type: SvcType::HostPort,
                port: host_port,
                node_port: None,
                frontends: Vec::new(),
                frontend_kinds: Vec::new(),
                backends: vec![DesiredBackend {
                    addr: pod_ip,
                    port: container_port,
                    state: BackendState::Active,
                    local: true,
                    topo: true,
                }],
                shown: Shown { target_port: container_port.to_string(), ..Shown::default() },
                source_ranges: Vec::new(),
            });
            if entry.backends[0].port != container_port {
                return Err(format!(
                    "hostPort {host_port}/{proto} leads to two container ports ({} and {container_port})",
                    entry.backends[0].port
                ));
            }
            for addr in addrs {
                let f = Frontend { addr, port: host_port, proto };
                if !entry.frontends.contains(&f) {
                    entry.frontends.push(f);
                    let local = if cfg.is_node_addr(&addr) { lb_common::SVC_F_LOCAL } else { 0 };
                    entry.frontend_kinds.push(lb_common::SVC_F_HOST_PORT | local);
                }
            }
        }
    }
    Ok(by_port.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::{Objects, read_str};

    fn objects(yaml: &str) -> Objects {
        let mut o = Objects::default();
        read_str("t.yaml".as_ref(), yaml, &mut o);
        assert!(o.errors.is_empty(), "{:?}", o.errors);
        o
    }

    fn build_yaml(yaml: &str) -> Model {
        let o = objects(yaml);
        build(&o.services, &o.slices, &ModelConfig::default())
    }

    fn svc(name: &str, ip: &str, ports: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: {ports}\n---\n"
        )
    }

    fn slice(name: &str, svc: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n---\n"
        )
    }

    fn backends(p: &DesiredPort) -> Vec<String> {
        p.backends.iter().map(|b| format!("{}:{} {:?}", b.addr, b.port, b.state)).collect()
    }

    fn pod(name: &str, node: &str, ip: &str, ports: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  nodeName: {node}\n{extra}  containers:\n  - name: c\n    ports: {ports}\nstatus: {{podIP: {ip}, phase: Running}}\n---\n"
        )
    }

    fn with_host_ports(yaml: &str, cfg: &ModelConfig) -> Model {
        let o = objects(yaml);
        let mut m = build(&o.services, &o.slices, cfg);
        let pods: Vec<Arc<Pod>> = o.pods.into_iter().map(Arc::new).collect();
        add_host_ports(&mut m, &pods, cfg);
        m
    }

    #[test]
    fn host_ports_of_this_nodes_pods_lead_to_the_container_port() {
        let cfg = ModelConfig {
            node_name: Some("node-1".into()),
            node_addrs: vec!["198.18.100.1".parse().unwrap(), "198.18.200.1".parse().unwrap()],
            ..ModelConfig::default()
        };
        let yaml =
            pod(
                "dns",
                "node-1",
                "198.18.10.2",
                "[{containerPort: 53, hostPort: 5353, protocol: UDP}, {containerPort: 9000}]",
                "",
            ) + &pod(
                "web",
                "node-1",
                "198.18.10.3",
                "[{containerPort: 8080, hostPort: 8081, hostIP: 198.18.200.1}]",
                "",
            ) + &pod("elsewhere", "node-2", "198.18.20.2", "[{containerPort: 8080, hostPort: 8082}]", "")
                + &pod(
                    "hostnet",
                    "node-1",
                    "198.18.100.1",
                    "[{containerPort: 9100, hostPort: 9100}]",
                    "  hostNetwork: true\n",
                );
        let m = with_host_ports(&yaml, &cfg);
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        // (port, frontends, backends, frontend kinds)
        type Row = (String, Vec<String>, Vec<String>, Vec<u16>);
        let got: Vec<Row> = m
            .ports
            .iter()
            .map(|p| {
                (
                    format!(
                        "{}/{}:{}/{} {:?}",
                        p.id.namespace, p.id.name, p.id.port_name, p.id.proto, p.svc_type
                    ),
                    p.frontends.iter().map(|f| f.to_string()).collect(),
                    backends(p),
                    p.frontend_kinds.clone(),
                )
            })
            .collect();
        let (hp, local) = (lb_common::SVC_F_HOST_PORT, lb_common::SVC_F_LOCAL);
        assert_eq!(
            got,
            [
                (
                    "default/dns:hostPort-5353/UDP HostPort".to_string(),
                    vec!["198.18.100.1:5353/UDP".to_string(), "198.18.200.1:5353/UDP".to_string()],
                    vec!["198.18.10.2:53 Active".to_string()],
                    vec![hp | local, hp | local],
                ),
                (
                    "default/web:hostPort-8081/TCP HostPort".to_string(),
                    vec!["198.18.200.1:8081/TCP".to_string()],
                    vec!["198.18.10.3:8080 Active".to_string()],
                    vec![hp | local],
                ),
            ]
        );
        assert!(m.ports.iter().all(|p| p.backends.iter().all(|b| b.local)));
        // Without a node name, no pod is known to be on this node.
        let m = with_host_ports(&yaml, &ModelConfig { node_name: None, ..cfg });
        assert!(m.ports.is_empty());
    }

    #[test]
    fn a_host_port_taken_by_a_service_or_another_pod_is_rejected_with_its_pod() {
        let cfg = ModelConfig {
            node_name: Some("node-1".into()),
            node_addrs: vec!["198.18.100.1".parse().unwrap()],
            ..ModelConfig::default()
        };
        let np = "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 198.18.0.10\n  ports: [{port: 80, nodePort: 30080}]\n---\n";
        let yaml = np.to_string()
            + &pod("a", "node-1", "198.18.10.2", "[{containerPort: 80, hostPort: 30080}]", "")
            + &pod("b", "node-1", "198.18.10.3", "[{containerPort: 80, hostPort: 8080}]", "")
            + &pod("c", "node-1", "198.18.10.4", "[{containerPort: 80, hostPort: 8080}]", "")
            + &pod(
                "d",
                "node-1",
                "198.18.10.5",
                "[{containerPort: 80, hostPort: 8090}, {containerPort: 81, hostPort: 8090}]",
                "",
            )
            + &pod("pending", "node-1", "", "[{containerPort: 80, hostPort: 8095}]", "");
        let m = with_host_ports(&yaml, &cfg);
        let rejected: Vec<String> = m.rejected.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rejected,
            [
                "Pod default/a: hostPort frontend 198.18.100.1:30080/TCP is already used by Service default/np",
                "Pod default/c: hostPort frontend 198.18.100.1:8080/TCP is already used by Pod default/b",
                "Pod default/d: hostPort 8090/TCP leads to two container ports (80 and 81)",
            ]
        );
        let names: Vec<&str> = m.ports.iter().map(|p| &*p.id.name).collect();
        assert_eq!(names, ["b", "np"], "the Service and the first pod keep working");
    }

    #[test]
    fn node_ports_left_out_are_allocated_alike_on_every_node_in_standalone_mode() {
        let cfg = ModelConfig {
            node_port_range: 30000..=30050,
            node_addrs: vec!["198.18.100.1".parse().unwrap()],
            allocate_node_ports: true,
            ..ModelConfig::default()
        };
        let np = |name: &str, ip: &str, node_port: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  ports: [{{port: 80{node_port}}}]\n---\n"
            )
        };
        let mut yaml = np("fixed", "198.18.0.1", ", nodePort: 30010");
        for i in 0..40 {
            yaml += &np(&format!("auto{i}"), &format!("198.18.1.{i}"), "");
        }
        let o = objects(&yaml);
        let m = build(&o.services, &o.slices, &cfg);
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let ports: Vec<u16> = m.ports.iter().map(|p| p.node_port.unwrap()).collect();
        assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 41, "all distinct: {ports:?}");
        assert!(ports.iter().all(|p| (30000..=30050).contains(p)));
        let auto0 = m.ports.iter().find(|p| &*p.id.name == "auto0").unwrap();
        assert_eq!(
            auto0.frontends.iter().filter(|f| f.addr == "198.18.100.1".parse::<IpAddr>().unwrap()).count(),
            1,
            "answered on the node's address: {:?}",
            auto0.frontends
        );
        // Another node (another agent, same objects) allocates the same.
        let again = build(&o.services, &o.slices, &cfg);
        assert_eq!(
            again.ports.iter().map(|p| p.node_port).collect::<Vec<_>>(),
            m.ports.iter().map(|p| p.node_port).collect::<Vec<_>>()
        );
        // Without allocation (the API server's job) such a port is rejected.
        let strict = build(&o.services, &o.slices, &ModelConfig { allocate_node_ports: false, ..cfg });
        assert_eq!(strict.rejected.len(), 40);
    }

    #[test]
    fn port_leads_to_target_port_from_the_slice() {
        let m = build_yaml(
            &(svc("web", "198.18.0.10", "[{name: http, port: 80, targetPort: 8080}]")
                + &slice("web-1", "web", "[{name: http, port: 8080}]", "[{addresses: [198.18.1.2]}]")),
        );
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let p = &m.ports[0];
        assert_eq!(
            p.frontends,
            vec![Frontend { addr: "198.18.0.10".parse().unwrap(), port: 80, proto: Proto::Tcp }]
        );
        assert_eq!(backends(p), ["198.18.1.2:8080 Active"], "ready unset counts as ready");
    }

    #[test]
    fn named_target_port_resolves_per_endpoint() {
        // Two slices for one service: the name "web" is container port 8080 on one pod and 9090 on
        // the other, as the EndpointSlice controller writes when pods name their ports alike.
        let m = build_yaml(
            &(svc("web", "198.18.0.10", "[{name: http, port: 80, targetPort: web}]")
                + &slice("web-1", "web", "[{name: http, port: 8080}]", "[{addresses: [198.18.1.2]}]")
                + &slice("web-2", "web", "[{name: http, port: 9090}]", "[{addresses: [198.18.2.2]}]")),
        );
        assert_eq!(backends(&m.ports[0]), ["198.18.1.2:8080 Active", "198.18.2.2:9090 Active"]);
    }

    #[test]
    fn endpoint_conditions_and_terminating_fallback() {
        let eps = "[{addresses: [198.18.1.1], conditions: {ready: true}},
                    {addresses: [198.18.1.2], conditions: {ready: false, serving: true, terminating: true}},
                    {addresses: [198.18.1.3], conditions: {ready: false, serving: false, terminating: true}},
                    {addresses: [198.18.1.4], conditions: {ready: false}}]";
        let m =
            build_yaml(&(svc("a", "198.18.0.10", "[{port: 80}]") + &slice("a-1", "a", "[{port: 80}]", eps)));
        let p = &m.ports[0];
        assert_eq!(
            backends(p),
            ["198.18.1.1:80 Active", "198.18.1.2:80 Terminating", "198.18.1.3:80 Draining"]
        );
        let sel: Vec<_> = p.selectable().map(|b| b.addr.to_string()).collect();
        assert_eq!(sel, ["198.18.1.1"], "new flows go to ready endpoints only");

        // With no ready endpoint, new flows go to the serving terminating one, never the draining.
        let eps = "[{addresses: [198.18.1.2], conditions: {ready: false, serving: true, terminating: true}},
                    {addresses: [198.18.1.3], conditions: {ready: false, serving: false, terminating: true}}]";
        let m =
            build_yaml(&(svc("a", "198.18.0.10", "[{port: 80}]") + &slice("a-1", "a", "[{port: 80}]", eps)));
        let sel: Vec<_> = m.ports[0].selectable().map(|b| b.addr.to_string()).collect();
        assert_eq!(sel, ["198.18.1.2"]);
    }

    #[test]
    fn slices_merge_and_deduplicate() {
        let m = build_yaml(
            &(svc("a", "198.18.0.10", "[{port: 80}]")
                + &slice(
                    "a-1",
                    "a",
                    "[{port: 80}]",
                    "[{addresses: [198.18.1.1], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [198.18.1.2]}]",
                )
                + &slice(
                    "a-2",
                    "a",
                    "[{port: 80}]",
                    "[{addresses: [198.18.1.1]}, {addresses: [198.18.1.3]}]",
                )),
        );
        assert_eq!(
            backends(&m.ports[0]),
            ["198.18.1.1:80 Active", "198.18.1.2:80 Active", "198.18.1.3:80 Active"]
        );
    }

    #[test]
    fn ports_match_by_name_and_protocol() {
        let m = build_yaml(
            &(svc(
                "dns",
                "198.18.0.53",
                "[{name: dns, port: 53, targetPort: 5353, protocol: UDP}, {name: dns-tcp, port: 53, targetPort: 5353, protocol: TCP}]",
            ) + &slice(
                "dns-1",
                "dns",
                "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}]",
                "[{addresses: [198.18.1.1]}]",
            )),
        );
        assert_eq!(m.ports.len(), 2);
        let udp = m.ports.iter().find(|p| p.id.proto == Proto::Udp).unwrap();
        let tcp = m.ports.iter().find(|p| p.id.proto == Proto::Tcp).unwrap();
        assert_eq!(backends(udp), ["198.18.1.1:5353 Active"]);
        assert_eq!(backends(tcp), ["198.18.1.1:5354 Active"]);
    }

    #[test]
    fn invalid_services_are_rejected_one_by_one() {
        let yaml = svc("bad-ip", "198.18.0.999", "[{port: 80}]")
            + &svc("port-zero", "198.18.0.2", "[{port: 0}]")
            + &svc("sctp", "198.18.0.3", "[{port: 80, protocol: SCTP}]")
            + &svc("weird-proto", "198.18.0.4", "[{port: 80, protocol: QUIC}]")
            + &svc("dup-port", "198.18.0.5", "[{name: a, port: 80}, {name: b, port: 80}]")
            + &svc("no-ip", "\"\"", "[{port: 80}]")
            + &svc("mapped-ip", "\"::ffff:198.18.0.7\"", "[{port: 80}]")
            + &svc("good", "198.18.0.6", "[{port: 80}]")
            + &svc("headless", "None", "[{port: 80}]")
            + "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n";
        let m = build_yaml(&yaml);
        let rejected: Vec<&str> = m.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(rejected, ["bad-ip", "dup-port", "mapped-ip", "no-ip", "port-zero", "weird-proto"]);
        assert!(m.rejected.iter().all(|r| !r.reason.is_empty()));
        assert!(m.rejected.iter().find(|r| r.name == "bad-ip").unwrap().reason.contains("198.18.0.999"));
        let served: Vec<&str> =
            m.ports.iter().filter(|p| !p.frontends.is_empty()).map(|p| &*p.id.name).collect();
        assert_eq!(
            served,
            ["good", "sctp"],
            "headless and ExternalName have no datapath, and are not errors"
        );
        let sctp = m.ports.iter().find(|p| &*p.id.name == "sctp").unwrap();
        assert_eq!(sctp.id.proto, Proto::Sctp);
        assert_eq!(sctp.id.proto.number(), 132);
    }

    #[test]
    fn a_frontend_is_served_by_one_service_only() {
        let m = build_yaml(
            &(svc("first", "198.18.0.10", "[{port: 80}]") + &svc("second", "198.18.0.10", "[{port: 80}]")),
        );
        assert_eq!(m.ports.len(), 1);
        assert_eq!(&*m.ports[0].id.name, "first");
        assert_eq!(m.rejected.len(), 1);
        assert!(m.rejected[0].reason.contains("already used by Service default/first"), "{:?}", m.rejected);
    }

    #[test]
    fn bad_slices_are_rejected_without_touching_others() {
        let yaml = svc("a", "198.18.0.10", "[{port: 80}]")
            + &slice("a-good", "a", "[{port: 80}]", "[{addresses: [198.18.1.1]}]")
            + &slice("a-bad", "a", "[{port: 80}]", "[{addresses: [not-an-ip]}]")
            + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan}\naddressType: IPv4\nendpoints: []\n";
        let m = build_yaml(&yaml);
        assert_eq!(backends(&m.ports[0]), ["198.18.1.1:80 Active"]);
        let rejected: Vec<&str> = m.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(rejected, ["a-bad", "orphan"]);
    }

    #[test]
    fn too_many_backends_is_rejected() {
        let eps: Vec<String> = (1..=5).map(|i| format!("{{addresses: [198.18.1.{i}]}}")).collect();
        let o = objects(
            &(svc("big", "198.18.0.10", "[{port: 80}]")
                + &slice("big-1", "big", "[{port: 80}]", &format!("[{}]", eps.join(",")))),
        );
        let m = build(
            &o.services,
            &o.slices,
            &ModelConfig { max_backends_per_service: 4, ..ModelConfig::default() },
        );
        assert!(m.ports.is_empty());
        assert!(m.rejected[0].reason.contains("5 endpoints"), "{:?}", m.rejected);
    }

    #[test]
    fn manifest_errors_name_the_document() {
        let mut o = Objects::default();
        read_str(
            "x.yaml".as_ref(),
            "kind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: {ports: 3}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n: : :\n",
            &mut o,
        );
        assert_eq!(o.ignored, 1);
        assert_eq!(o.errors.len(), 2, "{:?}", o.errors);
        assert_eq!(o.errors[0].doc, 1);
        assert_eq!(o.errors[0].object.as_deref(), Some("Service default/s"));
        assert_eq!(o.errors[1].doc, 3);
    }

    fn fronts(p: &DesiredPort) -> Vec<String> {
        p.frontends.iter().map(ToString::to_string).collect()
    }

    fn node_cfg(range: &str) -> ModelConfig {
        ModelConfig {
            node_port_range: parse_port_range(range).unwrap(),
            node_addrs: vec!["198.18.100.1".parse().unwrap(), "198.18.101.1".parse().unwrap()],
            ..ModelConfig::default()
        }
    }

    fn typed_svc(name: &str, ty: &str, extra: &str, ports: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: {ty}\n  clusterIP: 198.18.0.{n}\n  ports: {ports}\n{extra}---\n",
            n = name.len() + 10
        )
    }

    #[test]
    fn load_balancer_source_ranges_guard_the_ingress_ips_only() {
        let yaml = typed_svc(
            "lb",
            "LoadBalancer",
            "  externalIPs: [198.18.0.98]\n  loadBalancerSourceRanges: [198.18.100.7/24, 10.0.0.0/8, 198.18.100.0/24]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.0.99}]}}\n",
            "[{port: 80, nodePort: 30080}]",
        ) + &typed_svc(
            "clusterip",
            "ClusterIP",
            "  loadBalancerSourceRanges: [10.0.0.0/8]\n",
            "[{port: 80}]",
        ) + &typed_svc(
            "bad",
            "LoadBalancer",
            "  loadBalancerSourceRanges: [10.0.0.0/40]\n",
            "[{port: 80, nodePort: 30081}]",
        );
        let m = build_yaml(&yaml);
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);
        assert!(
            m.rejected[0].name == "bad" && m.rejected[0].reason.contains("loadBalancerSourceRanges"),
            "{:?}",
            m.rejected
        );
        let lb = m.ports.iter().find(|p| &*p.id.name == "lb").unwrap();
        let ranges: Vec<String> = lb.source_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["10.0.0.0/8", "198.18.100.0/24"], "normalised, sorted, deduplicated");
        for (f, k) in lb.frontends.iter().zip(&lb.frontend_kinds) {
            let guarded = k & lb_common::SVC_F_SOURCE_RANGES != 0;
            assert_eq!(guarded, f.addr.to_string() == "198.18.0.99", "{f}: only the ingress IP is guarded");
        }
        let ci = m.ports.iter().find(|p| &*p.id.name == "clusterip").unwrap();
        assert!(ci.source_ranges.is_empty(), "only type LoadBalancer has source ranges");
    }

    #[test]
    fn a_health_check_node_port_is_kept_for_load_balancers_with_local_policy_only() {
        let yaml = typed_svc(
            "local",
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            "[{port: 80, nodePort: 30080}]",
        ) + &typed_svc(
            "cluster",
            "LoadBalancer",
            "  healthCheckNodePort: 32001\n",
            "[{port: 80, nodePort: 30081}]",
        ) + &typed_svc(
            "np",
            "NodePort",
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32002\n",
            "[{port: 80, nodePort: 30082}]",
        ) + &typed_svc(
            "bad",
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 70000\n",
            "[{port: 80, nodePort: 30083}]",
        );
        let m = build_yaml(&yaml);
        let hc =
            |name: &str| m.ports.iter().find(|p| &*p.id.name == name).unwrap().shown.health_check_node_port;
        assert_eq!((hc("local"), hc("cluster"), hc("np"), hc("bad")), (32000, 0, 0, 0));
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);
        assert_eq!((m.rejected[0].name.as_str(), m.rejected[0].part), ("bad", Some("healthCheckNodePort")));
    }

    #[test]
    fn ingress_ips_in_proxy_mode_are_left_to_the_load_balancer() {
        let yaml = typed_svc(
            "lb",
            "LoadBalancer",
            "status: {loadBalancer: {ingress: [{ip: 198.18.0.97}, {ip: 198.18.0.98, ipMode: VIP}, {ip: 198.18.0.99, ipMode: Proxy}, {ip: 198.18.0.96, ipMode: Other}]}}\n",
            "[{port: 80, nodePort: 30080}]",
        );
        let m = build_yaml(&yaml);
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let lb = m.ports.iter().find(|p| &*p.id.name == "lb").unwrap();
        let ingress: Vec<String> = lb
            .frontends
            .iter()
            .zip(&lb.frontend_kinds)
            .filter(|(_, k)| *k & lb_common::SVC_F_LB_INGRESS != 0)
            .map(|(f, _)| f.addr.to_string())
            .collect();
        assert_eq!(
            ingress,
            ["198.18.0.97", "198.18.0.98"],
            "no ipMode, or VIP: served; Proxy (or another mode): not"
        );
    }

    /// Topology hints as kube-proxy weighs them: cluster-wide traffic uses the endpoints hinted
    /// for this node when every ready endpoint has node hints and some are for it, else those
    /// hinted for this zone when every ready one has zone hints and some are for it, else all;
    /// a traffic policy Local ignores hints.
    #[test]
    fn topology_hints_narrow_cluster_traffic_as_kube_proxy_does() {
        let svc =
            typed_svc("web", "NodePort", "  externalTrafficPolicy: Local\n", "[{port: 80, nodePort: 30080}]");
        let ep = |i: u8, node: &str, hints: &str| {
            format!(
                "{{addresses: [198.18.1.{i}], nodeName: {node}{}}}",
                if hints.is_empty() { String::new() } else { format!(", hints: {hints}") }
            )
        };
        let za = "{forZones: [{name: a}]}";
        let zb = "{forZones: [{name: b}]}";
        let used = |eps: &[String], zone: Option<&str>| -> (Vec<String>, Vec<String>) {
            let yaml =
                svc.clone() + &slice("web-1", "web", "[{port: 8080}]", &format!("[{}]", eps.join(", ")));
            let o = objects(&yaml);
            let cfg = ModelConfig {
                node_name: Some("n1".into()),
                zone: zone.map(Into::into),
                ..ModelConfig::default()
            };
            let m = build(&o.services, &o.slices, &cfg);
            let addrs =
                |local: bool| m.ports[0].selectable_where(local).map(|b| b.addr.to_string()).collect();
            (addrs(false), addrs(true))
        };
        // Every endpoint hinted, some for zone a: zone a's only for cluster traffic; the node
        // port (externalTrafficPolicy Local) keeps this node's endpoint although hinted for b.
        let all = [ep(1, "n1", zb), ep(2, "n2", za), ep(3, "n3", za)];
        assert_eq!(
            used(&all, Some("a")),
            (vec!["198.18.1.2".to_string(), "198.18.1.3".to_string()], vec!["198.18.1.1".to_string()])
        );
        // No endpoint for this zone, or the zone unknown: all.
        assert_eq!(used(&all, Some("c")).0.len(), 3);
        assert_eq!(used(&all, None).0.len(), 3);
        // One ready endpoint without a hint: all.
        let one_bare = [ep(1, "n1", zb), ep(2, "n2", za), ep(3, "n3", "")];
        assert_eq!(used(&one_bare, Some("a")).0.len(), 3);
        // ... but a terminating one without a hint does not count.
        let term = [ep(1, "n1", zb), ep(2, "n2", za), "{addresses: [198.18.1.3], nodeName: n3, conditions: {ready: false, serving: true, terminating: true}}".to_string()];
        assert_eq!(used(&term, Some("a")).0, ["198.18.1.2"]);
        // Node hints (trafficDistribution PreferSameNode) before zone hints.
        let nodes = [
            ep(1, "n1", "{forNodes: [{name: n1}], forZones: [{name: a}]}"),
            ep(2, "n2", "{forNodes: [{name: n2}], forZones: [{name: a}]}"),
        ];
        assert_eq!(used(&nodes, Some("a")).0, ["198.18.1.1"]);
    }

    #[test]
    fn endpoints_on_this_node_are_local_and_policies_pick_the_frontends() {
        let yaml = typed_svc(
            "web",
            "NodePort",
            "  externalTrafficPolicy: Local\n  externalIPs: [198.18.0.99]\n",
            "[{port: 80, nodePort: 30080}]",
        ) + &slice(
            "web-1",
            "web",
            "[{port: 8080}]",
            "[{addresses: [198.18.1.1], nodeName: n1}, {addresses: [198.18.1.2], nodeName: n2}, {addresses: [198.18.1.3]}]",
        );
        let o = objects(&yaml);
        let cfg = ModelConfig {
            node_name: Some("n1".into()),
            node_addrs: vec!["198.18.100.1".parse().unwrap()],
            ..ModelConfig::default()
        };
        let m = build(&o.services, &o.slices, &cfg);
        let p = &m.ports[0];
        let local: Vec<String> = p.backends.iter().filter(|b| b.local).map(|b| b.addr.to_string()).collect();
        assert_eq!(local, ["198.18.1.1"], "only nodeName n1 is local; no nodeName is not");
        assert_eq!(p.shown.external_policy, Policy::Local);
        let kind = |addr: &str| {
            p.frontend_kinds[p.frontends.iter().position(|f| f.addr.to_string() == addr).unwrap()]
        };
        assert!(
            p.local_only(kind("198.18.100.1")) && p.local_only(kind("198.18.0.99")),
            "node port and externalIP"
        );
        assert!(
            !p.local_only(kind(
                &p.frontends
                    .iter()
                    .find(|f| f.port == 80 && f.addr.to_string() != "198.18.0.99")
                    .unwrap()
                    .addr
                    .to_string()
            )),
            "the clusterIP follows internalTrafficPolicy (Cluster)"
        );
        assert_eq!(p.selectable_where(true).count(), 1);
        assert_eq!(p.selectable_where(false).count(), 3);
        // Without a node name nothing is local.
        let m = build(&o.services, &o.slices, &ModelConfig::default());
        assert!(m.ports[0].backends.iter().all(|b| !b.local));
        // A policy that is neither Cluster nor Local is an error of that Service alone.
        let bad = typed_svc(
            "bad",
            "NodePort",
            "  externalTrafficPolicy: Nearby\n",
            "[{port: 80, nodePort: 30081}]",
        );
        let m = build_yaml(&bad);
        assert!(m.rejected[0].reason.contains("externalTrafficPolicy \"Nearby\""), "{:?}", m.rejected);
    }

    #[test]
    fn node_port_is_answered_on_every_node_address() {
        let o = objects(
            &(typed_svc("np", "NodePort", "", "[{port: 80, targetPort: 8080, nodePort: 30080}]")
                + &slice("np-1", "np", "[{port: 8080}]", "[{addresses: [198.18.1.2]}]")),
        );
        let m = build(&o.services, &o.slices, &node_cfg("30000-32767"));
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let p = &m.ports[0];
        assert_eq!(p.svc_type, SvcType::NodePort);
        assert_eq!(p.node_port, Some(30080));
        assert_eq!(fronts(p), ["198.18.0.12:80/TCP", "198.18.100.1:30080/TCP", "198.18.101.1:30080/TCP"]);
        assert_eq!(backends(p), ["198.18.1.2:8080 Active"], "node port and port lead to the same backends");
    }

    #[test]
    fn node_port_range_is_a_setting() {
        let yaml = typed_svc("high", "NodePort", "", "[{port: 80, nodePort: 45000}]")
            + &typed_svc("low", "NodePort", "", "[{port: 80, nodePort: 30001}]");
        let o = objects(&yaml);
        let m = build(&o.services, &o.slices, &node_cfg("30000-32767"));
        // The node port out of range is left out; the Service's clusterIP is still served.
        assert_eq!(m.ports.iter().map(|p| &*p.id.name).collect::<Vec<_>>(), ["high", "low"]);
        assert_eq!(fronts(&m.ports[0]), ["198.18.0.14:80/TCP"]);
        assert_eq!(m.ports[0].node_port, None);
        assert_eq!(m.rejected.len(), 1);
        assert_eq!(m.rejected[0].part, Some("nodePort"));
        assert!(m.rejected[0].reason.contains("nodePort 45000 is outside the node port range 30000-32767"));
        let m = build(&o.services, &o.slices, &node_cfg("30000-50000"));
        assert!(m.rejected.is_empty(), "a cluster with a wider range serves both: {:?}", m.rejected);
        assert_eq!(m.ports.len(), 2);
        assert_eq!(parse_port_range("8080").unwrap(), 8080..=8080);
        assert!(parse_port_range("32767-30000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("x").is_err());
    }

    #[test]
    fn node_port_conflicts_and_omissions_are_rejected() {
        let yaml = typed_svc("a", "NodePort", "", "[{port: 80, nodePort: 30080}]")
            + &typed_svc("b", "NodePort", "", "[{port: 81, nodePort: 30080}]")
            + &typed_svc("c", "NodePort", "", "[{port: 82}]")
            + &typed_svc(
                "dd",
                "NodePort",
                "",
                "[{name: x, port: 83, nodePort: 30090}, {name: y, port: 84, nodePort: 30090}]",
            )
            + &typed_svc("udp", "NodePort", "", "[{port: 80, nodePort: 30080, protocol: UDP}]");
        let o = objects(&yaml);
        // With no node address known, node ports still conflict: they are cluster-wide.
        for cfg in [node_cfg("30000-32767"), ModelConfig::default()] {
            let m = build(&o.services, &o.slices, &cfg);
            // Each Service is served; the node ports in conflict or missing are left out.
            let served: Vec<String> = m
                .ports
                .iter()
                .map(|p| format!("{}:{}{:?}", p.id.name, p.id.port_name, p.node_port))
                .collect();
            assert_eq!(
                served,
                ["a:Some(30080)", "b:None", "c:None", "dd:xSome(30090)", "dd:yNone", "udp:Some(30080)"],
                "the same number on another protocol is no conflict"
            );
            assert!(m.rejected.iter().all(|r| r.part == Some("nodePort")), "{:?}", m.rejected);
            let why: Vec<String> = m.rejected.iter().map(ToString::to_string).collect();
            assert_eq!(why.len(), 3, "{why:?}");
            assert!(
                why[0].contains("default/b")
                    && why[0].contains("nodePort 30080/TCP is already used by Service default/a"),
                "{why:?}"
            );
            assert!(why[1].contains("default/c") && why[1].contains("without a nodePort"), "{why:?}");
            assert!(why[2].contains("default/dd") && why[2].contains("listed twice"), "{why:?}");
        }
    }

    #[test]
    fn a_dual_stack_service_is_one_port_per_family_each_to_its_own_endpoints() {
        let v6_slice = |name: &str, svc: &str, eps: &str| {
            slice(name, svc, "[{port: 8080}]", eps).replace("addressType: IPv4", "addressType: IPv6")
        };
        let yaml = svc("dual", "198.18.0.10", "[{port: 80, targetPort: 8080}]").replace(
            "  clusterIP: 198.18.0.10\n",
            "  clusterIP: 198.18.0.10\n  clusterIPs: [198.18.0.10, \"2001:db8:1::10\"]\n",
        ) + &slice("dual-4", "dual", "[{port: 8080}]", "[{addresses: [198.18.1.2]}]")
            + &v6_slice(
                "dual-6",
                "dual",
                "[{addresses: [\"2001:db8:2::2\"]}, {addresses: [\"2001:db8:3::2\"]}]",
            )
            + &svc("only6", "\"2001:db8:1::20\"", "[{port: 53, protocol: UDP}]")
            + &v6_slice("only6-1", "only6", "[{addresses: [\"2001:db8:2::3\"]}]")
            + &svc("bad", "198.18.0.11", "[{port: 80}]")
            + &v6_slice("bad-1", "bad", "[{addresses: [198.18.1.9]}]");
        let m = build_yaml(&yaml);
        let dual: Vec<&Arc<DesiredPort>> = m.ports.iter().filter(|p| &*p.id.name == "dual").collect();
        assert_eq!(dual.len(), 2, "{:?}", m.ports);
        assert_eq!((dual[0].id.family, dual[1].id.family), (Family::V4, Family::V6));
        assert_eq!(fronts(dual[0]), ["198.18.0.10:80/TCP"]);
        assert_eq!(backends(dual[0]), ["198.18.1.2:8080 Active"]);
        assert_eq!(fronts(dual[1]), ["[2001:db8:1::10]:80/TCP"]);
        assert_eq!(backends(dual[1]), ["2001:db8:2::2:8080 Active", "2001:db8:3::2:8080 Active"]);
        assert_eq!(dual[1].id.to_string(), "default/dual/TCP (IPv6)");
        let only6: Vec<&Arc<DesiredPort>> = m.ports.iter().filter(|p| &*p.id.name == "only6").collect();
        assert_eq!(only6.len(), 1);
        assert_eq!(only6[0].id.family, Family::V6);
        assert_eq!(fronts(only6[0]), ["[2001:db8:1::20]:53/UDP"]);
        // An IPv6 slice with an IPv4 address is refused, alone.
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);
        assert!(m.rejected[0].name == "bad-1" && m.rejected[0].reason.contains("not an IPv6 address"));
    }

    #[test]
    fn ipv6_node_addresses_serve_node_ports_host_ports_and_their_own_source_ranges() {
        let cfg = ModelConfig {
            node_name: Some("node-1".into()),
            node_addrs: vec!["198.18.100.1".parse().unwrap(), "2001:db8:100::1".parse().unwrap()],
            allocate_node_ports: true,
            ..ModelConfig::default()
        };
        let dual = |name: &str, n: u8, extra: &str, ports: &str| {
            typed_svc(name, "LoadBalancer", extra, ports).replace(
                &format!("  clusterIP: 198.18.0.{n}\n"),
                &format!("  clusterIP: 198.18.0.{n}\n  clusterIPs: [198.18.0.{n}, \"2001:db8:1::{n}\"]\n"),
            )
        };
        // (typed_svc numbers its clusterIPs from the name's length.)
        let n = |name: &str| 10 + name.len() as u8;
        let ranges = "  loadBalancerSourceRanges: [198.18.100.0/24, \"2001:db8:100::/48\"]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.5.5}, {ip: \"2001:db8:5::5\"}]}}\n";
        let v4_only = "  loadBalancerSourceRanges: [198.18.100.0/24]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.5.6}, {ip: \"2001:db8:5::6\"}]}}\n";
        let yaml = dual("fixed", n("fixed"), ranges, "[{port: 80, nodePort: 30080}]")
            + &dual("auto", n("auto"), "", "[{port: 81}]")
            + &dual("open6", n("open6"), v4_only, "[{port: 82, nodePort: 30082}]")
            + &pod("web", "node-1", "198.18.10.3", "[{containerPort: 8080, hostPort: 8081}]", "").replace(
                "podIP: 198.18.10.3,",
                "podIP: 198.18.10.3, podIPs: [{ip: 198.18.10.3}, {ip: \"2001:db8:10::3\"}],",
            );
        let m = with_host_ports(&yaml, &cfg);
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let port = |name: &str, family: Family| {
            m.ports
                .iter()
                .find(|p| &*p.id.name == name && p.id.family == family)
                .unwrap_or_else(|| panic!("{name}"))
        };
        // The node port on the node's IPv6 address, a local frontend.
        let fixed6 = port("fixed", Family::V6);
        assert_eq!(fixed6.node_port, Some(30080));
        assert!(fronts(fixed6).contains(&"[2001:db8:100::1]:30080/TCP".to_string()), "{:?}", fronts(fixed6));
        assert!(
            !fronts(fixed6).iter().any(|f| f.starts_with("198.18.100.1")),
            "each family its own addresses"
        );
        let at =
            fixed6.frontends.iter().position(|f| f.to_string() == "[2001:db8:100::1]:30080/TCP").unwrap();
        assert_ne!(fixed6.frontend_kinds[at] & lb_common::SVC_F_LOCAL, 0);
        // Each family keeps its own source ranges, and guards its own ingress IP.
        assert_eq!(
            fixed6.source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["2001:db8:100::/48"]
        );
        let fixed4 = port("fixed", Family::V4);
        assert_eq!(
            fixed4.source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["198.18.100.0/24"]
        );
        let guarded = |p: &DesiredPort, f: &str| {
            let i = p.frontends.iter().position(|x| x.to_string() == f).unwrap_or_else(|| panic!("{f}"));
            p.frontend_kinds[i] & lb_common::SVC_F_SOURCE_RANGES != 0
        };
        assert!(guarded(fixed6, "[2001:db8:5::5]:80/TCP") && guarded(fixed4, "198.18.5.5:80/TCP"));
        // Ranges of one family only leave the other open, as kube-proxy does.
        assert!(guarded(port("open6", Family::V4), "198.18.5.6:82/TCP"));
        assert!(!guarded(port("open6", Family::V6), "[2001:db8:5::6]:82/TCP"));
        // A node port given out in standalone mode is the same for both families.
        let (a4, a6) = (port("auto", Family::V4), port("auto", Family::V6));
        assert!(a4.node_port.is_some());
        assert_eq!(a4.node_port, a6.node_port);
        let np = a6.node_port.unwrap();
        assert!(fronts(a6).contains(&format!("[2001:db8:100::1]:{np}/TCP")), "{:?}", fronts(a6));
        assert!(fronts(a4).contains(&format!("198.18.100.1:{np}/TCP")), "{:?}", fronts(a4));
        // A dual-stack pod's hostPort: one port per family, each at that family's node address.
        let hp4 = port("web", Family::V4);
        let hp6 = port("web", Family::V6);
        assert_eq!(
            (fronts(hp4), backends(hp4)),
            (vec!["198.18.100.1:8081/TCP".to_string()], vec!["198.18.10.3:8080 Active".to_string()])
        );
        assert_eq!(
            (fronts(hp6), backends(hp6)),
            (vec!["[2001:db8:100::1]:8081/TCP".to_string()], vec!["2001:db8:10::3:8080 Active".to_string()])
        );
    }

    #[test]
    fn load_balancer_ingress_and_external_ips_lead_to_the_same_backends() {
        let lb = "  externalIPs: [198.18.50.1, \"2001:db8::1\"]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.18.60.1}, {hostname: lb.example.com}, {ip: 198.18.60.2}]\n";
        let yaml = typed_svc("lb", "LoadBalancer", lb, "[{port: 443, targetPort: 8443, nodePort: 31443}]")
            + &slice("lb-1", "lb", "[{port: 8443}]", "[{addresses: [198.18.1.2]}]")
            + &typed_svc("ext", "ClusterIP", "  externalIPs: [198.18.50.2]\n", "[{port: 80}]")
            + &typed_svc(
                "nolbnp",
                "LoadBalancer",
                "  allocateLoadBalancerNodePorts: false\n",
                "[{port: 80}]",
            );
        let o = objects(&yaml);
        let m = build(&o.services, &o.slices, &node_cfg("30000-32767"));
        // The IPv6 externalIP of an IPv4-only Service is not served, as kube-proxy has it.
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);
        assert!(m.rejected[0].reason.contains("2001:db8::1 is IPv6"), "{:?}", m.rejected);
        assert_eq!(m.ports.iter().filter(|p| &*p.id.name == "lb").count(), 1, "no IPv6 port");
        let lb = m.ports.iter().find(|p| &*p.id.name == "lb").unwrap();
        assert_eq!(
            fronts(lb),
            [
                "198.18.0.12:443/TCP",
                "198.18.50.1:443/TCP",
                "198.18.60.1:443/TCP",
                "198.18.60.2:443/TCP",
                "198.18.100.1:31443/TCP",
                "198.18.101.1:31443/TCP"
            ]
        );
        assert_eq!(backends(lb), ["198.18.1.2:8443 Active"]);
        let ext = m.ports.iter().find(|p| &*p.id.name == "ext").unwrap();
        assert_eq!(fronts(ext), ["198.18.0.13:80/TCP", "198.18.50.2:80/TCP"]);
        let nolbnp = m.ports.iter().find(|p| &*p.id.name == "nolbnp").unwrap();
        assert_eq!(nolbnp.node_port, None, "allocateLoadBalancerNodePorts: false means no node port");
    }

    #[test]
    fn bad_external_addresses_are_left_out_alone() {
        // clusterIPs come from the name's length: badext .16, loopext .17, badingress .20,
        // taken .15, samecip .17 (loopext's).
        let yaml =
            typed_svc("badext", "ClusterIP", "  externalIPs: [198.18.300.1, 198.18.50.1]\n", "[{port: 80}]")
                + &typed_svc("loopext", "ClusterIP", "  externalIPs: [127.0.0.1]\n", "[{port: 80}]")
                + &typed_svc(
                    "badingress",
                    "LoadBalancer",
                    "status: {loadBalancer: {ingress: [{ip: nope}, {ip: 198.18.60.1}]}}\n",
                    "[{port: 80, nodePort: 30000}]",
                )
                + &typed_svc("taken", "ClusterIP", "  externalIPs: [198.18.50.1]\n", "[{port: 80}]")
                + &typed_svc("samecip", "ClusterIP", "", "[{port: 80}]");
        let m = build_yaml(&yaml);
        let why: Vec<String> = m.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(why.len(), 5, "{why:?}");
        let parts: Vec<Option<&str>> = m.rejected.iter().map(|r| r.part).collect();
        assert_eq!(
            parts,
            [Some("externalIP"), Some("loadBalancerIngress"), Some("externalIP"), None, Some("externalIP")]
        );
        assert!(why[0].contains("badext") && why[0].contains("externalIP \"198.18.300.1\""), "{why:?}");
        assert!(
            why[1].contains("badingress") && why[1].contains("LoadBalancer ingress IP \"nope\""),
            "{why:?}"
        );
        assert!(why[2].contains("loopext") && why[2].contains("127.0.0.1 cannot be"), "{why:?}");
        // A clusterIP is the Service's identity: taken, the later Service is rejected whole.
        assert!(
            why[3].contains("samecip")
                && why[3].contains("198.18.0.17:80/TCP is already used by Service default/loopext"),
            "{why:?}"
        );
        assert!(
            why[4].contains("taken")
                && why[4].contains("198.18.50.1:80/TCP is already used by Service default/badext")
                && why[4].ends_with("(this externalIP is left out; the rest is served)"),
            "{why:?}"
        );
        let served: Vec<String> =
            m.ports.iter().map(|p| format!("{} {}", p.id.name, fronts(p).join(" "))).collect();
        assert_eq!(
            served,
            [
                "badext 198.18.0.16:80/TCP 198.18.50.1:80/TCP",
                "badingress 198.18.0.20:80/TCP 198.18.60.1:80/TCP",
                "loopext 198.18.0.17:80/TCP",
                "taken 198.18.0.15:80/TCP",
            ]
        );
    }

    #[test]
    fn invalid_source_ranges_leave_out_the_ingress_ips_only() {
        let yaml = typed_svc(
            "lb",
            "LoadBalancer",
            "  externalIPs: [198.18.50.1]\n  loadBalancerSourceRanges: [10.0.0.0/40]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.60.1}]}}\n",
            "[{port: 80, nodePort: 30081}]",
        );
        let o = objects(&yaml);
        let m = build(&o.services, &o.slices, &node_cfg("30000-32767"));
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);
        assert_eq!(m.rejected[0].part, Some("loadBalancerIngress"));
        assert!(m.rejected[0].reason.contains("loadBalancerSourceRanges"), "{:?}", m.rejected);
        // Never served open: the ingress IP the ranges guard is left out, the rest is served.
        assert_eq!(
            fronts(&m.ports[0]),
            ["198.18.0.12:80/TCP", "198.18.50.1:80/TCP", "198.18.100.1:30081/TCP", "198.18.101.1:30081/TCP"]
        );
    }

    #[test]
    fn impossible_endpoint_addresses_are_left_out_and_the_rest_of_the_slice_served() {
        let bad4 = [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.1.1",
            "224.0.0.1",
            "239.1.1.1",
            "255.255.255.255",
            "2001:db8::1",
            "not-an-ip",
        ];
        let bad6 = ["::", "::1", "fe80::1", "ff02::1", "ff0e::1", "::ffff:198.18.1.9", "198.18.1.9"];
        let list = |good: &str, bad: &[&str]| {
            let mut eps: Vec<String> = bad.iter().map(|a| format!("{{addresses: [\"{a}\"]}}")).collect();
            eps.insert(bad.len() / 2, format!("{{addresses: [\"{good}\"]}}"));
            format!("[{}]", eps.join(","))
        };
        let yaml = svc("web", "198.18.0.10", "[{port: 80}]")
            + &slice("web-1", "web", "[{port: 8080}]", &list("198.18.1.1", &bad4))
            + "apiVersion: v1\nkind: Service\nmetadata: {name: web6, namespace: default}\nspec: {clusterIP: \"2001:db8::10\", ports: [{port: 80}]}\n---\n"
            + &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web6-1, namespace: default, labels: {{kubernetes.io/service-name: web6}}}}\naddressType: IPv6\nports: [{{port: 8080}}]\nendpoints: {}\n---\n",
                list("2001:db8:1::1", &bad6)
            );
        let m = build_yaml(&yaml);
        let web = m.ports.iter().find(|p| &*p.id.name == "web").unwrap();
        assert_eq!(backends(web), ["198.18.1.1:8080 Active"], "the slice's good endpoint is served");
        let web6 = m.ports.iter().find(|p| &*p.id.name == "web6").unwrap();
        assert_eq!(backends(web6), ["2001:db8:1::1:8080 Active"]);
        assert_eq!(m.rejected.len(), bad4.len() + bad6.len(), "one rejection each: {:?}", m.rejected);
        for r in &m.rejected {
            assert_eq!((r.kind, r.part), ("EndpointSlice", Some("endpoint")), "{r}");
        }
        for (bad, slice_name) in bad4.iter().map(|b| (b, "web-1")).chain(bad6.iter().map(|b| (b, "web6-1"))) {
            let shown = bad.parse::<IpAddr>().map_or(format!("{bad:?}"), |a| a.to_string());
            assert!(
                m.rejected.iter().any(|r| r.name == slice_name && r.reason.contains(&shown)),
                "{bad} in {slice_name} is named: {:?}",
                m.rejected
            );
        }
        assert!(endpoint_addr_problem(&"198.18.1.1".parse().unwrap()).is_none());
        assert!(endpoint_addr_problem(&"10.0.0.1".parse().unwrap()).is_none());
        assert!(endpoint_addr_problem(&"2001:db8::1".parse().unwrap()).is_none());
    }

    #[test]
    fn node_ports_are_served_on_the_node_addresses_of_the_service_families_only() {
        let cfg = ModelConfig {
            node_addrs: vec!["198.18.100.1".parse().unwrap(), "2001:db8:100::1".parse().unwrap()],
            ..node_cfg("30000-32767")
        };
        let v4 = typed_svc("v4", "NodePort", "", "[{port: 80, nodePort: 30080}]");
        let v6 = "apiVersion: v1\nkind: Service\nmetadata: {name: v6, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: \"2001:db8::10\"\n  ports: [{port: 80, nodePort: 30081}]\n---\n";
        let dual = "apiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 198.18.0.30\n  clusterIPs: [198.18.0.30, \"2001:db8::30\"]\n  ports: [{port: 80, nodePort: 30082}]\n---\n";
        for allocate in [false, true] {
            let o = objects(&(v4.clone() + v6 + dual));
            let m =
                build(&o.services, &o.slices, &ModelConfig { allocate_node_ports: allocate, ..cfg.clone() });
            assert!(m.rejected.is_empty(), "{:?}", m.rejected);
            let served: Vec<String> =
                m.ports.iter().map(|p| format!("{} {}", p.id.name, fronts(p).join(" "))).collect();
            assert_eq!(
                served,
                [
                    "dual 198.18.0.30:80/TCP 198.18.100.1:30082/TCP",
                    "dual [2001:db8::30]:80/TCP [2001:db8:100::1]:30082/TCP",
                    "v4 198.18.0.12:80/TCP 198.18.100.1:30080/TCP",
                    "v6 [2001:db8::10]:80/TCP [2001:db8:100::1]:30081/TCP",
                ],
                "an IPv4-only Service has no node port on the node's IPv6 addresses, nor the reverse"
            );
        }
        // externalIPs of a family the Service has no clusterIP of are left out, as kube-proxy does.
        let o =
            objects(&typed_svc("v4ext", "ClusterIP", "  externalIPs: [\"2001:db8::99\"]\n", "[{port: 80}]"));
        let m = build(&o.services, &o.slices, &cfg);
        assert_eq!(m.ports.len(), 1);
        assert_eq!(fronts(&m.ports[0]), ["198.18.0.15:80/TCP"]);
        assert_eq!(m.rejected[0].part, Some("externalIP"));
        assert!(m.rejected[0].reason.contains("has no IPv6 clusterIP"), "{:?}", m.rejected);
    }

    #[test]
    fn external_name_is_kept_for_display_only() {
        let m = build_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: prod}\nspec: {type: ExternalName, externalName: db.example.com, ports: [{port: 5432}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {type: ExternalName}\n",
        );
        assert_eq!(m.ports.len(), 1);
        let p = &m.ports[0];
        assert_eq!((&*p.id.namespace, &*p.id.name, p.port), ("prod", "db", 5432));
        assert_eq!(p.svc_type, SvcType::ExternalName);
        assert_eq!(p.shown.external_name, "db.example.com");
        assert!(p.frontends.is_empty() && p.backends.is_empty(), "no datapath");
        assert_eq!(m.rejected.len(), 1);
        assert!(m.rejected[0].reason.contains("without spec.externalName"));
    }

    #[test]
    fn hand_made_endpoints_serve_a_service_without_selector() {
        // A database outside the cluster at a fixed address, as the Kubernetes docs describe.
        let m = build_yaml(
            &(svc("db", "198.18.0.20", "[{name: pg, port: 5432, targetPort: 15432}]")
                + "apiVersion: v1\nkind: Endpoints\nmetadata: {name: db, namespace: default}\nsubsets:\n- addresses: [{ip: 198.18.40.7}]\n  notReadyAddresses: [{ip: 198.18.40.8}]\n  ports: [{name: pg, port: 15432}]\n- addresses: [{ip: 198.18.40.9}]\n  ports: [{name: pg, port: 25432}]\n"),
        );
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        assert_eq!(backends(&m.ports[0]), ["198.18.40.7:15432 Active", "198.18.40.9:25432 Active"]);
    }

    #[test]
    fn the_cached_model_equals_a_fresh_one_and_rebuilds_only_what_changed() {
        let mut yaml = String::new();
        for i in 0..40 {
            yaml += &svc(
                &format!("s{i}"),
                &format!("198.18.0.{i}"),
                "[{name: http, port: 80, targetPort: 8080}]",
            );
            yaml += &slice(
                &format!("s{i}-1"),
                &format!("s{i}"),
                "[{name: http, port: 8080}]",
                &format!("[{{addresses: [198.18.1.{i}]}}]"),
            );
        }
        let o = objects(&yaml);
        let mut services: Vec<Arc<Service>> = o.services.into_iter().map(Arc::new).collect();
        let mut slices: Vec<Arc<EndpointSlice>> = o.slices.into_iter().map(Arc::new).collect();
        let cfg = ModelConfig::default();
        let mut cache = ModelCache::default();
        let same = |a: &Model, b: &Model| {
            assert_eq!(a.ports, b.ports);
            assert_eq!(a.rejected, b.rejected);
        };
        let fresh = |sv: &[Arc<Service>], sl: &[Arc<EndpointSlice>]| {
            build(sv.iter().map(AsRef::as_ref), sl.iter().map(AsRef::as_ref), &cfg)
        };
        same(&cache.build(&services, &slices, &cfg), &fresh(&services, &slices));
        assert_eq!(cache.last_rebuilt, 40);
        same(&cache.build(&services, &slices, &cfg), &fresh(&services, &slices));
        assert_eq!(cache.last_rebuilt, 0, "nothing changed");

        // One endpoint changes: one Service is modelled again.
        let mut changed = (*slices[7]).clone();
        changed.endpoints[0].addresses = vec!["198.18.2.7".into()];
        slices[7] = Arc::new(changed);
        let m = cache.build(&services, &slices, &cfg);
        same(&m, &fresh(&services, &slices));
        assert_eq!(cache.last_rebuilt, 1);
        assert_eq!(
            backends(&m.ports[m.ports.iter().position(|p| &*p.id.name == "s7").unwrap()]),
            ["198.18.2.7:8080 Active"]
        );

        // A Service takes another's address: it is rejected, the owner keeps it.
        let mut thief = (*services[3]).clone();
        thief.spec.as_mut().unwrap().cluster_ip = Some("198.18.0.20".into());
        services[3] = Arc::new(thief);
        let m = cache.build(&services, &slices, &cfg);
        same(&m, &fresh(&services, &slices));
        assert_eq!(cache.last_rebuilt, 1);
        assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);

        // A slice goes away, and a Service goes away.
        slices.remove(12);
        services.remove(30);
        let m = cache.build(&services, &slices, &cfg);
        same(&m, &fresh(&services, &slices));
        assert_eq!(cache.last_rebuilt, 1, "s12 lost its slice; s30 needs no model");
        assert_eq!(m.ports.len(), 38);

        // Another configuration starts afresh.
        let other = ModelConfig { max_backends_per_service: 1, ..ModelConfig::default() };
        cache.build(&services, &slices, &other);
        assert_eq!(cache.last_rebuilt, 39);
    }
}
