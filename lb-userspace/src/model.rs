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
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
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
                    claimed.get(f).map(|owner| {
                        format!("frontend {f} is already used by Service {}/{}", owner.namespace, owner.name)
                    })
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
        let reject = |reason: String| Rejection {
            kind: "EndpointSlice",
            namespace: namespace.clone(),
            name: name.clone(),
            reason,
        };
        if slice.address_type != "IPv4" {
            // IPv6 and FQDN slices are not served yet; they are not errors.
            continue;
        }
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
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
                    bad = Some(format!(
                        "port {:?} has invalid number {:?}",
                        p.name.as_deref().unwrap_or(""),
                        other.map(|_| p.port)
                    ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{Objects, read_str};

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
            + &svc("good", "198.18.0.6", "[{port: 80}]")
            + &svc("headless", "None", "[{port: 80}]")
            + "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n";
        let m = build_yaml(&yaml);
        let rejected: Vec<&str> = m.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(rejected, ["bad-ip", "dup-port", "no-ip", "port-zero", "sctp", "weird-proto"]);
        assert!(m.rejected.iter().all(|r| !r.reason.is_empty()));
        assert!(m.rejected.iter().find(|r| r.name == "bad-ip").unwrap().reason.contains("198.18.0.999"));
        let served: Vec<&str> = m.ports.iter().map(|p| p.id.name.as_str()).collect();
        assert_eq!(served, ["good"], "headless and ExternalName have no datapath, and are not errors");
    }

    #[test]
    fn a_frontend_is_served_by_one_service_only() {
        let m = build_yaml(
            &(svc("first", "198.18.0.10", "[{port: 80}]") + &svc("second", "198.18.0.10", "[{port: 80}]")),
        );
        assert_eq!(m.ports.len(), 1);
        assert_eq!(m.ports[0].id.name, "first");
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
        let m = build(&o.services, &o.slices, &ModelConfig { max_backends_per_service: 4 });
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
}
