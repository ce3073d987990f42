//! The chaos soak: the two-node bed under constant load while a driver, at random, changes
//! everything around it, and every connection is accounted for.
//!
//! Both agents watch a fake API server (plain HTTP, in the client's namespace: the control plane
//! is off the nodes). Four pods, two on each node, serve TCP 8080 and 8081 and UDP 5353.
//!
//! - `stable`, a LoadBalancer Service (ClusterIP 198.18.0.70, externalIP 198.18.0.90, ingress IP
//!   198.18.0.91, node ports 30070/TCP and 30071/UDP, externalTrafficPolicy Cluster: node ports
//!   are SNATed to the node for pods on the other node), carries the load. The driver changes its
//!   endpoints but always leaves at least one ready.
//! - `churn-0..2`, ClusterIP Services the driver deletes and creates again; an ExternalName.
//!
//! Load, for the whole run: new TCP connections (one request each) through the ClusterIP, the
//! ingress IP, the externalIP and both nodes' node ports; long-lived TCP streams through the
//! ClusterIP, both node ports and the ingress IP (a request every 100 ms); UDP request/response
//! on long-lived sockets through the ClusterIP and node-1's node port; and node-1's own
//! processes (in its cgroup: socket-level balancing) with a TCP and a UDP session to the
//! ClusterIP.
//!
//! Events, one every 1.5 to 3 s: scale the endpoints, flip one's readiness, mark one
//! terminating, delete and recreate a churn Service (timed until it answers), SIGKILL an agent
//! and restart it, stop the API server for a few seconds (with a change made meanwhile, timed
//! until both nodes have it once it is back), add or remove an address of node-1 (timed until
//! its node port answers).
//!
//! Accounting: every new connection must succeed and every datagram be answered (a ready
//! backend always exists); a stream may end only by a reset, an abort or a close, and only when
//! its pod was removed or stopped being ready while it was open, never by a timeout (a hang).
//! At the end the state is restored, the load stopped, and after the conntrack's closing time
//! no TCP flow is tracked as established (every one saw its FIN or reset) and no more UDP flows
//! are live than the load had sockets; the services, service
//! info and backend entries equal the baseline; the agents' memory stayed bounded.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    HeldConn, TwoNodes, epoch_ms,
    fake_api::{FakeApi, Kind, serve},
    in_netns, session_lines, socket_lb_cgroup, tcp_request,
};

const API_HOST: &str = "198.18.100.2";
const API_PORT: u16 = 6443;
const CLUSTER_IP: &str = "198.18.0.70";
const EXTERNAL_IP: &str = "198.18.0.90";
const INGRESS_IP: &str = "198.18.0.91";
const NODE1: &str = "198.18.100.1";
const NODE2: &str = "198.18.200.2";
const NODE_PORT_TCP: u16 = 30070;
const NODE_PORT_UDP: u16 = 30071;
/// The address the driver adds to node-1 and takes away.
const EXTRA_ADDR: &str = "198.18.100.11";
const CHURN: usize = 3;
/// The pods' TCP ports: the stable Service's (a named targetPort) and the churn Services'. Apart,
/// so that a pod leaving the stable Service frees its backend and the flows on it end.
const STABLE_PORT: u16 = 8081;
const CHURN_PORT: u16 = 8080;
/// (name, node index) of the pods; the k-th pod on node n is at 198.18.<10 (n + 1) + k>.2.
const PODS: [(&str, usize); 4] = [("pod-a1", 0), ("pod-a2", 0), ("pod-b1", 1), ("pod-b2", 1)];
/// How long a request may take before it counts as a hang.
const TIMEOUT: Duration = Duration::from_secs(1);
/// A check that an event was applied (a Service answering, an address served) must pass in this.
const APPLY_DEADLINE: Duration = Duration::from_secs(10);

fn pod_ip(i: usize) -> String {
    let n = PODS[i].1;
    let k = PODS[..i].iter().filter(|p| p.1 == n).count();
    format!("198.18.{}.2", 10 * (n + 1) + k)
}

/// An endpoint's conditions as the driver sets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    Ready,
    NotReady,
    Terminating,
}

/// The stable Service's endpoints: pod index -> conditions (absent: not an endpoint).
type Endpoints = BTreeMap<usize, Cond>;

/// What the soak does and for how long.
#[derive(Clone, Debug)]
pub struct Config {
    pub duration: Duration,
    pub seed: u64,
    /// `xlb-testbed`, which serves in the pods and runs the node's sessions.
    pub testbed: PathBuf,
}

/// splitmix64: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// No answer within [`TIMEOUT`]: a hang.
    Timeout,
    Reset,
    Aborted,
    Refused,
    /// The peer closed the connection.
    Closed,
    Other,
}

fn failure_of(e: &anyhow::Error) -> Failure {
    if e.to_string().contains("closed the connection") {
        return Failure::Closed;
    }
    match e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()).map(std::io::Error::kind) {
        Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Failure::Timeout,
        Some(std::io::ErrorKind::ConnectionReset) => Failure::Reset,
        Some(std::io::ErrorKind::ConnectionAborted) => Failure::Aborted,
        Some(std::io::ErrorKind::ConnectionRefused) => Failure::Refused,
        Some(std::io::ErrorKind::UnexpectedEof) => Failure::Closed,
        _ => Failure::Other,
    }
}

/// One event of the driver: its kind, when, and what it found.
#[derive(Clone, Debug)]
pub struct Event {
    pub at_ms: u128,
    pub kind: &'static str,
    pub detail: String,
    /// For events that are checked: how long until the change was seen working.
    pub applied: Option<Duration>,
    /// A check that did not pass.
    pub failed: Option<String>,
}

/// The end of a long-lived stream or session connection.
#[derive(Clone, Debug)]
pub struct StreamEnd {
    pub target: String,
    pub pod: String,
    pub opened_ms: u128,
    pub ended_ms: u128,
    pub how: Failure,
    pub error: String,
    /// Its client port (0: not known, as for the node's sessions).
    pub client_port: u16,
    /// Another connection of the load used the same client port to another frontend while it
    /// was open (see the module's documentation, and README's Limitations).
    pub clash: bool,
    /// When its pod stopped being a ready endpoint while it was open (`None`: it did not).
    pub removed_ms: Option<u128>,
}

/// Everything the soak measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub seconds: f64,
    /// New TCP connections made, and those that failed (by how).
    pub connections: u64,
    pub connection_failures: Vec<(String, Failure, String)>,
    /// Requests answered on long-lived streams, and the streams' ends.
    pub stream_requests: u64,
    pub stream_ends: Vec<StreamEnd>,
    /// UDP requests and those not answered within the timeout.
    pub udp_requests: u64,
    pub udp_lost: Vec<(String, String)>,
    /// The node processes' session requests and errors.
    pub session_requests: u64,
    pub session_ends: Vec<StreamEnd>,
    pub events: Vec<Event>,
    /// Per node: TCP flows still tracked as live, UDP flows live (each at most one per UDP socket
    /// of the load), after the load and the flows' closing time; the flows of streams reset by
    /// their backend counted apart (`ct_left_by_reset`), and live ones there fail the soak too.
    pub ct_live_after: Vec<(usize, usize)>,
    /// Per node: flows of streams that their backend reset, still tracked as established.
    pub ct_left_by_reset: Vec<usize>,
    /// Per node: flows of streams that hung (a client-port clash or not), still tracked as
    /// established (their client gave up with data unacknowledged): the hang itself is what the
    /// checks judge.
    pub ct_left_by_hang: Vec<usize>,
    /// Per node: (services entries, service-info entries, backends) at the start and the end.
    pub maps_before: Vec<(usize, usize, usize)>,
    pub maps_after: Vec<(usize, usize, usize)>,
    /// Per agent run (node, run): RSS samples in KiB.
    pub rss: Vec<(usize, usize, Vec<u64>)>,
}

impl Report {
    /// Stream and session ends that no removal explains, or that hung or took over 1 s.
    pub fn unexplained_ends(&self) -> Vec<&StreamEnd> {
        self.stream_ends
            .iter()
            .chain(&self.session_ends)
            .filter(|e| !e.clash)
            .filter(|e| {
                e.how == Failure::Timeout
                    || e.removed_ms.is_none_or(|r| e.ended_ms > r && e.ended_ms - r > 1000 + 200)
            })
            .collect()
    }

    /// The checks that failed, each said in a line (empty: the soak ran clean).
    pub fn violations(&self) -> Vec<String> {
        self.violations_tolerating(0).0
    }

    /// [`Self::violations`], but with up to `hangs` stream hangs that nothing explains set
    /// apart (returned second) instead of failing: the intermittent hang the 2-minute soak of
    /// the test suite meets about once in several runs, whose cause is not found yet (issue 23).
    /// Any other hang, and anything else, still fails.
    pub fn violations_tolerating(&self, hangs: usize) -> (Vec<String>, Vec<&StreamEnd>) {
        let mut v = Vec::new();
        let mut tolerated = Vec::new();
        for (t, f, e) in &self.connection_failures {
            v.push(format!("a new connection to {t} failed ({f:?}) while a ready backend existed: {e}"));
        }
        for e in self.unexplained_ends() {
            if e.how == Failure::Timeout && e.client_port != 0 && tolerated.len() < hangs {
                tolerated.push(e);
                continue;
            }
            v.push(format!("a connection ended without its backend being removed, or hung: {e:?}"));
        }
        for (t, e) in &self.udp_lost {
            v.push(format!("a datagram to {t} was not answered: {e}"));
        }
        for e in &self.events {
            if let Some(f) = &e.failed {
                v.push(format!("event {} ({}) at {}: {f}", e.kind, e.detail, e.at_ms));
            }
        }
        for (n, &(tcp, udp)) in self.ct_live_after.iter().enumerate() {
            let tcp = tcp + self.ct_left_by_reset.get(n).copied().unwrap_or(0);
            if tcp > 0 || udp > UDP_SOCKETS {
                v.push(format!(
                    "node-{}: {tcp} TCP flows still tracked as established and {udp} UDP flows live after the load (at most {UDP_SOCKETS} UDP)",
                    n + 1
                ));
            }
        }
        if self.maps_before != self.maps_after {
            v.push(format!(
                "map entries (services, service info, backends) per node: {:?} at the start, {:?} at the end",
                self.maps_before, self.maps_after
            ));
        }
        for (node, run, samples) in &self.rss {
            if let Some(growth) = rss_growth(samples)
                && growth > 1.3
            {
                v.push(format!("agent of node-{} (run {run}): RSS grew {growth:.2}x: {samples:?}", node + 1));
            }
        }
        (v, tolerated)
    }

    /// The figures, as markdown (BENCHMARKS.md's soak section takes this).
    pub fn markdown(&self) -> String {
        let mut by_kind: BTreeMap<&str, (usize, Vec<Duration>, usize)> = BTreeMap::new();
        for e in &self.events {
            let k = by_kind.entry(e.kind).or_default();
            k.0 += 1;
            k.1.extend(e.applied);
            k.2 += usize::from(e.failed.is_some());
        }
        let mut s = format!(
            "Seed {}, {:.0} s of load; two nodes, four pods, one Service of every kind under load.\n\n",
            self.seed, self.seconds
        );
        s += "| load | made | failed |\n|---|---:|---:|\n";
        s += &format!(
            "| new TCP connections (ClusterIP, ingress IP, externalIP, both nodes' node ports, SNATed for pods elsewhere) | {} | {} |\n",
            self.connections,
            self.connection_failures.len()
        );
        let ended = |ends: &[StreamEnd]| {
            let removed = ends.iter().filter(|e| e.removed_ms.is_some() && e.how != Failure::Timeout).count();
            (removed, ends.len() - removed)
        };
        let (sr, su) = ended(&self.stream_ends);
        s += &format!(
            "| requests on long-lived TCP streams | {} | {su} (and {sr} streams ended by their backend's removal) |\n",
            self.stream_requests
        );
        s += &format!(
            "| UDP requests (ClusterIP, node port) | {} | {} |\n",
            self.udp_requests,
            self.udp_lost.len()
        );
        let (nr, nu) = ended(&self.session_ends);
        s += &format!(
            "| node processes' requests (socket-level, TCP and UDP) | {} | {nu} (and {nr} connections ended by their backend's removal) |\n\n",
            self.session_requests
        );
        let clashes = self.stream_ends.iter().filter(|e| e.clash).count();
        s += &format!(
            "Streams that hung because a new connection of the client took the same client port to another frontend balanced to the same pod (a known limitation: README): {clashes}; flows of hung streams left established per node: {:?}.\n\n",
            self.ct_left_by_hang
        );
        let worst = self
            .stream_ends
            .iter()
            .chain(&self.session_ends)
            .filter(|e| !e.clash)
            .filter_map(|e| Some(e.ended_ms.saturating_sub(e.removed_ms?)))
            .max();
        let mut hows: BTreeMap<String, usize> = BTreeMap::new();
        for e in self.stream_ends.iter().chain(&self.session_ends) {
            *hows.entry(format!("{:?}", e.how)).or_default() += 1;
        }
        s += &format!(
            "Connections to removed backends ended by: {hows:?}; the longest from the removal to the end (client-port clashes aside): {} ms.\n\n",
            worst.map_or("-".into(), |w| w.to_string())
        );
        s += "| event | times | applied within (median / max) | failed |\n|---|---:|---|---:|\n";
        for (k, (n, mut applied, failed)) in by_kind {
            applied.sort();
            let within = match (applied.get(applied.len() / 2), applied.last()) {
                (Some(m), Some(x)) => format!("{} / {} ms", m.as_millis(), x.as_millis()),
                _ => "-".into(),
            };
            s += &format!("| {k} | {n} | {within} | {failed} |\n");
        }
        s += &format!(
            "\nAfter the load, per node: (TCP flows still established, UDP flows live) {:?}; map entries (services, service info, backends) {:?} at the start, {:?} at the end.\n\
             Of streams that a backend reset (its pod removed: the next packet went to another pod, which answered with a reset), flows still established per node: {:?}.\n",
            self.ct_live_after, self.maps_before, self.maps_after, self.ct_left_by_reset
        );
        let rss: Vec<String> = self
            .rss
            .iter()
            .filter(|(_, _, s)| !s.is_empty())
            .map(|(n, r, s)| {
                format!(
                    "node-{} run {r}: {} -> {} MiB (max {})",
                    n + 1,
                    s[0] / 1024,
                    s[s.len() - 1] / 1024,
                    s.iter().max().unwrap() / 1024
                )
            })
            .collect();
        s += &format!("Agent RSS: {}.\n", rss.join("; "));
        s
    }
}

/// The client's UDP sockets of the load (each may hold one live conntrack flow at the end).
const UDP_SOCKETS: usize = 2;

/// The last quarter's highest RSS over the first quarter's (`None`: too few samples).
fn rss_growth(samples: &[u64]) -> Option<f64> {
    if samples.len() < 8 {
        return None;
    }
    let q = samples.len() / 4;
    let first = *samples[..q].iter().max()? as f64;
    let last = *samples[samples.len() - q..].iter().max()? as f64;
    // 8 MiB of slack: allocator arenas settle in steps.
    Some(last / (first + 8192.0))
}

/// The shared record of the stable Service's endpoints over time.
#[derive(Default)]
struct Timeline(Mutex<Vec<(u128, Endpoints)>>);

impl Timeline {
    fn push(&self, eps: &Endpoints) {
        self.0.lock().unwrap().push((epoch_ms(), eps.clone()));
    }

    /// When pod `pod` (by name) last became less available (ready to not ready or terminating,
    /// or to no endpoint at all; not ready or terminating to none) within [from, to]; else `from`
    /// when it was not ready then already (the datapath may apply that later, after an outage of
    /// the API server); else `None`.
    fn removed(&self, pod: &str, from: u128, to: u128) -> Option<u128> {
        let i = PODS.iter().position(|p| p.0 == pod)?;
        let tl = self.0.lock().unwrap();
        let rank = |eps: &Endpoints| match eps.get(&i) {
            Some(Cond::Ready) => 2,
            Some(_) => 1,
            None => 0,
        };
        let at = |t: u128| tl.iter().rev().find(|(at, _)| *at <= t).map_or(2, |(_, e)| rank(e));
        let mut last = None;
        for w in tl.windows(2) {
            let (t, eps) = &w[1];
            if *t > from && *t <= to && rank(eps) < rank(&w[0].1) {
                last = Some(*t);
            }
        }
        last.or((at(from) < 2).then_some(from))
    }
}

fn service_json() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "stable", "namespace": "default", "uid": "uid-stable"},
        "spec": {"type": "LoadBalancer", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                 "externalIPs": [EXTERNAL_IP], "externalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": NODE_PORT_TCP, "protocol": "TCP"},
                           {"name": "dns", "port": 53, "targetPort": 5353, "nodePort": NODE_PORT_UDP, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": INGRESS_IP}]}}})
}

/// An EndpointSlice of `eps` for `svc`, its TCP port `http` at `tcp_port`.
fn slice_json(name: &str, svc: &str, eps: &Endpoints, tcp_port: u16) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(&i, c)| {
            let (ready, terminating) = match c {
                Cond::Ready => (true, false),
                Cond::NotReady => (false, false),
                Cond::Terminating => (false, true),
            };
            json!({"addresses": [pod_ip(i)], "nodeName": format!("node-{}", PODS[i].1 + 1),
                   "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": tcp_port, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]})
}

fn churn_service(k: usize) -> Value {
    crate::fake_api::service(&format!("churn-{k}"), &format!("198.18.0.8{k}"), 80, 8080)
}

fn churn_slice(k: usize) -> Value {
    let all: Endpoints = (0..PODS.len()).map(|i| (i, Cond::Ready)).collect();
    slice_json(&format!("churn-{k}-1"), &format!("churn-{k}"), &all, CHURN_PORT)
}

/// The fake API server, stoppable: its serving task and the address it listens on.
struct Api {
    api: Arc<FakeApi>,
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Api {
    fn start(&mut self, bed: &TwoNodes) -> anyhow::Result<()> {
        let listener = bed.client.enter(|| std::net::TcpListener::bind((API_HOST, API_PORT)))?;
        listener.set_nonblocking(true)?;
        let _guard = self.rt.enter();
        let l = tokio::net::TcpListener::from_std(listener)?;
        self.task = Some(self.rt.spawn(serve(self.api.clone(), l)));
        Ok(())
    }

    /// Stops listening and ends every watch: the agents see the API server gone.
    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = self.rt.block_on(t);
        }
        self.api.drop_watches();
    }
}

/// The frontends of the stable Service's TCP port.
fn tcp_targets() -> Vec<String> {
    vec![
        format!("{CLUSTER_IP}:80"),
        format!("{INGRESS_IP}:80"),
        format!("{EXTERNAL_IP}:80"),
        format!("{NODE1}:{NODE_PORT_TCP}"),
        format!("{NODE2}:{NODE_PORT_TCP}"),
    ]
}

/// A failed new connection: (target, how, what was said).
type ConnFailure = (String, Failure, String);

#[derive(Default)]
struct Load {
    connections: Mutex<(u64, Vec<ConnFailure>)>,
    stream_requests: Mutex<u64>,
    /// Ends of streams, their removal and clash left to be worked out after the run.
    stream_ends: Mutex<Vec<StreamEnd>>,
    /// Every connection's (client port, target, opened, closed), epoch ms.
    uses: Mutex<Vec<(u16, String, u128, u128)>>,
    udp: Mutex<(u64, Vec<(String, String)>)>,
}

/// New TCP connections, one request each, round robin over the targets, every 40 ms.
fn connections(client: &Path, load: &Load, stop: &AtomicBool) {
    let targets = tcp_targets();
    in_netns(client, || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let t = &targets[i % targets.len()];
            i += 1;
            let at = epoch_ms();
            let r = tcp_request(t.parse::<SocketAddrV4>().unwrap(), TIMEOUT);
            // The pod sees the client's own port unless the flow was SNATed.
            if let Ok(a) = &r
                && a.peer.ip().to_string() == API_HOST
            {
                load.uses.lock().unwrap().push((a.peer.port(), t.clone(), at, epoch_ms()));
            }
            let mut c = load.connections.lock().unwrap();
            c.0 += 1;
            if let Err(e) = r {
                c.1.push((t.clone(), failure_of(&e), format!("at {at}: {e:#}")));
            }
            drop(c);
            std::thread::sleep(Duration::from_millis(40));
        }
    });
}

/// A long-lived TCP stream to `target`, a request every 100 ms; opened again when it ends.
fn stream(client: &Path, target: &str, load: &Load, stop: &AtomicBool) {
    let to: SocketAddrV4 = target.parse().unwrap();
    in_netns(client, || {
        while !stop.load(Ordering::Relaxed) {
            let opened = epoch_ms();
            let mut conn = match HeldConn::open(to, TIMEOUT) {
                Ok(c) => c,
                Err(e) => {
                    let mut c = load.connections.lock().unwrap();
                    c.0 += 1;
                    c.1.push((
                        target.to_owned(),
                        failure_of(&e),
                        format!("at {opened}: opening a stream: {e:#}"),
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            load.connections.lock().unwrap().0 += 1;
            let port = conn.local_addr().map_or(0, |a| a.port());
            let mut pod = String::new();
            while !stop.load(Ordering::Relaxed) {
                match conn.request(TIMEOUT) {
                    Ok(a) => {
                        pod = a.pod;
                        *load.stream_requests.lock().unwrap() += 1;
                    }
                    Err(e) => {
                        let end = StreamEnd {
                            target: target.to_owned(),
                            pod: pod.clone(),
                            opened_ms: opened,
                            ended_ms: epoch_ms(),
                            how: failure_of(&e),
                            error: format!("{e:#}"),
                            client_port: port,
                            clash: false,
                            removed_ms: None,
                        };
                        load.stream_ends.lock().unwrap().push(end);
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            load.uses.lock().unwrap().push((port, target.to_owned(), opened, epoch_ms()));
        }
    });
}

/// UDP requests on one connected socket to `target`, every 50 ms.
fn datagrams(client: &Path, target: &str, load: &Load, stop: &AtomicBool) {
    let to: SocketAddr = target.parse().unwrap();
    in_netns(client, || {
        let s = UdpSocket::bind("0.0.0.0:0").and_then(|s| {
            s.connect(to)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            Ok(s)
        });
        let Ok(s) = s else {
            load.udp.lock().unwrap().1.push((target.to_owned(), "cannot open the socket".into()));
            return;
        };
        let mut buf = [0u8; 512];
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let r = s.send(format!("soak {seq}\n").as_bytes()).and_then(|_| s.recv(&mut buf));
            let mut u = load.udp.lock().unwrap();
            u.0 += 1;
            if let Err(e) = r {
                u.1.push((target.to_owned(), format!("{e} at {}", epoch_ms())));
            }
            drop(u);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// `xlb get services -o json` of node `n`, parsed.
fn services(bed: &TwoNodes, n: usize) -> anyhow::Result<Vec<Value>> {
    let out = bed.xlb_cli(n, &["get", "services", "-o", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

/// The backends new flows may take for `frontend` (`ADDR:PORT/PROTO`) on node `n`.
fn selectable(bed: &TwoNodes, n: usize, frontend: &str) -> anyhow::Result<Vec<String>> {
    let rows = services(bed, n)?;
    let row = rows.iter().find(|r| r["frontend"] == frontend);
    let mut out: Vec<String> = row
        .and_then(|r| r["backends"].as_array())
        .into_iter()
        .flatten()
        .filter(|b| b["selectable"] == true)
        .filter_map(|b| b["address"].as_str().map(str::to_owned))
        .collect();
    out.sort();
    Ok(out)
}

/// Waits until both nodes let new flows of the stable Service's TCP port take exactly the ready
/// pods of `eps`; how long that took.
fn converged(bed: &TwoNodes, eps: &Endpoints) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut want: Vec<String> =
        eps.iter().filter(|(_, c)| **c == Cond::Ready).map(|(i, _)| pod_ip(*i)).collect();
    want.sort();
    let frontend = format!("{CLUSTER_IP}:80/TCP");
    loop {
        let got = [selectable(bed, 0, &frontend)?, selectable(bed, 1, &frontend)?];
        if got.iter().all(|g| *g == want) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > APPLY_DEADLINE {
            bail!("after {APPLY_DEADLINE:?} the nodes take {got:?} for new flows, not {want:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a new TCP connection from the client to `to` is answered.
fn answers(bed: &TwoNodes, to: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let to: SocketAddrV4 = to.parse()?;
    loop {
        if bed.client.enter(|| tcp_request(to, Duration::from_millis(500))).is_ok() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > APPLY_DEADLINE {
            bail!("{to} did not answer within {APPLY_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Entries of the pinned map `name` of node `n` (bpftool).
fn map_entries(bed: &TwoNodes, n: usize, name: &str) -> anyhow::Result<usize> {
    let path = bed.pin_dirs[n].join(name);
    let out = crate::run("bpftool", &["-j", "map", "dump", "pinned", &path.display().to_string()])?;
    let v: Value = serde_json::from_str(&out).context("bpftool's JSON")?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// (services entries, service-info entries, backends in use) of node `n`.
fn map_counts(bed: &TwoNodes, n: usize) -> anyhow::Result<(usize, usize, usize)> {
    let backends: Vec<Value> = serde_json::from_str(&bed.xlb_cli(n, &["get", "backends", "-o", "json"])?)?;
    Ok((
        map_entries(bed, n, lb_common::MAP_SERVICES)?,
        map_entries(bed, n, lb_common::MAP_SVC_INFO)?,
        backends.len(),
    ))
}

/// (TCP flows still established, UDP flows live by their lifetime) of node `n` (stale ones
/// aside), and the TCP ones among them whose client port is in `reset_ports`, and in
/// `hung_ports` (each counted apart, not in the first).
fn live_flows(
    bed: &TwoNodes,
    n: usize,
    reset_ports: &[u16],
    hung_ports: &[u16],
) -> anyhow::Result<((usize, usize), usize, usize)> {
    let rows: Vec<Value> = serde_json::from_str(&bed.xlb_cli(n, &["conntrack", "-o", "json"])?)?;
    let (mut tcp, mut udp, mut by_reset, mut by_hang) = (0, 0, 0, 0);
    for r in rows.iter().filter(|r| r["stale"] != true && r["forward_tracked"] == true) {
        let idle = r["idle_seconds"].as_u64().unwrap_or(0);
        let flags = r["tcp_flags"].as_str().unwrap_or("");
        let port = r["client"].as_str().and_then(|c| c.parse::<SocketAddr>().ok()).map(|a| a.port());
        match r["protocol"].as_str() {
            Some("TCP") => {
                // A closing flow (FIN or RST seen) is over within the closing time, whatever
                // created it (a late segment of a connection already gone makes one): only
                // the others would stay for the established lifetime.
                let closing = flags.contains("FIN") || flags.contains("RST");
                if !closing {
                    eprintln!("node-{}: TCP flow still established after the load: {r}", n + 1);
                    if port.is_some_and(|p| hung_ports.contains(&p)) {
                        by_hang += 1;
                    } else if port.is_some_and(|p| reset_ports.contains(&p)) {
                        by_reset += 1;
                    } else {
                        tcp += 1;
                    }
                }
            }
            Some("UDP") if idle <= 60 => udp += 1,
            _ => {}
        }
    }
    Ok(((tcp, udp), by_reset, by_hang))
}

/// Runs the soak. Errors are failures to run it (the bed, the agents); what the soak found is
/// in the report ([`Report::violations`]).
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    let mut rng = Rng(cfg.seed);
    let mut bed = TwoNodes::with_pods(&PODS, false)?;
    let Some(cgroup) = socket_lb_cgroup(bed.cgroups[0].as_ref()) else {
        bail!("no cgroup v2 hierarchy: the node processes' load needs one");
    };
    bed.start_servers(&cfg.testbed, &[CHURN_PORT, STABLE_PORT], &[5353])?;

    // The API server and its objects.
    let api = FakeApi::new();
    let mut eps: Endpoints = (0..PODS.len()).map(|i| (i, Cond::Ready)).collect();
    api.put(Kind::Service, service_json());
    api.put(Kind::Slice, slice_json("stable-1", "stable", &eps, STABLE_PORT));
    for k in 0..CHURN {
        api.put(Kind::Service, churn_service(k));
        api.put(Kind::Slice, churn_slice(k));
    }
    api.put(
        Kind::Service,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "default", "uid": "uid-db"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com",
                     "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}}),
    );
    for (n, name) in ["node-1", "node-2"].iter().enumerate() {
        let mut node = crate::fake_api::node(name, None);
        node["status"]["addresses"][0]["address"] = json!(if n == 0 { NODE1 } else { NODE2 });
        api.put(Kind::Node, node);
    }
    let mut server = Api { api: api.clone(), rt: tokio::runtime::Runtime::new()?, task: None };
    server.start(&bed)?;
    let kubeconfig = bed.work.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: soak\n  cluster: {{server: \"http://{API_HOST}:{API_PORT}\"}}\n\
             users:\n- name: xlb\n  user: {{token: soak}}\ncontexts:\n- name: soak\n  context: {{cluster: soak, user: xlb}}\n\
             current-context: soak\n"
        ),
    )?;
    bed.kubeconfig = Some(kubeconfig);
    bed.start_agents()?;
    let timeline = Timeline::default();
    timeline.push(&eps);
    converged(&bed, &eps)?;
    for k in 0..CHURN {
        answers(&bed, &format!("198.18.0.8{k}:80"))?;
    }
    let mut report = Report { seed: cfg.seed, ..Report::default() };
    report.maps_before = vec![map_counts(&bed, 0)?, map_counts(&bed, 1)?];

    // The node's own processes: a TCP and a UDP session to the ClusterIP, a request every 100 ms
    // for the whole soak (in node-1's cgroup: balanced at the socket).
    let count = (cfg.duration.as_millis() / 100).to_string();
    let mut sessions = Vec::new();
    for (udp, to) in [(false, format!("{CLUSTER_IP}:80")), (true, format!("{CLUSTER_IP}:53"))] {
        let log = bed.work.join(format!("session-{}.log", if udp { "udp" } else { "tcp" }));
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &bed.nodes[0].name]).arg(&cfg.testbed).args([
            "session",
            if udp { "--udp" } else { "--tcp" },
            &to,
            "--count",
            &count,
            "--interval-ms",
            "100",
        ]);
        crate::in_cgroup(&mut cmd, &cgroup)?;
        let name = format!("session to {to} ({})", if udp { "UDP" } else { "TCP" });
        sessions.push(crate::Proc::spawn(&name, &mut cmd, Some(&log))?);
    }

    let load = Load::default();
    let client_path = bed.client.path();
    let stop = AtomicBool::new(false);
    let t_start = Instant::now();
    let mut agent_runs = [0usize; 2];
    let mut rss: Vec<(usize, usize, Vec<u64>)> = vec![(0, 0, Vec::new()), (1, 0, Vec::new())];
    let mut extra_addr = false;
    let mut events = Vec::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let (client, load_ref, stop_ref) = (client_path.as_path(), &load, &stop);
        s.spawn(move || connections(client, load_ref, stop_ref));
        for t in [format!("{CLUSTER_IP}:80"), format!("{NODE1}:{NODE_PORT_TCP}"), format!("{INGRESS_IP}:80")]
        {
            s.spawn(move || stream(client, &t, load_ref, stop_ref));
        }
        for t in [format!("{CLUSTER_IP}:53"), format!("{NODE1}:{NODE_PORT_UDP}")] {
            s.spawn(move || datagrams(client, &t, load_ref, stop_ref));
        }
        let mut drive = || -> anyhow::Result<()> {
            while t_start.elapsed() < cfg.duration {
                std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
                // RSS of each agent now running.
                for a in &bed.agents {
                    let n = if a.name.ends_with("node-1") { 0 } else { 1 };
                    if let (Some(kib), Some(entry)) = (
                        rss_kib(a.pid()),
                        rss.iter_mut().rev().find(|(node, run, _)| *node == n && *run == agent_runs[n]),
                    ) {
                        entry.2.push(kib);
                    }
                }
                let at_ms = epoch_ms();
                let mut ev =
                    |kind: &'static str, detail: String, applied: anyhow::Result<Option<Duration>>| {
                        let (applied, failed) = match applied {
                            Ok(a) => (a, None),
                            Err(e) => (None, Some(format!("{e:#}"))),
                        };
                        events.push(Event { at_ms, kind, detail, applied, failed });
                    };
                let ready = |eps: &Endpoints| eps.values().filter(|c| **c == Cond::Ready).count();
                match rng.below(100) {
                    // Scale: a random non-empty set of the pods, all ready.
                    0..=24 => {
                        let mut next = Endpoints::new();
                        while next.is_empty() {
                            for i in 0..PODS.len() {
                                if rng.below(2) == 0 {
                                    next.insert(i, Cond::Ready);
                                }
                            }
                        }
                        eps = next;
                        api.put(Kind::Slice, slice_json("stable-1", "stable", &eps, STABLE_PORT));
                        timeline.push(&eps);
                        ev("scale", format!("{} endpoints", eps.len()), converged(&bed, &eps).map(Some));
                    }
                    // Readiness: a ready one (if another stays ready) turns not ready, or back.
                    25..=44 => {
                        let i = rng.below(PODS.len() as u64) as usize;
                        let detail = match eps.get(&i).copied() {
                            Some(Cond::Ready) if ready(&eps) > 1 => {
                                eps.insert(i, Cond::NotReady);
                                format!("{} not ready", PODS[i].0)
                            }
                            _ => {
                                eps.insert(i, Cond::Ready);
                                format!("{} ready", PODS[i].0)
                            }
                        };
                        api.put(Kind::Slice, slice_json("stable-1", "stable", &eps, STABLE_PORT));
                        timeline.push(&eps);
                        ev("readiness", detail, converged(&bed, &eps).map(Some));
                    }
                    // Terminating: a ready one (if another stays ready) starts terminating.
                    45..=54 => {
                        let ready_pods: Vec<usize> =
                            eps.iter().filter(|(_, c)| **c == Cond::Ready).map(|(i, _)| *i).collect();
                        if ready_pods.len() > 1 {
                            let i = ready_pods[rng.below(ready_pods.len() as u64) as usize];
                            eps.insert(i, Cond::Terminating);
                            api.put(Kind::Slice, slice_json("stable-1", "stable", &eps, STABLE_PORT));
                            timeline.push(&eps);
                            ev("terminating", PODS[i].0.to_string(), converged(&bed, &eps).map(Some));
                        }
                    }
                    // A churn Service deleted and created again.
                    55..=69 => {
                        let k = rng.below(CHURN as u64) as usize;
                        api.delete(Kind::Slice, &format!("default/churn-{k}-1"));
                        api.delete(Kind::Service, &format!("default/churn-{k}"));
                        std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
                        api.put(Kind::Service, churn_service(k));
                        api.put(Kind::Slice, churn_slice(k));
                        ev(
                            "service deleted and recreated",
                            format!("churn-{k}"),
                            answers(&bed, &format!("198.18.0.8{k}:80")).map(Some),
                        );
                    }
                    // An agent SIGKILLed and started again.
                    70..=79 => {
                        let n = rng.below(2) as usize;
                        let name = format!("xlb agent on node-{}", n + 1);
                        if let Some(a) = bed.agents.iter().find(|a| a.name == name) {
                            a.signal(libc::SIGKILL);
                        }
                        bed.stop_agent(n);
                        std::thread::sleep(Duration::from_millis(200 + rng.below(1800)));
                        let t0 = Instant::now();
                        let r = bed.start_agent(n);
                        agent_runs[n] += 1;
                        rss.push((n, agent_runs[n], Vec::new()));
                        ev(
                            "agent SIGKILLed and restarted",
                            format!("node-{}", n + 1),
                            r.map(|()| Some(t0.elapsed())),
                        );
                    }
                    // The API server away for a while; a change made meanwhile is applied once it
                    // is back.
                    80..=89 => {
                        server.stop();
                        std::thread::sleep(Duration::from_millis(1000 + rng.below(3000)));
                        let i = rng.below(PODS.len() as u64) as usize;
                        match eps.get(&i) {
                            Some(Cond::Ready) if ready(&eps) > 1 => {
                                eps.remove(&i);
                            }
                            _ => {
                                eps.insert(i, Cond::Ready);
                            }
                        }
                        api.put(Kind::Slice, slice_json("stable-1", "stable", &eps, STABLE_PORT));
                        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                        // The change can reach the datapath only from now on: flows on a pod it
                        // removed end from here.
                        let r = server.start(&bed).and_then(|()| {
                            timeline.push(&eps);
                            converged(&bed, &eps)
                        });
                        ev(
                            "API server stopped and started",
                            format!("{} endpoints meanwhile", eps.len()),
                            r.map(Some),
                        );
                    }
                    // Node-1 gains an address (its node port answers there) or loses it.
                    _ => {
                        let cidr = format!("{EXTRA_ADDR}/24");
                        if extra_addr {
                            let r = bed.nodes[0].ip(&["addr", "del", &cidr, "dev", "eth0"]).map(|_| None);
                            ev("node address removed", EXTRA_ADDR.into(), r);
                        } else {
                            let r = bed.nodes[0].ip(&["addr", "add", &cidr, "dev", "eth0"]).and_then(|_| {
                                answers(&bed, &format!("{EXTRA_ADDR}:{NODE_PORT_TCP}")).map(Some)
                            });
                            ev("node address added", EXTRA_ADDR.into(), r);
                        }
                        extra_addr = !extra_addr;
                    }
                }
            }
            Ok(())
        };
        let result = drive();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    report.seconds = t_start.elapsed().as_secs_f64();

    // Back to the start: every pod ready, the address gone, then the flows' closing time.
    eps = (0..PODS.len()).map(|i| (i, Cond::Ready)).collect();
    api.put(Kind::Slice, slice_json("stable-1", "stable", &eps, STABLE_PORT));
    timeline.push(&eps);
    if extra_addr {
        bed.nodes[0].ip(&["addr", "del", &format!("{EXTRA_ADDR}/24"), "dev", "eth0"])?;
    }
    converged(&bed, &eps)?;
    for mut p in std::mem::take(&mut sessions) {
        p.stop(Duration::from_secs(2));
        let lines = session_lines(&p.log_text());
        let name = p.name.clone();
        report.session_requests += lines.iter().filter(|(_, r)| r.starts_with("ok")).count() as u64;
        let mut opened = lines.first().map_or(0, |l| l.0);
        let mut pod = String::new();
        for (t, r) in &lines {
            if let Some(p) = r.strip_prefix("ok ") {
                pod = p.to_owned();
            } else {
                let how = if r.contains("timed out")
                    || r.contains("would block")
                    || r.contains("Resource temporarily")
                {
                    Failure::Timeout
                } else if r.contains("reset") {
                    Failure::Reset
                } else if r.contains("abort") {
                    Failure::Aborted
                } else if r.contains("refused") {
                    Failure::Refused
                } else if r.contains("closed") {
                    Failure::Closed
                } else {
                    Failure::Other
                };
                report.session_ends.push(StreamEnd {
                    target: name.clone(),
                    pod: pod.clone(),
                    opened_ms: opened,
                    ended_ms: *t,
                    how,
                    error: r.clone(),
                    client_port: 0,
                    clash: false,
                    removed_ms: timeline.removed(&pod, opened, *t),
                });
                opened = *t;
            }
        }
    }
    let (connections, failures) = std::mem::take(&mut *load.connections.lock().unwrap());
    report.connections = connections;
    report.connection_failures = failures;
    report.stream_requests = *load.stream_requests.lock().unwrap();
    let uses = std::mem::take(&mut *load.uses.lock().unwrap());
    report.stream_ends = std::mem::take(&mut *load.stream_ends.lock().unwrap());
    for e in &mut report.stream_ends {
        e.removed_ms = timeline.removed(&e.pod, e.opened_ms, e.ended_ms);
        e.clash = e.how == Failure::Timeout
            && uses.iter().any(|(p, t, from, to)| {
                *p == e.client_port && *t != e.target && *from <= e.ended_ms && *to >= e.opened_ms
            });
    }

    std::thread::sleep(Duration::from_secs(12));
    // The flows of streams that ended by a reset, and of hung ones, are counted apart (the hang
    // is what is judged).
    let ports_of = |how: Failure| -> Vec<u16> {
        report.stream_ends.iter().filter(|e| e.how == how).map(|e| e.client_port).collect()
    };
    let (reset_ports, hung_ports) = (ports_of(Failure::Reset), ports_of(Failure::Timeout));
    for n in 0..2 {
        let (live, by_reset, by_hang) = live_flows(&bed, n, &reset_ports, &hung_ports)?;
        report.ct_live_after.push(live);
        report.ct_left_by_reset.push(by_reset);
        report.ct_left_by_hang.push(by_hang);
    }
    report.maps_after = vec![map_counts(&bed, 0)?, map_counts(&bed, 1)?];
    let (udp_requests, udp_lost) = std::mem::take(&mut *load.udp.lock().unwrap());
    report.udp_requests = udp_requests;
    report.udp_lost = udp_lost;
    report.events = events;
    report.rss = rss;
    server.stop();
    Ok(report)
}

/// `xlb-testbed soak [--minutes M] [--seconds S] [--seed S] [--record FILE]`: runs the soak,
/// prints its figures, writes them to FILE (markdown) when asked; fails when a check failed.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut duration = Duration::from_secs(600);
    let mut seed = epoch_ms() as u64;
    let mut record: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--minutes" => duration = Duration::from_secs_f64(v.parse::<f64>()? * 60.0),
            "--seconds" => duration = Duration::from_secs(v.parse()?),
            "--seed" => seed = v.parse()?,
            "--record" => record = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {a}"),
        }
    }
    let testbed = std::env::current_exe()?;
    eprintln!("soak: {} s, seed {seed}", duration.as_secs());
    let report = run(&Config { duration, seed, testbed })?;
    let md = report.markdown();
    for e in report.stream_ends.iter().chain(&report.session_ends) {
        eprintln!("connection ended: {e:?}");
    }
    for e in &report.events {
        eprintln!("event: {e:?}");
    }
    println!("{md}");
    let violations = report.violations();
    if let Some(file) = record {
        write_record(&file, &report, &violations)?;
    }
    if !violations.is_empty() {
        bail!("the soak found {} problems:\n{}", violations.len(), violations.join("\n"));
    }
    println!("soak clean: no check failed");
    Ok(())
}

fn write_record(file: &Path, report: &Report, violations: &[String]) -> anyhow::Result<()> {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let verdict = if violations.is_empty() {
        "No check failed.".to_owned()
    } else {
        format!(
            "{} checks failed:\n\n{}",
            violations.len(),
            violations.iter().map(|v| format!("- {v}\n")).collect::<String>()
        )
    };
    std::fs::write(
        file,
        format!(
            "`cargo xtask soak --minutes {:.0}` at {commit}, {date}. {verdict}\n\n{}",
            report.seconds / 60.0,
            report.markdown()
        ),
    )?;
    Ok(())
}
