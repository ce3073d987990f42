//! What the CLI shows: the datapath's maps, read directly (the agent need not run), joined into
//! the shapes operators know from `kubectl get svc` and `kubectl describe svc`.
//!
//! Every listing has a JSON/YAML form whose schema is documented in docs/cli.md; fields are only
//! ever added, never renamed or removed, within a major version.
pub mod packet;
pub mod trace;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_common::{
    BACKEND_F_LOCAL, BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, CT_DIR_FORWARD, CT_DIR_REPLY, Ct4Key,
    Ct4Value, Ct6Key, Ct6Value, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LB_INGRESS, SVC_F_NODE_PORT,
    SvcInfo,
};
use serde::Serialize;

use crate::{
    datapath::{Datapath, DatapathError},
    model::{Policy, Proto, SvcType},
    reconcile::unfixed,
};

/// How a listing is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// Renders `value` as JSON or YAML, or returns `None` for a table.
pub fn structured<T: Serialize>(out: Output, value: &T) -> anyhow::Result<Option<String>> {
    Ok(match out {
        Output::Table => None,
        Output::Json => Some(serde_json::to_string_pretty(value)? + "\n"),
        Output::Yaml => Some(serde_yaml::to_string(value)?),
    })
}

fn state_name(s: u8) -> &'static str {
    match s {
        BACKEND_STATE_ACTIVE => "active",
        BACKEND_STATE_TERMINATING => "terminating",
        _ => "free",
    }
}

fn proto_name(p: u8) -> String {
    Proto::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub address: String,
    pub port: u16,
    /// `active`, `terminating` (keeps its flows, takes new ones only if nothing is active) or
    /// `free` (the slot names a backend that is gone: a race with the agent).
    pub state: &'static str,
    pub id: u32,
    /// New flows may choose this backend.
    pub selectable: bool,
    /// New flows sent to this backend since the agent gave it its id.
    pub new_flows: u64,
}

impl BackendRow {
    /// Whether this is an IPv6 backend (whose id names an entry of the IPv6 backends).
    pub fn is_ipv6(&self) -> bool {
        self.address.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6())
    }
}

/// One frontend (or, for ExternalName, one service port): the schema of
/// `xlb get services -o json` (an array of these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub svc_type: Option<SvcType>,
    pub port_name: String,
    /// `ADDRESS:PORT/PROTOCOL`; null for ExternalName.
    pub frontend: Option<String>,
    /// What the frontend address is: `ClusterIP`, `ExternalIP`, `LoadBalancerIngress`,
    /// `NodePort` (several when an address is more than one).
    pub frontend_kinds: Vec<&'static str>,
    /// The frontend's address; null for ExternalName.
    pub address: Option<String>,
    /// The frontend's port (the nodePort for a node address); the Service's port for
    /// ExternalName.
    pub port: u16,
    pub protocol: String,
    /// The Service's `port`.
    pub service_port: u16,
    /// As the Service writes it: a number or a port name; "" when unset (then it is `port`).
    pub target_port: String,
    pub node_port: Option<u16>,
    /// ExternalName: the DNS name; null otherwise.
    pub external_name: Option<String>,
    /// `None` or `ClientIP`.
    pub session_affinity: &'static str,
    pub affinity_timeout_seconds: Option<u32>,
    pub external_traffic_policy: Policy,
    pub internal_traffic_policy: Policy,
    pub service_id: u32,
    pub backends: Vec<BackendRow>,
}

/// The frontend kinds named in `flags`.
pub fn kinds(flags: u16) -> Vec<&'static str> {
    [
        (SVC_F_CLUSTER_IP, "ClusterIP"),
        (SVC_F_EXTERNAL_IP, "ExternalIP"),
        (SVC_F_LB_INGRESS, "LoadBalancerIngress"),
        (SVC_F_NODE_PORT, "NodePort"),
        (lb_common::SVC_F_LOCAL, "NodeAddress"),
        (lb_common::SVC_F_SOURCE_RANGES, "SourceRanges"),
        (lb_common::SVC_F_HOST_PORT, "HostPort"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect()
}

/// A frontend as read from the service map.
#[derive(Clone, Debug)]
struct FrontendEntry {
    addr: IpAddr,
    port: u16,
    proto: u8,
    svc_id: u32,
    flags: u16,
    count: u16,
    /// Backend ids by slot (1..).
    slots: BTreeMap<u16, u32>,
}

/// Everything the CLI shows, read once from the maps.
pub struct View {
    infos: BTreeMap<u32, SvcInfo>,
    /// loadBalancerSourceRanges by service port id.
    ranges: BTreeMap<u32, Vec<crate::model::Cidr>>,
    frontends: Vec<FrontendEntry>,
    backends: BTreeMap<u32, lb_common::Backend4>,
    /// IPv6 backends: ids of their own.
    backends6: BTreeMap<u32, lb_common::Backend6>,
    flows: BTreeMap<u32, u64>,
    /// New flows per IPv6 backend.
    flows6: BTreeMap<u32, u64>,
}

impl View {
    /// Reads the service, backend, name and flow-count maps.
    pub fn read(dp: &impl Datapath) -> Result<Self, DatapathError> {
        let infos: BTreeMap<u32, SvcInfo> = dp.read_svc_infos()?.into_iter().collect();
        let mut entries: BTreeMap<(IpAddr, u16, u8), FrontendEntry> = BTreeMap::new();
        let mut slots: BTreeMap<(IpAddr, u16, u8), BTreeMap<u16, u32>> = BTreeMap::new();
        let v4 =
            dp.read_services()?.into_iter().map(|(k, v)| (IpAddr::from(k.addr), k.port, k.proto, k.slot, v));
        let v6 = dp
            .read_services6()?
            .into_iter()
            .map(|(k, v)| (IpAddr::from(Ipv6Addr::from(k.addr)), k.port, k.proto, k.slot, v));
        for (addr, port, proto, slot, v) in v4.chain(v6) {
            let fk = (addr, port, proto);
            if slot == 0 {
                let e = FrontendEntry {
                    addr,
                    port,
                    proto,
                    svc_id: v.svc_id,
                    flags: v.flags,
                    count: v.count,
                    slots: BTreeMap::new(),
                };
                entries.insert(fk, e);
            } else {
                slots.entry(fk).or_default().insert(slot, v.backend_id);
            }
        }
        let mut backends = BTreeMap::new();
        let mut backends6 = BTreeMap::new();
        let mut flows = BTreeMap::new();
        let mut flows6 = BTreeMap::new();
        for (fk, e) in entries.iter_mut() {
            e.slots = slots.remove(fk).unwrap_or_default();
            for &id in e.slots.values() {
                if e.addr.is_ipv6() {
                    if let std::collections::btree_map::Entry::Vacant(v) = backends6.entry(id) {
                        v.insert(dp.read_backend6(id)?);
                        flows6.insert(id, dp.read_backend_flows6(id)?);
                    }
                } else if let std::collections::btree_map::Entry::Vacant(v) = backends.entry(id) {
                    v.insert(dp.read_backend(id)?);
                    flows.insert(id, dp.read_backend_flows(id)?);
                }
            }
        }
        let mut ranges: BTreeMap<u32, Vec<crate::model::Cidr>> = BTreeMap::new();
        for (id, c) in dp.read_source_ranges()? {
            ranges.entry(id).or_default().push(c);
        }
        for v in ranges.values_mut() {
            v.sort();
        }
        Ok(View {
            infos,
            ranges,
            frontends: entries.into_values().collect(),
            backends,
            backends6,
            flows,
            flows6,
        })
    }

    /// The row of backend `id`, of the IPv6 backends when `v6`.
    fn backend_row(&self, id: u32, selectable: bool, v6: bool) -> BackendRow {
        let (address, port, state) = if v6 {
            let b = self.backends6.get(&id).copied().unwrap_or_default();
            (Ipv6Addr::from(b.addr).to_string(), b.port, b.state)
        } else {
            let b = self.backends.get(&id).copied().unwrap_or_default();
            (Ipv4Addr::from(b.addr).to_string(), b.port, b.state)
        };
        BackendRow {
            address,
            port,
            state: state_name(state),
            id,
            selectable,
            new_flows: if v6 { &self.flows6 } else { &self.flows }.get(&id).copied().unwrap_or(0),
        }
    }

    fn row(&self, info: Option<&SvcInfo>, svc_id: u32, f: Option<&FrontendEntry>) -> ServiceRow {
        let text = |g: fn(&SvcInfo) -> &[u8]| info.map(|i| unfixed(g(i))).unwrap_or_default();
        let proto = f.map(|f| f.proto).or(info.map(|i| i.proto)).unwrap_or(0);
        let protocol = proto_name(proto);
        let external_name = text(|i| &i.external_name);
        let affinity = info.map_or(0, |i| i.affinity_timeout);
        ServiceRow {
            namespace: text(|i| &i.namespace),
            name: text(|i| &i.name),
            svc_type: info.and_then(|i| SvcType::from_code(i.svc_type)),
            port_name: text(|i| &i.port_name),
            frontend: f.map(|f| format!("{}/{protocol}", SocketAddr::new(f.addr, f.port))),
            frontend_kinds: f.map(|f| kinds(f.flags)).unwrap_or_default(),
            address: f.map(|f| f.addr.to_string()),
            port: f.map(|f| f.port).or(info.map(|i| i.port)).unwrap_or(0),
            protocol,
            service_port: info.map_or(0, |i| i.port),
            target_port: text(|i| &i.target_port),
            node_port: info.map(|i| i.node_port).filter(|p| *p != 0),
            external_name: (!external_name.is_empty()).then_some(external_name),
            session_affinity: if affinity > 0 { "ClientIP" } else { "None" },
            affinity_timeout_seconds: (affinity > 0).then_some(affinity),
            external_traffic_policy: Policy::from_code(info.map_or(0, |i| i.external_policy)),
            internal_traffic_policy: Policy::from_code(info.map_or(0, |i| i.internal_policy)),
            service_id: svc_id,
            backends: f
                .map(|f| {
                    f.slots
                        .iter()
                        .map(|(&slot, &id)| self.backend_row(id, slot <= f.count, f.addr.is_ipv6()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// One row per frontend, plus one per service port that has none (ExternalName), sorted by
    /// namespace, name, port name and frontend.
    pub fn service_rows(&self) -> Vec<ServiceRow> {
        let mut rows: Vec<ServiceRow> =
            self.frontends.iter().map(|f| self.row(self.infos.get(&f.svc_id), f.svc_id, Some(f))).collect();
        let with_frontend: BTreeSet<u32> = self.frontends.iter().map(|f| f.svc_id).collect();
        for (&id, info) in &self.infos {
            if !with_frontend.contains(&id) {
                rows.push(self.row(Some(info), id, None));
            }
        }
        rows.sort_by(|a, b| {
            (&a.namespace, &a.name, &a.port_name, &a.frontend).cmp(&(
                &b.namespace,
                &b.name,
                &b.port_name,
                &b.frontend,
            ))
        });
        rows
    }

    /// `NS/NAME` of a service id, with `:PORT_NAME` when the port has a name.
    pub fn port_label(&self, svc_id: u32) -> String {
        match self.infos.get(&svc_id) {
            Some(i) => {
                let (ns, name, port) = (unfixed(&i.namespace), unfixed(&i.name), unfixed(&i.port_name));
                if port.is_empty() { format!("{ns}/{name}") } else { format!("{ns}/{name}:{port}") }
            }
            None => format!("<service id {svc_id}>"),
        }
    }

    fn svc_of(&self, svc_id: u32) -> Option<(String, String)> {
        self.infos.get(&svc_id).map(|i| (unfixed(&i.namespace), unfixed(&i.name)))
    }
}

/// Reads every frontend with its backends (see [`View::service_rows`]).
pub fn service_rows(dp: &impl Datapath) -> Result<Vec<ServiceRow>, DatapathError> {
    Ok(View::read(dp)?.service_rows())
}

/// Aligns rows of cells into columns separated by three spaces.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut all = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    all.extend(rows);
    let cols = header.len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| all.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in all {
        let line: Vec<String> = (0..cols)
            .map(|i| format!("{:<w$}", row.get(i).map_or("", String::as_str), w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn policies(r: &ServiceRow) -> String {
    format!("{:?}/{:?}", r.external_traffic_policy, r.internal_traffic_policy)
}

fn affinity(r: &ServiceRow) -> String {
    match r.affinity_timeout_seconds {
        Some(t) => format!("ClientIP({t}s)"),
        None => "None".into(),
    }
}

/// `xlb get services` as a table.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let body = rows
        .iter()
        .map(|r| {
            let backends = if let Some(n) = &r.external_name {
                format!("{n} (DNS only)")
            } else if r.backends.is_empty() {
                "<none>".to_string()
            } else {
                r.backends
                    .iter()
                    .map(|b| {
                        let mut s = format!("{}:{}", b.address, b.port);
                        if b.state != "active" {
                            s.push_str(&format!(" ({})", b.state));
                        }
                        s
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let ty = r.svc_type.map_or("?".into(), |t| format!("{t:?}"));
            let name =
                if r.port_name.is_empty() { r.name.clone() } else { format!("{}:{}", r.name, r.port_name) };
            let frontend = r.frontend.clone().unwrap_or_else(|| "<none>".into());
            vec![r.namespace.clone(), name, ty, frontend, affinity(r), policies(r), backends]
        })
        .collect();
    table(&["NAMESPACE", "NAME", "TYPE", "FRONTEND", "AFFINITY", "POLICY(EXT/INT)", "BACKENDS"], body)
}

/// One service port in `xlb describe service`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortDescription {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub target_port: String,
    pub node_port: Option<u16>,
    pub service_id: u32,
    pub frontends: Vec<String>,
    /// Backends with their state and counters; `active_flows` counts tracked flows now.
    pub backends: Vec<BackendDescription>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendDescription {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub state: &'static str,
    /// New flows to some frontend of the port may be sent to it.
    pub selectable: bool,
    /// Why this node's frontends of the port use it or not (see [`why`]).
    pub why: String,
    pub new_flows: u64,
    pub active_flows: u64,
}

/// Why frontend `f` uses (`selected`) a backend of state `state` on this node or not (`local`:
/// the endpoint is on this node), read from what the maps hold: the backend's state and place,
/// and the frontend's slots and flags. A ready endpoint that a frontend without a Local traffic
/// policy leaves out can only have been left out by topology hints (kube-proxy's rule: when
/// every ready endpoint is hinted and some for this node, or this node's zone, only those).
fn why(f: &FrontendEntry, state: u8, selected: bool, local: bool) -> &'static str {
    let policy_local = f.flags & (lb_common::SVC_F_LOCAL_LIST | lb_common::SVC_F_NO_LOCAL_ENDPOINT) != 0;
    match (state, selected) {
        (BACKEND_STATE_ACTIVE, true) => "ready",
        (BACKEND_STATE_TERMINATING, true) => "terminating, still serving: used while no endpoint is ready",
        (BACKEND_STATE_TERMINATING, false) => "terminating: no new flows while an endpoint is ready",
        (BACKEND_STATE_ACTIVE, false) if policy_local && !local => "on another node (traffic policy Local)",
        (BACKEND_STATE_ACTIVE, false) => "not hinted for this node or its zone (topology hints)",
        _ => "free",
    }
}

/// `xlb describe service NS/NAME -o json|yaml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceDescription {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub svc_type: Option<SvcType>,
    pub cluster_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub load_balancer_ingress: Vec<String>,
    /// `loadBalancerSourceRanges`: the clients allowed on the ingress IPs (empty: all).
    pub load_balancer_source_ranges: Vec<String>,
    pub external_name: Option<String>,
    pub session_affinity: &'static str,
    pub affinity_timeout_seconds: Option<u32>,
    pub external_traffic_policy: Policy,
    pub internal_traffic_policy: Policy,
    pub ports: Vec<PortDescription>,
}

/// Parses `NS/NAME` or `NAME` (namespace `default`, as kubectl).
pub fn parse_service(s: &str) -> (String, String) {
    match s.split_once('/') {
        Some((ns, n)) => (ns.to_owned(), n.to_owned()),
        None => ("default".to_owned(), s.to_owned()),
    }
}

/// A conntrack entry of either family (`xlb_ct4_v2` or `xlb_ct6_v1`), addresses as `IpAddr`,
/// ports in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub dir: u8,
    pub proto: u8,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub nat_addr: IpAddr,
    pub nat_port: u16,
    pub tcp_flags: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    pub created: u32,
    pub last_seen: u32,
    pub snat_port: u16,
}

/// `From` a conntrack key and value of one family (`$addr`: its address type).
macro_rules! ct_entry_from {
    ($key:ty, $value:ty, $addr:ty) => {
        impl From<($key, $value)> for CtEntry {
            fn from((k, v): ($key, $value)) -> Self {
                CtEntry {
                    dir: k.dir,
                    proto: k.proto,
                    saddr: <$addr>::from(k.saddr).into(),
                    sport: k.sport,
                    daddr: <$addr>::from(k.daddr).into(),
                    dport: k.dport,
                    nat_addr: <$addr>::from(v.nat_addr).into(),
                    nat_port: v.nat_port,
                    tcp_flags: v.tcp_flags,
                    flags: v.flags,
                    backend_id: v.backend_id,
                    svc_id: v.svc_id,
                    created: v.created,
                    last_seen: v.last_seen,
                    snat_port: v.snat_port,
                }
            }
        }
    };
}
ct_entry_from!(Ct4Key, Ct4Value, Ipv4Addr);
ct_entry_from!(Ct6Key, Ct6Value, Ipv6Addr);

/// Every conntrack entry of both families.
pub fn read_flows(dp: &impl Datapath) -> Result<Vec<CtEntry>, DatapathError> {
    let v4 = dp.read_ct()?.into_iter().map(CtEntry::from);
    Ok(v4.chain(dp.read_ct6()?.into_iter().map(CtEntry::from)).collect())
}

/// A backend's key across families: (IPv6, id); each family gives ids of its own.
pub type BackendKey = (bool, u32);

impl View {
    /// The address, port and state of backend `id` of the family of `v6`.
    fn backend_of(&self, v6: bool, id: u32) -> Option<(IpAddr, u16, u8)> {
        if v6 {
            self.backends6.get(&id).map(|b| (Ipv6Addr::from(b.addr).into(), b.port, b.state))
        } else {
            self.backends.get(&id).map(|b| (Ipv4Addr::from(b.addr).into(), b.port, b.state))
        }
    }

    /// Tracked flows per backend: forward conntrack entries whose backend id still names the
    /// backend they were sent to (stale entries are not counted).
    pub fn active_flows(&self, ct: &[CtEntry]) -> BTreeMap<BackendKey, u64> {
        let mut m = BTreeMap::new();
        for e in ct.iter().filter(|e| e.dir == CT_DIR_FORWARD) {
            let v6 = e.nat_addr.is_ipv6();
            let live = self.backend_of(v6, e.backend_id).is_some_and(|(a, p, st)| {
                st != lb_common::BACKEND_STATE_FREE && a == e.nat_addr && p == e.nat_port
            });
            if live {
                *m.entry((v6, e.backend_id)).or_default() += 1;
            }
        }
        m
    }

    /// Why the frontends of service port `svc_id` use backend `id` (of the IPv6 backends when
    /// `v6`) or not: one reason when they agree, else each frontend kind's.
    fn why_text(&self, svc_id: u32, id: u32, v6: bool) -> String {
        let (state, local) = if v6 {
            self.backends6.get(&id).map_or((0, false), |b| (b.state, b.flags & BACKEND_F_LOCAL != 0))
        } else {
            self.backends.get(&id).map_or((0, false), |b| (b.state, b.flags & BACKEND_F_LOCAL != 0))
        };
        let mut reasons: BTreeMap<&'static str, BTreeSet<&'static str>> = BTreeMap::new();
        for f in self.frontends.iter().filter(|f| f.svc_id == svc_id && f.addr.is_ipv6() == v6) {
            let selected = f.slots.iter().any(|(&slot, &b)| b == id && slot <= f.count);
            let kind = kinds(f.flags).first().copied().unwrap_or("frontend");
            reasons.entry(why(f, state, selected, local)).or_default().insert(kind);
        }
        if reasons.len() <= 1 {
            return reasons.into_keys().next().unwrap_or("free").to_string();
        }
        let parts: Vec<String> = reasons
            .iter()
            .map(|(why, kinds)| format!("{}: {why}", kinds.iter().copied().collect::<Vec<_>>().join(", ")))
            .collect();
        parts.join("; ")
    }

    /// The description of one Service, or `None` when the maps hold nothing of it.
    pub fn describe(
        &self,
        namespace: &str,
        name: &str,
        active: &BTreeMap<BackendKey, u64>,
    ) -> Option<ServiceDescription> {
        let rows: Vec<ServiceRow> =
            self.service_rows().into_iter().filter(|r| r.namespace == namespace && r.name == name).collect();
        let first = rows.first()?;
        let addrs = |flag: u16| -> Vec<String> {
            let set: BTreeSet<IpAddr> = self
                .frontends
                .iter()
                .filter(|f| f.flags & flag != 0 && rows.iter().any(|r| r.service_id == f.svc_id))
                .map(|f| f.addr)
                .collect();
            set.into_iter().map(|a| a.to_string()).collect()
        };
        let mut d = ServiceDescription {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            svc_type: first.svc_type,
            cluster_ips: addrs(SVC_F_CLUSTER_IP),
            external_ips: addrs(SVC_F_EXTERNAL_IP),
            load_balancer_ingress: addrs(SVC_F_LB_INGRESS),
            load_balancer_source_ranges: {
                let set: BTreeSet<String> = rows
                    .iter()
                    .flat_map(|r| self.ranges.get(&r.service_id).into_iter().flatten())
                    .map(ToString::to_string)
                    .collect();
                set.into_iter().collect()
            },
            external_name: first.external_name.clone(),
            session_affinity: first.session_affinity,
            affinity_timeout_seconds: first.affinity_timeout_seconds,
            external_traffic_policy: first.external_traffic_policy,
            internal_traffic_policy: first.internal_traffic_policy,
            ports: Vec::new(),
        };
        let mut by_id: BTreeMap<u32, Vec<&ServiceRow>> = BTreeMap::new();
        for r in &rows {
            by_id.entry(r.service_id).or_default().push(r);
        }
        for (id, rs) in by_id {
            let r0 = rs[0];
            let mut backends: BTreeMap<u32, BackendDescription> = BTreeMap::new();
            for r in &rs {
                for b in &r.backends {
                    let d = backends.entry(b.id).or_insert_with(|| BackendDescription {
                        id: b.id,
                        address: b.address.clone(),
                        port: b.port,
                        state: b.state,
                        selectable: false,
                        why: self.why_text(id, b.id, b.is_ipv6()),
                        new_flows: b.new_flows,
                        active_flows: active.get(&(b.is_ipv6(), b.id)).copied().unwrap_or(0),
                    });
                    d.selectable |= b.selectable;
                }
            }
            d.ports.push(PortDescription {
                name: r0.port_name.clone(),
                port: r0.service_port,
                protocol: r0.protocol.clone(),
                target_port: r0.target_port.clone(),
                node_port: r0.node_port,
                service_id: id,
                frontends: rs.iter().filter_map(|r| r.frontend.clone()).collect(),
                backends: backends.into_values().collect(),
            });
        }
        d.ports.sort_by(|a, b| (a.port, &a.protocol, &a.name).cmp(&(b.port, &b.protocol, &b.name)));
        Some(d)
    }
}

fn or_none(v: &[String]) -> String {
    if v.is_empty() { "<none>".into() } else { v.join(",") }
}

fn kv(o: &mut String, k: &str, v: &str) {
    let line = format!("{:<25} {v}", format!("{k}:"));
    let _ = writeln!(o, "{}", line.trim_end());
}

/// `xlb describe service` as text, in the shape of `kubectl describe service`.
pub fn describe_text(d: &ServiceDescription) -> String {
    let mut o = String::new();
    kv(&mut o, "Name", &d.name);
    kv(&mut o, "Namespace", &d.namespace);
    kv(&mut o, "Type", &d.svc_type.map_or("?".into(), |t| format!("{t:?}")));
    if let Some(n) = &d.external_name {
        kv(&mut o, "External Name", n);
    } else {
        kv(&mut o, "IP", &or_none(&d.cluster_ips));
    }
    if !d.external_ips.is_empty() {
        kv(&mut o, "External IPs", &d.external_ips.join(","));
    }
    if !d.load_balancer_ingress.is_empty() {
        kv(&mut o, "LoadBalancer Ingress", &d.load_balancer_ingress.join(", "));
    }
    if !d.load_balancer_source_ranges.is_empty() {
        kv(&mut o, "LoadBalancer Source Ranges", &d.load_balancer_source_ranges.join(","));
    }
    let affinity = match d.affinity_timeout_seconds {
        Some(t) => format!("ClientIP (timeout {t}s)"),
        None => "None".into(),
    };
    kv(&mut o, "Session Affinity", &affinity);
    kv(&mut o, "External Traffic Policy", &format!("{:?}", d.external_traffic_policy));
    kv(&mut o, "Internal Traffic Policy", &format!("{:?}", d.internal_traffic_policy));
    for p in &d.ports {
        let name = if p.name.is_empty() { "<unset>" } else { &p.name };
        kv(&mut o, "Port", &format!("{name}  {}/{}", p.port, p.protocol));
        kv(
            &mut o,
            "TargetPort",
            &if p.target_port.is_empty() { p.port.to_string() } else { p.target_port.clone() },
        );
        if let Some(np) = p.node_port {
            kv(&mut o, "NodePort", &format!("{name}  {np}/{}", p.protocol));
        }
        let ready: Vec<String> = p
            .backends
            .iter()
            .filter(|b| b.state == "active")
            .map(|b| format!("{}:{}", b.address, b.port))
            .collect();
        kv(&mut o, "Endpoints", &or_none(&ready));
        kv(&mut o, "Service ID", &p.service_id.to_string());
        kv(&mut o, "Frontends", &or_none(&p.frontends));
        if p.backends.is_empty() {
            if d.external_name.is_none() {
                kv(&mut o, "Backends", "<none> (new connections are dropped)");
            }
            continue;
        }
        kv(&mut o, "Backends", "");
        let rows = p
            .backends
            .iter()
            .map(|b| {
                vec![
                    format!("  {}", b.id),
                    format!("{}:{}", b.address, b.port),
                    b.state.to_string(),
                    if b.selectable { "yes" } else { "no" }.into(),
                    b.new_flows.to_string(),
                    b.active_flows.to_string(),
                    b.why.clone(),
                ]
            })
            .collect();
        o.push_str(&table(
            &["  ID", "ADDRESS", "STATE", "SELECTABLE", "NEW-FLOWS", "ACTIVE-FLOWS", "WHY"],
            rows,
        ));
    }
    if d.affinity_timeout_seconds.is_some() {
        o.push_str(
            "Note:                     affinity is kept per client address on the packet path, per network namespace at the socket\n",
        );
    }
    o
}

/// One backend in `xlb backends`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendListRow {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub state: &'static str,
    /// Service ports whose frontends name this backend (`NS/NAME[:PORT]`).
    pub services: Vec<String>,
    pub new_flows: u64,
    pub active_flows: u64,
}

impl View {
    /// Every backend a frontend names, by id.
    pub fn backend_rows(&self, active: &BTreeMap<BackendKey, u64>) -> Vec<BackendListRow> {
        // IPv4 backends first, then IPv6 ones (ids of their own).
        let mut users: BTreeMap<BackendKey, (u8, BTreeSet<String>)> = BTreeMap::new();
        for f in &self.frontends {
            for &id in f.slots.values() {
                let e = users.entry((f.addr.is_ipv6(), id)).or_insert((f.proto, BTreeSet::new()));
                e.1.insert(self.port_label(f.svc_id));
            }
        }
        users
            .into_iter()
            .map(|((v6, id), (proto, services))| {
                let b = self.backend_row(id, false, v6);
                BackendListRow {
                    id,
                    address: b.address,
                    port: b.port,
                    protocol: proto_name(proto),
                    state: b.state,
                    services: services.into_iter().collect(),
                    new_flows: b.new_flows,
                    active_flows: active.get(&(v6, id)).copied().unwrap_or(0),
                }
            })
            .collect()
    }
}

pub fn backends_table(rows: &[BackendListRow]) -> String {
    let body = rows
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                format!("{}:{}/{}", b.address, b.port, b.protocol),
                b.state.to_string(),
                b.new_flows.to_string(),
                b.active_flows.to_string(),
                b.services.join(","),
            ]
        })
        .collect();
    table(&["ID", "BACKEND", "STATE", "NEW-FLOWS", "ACTIVE-FLOWS", "SERVICES"], body)
}

/// One tracked flow in `xlb conntrack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub protocol: String,
    /// The client's address and port.
    pub client: String,
    /// The frontend the client sent to.
    pub frontend: String,
    /// The backend the flow is translated to.
    pub backend: String,
    pub backend_id: u32,
    pub service_id: u32,
    /// `NS/NAME[:PORT]` of the service port; empty when the port is gone.
    pub service: String,
    /// TCP flags seen from the client (`SYN,ACK,...`); empty for UDP.
    pub tcp_flags: String,
    /// For a flow to an endpoint on another node: the node address and port it is SNATed to.
    pub snat: Option<String>,
    /// An entry for client -> frontend exists (false: only the reply entry is left).
    pub forward_tracked: bool,
    /// An entry for backend -> client exists.
    pub reply_tracked: bool,
    /// The backend id no longer names this backend: the next packet balances the flow again.
    pub stale: bool,
    pub age_seconds: u64,
    pub idle_seconds: u64,
}

/// What `xlb conntrack` keeps.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// `(namespace, name)`.
    pub service: Option<(String, String)>,
    pub client: Option<AddrFilter>,
    pub frontend: Option<AddrFilter>,
    pub backend: Option<AddrFilter>,
}

/// An address, optionally with a port (`198.18.0.10`, `198.18.0.10:80`, `2001:db8::1`,
/// `[2001:db8::1]:80`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrFilter {
    pub addr: IpAddr,
    pub port: Option<u16>,
}

impl std::str::FromStr for AddrFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(AddrFilter { addr: sa.ip(), port: Some(sa.port()) });
        }
        s.parse::<IpAddr>()
            .map(|addr| AddrFilter { addr, port: None })
            .map_err(|_| format!("{s:?} is neither ADDRESS nor ADDRESS:PORT ([ADDRESS]:PORT for IPv6)"))
    }
}

impl AddrFilter {
    fn matches(&self, addr: IpAddr, port: u16) -> bool {
        addr == self.addr && self.port.is_none_or(|p| p == port)
    }
}

/// TCP flag names, as in `tcpdump`'s order.
pub fn tcp_flag_names(f: u8) -> String {
    const NAMES: [(u8, &str); 6] =
        [(0x02, "SYN"), (0x10, "ACK"), (0x08, "PSH"), (0x01, "FIN"), (0x04, "RST"), (0x20, "URG")];
    NAMES.iter().filter(|(b, _)| f & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(",")
}

/// Seconds of CLOCK_MONOTONIC, the clock conntrack timestamps use.
pub fn monotonic_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

impl View {
    /// Tracked flows, one row per flow (forward and reply entries joined), filtered, sorted by
    /// protocol, client, frontend.
    pub fn flow_rows(&self, ct: &[CtEntry], now: u64, filter: &FlowFilter) -> Vec<FlowRow> {
        // Keyed by (proto, client, frontend, backend), each as (addr, port).
        type Tuple = (u8, (IpAddr, u16), (IpAddr, u16), (IpAddr, u16));
        let mut flows: BTreeMap<Tuple, (Option<CtEntry>, Option<CtEntry>)> = BTreeMap::new();
        // SNATed flows: (proto, client address and SNAT port, backend) -> the node address and
        // port they leave with.
        type Ends = (u8, (IpAddr, u16), (IpAddr, u16));
        let mut snat: BTreeMap<Ends, String> = BTreeMap::new();
        for e in ct {
            if e.dir == lb_common::CT_DIR_SNAT {
                let at = SocketAddr::new(e.nat_addr, e.nat_port).to_string();
                snat.insert((e.proto, (e.saddr, e.sport), (e.daddr, e.dport)), at);
                continue;
            }
            if e.dir == CT_DIR_REPLY && e.flags & lb_common::CT_F_DNAT_BACK != 0 {
                continue; // the SNATed side of a flow shown through its other entries
            }
            match e.dir {
                CT_DIR_FORWARD => {
                    let t = (e.proto, (e.saddr, e.sport), (e.daddr, e.dport), (e.nat_addr, e.nat_port));
                    flows.entry(t).or_default().0 = Some(*e);
                }
                CT_DIR_REPLY | lb_common::CT_DIR_SNAT_REPLY => {
                    let t = (e.proto, (e.daddr, e.dport), (e.nat_addr, e.nat_port), (e.saddr, e.sport));
                    flows.entry(t).or_default().1 = Some(*e);
                }
                _ => {}
            }
        }
        let sa = |(a, p): (IpAddr, u16)| SocketAddr::new(a, p).to_string();
        let mut rows = Vec::new();
        for ((proto, client, frontend, backend), (fwd, rep)) in flows {
            let Some(v) = fwd.or(rep) else { continue };
            if let Some((ns, name)) = &filter.service
                && self.svc_of(v.svc_id).as_ref().is_none_or(|(n, m)| n != ns || m != name)
            {
                continue;
            }
            let keep =
                |f: &Option<AddrFilter>, (a, p): (IpAddr, u16)| f.as_ref().is_none_or(|f| f.matches(a, p));
            if !keep(&filter.client, client)
                || !keep(&filter.frontend, frontend)
                || !keep(&filter.backend, backend)
            {
                continue;
            }
            let be = self.backend_of(backend.0.is_ipv6(), v.backend_id);
            let stale = be.is_none_or(|(a, p, st)| st == lb_common::BACKEND_STATE_FREE || (a, p) != backend);
            let created = u64::from(fwd.map_or(v.created, |f| f.created));
            let last = u64::from(fwd.map_or(0, |f| f.last_seen).max(rep.map_or(0, |r| r.last_seen)));
            rows.push(FlowRow {
                protocol: proto_name(proto),
                client: sa(client),
                frontend: sa(frontend),
                backend: sa(backend),
                backend_id: v.backend_id,
                service_id: v.svc_id,
                service: if self.infos.contains_key(&v.svc_id) {
                    self.port_label(v.svc_id)
                } else {
                    String::new()
                },
                tcp_flags: tcp_flag_names(fwd.map_or(0, |f| f.tcp_flags)),
                // Keyed by the SNAT port the forward entry names.
                snat: fwd
                    .filter(|f| f.flags & lb_common::CT_F_SNAT != 0)
                    .and_then(|f| snat.get(&(proto, (client.0, f.snat_port), backend)))
                    .cloned(),
                forward_tracked: fwd.is_some(),
                reply_tracked: rep.is_some(),
                stale,
                age_seconds: now.saturating_sub(created),
                idle_seconds: now.saturating_sub(last),
            });
        }
        rows
    }
}

pub fn flows_table(rows: &[FlowRow]) -> String {
    let body = rows
        .iter()
        .map(|f| {
            let mut state = Vec::new();
            if !f.forward_tracked {
                state.push("reply-only");
            }
            if !f.reply_tracked {
                state.push("no-reply-entry");
            }
            if f.stale {
                state.push("stale");
            }
            vec![
                f.protocol.clone(),
                f.client.clone(),
                f.frontend.clone(),
                f.backend.clone(),
                if f.service.is_empty() { format!("<id {}>", f.service_id) } else { f.service.clone() },
                if f.tcp_flags.is_empty() { "-".into() } else { f.tcp_flags.clone() },
                format!("{}s", f.age_seconds),
                format!("{}s", f.idle_seconds),
                if state.is_empty() { "ok".into() } else { state.join(",") },
            ]
        })
        .collect();
    table(&["PROTO", "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "FLAGS", "AGE", "IDLE", "STATE"], body)
}

/// The verdict a counter stands for.
pub fn stat_verdict(name: &str) -> &'static str {
    match name {
        "rx" => "seen",
        "ct_live" | "ct_evicted" => "derived",
        n if n.starts_with("ct_") => "event",
        "sock_translated" => "sock (translated)",
        "sock_refused" => "sock (refused)",
        n if n.starts_with("reject_") => "reject (answered)",
        n if n.starts_with("drop_") => "drop",
        n if n.starts_with("pass_") => "pass",
        _ => "pass (translated)",
    }
}

/// What a counter means (lb_common::Stat's documentation, for operators).
pub fn stat_meaning(name: &str) -> &'static str {
    match name {
        "rx" => "every packet the program saw",
        "pass_not_ipv4" => "neither IPv4 nor IPv6 (ARP, VLAN...)",
        "pass_malformed" => "truncated or inconsistent header; left to the kernel",
        "pass_other_proto" => "IPv4 but neither TCP nor UDP (nor an ICMP error about a tracked flow)",
        "pass_fragment" => {
            "later fragment whose first fragment was not seen translated (not a Service's flow)"
        }
        "pass_no_service" => "no frontend and no tracked flow matched",
        "dnat_new" => "first packet of a new flow, sent to a backend",
        "dnat_established" => "packet of a tracked flow, sent to its backend",
        "rev_nat" => "reply from a backend, source set back to the frontend",
        "drop_no_backend" => {
            "service has no usable endpoint and no answer was possible (a reset, IP options, ICMP rate limit), or a traffic policy Local leaves this node without one"
        }
        "reject_no_backend" => {
            "service has no usable endpoint: answered with a TCP reset or ICMP port unreachable"
        }
        "drop_stale_slot" => "backend slot vanished during an update (race with the agent)",
        "drop_ct_full" => "connection could not be tracked (conntrack map update failed)",
        "ct_stale_backend" => "tracked flow whose backend was removed; balanced again",
        "ct_created" => "new flow tracked",
        "ct_live" => "flows tracked now (forward entries in the conntrack map)",
        "ct_evicted" => {
            "flows evicted from the full conntrack map before they expired (created - expired - stale - live)"
        }
        "ct_expired" => {
            "tracked flow over (idle past its lifetime, or a new connection on a closed one); balanced again"
        }
        "pass_egress_rev_nat" => "reply of a flow to a node address, left for TC egress to translate",
        "egress_rev_nat" => "TC egress: reply's source set back to the node address and port",
        "drop_source_range" => "new flow to a LoadBalancer IP from a client outside loadBalancerSourceRanges",
        "icmp_translated" => {
            "ICMP error about a tracked flow, translated for the backend or client it concerns"
        }
        "egress_snat" => "TC egress: a flow to an endpoint on another node leaves with the node's address",
        "sock_translated" => {
            "socket level: a connect or UDP datagram of a node process or pod to a frontend was given a backend"
        }
        "sock_refused" => {
            "socket level: a connect or UDP datagram to a frontend without usable endpoints, or to an address of the Service ranges no Service holds, failed with ECONNREFUSED"
        }
        "reject_no_service" => {
            "new flow to an address of the Service ranges (--service-cidr) that no Service holds: answered with a TCP reset or ICMP port unreachable"
        }
        "drop_no_service" => {
            "as reject_no_service, where no answer was possible (a reset, IP options, ICMP rate limit)"
        }
        "frag_translated" => {
            "later fragment of a translated datagram, given the addresses its first fragment got"
        }
        _ => "",
    }
}

/// One counter in `xlb stats -o json|yaml` (an object keyed by counter name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatRow {
    pub packets: u64,
    pub bytes: u64,
    pub verdict: &'static str,
    pub meaning: &'static str,
}

pub fn stat_rows(stats: &[(&'static str, u64, u64)]) -> BTreeMap<&'static str, StatRow> {
    stats
        .iter()
        .map(|&(n, packets, bytes)| {
            (n, StatRow { packets, bytes, verdict: stat_verdict(n), meaning: stat_meaning(n) })
        })
        .collect()
}

/// The counters, followed by two derived from them and the conntrack map: `ct_live` (flows
/// tracked now: forward entries) and `ct_evicted` (flows the LRU map evicted before they
/// expired: created - expired - stale - live).
pub fn with_ct_rows(
    mut stats: Vec<(&'static str, u64, u64)>,
    ct: &[CtEntry],
) -> Vec<(&'static str, u64, u64)> {
    let get = |n: &str| stats.iter().find(|s| s.0 == n).map_or(0, |s| s.1);
    let live = ct.iter().filter(|e| e.dir == lb_common::CT_DIR_FORWARD).count() as u64;
    let gone = get("ct_expired") + get("ct_stale_backend") + live;
    let evicted = get("ct_created").saturating_sub(gone);
    stats.push(("ct_live", live, 0));
    stats.push(("ct_evicted", evicted, 0));
    stats
}

pub fn stats_table(stats: &[(&'static str, u64, u64)]) -> String {
    let body = stats
        .iter()
        .map(|&(n, p, b)| {
            vec![
                n.to_string(),
                stat_verdict(n).to_string(),
                p.to_string(),
                b.to_string(),
                stat_meaning(n).to_string(),
            ]
        })
        .collect();
    table(&["COUNTER", "VERDICT", "PACKETS", "BYTES", "MEANING"], body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `xlb describe` says why each endpoint is used or not, per frontend kind, from the maps
    /// the reconciler wrote for a model with topology hints, a Local policy and a terminating
    /// endpoint.
    #[test]
    fn describe_says_why_each_endpoint_is_used_or_not() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.18.0.10
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.18.1.1], nodeName: n1, hints: {forZones: [{name: b}]}}
- {addresses: [198.18.1.2], nodeName: n2, hints: {forZones: [{name: a}]}}
- {addresses: [198.18.1.3], nodeName: n2, hints: {forZones: [{name: a}]}, conditions: {ready: false, serving: true, terminating: true}}
"#;
        let mut objects = crate::source::manifests::Objects::default();
        crate::source::manifests::read_str("t.yaml".as_ref(), yaml, &mut objects);
        assert!(objects.errors.is_empty(), "{:?}", objects.errors);
        let why = |zone: Option<&str>| -> BTreeMap<String, String> {
            let cfg = crate::model::ModelConfig {
                node_name: Some("n1".into()),
                node_addrs: vec!["198.18.100.1".parse().unwrap()],
                zone: zone.map(Into::into),
                ..crate::model::ModelConfig::default()
            };
            let m = crate::model::build(&objects.services, &objects.slices, &cfg);
            let dp = crate::datapath::MemDatapath {
                filter: vec![0; lb_common::FILTER_WORDS as usize],
                ..Default::default()
            };
            let mut rec = crate::reconcile::Reconciler::new(dp).unwrap();
            rec.apply(&m.ports).unwrap();
            let view = View::read(rec.datapath()).unwrap();
            let d = view.describe("default", "web", &BTreeMap::new()).unwrap();
            let text = describe_text(&d);
            d.ports[0]
                .backends
                .iter()
                .map(|b| {
                    assert!(text.contains(&b.why), "{text}");
                    (b.address.clone(), b.why.clone())
                })
                .collect()
        };
        // In zone a: the ClusterIP uses zone a's endpoint only; the node port (Local) this
        // node's, whatever its hints.
        let a = why(Some("a"));
        assert_eq!(
            a["198.18.1.1"],
            "ClusterIP: not hinted for this node or its zone (topology hints); NodePort: ready"
        );
        assert_eq!(a["198.18.1.2"], "NodePort: on another node (traffic policy Local); ClusterIP: ready");
        assert_eq!(a["198.18.1.3"], "terminating: no new flows while an endpoint is ready");
        // With no zone known the hints are not used: every ready endpoint for the ClusterIP.
        let none = why(None);
        assert_eq!(none["198.18.1.1"], "ready");
        assert_eq!(none["198.18.1.2"], "NodePort: on another node (traffic policy Local); ClusterIP: ready");
    }

    #[test]
    fn every_counter_has_a_verdict_and_a_meaning() {
        for n in lb_common::STAT_NAMES {
            assert!(!stat_meaning(n).is_empty(), "{n} has no meaning");
            assert!(!stat_verdict(n).is_empty(), "{n} has no verdict");
        }
    }
}
