//! `xlb agent`: loads and attaches the datapath, then keeps its maps equal to what the source
//! (the API server, or a manifest directory) says.
//!
//! Order on start: reuse the pinned maps and read them back; start /healthz, /metrics, /readyz;
//! wait for the source's first complete picture; sync the maps; only then put the new program
//! on the interfaces (replacing, atomically, the one a previous agent left pinned). While the
//! new agent starts, the old program keeps forwarding with the old maps: nothing is flushed.
pub mod events;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod node;
pub mod sockterm;
use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        BpfMaps, Datapath,
        ebpf::{self, Attached, Capacities},
    },
    model::{
        ModelConfig,
        incremental::{IncrementalModel, Key, PortChanges},
    },
    reconcile::{ApplyStats, Reconciler},
    source::{
        self, Delta, ProxyName,
        kube::KubeSource,
        manifests::{self, DocError},
    },
};
use metrics::{Metrics, SyncFigures};

#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, checked for changes every `poll`.
    Manifests { dir: PathBuf, poll: Duration },
    /// The API server, from this kubeconfig or else the environment (in-cluster, KUBECONFIG).
    Kube {
        kubeconfig: Option<PathBuf>,
        /// This node: its pods are watched for their hostPorts (none without a name).
        node_name: Option<String>,
        /// Watch this node's Node object for its zone (not when `--node-zone` gives it).
        watch_node: bool,
    },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceConfig,
    pub interfaces: Vec<String>,
    pub pin_dir: PathBuf,
    pub xdp_mode: XdpMode,
    /// Where the balancing core runs, per interface (`--datapath`).
    pub datapath_hook: ebpf::HookChoice,
    pub capacities: Capacities,
    /// After a change, wait this long for more before syncing; zero: sync at once, and take the
    /// changes that come during a sync together in the next.
    pub batch_delay: Duration,
    /// Node ports outside this range are rejected.
    pub node_port_range: RangeInclusive<u16>,
    /// Node ports are answered on the node's addresses within these prefixes (all of them,
    /// loopback excepted, when empty), as kube-proxy's `--nodeport-addresses`.
    pub nodeport_addresses: Vec<crate::model::Cidr>,
    /// The cluster's Service IP ranges: a new flow to an address of them that no frontend holds
    /// is answered at once (see lb_common::MAP_SERVICE_CIDRS). Empty: not known.
    pub service_cidrs: Vec<crate::model::Cidr>,
    /// This node's name as EndpointSlices give it (`nodeName`), for the traffic policies
    /// `Local`.
    pub node_name: Option<String>,
    /// How often the node's addresses are read again.
    pub address_poll: Duration,
    /// Where /metrics, /healthz and /readyz are served; `None`: not served.
    pub http_addr: Option<SocketAddr>,
    /// Where the node health server (kube-proxy's, port 10256) is served; `None`: not served.
    pub healthz_addr: Option<SocketAddr>,
    /// /healthz fails once a change has waited this long for a successful sync.
    pub max_pending: Duration,
    /// The datapath's settings: conntrack lifetimes, backend selection.
    pub datapath: lb_common::DatapathConfig,
    /// The cgroup (v2) whose processes get socket-level balancing: the hierarchy's root on a
    /// node, so that the node's processes and its pods reach ClusterIPs. `None`: off.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Where the node's sysctls are (normally /proc/sys).
    pub proc_sys: PathBuf,
    /// Which Services are this agent's (`--service-proxy-name`).
    pub proxy_name: ProxyName,
    /// This node's zone as `--node-zone` gives it (else, from the API server, its Node's).
    pub node_zone: Option<String>,
}

impl AgentConfig {
    /// The settings, one `name: value` line each (`xlb agent --dry-run`).
    pub fn describe(&self) -> String {
        let source = match &self.source {
            SourceConfig::Manifests { dir, poll } => {
                format!("manifests {} (checked every {} ms)", dir.display(), poll.as_millis())
            }
            SourceConfig::Kube { kubeconfig: Some(k), .. } => {
                format!("API server from kubeconfig {}", k.display())
            }
            SourceConfig::Kube { kubeconfig: None, .. } => {
                "API server from the environment (in-cluster service account, KUBECONFIG, ~/.kube/config)"
                    .into()
            }
        };
        let c = &self.capacities;
        let d = &self.datapath;
        let lines = [
            ("source", source),
            (
                "services served",
                match self.proxy_name.name() {
                    None => format!("without the label {}", crate::source::SERVICE_PROXY_NAME_LABEL),
                    Some(n) => format!("with the label {}={n}", crate::source::SERVICE_PROXY_NAME_LABEL),
                },
            ),
            ("interfaces", self.interfaces.join(",")),
            (
                "datapath",
                match self.datapath_hook {
                    ebpf::HookChoice::Auto => {
                        "auto (per interface: XDP on physical NICs with native XDP, tc elsewhere)"
                    }
                    ebpf::HookChoice::Xdp => "xdp",
                    ebpf::HookChoice::Tc => "tc",
                }
                .into(),
            ),
            (
                "xdp mode",
                match self.xdp_mode {
                    XdpMode::Driver => "native",
                    XdpMode::Skb => "generic",
                    _ => "auto",
                }
                .into(),
            ),
            ("pin dir", self.pin_dir.display().to_string()),
            ("node name", self.node_name.clone().unwrap_or_else(|| "<none>".into())),
            ("node port range", format!("{}-{}", self.node_port_range.start(), self.node_port_range.end())),
            (
                "node port addresses",
                if self.nodeport_addresses.is_empty() {
                    "every address but loopback".into()
                } else {
                    self.nodeport_addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                },
            ),
            (
                "service cidrs",
                if self.service_cidrs.is_empty() {
                    "none (traffic to a deleted Service's address is routed as any)".into()
                } else {
                    self.service_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                },
            ),
            (
                "socket-level balancing",
                self.socket_lb_cgroup.as_ref().map_or("off".into(), |c| format!("cgroup {}", c.display())),
            ),
            ("http", self.http_addr.map_or("off".into(), |a| a.to_string())),
            ("node health", self.healthz_addr.map_or("off".into(), |a| a.to_string())),
            (
                "node zone",
                match (&self.node_zone, &self.source) {
                    (Some(z), _) => z.clone(),
                    (None, SourceConfig::Kube { .. }) => "from this node's Node object".into(),
                    (None, _) => "none (topology hints by zone not used)".into(),
                },
            ),
            ("sysctls", self.proc_sys.display().to_string()),
            (
                "capacities",
                format!(
                    "services {} backends {} conntrack {} socket translations {} affinity {} ipv6 {}",
                    c.service_entries,
                    c.backends,
                    c.ct_entries,
                    c.sock_nat_entries,
                    c.affinity_entries,
                    c.ipv6_entries
                ),
            ),
            (
                "conntrack timeouts (s)",
                format!(
                    "tcp syn {} established {} close {} udp {}",
                    d.tcp_syn_s, d.tcp_established_s, d.tcp_close_s, d.udp_s
                ),
            ),
            (
                "backend selection",
                if d.maglev_size == 0 {
                    "random".into()
                } else {
                    format!("maglev, table size {}", d.maglev_size)
                },
            ),
        ];
        lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
    }
}

/// The objects one sync is built from.
/// Every object at once (tests, and what a whole read of a directory gives).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Pods of this node (all pods from manifests; the model keeps this node's), for hostPorts.
    pub pods: Vec<Arc<Pod>>,
    /// Manifest documents that could not be read.
    pub doc_errors: Vec<DocError>,
}

impl Snapshot {
    pub fn from_manifests(o: impl Into<manifests::SharedObjects>) -> Self {
        let o = o.into();
        Self { services: o.services, slices: o.slices, pods: o.pods, doc_errors: o.errors }
    }
}

/// What changed at the source since the last sync.
#[derive(Default)]
pub struct Update {
    pub services: Delta<Service>,
    pub slices: Delta<EndpointSlice>,
    pub pods: Delta<Pod>,
    /// Manifest documents that could not be read (`None`: the directory was not read again).
    pub doc_errors: Option<Vec<DocError>>,
    /// Those of them in the files read now (logged).
    pub new_doc_errors: Vec<DocError>,
}

impl Update {
    /// No list, and a few changed objects.
    fn is_small(&self) -> bool {
        let lists = self.services.list.is_some() || self.slices.list.is_some() || self.pods.list.is_some();
        !lists && self.services.changes.len() + self.slices.changes.len() + self.pods.changes.len() <= 16
    }
}

impl From<&Snapshot> for Update {
    fn from(s: &Snapshot) -> Self {
        Update {
            services: Delta::listed(s.services.clone()),
            slices: Delta::listed(s.slices.clone()),
            pods: Delta::listed(s.pods.clone()),
            doc_errors: Some(s.doc_errors.clone()),
            new_doc_errors: s.doc_errors.clone(),
        }
    }
}

/// Model plus reconciler plus figures: one sync turns the changes at the source into map
/// writes, at the cost of what changed.
pub struct Syncer<D> {
    pub rec: Reconciler<D>,
    pub cfg: ModelConfig,
    pub metrics: Arc<Metrics>,
    pub model: IncrementalModel,
    /// The node's addresses as last read by the watcher task; taken into `cfg` at each sync.
    pub node_addrs: Option<Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>>,
    /// (pin directory, cgroup) of socket-level balancing, whose sockets connected to removed
    /// backends are terminated after each sync; `None`: off.
    pub terminate: Option<(PathBuf, PathBuf)>,
    /// Writes events about rejected objects (API server source only).
    pub events: Option<events::EventReporter>,
    /// This node's zone as its Node object says (`None`: not watched; `--node-zone` then, or
    /// no zone).
    pub node_zone: Option<Arc<source::kube::NodeZone>>,
    /// The health check node ports, following each sync's changes.
    pub health_checks: Option<Arc<healthcheck::HealthChecks>>,
    /// The rejections logged, so that each is logged once, not at every sync.
    logged: std::collections::BTreeSet<events::RejectionKey>,
    /// The node ports xlb gave out (standalone mode), by service port: each is logged when
    /// given, not at every sync.
    assigned: crate::HashMap<crate::model::PortRef, u16>,
    /// This node's pods (they are few: the model takes them all when one changes).
    pods: std::collections::BTreeMap<Key, Arc<Pod>>,
    doc_errors: Vec<DocError>,
}

impl<D: Datapath> Syncer<D> {
    pub fn new(rec: Reconciler<D>, cfg: ModelConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            rec,
            model: IncrementalModel::new(cfg.clone()),
            cfg,
            metrics,
            node_addrs: None,
            terminate: None,
            events: None,
            health_checks: None,
            node_zone: None,
            logged: Default::default(),
            assigned: Default::default(),
            pods: Default::default(),
            doc_errors: Vec::new(),
        }
    }

    /// Destroys the sockets that socket-level balancing connected to the backends the last
    /// applies removed, so that their owners connect again to live ones.
    fn terminate_sockets(&mut self) {
        let freed = self.rec.take_freed();
        let Some((pin_dir, cgroup)) = &self.terminate else { return };
        if freed.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<sockterm::Gone> = freed.into_iter().collect();
        let result = sockterm::cookies_for(pin_dir, &gone).and_then(|cookies| {
            if cookies.is_empty() {
                return Ok(0);
            }
            sockterm::terminate(&sockterm::namespaces_below(cgroup), &gone, &cookies)
        });
        match result {
            Ok(0) => {}
            Ok(n) => {
                info!(sockets = n, backends = gone.len(), "terminated sockets connected to removed backends")
            }
            Err(e) => warn!(error = %e, "cannot terminate the sockets connected to removed backends"),
        }
    }

    /// Logs the node ports given out by the changes (standalone mode, where no API server
    /// assigns them): which Service's port got which.
    fn log_assigned_node_ports(&mut self, changes: &PortChanges) {
        if !self.cfg.allocate_node_ports {
            return; // the API server assigns them
        }
        for (id, p) in changes {
            let np = p.as_ref().filter(|p| p.shown.node_port_assigned).and_then(|p| p.node_port);
            let Some(np) = np else {
                self.assigned.remove(id);
                continue;
            };
            if self.assigned.insert(id.clone(), np) == Some(np) {
                continue;
            }
            // Both families of a port share its node port: said once.
            let other = crate::model::PortRef {
                family: match id.family {
                    crate::model::Family::V4 => crate::model::Family::V6,
                    crate::model::Family::V6 => crate::model::Family::V4,
                },
                ..id.clone()
            };
            if self.assigned.get(&other) == Some(&np) {
                continue;
            }
            let port = p.as_ref().map_or(0, |p| p.port);
            info!(
                service = %format!("{}/{}", id.namespace, id.name),
                port = %if id.port_name.is_empty() { port.to_string() } else { id.port_name.clone() },
                protocol = %id.proto,
                node_port = np,
                "assigned a node port (the manifest has none; `xlb describe` shows it)"
            );
        }
    }

    /// Syncs a whole picture: the objects that differ from those held are the changes.
    pub fn sync(&mut self, snap: &Snapshot) -> anyhow::Result<ApplyStats> {
        self.sync_update(Update::from(snap))
    }

    /// Models what changed and writes the difference. Invalid objects are logged and counted,
    /// not returned; an error means a map write failed (the next sync finishes the work, even
    /// with nothing new).
    pub fn sync_update(&mut self, u: Update) -> anyhow::Result<ApplyStats> {
        let started = Instant::now();
        for e in &u.new_doc_errors {
            warn!(error = %e, "skipped manifest document");
        }
        if let Some(errors) = u.doc_errors {
            self.doc_errors = errors;
        }
        let mut changes = PortChanges::new();
        // The node's addresses and zone: the model takes both at once (each change of its
        // settings models every Service again).
        let mut cfg_changed = false;
        if let Some(src) = &self.node_addrs {
            let now = src.lock().map(|a| a.clone()).unwrap_or_default();
            if now != self.cfg.node_addrs {
                info!(addresses = ?now, "the node's addresses changed: node ports follow");
                self.cfg.node_addrs = now;
                cfg_changed = true;
            }
        }
        if let Some(z) = &self.node_zone {
            let now = z.get();
            cfg_changed |= now != self.cfg.zone;
            self.cfg.zone = now;
        }
        if cfg_changed {
            changes.extend(self.model.set_config(self.cfg.clone()));
        }
        // Pods: this node's, all of them to the model when one changed.
        let pods_changed = !u.pods.is_empty();
        if let Some(list) = u.pods.list {
            self.pods = list.into_iter().map(|p| (crate::model::ns_name(&p.metadata), p)).collect();
        }
        for (key, p) in u.pods.changes {
            match p {
                Some(p) => self.pods.insert(key, p),
                None => self.pods.remove(&key),
            };
        }
        let pods = pods_changed.then(|| self.pods.values().cloned().collect::<Vec<_>>());
        let (svc_list, slice_list) = (u.services.list, u.slices.list);
        let listed = svc_list.is_some() || slice_list.is_some();
        if listed {
            changes.extend(self.model.replace(svc_list.as_deref(), slice_list.as_deref(), None));
        }
        // The lists go now: the model kept what it needs (of a slice from the API server, its
        // parsed form only), and the reconciler's work comes on top of what is left.
        let objects = svc_list.as_ref().map_or(0, Vec::len) + slice_list.as_ref().map_or(0, Vec::len);
        if objects > 10_000 {
            // Freeing a large list (hundreds of thousands of objects, millions of allocations)
            // takes a good part of a first sync: it is done beside the writes, not before them.
            // What it frees goes back to the system there: the sync's own trim may come first.
            let _ = std::thread::Builder::new().name("xlb-free".into()).spawn(move || {
                drop((svc_list, slice_list));
                trim_heap();
            });
        } else {
            drop((svc_list, slice_list));
        }
        changes.extend(self.model.update(u.services.changes, u.slices.changes, pods));
        let model_done = started.elapsed();
        let rejected = self.model.rejected();
        // Each rejection is logged when it first holds (an object newly rejected, or for another
        // reason, or another part of it), not again at every sync while it lasts.
        for r in events::changes(&mut self.logged, &rejected) {
            let object = format!("{} {}/{}", r.kind, r.namespace, r.name);
            match r.part {
                None => warn!(%object, reason = %r.reason, "rejected object"),
                Some(part) => {
                    warn!(%object, part, reason = %r.reason, "rejected part of an object; the rest is served")
                }
            }
        }
        if let Some(events) = &mut self.events {
            events.report(&rejected, &self.model);
        }
        self.log_assigned_node_ports(&changes);
        let changed_ports = changes.len();
        if let Some(h) = &self.health_checks {
            h.update(&changes);
        }
        match self.rec.apply_changes(changes) {
            Ok(stats) => {
                self.metrics.set_capacity_exceeded(None);
                if let Some(events) = &mut self.events {
                    events.report_capacity(None, "");
                }
                self.terminate_sockets();
                let elapsed = started.elapsed();
                let mut rejected_whole = std::collections::BTreeMap::new();
                let mut rejected_parts = std::collections::BTreeMap::new();
                for r in &rejected {
                    match r.part {
                        None => *rejected_whole.entry(r.kind.to_string()).or_default() += 1,
                        Some(p) => {
                            *rejected_parts.entry((r.kind.to_string(), p.to_string())).or_default() += 1
                        }
                    }
                }
                if !self.doc_errors.is_empty() {
                    rejected_whole.insert("Document".to_string(), self.doc_errors.len() as u64);
                }
                let maps = self.rec.usage();
                // The backend map holds one entry per distinct backend: no need to count again.
                let backends = maps.iter().find(|m| m.0 == lb_common::MAP_BACKENDS).map_or(0, |m| m.1);
                let (service_ports, frontends) = self.model.figures();
                let figures = SyncFigures {
                    services: self.model.service_count() as u64,
                    endpoint_slices: self.model.slice_count() as u64,
                    service_ports: service_ports as u64,
                    frontends: frontends as u64,
                    backends,
                    rejected: rejected_whole,
                    rejected_parts,
                    maps,
                };
                self.metrics.sync_ok(elapsed, stats.writes, stats.deletes, figures);
                info!(
                    services = self.model.service_count(),
                    slices = self.model.slice_count(),
                    service_ports,
                    changed_ports,
                    rejected = rejected.len() + self.doc_errors.len(),
                    writes = stats.writes,
                    deletes = stats.deletes,
                    model_us = model_done.as_micros() as u64,
                    elapsed_us = elapsed.as_micros() as u64,
                    "synced"
                );
                // A large sync (the first, a relist) leaves much of the heap free, but held by
                // the allocator's arenas: give it back.
                if listed || stats.writes + stats.deletes >= 1000 || changed_ports >= 1000 {
                    trim_heap();
                }
                Ok(stats)
            }
            Err(e) => {
                self.metrics.sync_failed(started.elapsed());
                // A map too small for the cluster: nothing was written; said in the error, the
                // metric xlb_capacity_exceeded and an event on the node.
                let flag = e.capacity_flag();
                self.metrics.set_capacity_exceeded(flag);
                if let Some(events) = &mut self.events {
                    events.report_capacity(flag, &e.to_string());
                }
                Err(anyhow::Error::new(e).context("writing the datapath maps"))
            }
        }
    }
}

/// Returns the free memory at the top of the allocator's heaps (and whole free pages within
/// them) to the system.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where the objects come from.
pub enum Source {
    Manifests { dir: PathBuf, cache: std::sync::Mutex<manifests::DirCache>, _poller: AbortOnDrop },
    Kube(KubeSource),
}

impl Source {
    /// Starts the source; `changed` is notified whenever there is something new to take.
    pub async fn start(
        cfg: &SourceConfig,
        proxy: &ProxyName,
        changed: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        match cfg {
            SourceConfig::Manifests { dir, poll } => {
                manifests::manifest_files(dir)?; // a missing directory is an error at start
                let (dir2, poll) = (dir.clone(), *poll);
                let poller = tokio::spawn(async move {
                    let mut seen = fingerprint(&dir2);
                    let mut tick = tokio::time::interval(poll);
                    loop {
                        tick.tick().await;
                        let now = fingerprint(&dir2);
                        if now != seen {
                            seen = now;
                            metrics.changed();
                            changed.notify_one();
                        }
                    }
                });
                Ok(Source::Manifests {
                    dir: dir.clone(),
                    cache: std::sync::Mutex::new(manifests::DirCache::new(proxy.clone())),
                    _poller: AbortOnDrop(poller),
                })
            }
            SourceConfig::Kube { kubeconfig, node_name, watch_node } => {
                let client = source::kube::client(kubeconfig.as_deref()).await?;
                Ok(Source::Kube(KubeSource::start(
                    client,
                    node_name.as_deref(),
                    *watch_node,
                    proxy,
                    changed,
                    metrics,
                )))
            }
        }
    }

    /// Waits for the first complete picture (logging while it takes long).
    pub async fn wait_ready(&self) {
        if let Source::Kube(k) = self {
            let mut waited = 0u64;
            loop {
                match tokio::time::timeout(Duration::from_secs(10), k.wait_ready()).await {
                    Ok(()) => return,
                    Err(_) => {
                        waited += 10;
                        warn!(
                            waited_s = waited,
                            "still waiting for the first list of Services and EndpointSlices"
                        );
                    }
                }
            }
        }
    }

    /// What changed since the last call: the watches' findings, or the objects of the
    /// directory's files that are new, changed or gone.
    pub fn take_update(&self) -> anyhow::Result<Update> {
        match self {
            Source::Manifests { dir, cache, .. } => {
                let mut cache = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let c = cache.read_changes(dir)?;
                if c.files_read + c.files_gone > 0 {
                    debug!(files_read = c.files_read, files_gone = c.files_gone, "manifest directory read");
                }
                Ok(Update {
                    services: Delta { list: None, changes: c.services.into_iter().collect() },
                    slices: Delta { list: None, changes: c.slices.into_iter().collect() },
                    pods: c.pods.map(Delta::listed).unwrap_or_default(),
                    doc_errors: Some(c.errors),
                    new_doc_errors: c.new_errors,
                })
            }
            Source::Kube(k) => Ok(Update {
                services: k.services.take(),
                slices: k.slices.take(),
                pods: k.pods.as_ref().map(|p| p.take()).unwrap_or_default(),
                doc_errors: None,
                new_doc_errors: Vec::new(),
            }),
        }
    }
}

/// (file, modification time, length) of every manifest: a change in any means re-read.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    manifests::manifest_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(&p).ok();
            let mtime = md.as_ref().and_then(|m| m.modified().ok());
            let len = md.map_or(0, |m| m.len());
            (p, mtime, len)
        })
        .collect()
}

/// Attaches the XDP program (the XDP datapath) to `iface`, chosen for reason `why`.
fn attach_xdp(ebpf: &mut aya::Ebpf, iface: &str, cfg: &AgentConfig, why: &str) -> anyhow::Result<()> {
    if cfg.xdp_mode != XdpMode::Skb && ebpf::driver(iface).as_deref() == Some("veth") {
        warn!(
            %iface,
            "veth in native XDP mode: the answers xlb sends back out of it (TCP resets and ICMP errors for Services without endpoints) reach its peer at once only if the peer runs an XDP program (`xlb xdp-pass --iface PEER` in the peer's namespace); with GRO alone they wait for other traffic, without either they are lost. Otherwise run with --xdp-mode generic, or --datapath tc"
        );
    }
    match ebpf::attach_pinned(ebpf, iface, cfg.xdp_mode, &cfg.pin_dir)? {
        Attached::New => info!(%iface, datapath = "xdp", reason = %why, "attached XDP (new pinned link)"),
        Attached::Replaced => {
            info!(%iface, datapath = "xdp", reason = %why, "attached XDP (replaced the program of the pinned link)")
        }
        Attached::Unpinned => {
            warn!(%iface, datapath = "xdp", reason = %why, "attached XDP without a link (kernel < 5.9): it detaches when the agent stops")
        }
    }
    Ok(())
}

/// Removes the pin of a link of the hook `iface` no longer uses (an earlier agent's, run with
/// another `--datapath`): the link, held by nothing else, goes with it.
fn detach_pin(path: &std::path::Path, iface: &str, what: &str) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            info!(%iface, path = %path.display(), "detached {what}: this interface's datapath runs at the other hook now");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// One update taken and synced. A large one (a list, many changes) runs off the async workers;
/// a small one (a few objects: well under a millisecond) runs in place, as handing the worker's
/// other tasks to another thread would cost more than it.
fn sync_once<D: Datapath>(source: &Source, syncer: &mut Syncer<D>) -> anyhow::Result<ApplyStats> {
    let update = source.take_update()?;
    if update.is_small() {
        return syncer.sync_update(update);
    }
    tokio::task::block_in_place(|| syncer.sync_update(update))
}

/// Syncs after every change until `shutdown` resolves: at once when `batch_delay` is zero (the
/// default), the changes that arrive while a sync runs being taken together by the next one
/// (`changed` keeps one wake-up for them); else after waiting `batch_delay` for more. A failed
/// sync is retried with backoff (100 ms doubling to 5 s).
pub async fn control_loop<D: Datapath>(
    source: &Source,
    syncer: &mut Syncer<D>,
    changed: &Notify,
    batch_delay: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut retry: Option<Duration> = None;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
            _ = &mut shutdown => return,
        }
        if !batch_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(batch_delay) => {}
                _ = &mut shutdown => return,
            }
        }
        match sync_once(source, syncer) {
            Ok(_) => retry = None,
            Err(e) => {
                let next = retry.map_or(Duration::from_millis(100), |d| (d * 2).min(Duration::from_secs(5)));
                error!(
                    error = format!("{e:#}"),
                    retry_in_ms = next.as_millis() as u64,
                    "sync failed; will retry"
                );
                retry = Some(next);
            }
        }
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    if cfg.interfaces.is_empty() {
        anyhow::bail!("no interface given: pass --iface for each interface that carries Service traffic");
    }
    match ebpf::effective_capabilities() {
        Ok(caps) => {
            for w in ebpf::check_capabilities(caps, cfg.socket_lb_cgroup.is_some())? {
                warn!("{w}");
            }
        }
        Err(e) => warn!(error = %e, "cannot read this process's capabilities; trying anyway"),
    }
    let service_cidrs = crate::datapath::service_cidrs(&cfg.service_cidrs)
        .map_err(|e| anyhow::anyhow!("--service-cidr: {e}"))?;
    // One agent per pin directory, taken before anything is created, pinned or attached (see
    // crate::datapath::pinlock), and held until the agent exits.
    ebpf::prepare_pin_dir(&cfg.pin_dir)?;
    let _pin_lock = crate::datapath::pinlock::lock(&cfg.pin_dir)?;
    info!(pin_dir = %cfg.pin_dir.display(), "locked the pin directory: no other agent runs on it");
    let metrics = Arc::new(Metrics::default());
    // The lists start before the programs are loaded: the watches run on the async workers while
    // the kernel verifies the programs here (about half a second), and nothing is synced before
    // both are done.
    let changed = Arc::new(Notify::new());
    let source = Source::start(&cfg.source, &cfg.proxy_name, changed.clone(), metrics.clone()).await?;
    match cfg.proxy_name.name() {
        None => info!(
            label = crate::source::SERVICE_PROXY_NAME_LABEL,
            "serving the Services without the label (those with it are another proxy's)"
        ),
        Some(n) => info!(
            label = crate::source::SERVICE_PROXY_NAME_LABEL,
            value = n,
            "serving only the Services whose label has this value"
        ),
    }
    let loading = std::time::Instant::now();
    // The hook of each interface first: only their programs are loaded and verified.
    let hooks: Vec<(String, ebpf::Hook, String)> = cfg
        .interfaces
        .iter()
        .map(|i| {
            let (hook, why) = ebpf::choose_hook(i, cfg.datapath_hook);
            (i.clone(), hook, why)
        })
        .collect();
    if hooks.iter().any(|(_, h, _)| *h == ebpf::Hook::Tc) && !ebpf::tcx_supported() {
        anyhow::bail!("--datapath tc needs tcx links (Linux 6.6 or later); use --datapath xdp");
    }
    let needed: Vec<ebpf::Hook> = hooks.iter().map(|(_, h, _)| *h).collect();
    let mut ebpf = ebpf::load_hooks(Some(&cfg.pin_dir), cfg.capacities, &needed)?;
    info!(elapsed_ms = loading.elapsed().as_millis() as u64, "programs loaded and verified by the kernel");
    crate::datapath::write_config(&mut ebpf, cfg.datapath).context("writing the datapath's settings")?;
    crate::datapath::write_service_cidrs(&mut ebpf, service_cidrs).context("writing the Service ranges")?;
    if cfg.service_cidrs.is_empty() {
        info!("no --service-cidr: traffic to an address no Service holds is routed as any");
    } else {
        info!(service_cidrs = ?cfg.service_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "new connections to an address of these ranges that no Service holds are refused at once");
    }
    info!(settings = ?cfg.datapath, "datapath settings (conntrack lifetimes in seconds; maglev_size 0: random selection)");
    match crate::datapath::copy_services_v1(&cfg.pin_dir) {
        Ok(0) => {}
        Ok(n) => info!(
            entries = n,
            "copied the service map of the earlier layout ({}): every service and backend keeps its id",
            lb_common::MAP_SERVICES_V1
        ),
        // The first sync writes every service anew: tracked flows whose backend gets another id
        // are balanced again.
        Err(e) => warn!(error = %e, "cannot copy the service map of the earlier layout; writing it anew"),
    }
    let maps = BpfMaps::open(&cfg.pin_dir)?.with_maglev_pinned(&cfg.pin_dir)?;
    let mut rec = Reconciler::new(maps).context("reading back the pinned maps")?;
    rec.set_maglev(cfg.datapath.maglev_size);
    // Frontends on the node's own addresses need TC egress (tcx links, kernel 6.6) for their
    // replies; without it node ports are checked but not served.
    let node_addrs = if ebpf::tcx_supported() {
        let a = node::addresses(&cfg.nodeport_addresses).context("listing the node's addresses")?;
        info!(addresses = ?a, "node ports are answered on these addresses");
        // SNATed flows take their source ports from a range the node's own sockets must not use.
        match node::reserve_snat_ports(&cfg.proc_sys) {
            Ok(r) => info!(ports = %r, "reserved the SNAT source ports (net.ipv4.ip_local_reserved_ports)"),
            Err(e) => {
                warn!(error = %e, proc_sys = %cfg.proc_sys.display(), "cannot reserve the SNAT source ports (in a container, mount the host's /proc/sys/net writable and pass its parent with --proc-sys); a local socket bound there could clash with a SNATed flow")
            }
        }
        a
    } else {
        warn!("kernel older than 6.6 (no tcx links): node ports are checked but not served");
        Vec::new()
    };
    info!(node_name = cfg.node_name.as_deref().unwrap_or("<none>"), "endpoints on this node are local");
    let model_cfg = ModelConfig {
        node_port_range: cfg.node_port_range.clone(),
        node_addrs,
        node_name: cfg.node_name.clone(),
        // Standalone, nobody else gives node ports out.
        allocate_node_ports: matches!(cfg.source, SourceConfig::Manifests { .. }),
        zone: cfg.node_zone.clone(),
        ..ModelConfig::default()
    };
    let mut syncer = Syncer::new(rec, model_cfg, metrics.clone());
    syncer.terminate = cfg.socket_lb_cgroup.clone().map(|c| (cfg.pin_dir.clone(), c));

    let _http = match cfg.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the HTTP endpoints to {addr}"))?;
            let stats = BpfMaps::open(&cfg.pin_dir)?;
            let counters: http::CounterSource = Arc::new(move || stats.read_stats().unwrap_or_default());
            let state = Arc::new(http::HttpState {
                metrics: metrics.clone(),
                counters,
                max_pending: cfg.max_pending,
            });
            info!(%addr, "serving /metrics, /healthz and /readyz");
            Some(AbortOnDrop(tokio::spawn(http::serve(listener, state))))
        }
        None => None,
    };

    syncer.health_checks = Some(Arc::new(healthcheck::HealthChecks::new(metrics.clone(), cfg.max_pending)));
    let _node_health = cfg.healthz_addr.map(|addr| {
        AbortOnDrop(tokio::spawn(http::serve_node_health(addr, metrics.clone(), cfg.max_pending)))
    });

    // Addresses come and go (DHCP, new interfaces): node ports follow within a poll.
    let _addr_watch = if ebpf::tcx_supported() {
        let shared = Arc::new(std::sync::Mutex::new(syncer.cfg.node_addrs.clone()));
        syncer.node_addrs = Some(shared.clone());
        let (changed, only, every) = (changed.clone(), cfg.nodeport_addresses.clone(), cfg.address_poll);
        Some(AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match node::addresses(&only) {
                    Ok(now) => {
                        let mut cur = shared.lock().unwrap_or_else(|e| e.into_inner());
                        if *cur != now {
                            *cur = now;
                            changed.notify_one();
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot list the node's addresses"),
                }
            }
        })))
    } else {
        None
    };
    if let Source::Kube(k) = &source {
        syncer.events = Some(events::EventReporter::start(k.client.clone(), cfg.node_name.as_deref()));
        syncer.node_zone = k.zone.clone();
    }
    source.wait_ready().await;
    // Maps first, then attach: the program never runs against maps the agent has not filled.
    // A failed first sync is retried by the loop; the maps then hold what an earlier agent left.
    metrics.changed();
    if let Err(e) = sync_once(&source, &mut syncer) {
        error!(error = format!("{e:#}"), "initial sync failed; will retry");
        changed.notify_one();
    }
    for (iface, hook, why) in &hooks {
        if *hook == ebpf::Hook::Tc {
            // The new program first, then the other hook's goes: a packet meanwhile meets one
            // or both (the second then finds nothing to translate), never neither.
            let how = ebpf::attach_tc_ingress_pinned(&mut ebpf, iface, &cfg.pin_dir)?;
            info!(%iface, datapath = "tc", reason = %why, replaced = (how == Attached::Replaced), "attached the datapath at TC ingress");
            detach_pin(&ebpf::link_pin(&cfg.pin_dir, iface), iface, "XDP")?;
        } else {
            attach_xdp(&mut ebpf, iface, &cfg, why)?;
            detach_pin(&ebpf::tc_ingress_link_pin(&cfg.pin_dir, iface), iface, "TC ingress")?;
        }
        if ebpf::tcx_supported() {
            match ebpf::attach_tc_pinned(&mut ebpf, iface, &cfg.pin_dir)? {
                Attached::Replaced => {
                    info!(%iface, "attached TC egress (replaced the program of the pinned link)")
                }
                _ => info!(%iface, "attached TC egress (new pinned link)"),
            }
        }
    }

    match &cfg.socket_lb_cgroup {
        Some(dir) => {
            let how = ebpf::attach_sock_pinned(&mut ebpf, dir, &cfg.pin_dir)?;
            let replaced = how.iter().filter(|a| **a == Attached::Replaced).count();
            info!(
                cgroup = %dir.display(),
                replaced,
                "attached socket-level balancing (connect, sendmsg, recvmsg, getpeername; IPv4 and IPv6)"
            );
        }
        None => {
            // An earlier agent's socket programs would keep running against maps nobody keeps
            // up to date any more.
            for (_, pin) in ebpf::SOCK_PROGRAMS {
                let p = ebpf::sock_link_pin(&cfg.pin_dir, pin);
                if p.exists() {
                    std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                    info!(path = %p.display(), "socket-level balancing is off: detached an earlier agent's program");
                }
            }
            info!(
                "socket-level balancing is off: the node's processes reach Services only through the interfaces xlb is attached to"
            );
        }
    }
    // Maps of another layout version, pinned by an agent of another version, are used by no
    // program any more once every link runs this one.
    for p in crate::datapath::other_version_pins(&cfg.pin_dir) {
        match std::fs::remove_file(&p) {
            Ok(()) => {
                info!(path = %p.display(), "removed a map of another layout version left by an earlier agent")
            }
            Err(e) => warn!(path = %p.display(), error = %e, "cannot remove a map of another layout version"),
        }
    }
    metrics.set_ready();
    info!(pin_dir = %cfg.pin_dir.display(), "ready");

    // SIGHUP: read the source again now (for manifests, without waiting for the next poll).
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let _reload = {
        let (changed, metrics) = (changed.clone(), metrics.clone());
        AbortOnDrop(tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                info!("SIGHUP: reading the source again");
                metrics.changed();
                changed.notify_one();
            }
        }))
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    control_loop(&source, &mut syncer, &changed, cfg.batch_delay, shutdown).await;
    metrics.set_stopping();
    info!(
        "stopping: the program stays attached and the maps pinned in {} (remove with `xlb cleanup`)",
        cfg.pin_dir.display()
    );
    Ok(())
}

pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::MemDatapath;

    /// What a tracing subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Captured {
        /// A subscriber that writes into the returned buffer, up to `level`.
        fn subscriber(level: tracing::Level) -> (Self, impl tracing::Subscriber + Send + Sync) {
            let out = Self::default();
            let writer = out.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(level)
                .finish();
            (out, subscriber)
        }

        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn snapshot(yaml: &str) -> Snapshot {
        let mut o = manifests::Objects::default();
        manifests::read_str(Path::new("test.yaml"), yaml, &mut o);
        Snapshot::from_manifests(o)
    }

    fn svc(name: &str, ip: &str, node_port: u32) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{type: NodePort, clusterIP: {ip}, ports: [{{port: 80, nodePort: {node_port}}}]}}\n---\n"
        )
    }

    #[test]
    fn a_rejection_is_logged_once_per_change_of_its_object_not_at_every_sync() {
        let (out, subscriber) = Captured::subscriber(tracing::Level::WARN);
        let cfg = ModelConfig { node_port_range: 30000..=32767, ..ModelConfig::default() };
        let mut syncer =
            Syncer::new(Reconciler::new(MemDatapath::default()).unwrap(), cfg, Arc::new(Metrics::default()));
        let lines = |what: &str| out.text().lines().filter(|l| l.contains(what)).count();
        tracing::subscriber::with_default(subscriber, || {
            let bad = snapshot(&(svc("bad", "198.18.0.1", 40000) + &svc("good", "198.18.0.2", 30000)));
            for _ in 0..50 {
                syncer.sync(&bad).unwrap();
            }
            assert_eq!(lines("default/bad"), 1, "once, not at each of the 50 syncs");
            assert_eq!(lines("nodePort 40000"), 1);
            // The object changes, and so does what is wrong with it: said again, once.
            let changed = snapshot(&(svc("bad", "198.18.0.1", 40001) + &svc("good", "198.18.0.2", 30000)));
            for _ in 0..50 {
                syncer.sync(&changed).unwrap();
            }
            assert_eq!(lines("default/bad"), 2);
            assert_eq!(lines("nodePort 40001"), 1);
            // Fixed, then broken again: said again.
            syncer.sync(&snapshot(&svc("bad", "198.18.0.1", 30001))).unwrap();
            syncer.sync(&changed).unwrap();
            assert_eq!(lines("nodePort 40001"), 2);
            assert_eq!(lines("default/good"), 0);
        });
    }

    #[test]
    fn a_node_port_xlb_assigns_is_logged_once_with_its_service() {
        let (out, subscriber) = Captured::subscriber(tracing::Level::INFO);
        let cfg = ModelConfig { allocate_node_ports: true, ..ModelConfig::default() };
        let mut syncer =
            Syncer::new(Reconciler::new(MemDatapath::default()).unwrap(), cfg, Arc::new(Metrics::default()));
        let auto = "apiVersion: v1\nkind: Service\nmetadata: {name: auto, namespace: default}\nspec: {type: NodePort, clusterIP: 198.18.0.3, ports: [{name: http, port: 80}]}\n---\n";
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                syncer.sync(&snapshot(auto)).unwrap();
            }
        });
        let text = out.text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("assigned a node port")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        let np = crate::cli::service_rows(syncer.rec.datapath())
            .unwrap()
            .into_iter()
            .find_map(|r| r.node_port)
            .unwrap();
        assert!(
            lines[0].contains("service=default/auto")
                && lines[0].contains("port=http")
                && lines[0].contains(&format!("node_port={np}")),
            "{}",
            lines[0]
        );
    }
}
