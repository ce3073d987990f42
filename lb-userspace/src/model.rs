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
//! - an invalid Service is rejected with its reason and never disturbs the others.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::IPPROTO_TCP => Some(Proto::Tcp),
            lb_common::IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// Parses a Kubernetes protocol name; `None` (unset) means TCP.
    fn parse(p: Option<&str>) -> Result<Self, String> {
        match p.unwrap_or("TCP") {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            "SCTP" => Err("protocol SCTP is not supported by xlb yet".into()),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum SvcType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl SvcType {
    pub fn code(self) -> u8 {
        match self {
            SvcType::ClusterIP => lb_common::SVC_TYPE_CLUSTER_IP,
            SvcType::NodePort => lb_common::SVC_TYPE_NODE_PORT,
            SvcType::LoadBalancer => lb_common::SVC_TYPE_LOAD_BALANCER,
            SvcType::ExternalName => lb_common::SVC_TYPE_EXTERNAL_NAME,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            lb_common::SVC_TYPE_CLUSTER_IP => Some(SvcType::ClusterIP),
            lb_common::SVC_TYPE_NODE_PORT => Some(SvcType::NodePort),
            lb_common::SVC_TYPE_LOAD_BALANCER => Some(SvcType::LoadBalancer),
            lb_common::SVC_TYPE_EXTERNAL_NAME => Some(SvcType::ExternalName),
            _ => None,
        }
    }
}

/// Identity of a service port: stable across updates, so its datapath id is too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" for a single unnamed port).
    pub port_name: String,
    pub proto: Proto,
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.proto)
    }
}

/// An address the datapath answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
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
    pub addr: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
}

/// One Service port as the datapath must serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPort {
    pub id: PortRef,
    pub svc_type: SvcType,
    /// The Service's `port`.
    pub port: u16,
    pub frontends: Vec<Frontend>,
    /// Every endpoint known for the port, sorted, without duplicates.
    pub backends: Vec<DesiredBackend>,
}

impl DesiredPort {
    /// The backends new flows choose from: the ready ones, or, when none is ready, the
    /// terminating ones that still serve.
    pub fn selectable(&self) -> impl Iterator<Item = &DesiredBackend> {
        let any_active = self.backends.iter().any(|b| b.state == BackendState::Active);
        let want = if any_active { BackendState::Active } else { BackendState::Terminating };
        self.backends.iter().filter(move |b| b.state == want)
    }
}

/// An object the model refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}: {}", self.kind, self.namespace, self.name, self.reason)
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Most endpoints one service port may have in the datapath.
    pub max_backends_per_service: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { max_backends_per_service: usize::from(lb_common::MAX_BACKENDS_PER_SERVICE) }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Sorted by [`PortRef`].
    pub ports: Vec<DesiredPort>,
    pub rejected: Vec<Rejection>,
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Endpoints of one service, by (slice port name, protocol).
type EndpointIndex = BTreeMap<(String, Proto), BTreeMap<(Ipv4Addr, u16), BackendState>>;

/// Builds the desired datapath state. Objects are taken in a deterministic order (namespace,
/// name), so that when two Services claim the same frontend the same one always wins.
pub fn build(services: &[Service], slices: &[EndpointSlice], cfg: &ModelConfig) -> Model {
    let mut model = Model::default();
    let endpoints = index_slices(slices, &mut model.rejected);

    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by_key(|s| ns_name(&s.metadata));
    let mut claimed: BTreeMap<Frontend, PortRef> = BTreeMap::new();

    for svc in sorted {
        let (namespace, name) = ns_name(&svc.metadata);
        match service_ports(svc, &namespace, &name, &endpoints, cfg) {
            Ok(ports) => {
                // A frontend already served by another Service is a conflict: reject the whole
                // later Service rather than serve half of it.
                let clash = ports.iter().flat_map(|p| p.frontends.iter()).find_map(|f| {
                    claimed.get(f).map(|owner| format!("frontend {f} is already used by Service {}/{}", owner.namespace, owner.name))
                });
                if let Some(reason) = clash {
                    model.rejected.push(Rejection { kind: "Service", namespace, name, reason });
                    continue;
                }
                for p in &ports {
                    for f in &p.frontends {
                        claimed.insert(*f, p.id.clone());
                    }
                }
                model.ports.extend(ports);
            }
            Err(reason) if reason.is_empty() => {}
            Err(reason) => model.rejected.push(Rejection { kind: "Service", namespace, name, reason }),
        }
    }
    model.ports.sort_by(|a, b| a.id.cmp(&b.id));
    model
}

/// Indexes the endpoints of every slice by (namespace, service) and port.
fn index_slices(
    slices: &[EndpointSlice],
    rejected: &mut Vec<Rejection>,
) -> BTreeMap<(String, String), EndpointIndex> {
    let mut index: BTreeMap<(String, String), EndpointIndex> = BTreeMap::new();
    for slice in slices {
        let (namespace, name) = ns_name(&slice.metadata);
        let reject = |reason: String| Rejection { kind: "EndpointSlice", namespace: namespace.clone(), name: name.clone(), reason };
        if slice.address_type != "IPv4" {
            // IPv6 and FQDN slices are not served yet; they are not errors.
            continue;
        }
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            rejected.push(reject(format!("no {SERVICE_NAME_LABEL} label: it belongs to no Service")));
            continue;
        };
        let mut ports = Vec::new();
        let mut bad = None;
        for p in slice.ports.iter().flatten() {
            let proto = match Proto::parse(p.protocol.as_deref()) {
                Ok(proto) => proto,
                Err(e) => {
                    bad = Some(format!("port {:?}: {e}", p.name.as_deref().unwrap_or("")));
                    break;
                }
            };
            let number = match p.port.map(u16::try_from) {
                Some(Ok(n)) if n != 0 => n,
                other => {
                    bad = Some(format!("port {:?} has invalid number {:?}", p.name.as_deref().unwrap_or(""), other.map(|_| p.port)));
                    break;
                }
            };
            ports.push((p.name.clone().unwrap_or_default(), proto, number));
        }
        let mut addrs = Vec::new();
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
            match first.parse::<Ipv4Addr>() {
                Ok(a) => addrs.push((a, state)),
                Err(_) => {
                    bad = Some(format!("endpoint address {first:?} is not an IPv4 address"));
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            rejected.push(reject(reason));
            continue;
        }
        let by_port = index.entry((namespace.clone(), service.clone())).or_default();
        for (port_name, proto, number) in ports {
            let eps = by_port.entry((port_name, proto)).or_default();
            for &(addr, state) in &addrs {
                // Merge duplicates across slices: the most usable state wins.
                let e = eps.entry((addr, number)).or_insert(state);
                *e = (*e).min(state);
            }
        }
    }
    index
}

/// The service ports of one Service. `Err("")` means "nothing to serve, and that is fine"
/// (headless, ExternalName).
fn service_ports(
    svc: &Service,
    namespace: &str,
    name: &str,
    endpoints: &BTreeMap<(String, String), EndpointIndex>,
    cfg: &ModelConfig,
) -> Result<Vec<DesiredPort>, String> {
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
    let mut addrs: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for ip in std::iter::once(cluster_ip).chain(spec.cluster_ips.iter().flatten().map(String::as_str)) {
        if ip.contains(':') {
            continue; // IPv6 family: served once dual-stack lands
        }
        let a: Ipv4Addr = ip.parse().map_err(|_| format!("clusterIP {ip:?} is not a valid IP address"))?;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
            return Err(format!("clusterIP {a} cannot be a service address"));
        }
        addrs.insert(a);
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("no ports".into());
    }
    let empty = EndpointIndex::new();
    let eps = endpoints.get(&(namespace.to_owned(), name.to_owned())).unwrap_or(&empty);
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
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
        let backends: Vec<DesiredBackend> = eps
            .get(&(port_name.clone(), proto))
            .into_iter()
            .flatten()
            .map(|(&(addr, port), &state)| DesiredBackend { addr, port, state })
            .collect();
        if backends.len() > cfg.max_backends_per_service {
            return Err(format!(
                "port {port_name:?} has {} endpoints, more than the {} one service port may have",
                backends.len(),
                cfg.max_backends_per_service
            ));
        }
        out.push(DesiredPort {
            id: PortRef { namespace: namespace.to_owned(), name: name.to_owned(), port_name, proto },
            svc_type,
            port,
            frontends: addrs.iter().map(|&addr| Frontend { addr, port, proto }).collect(),
            backends,
        });
    }
    Ok(out)
}
