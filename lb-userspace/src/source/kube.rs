//! The Kubernetes source: list/watch of Services, EndpointSlices (discovery.k8s.io/v1) and this
//! node's Pods (for hostPorts), with kube-rs' watcher. What each watch sees is kept as a
//! [`Delta`] until the agent takes it: no store of every object (the model keeps what it needs).
//!
//! The watcher lists, then watches from the list's resourceVersion with bookmarks; on a
//! dropped connection it resumes the watch, and when the API server answers 410 Gone (the
//! resourceVersion was compacted) it lists again. Errors are retried by [`Retry`]: a 410 at once
//! (the server is there, and the list is what it asks for), an unreachable server every second
//! at most (a connection refused costs it nothing, and a restarted API server is heard from
//! within a second of its return), and an error the server answered with (429, 5xx, 403) with a
//! backoff growing to 10 s (it is shedding load, or refusing for a reason a retry won't fix).
//! The model keeps the last known objects through all of this: a relist is handed over only once
//! it is complete (then it replaces what the model held, and only the differences are written),
//! and an API server that is away leaves the datapath as it is (never flushed).
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    Delta, ProxyName,
    slim::{SlimService, SlimSlice},
};
use crate::{agent::metrics::Metrics, model::ns_name};

/// Every request the agent makes to the API server, as RBAC names them: (verb, API group,
/// resource). deploy/'s ClusterRole grants these and nothing more; lb-userspace/tests/rbac.rs
/// runs the agent against an API server that enforces that role and checks that the requests
/// it sees are exactly these. Pods are asked for with the field selector spec.nodeName.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("list", "", "services"),
    ("watch", "", "services"),
    ("list", "discovery.k8s.io", "endpointslices"),
    ("watch", "discovery.k8s.io", "endpointslices"),
    ("list", "", "pods"),
    ("watch", "", "pods"),
    // This node's Node (fieldSelector metadata.name), for its zone (topology hints).
    ("list", "", "nodes"),
    ("watch", "", "nodes"),
    // Events about rejected objects (crate::agent::events), in the objects' namespaces.
    ("create", "events.k8s.io", "events"),
];

/// Builds a client from `--kubeconfig`, or else the environment: KUBECONFIG, ~/.kube/config, or
/// the in-cluster service account.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: not in a cluster, and no KUBECONFIG or ~/.kube/config \
             (pass --kubeconfig, or --manifests DIR to run without an API server)",
        )?,
    };
    info!(server = %config.cluster_url, "using the Kubernetes API server");
    Client::try_from(config).context("building the Kubernetes client")
}

/// One watch's findings since the agent last took them, and whether its first list is complete.
pub struct Watched<K> {
    pending: Mutex<Delta<K>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl<K> Default for Watched<K> {
    fn default() -> Self {
        Self { pending: Mutex::new(Delta::default()), ready: tokio::sync::watch::Sender::new(false) }
    }
}

impl<K> Watched<K> {
    /// What the watch has seen since the last call.
    pub fn take(&self) -> Delta<K> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Waits until the first list is complete.
    pub async fn wait_ready(&self) {
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
    }

    fn with<R>(&self, f: impl FnOnce(&mut Delta<K>) -> R) -> R {
        f(&mut self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// The watches of Services, EndpointSlices and the pods of this node.
pub struct KubeSource {
    pub services: Arc<Watched<Service>>,
    pub slices: Arc<Watched<EndpointSlice>>,
    /// `None` when the node has no name to select its pods by.
    pub pods: Option<Arc<Watched<Pod>>>,
    /// This node's zone, from its Node object (`None`: not watched).
    pub zone: Option<Arc<NodeZone>>,
    /// The client the watches use (events about rejected objects are written with it).
    pub client: Client,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Starts the watches: Services, EndpointSlices, and the pods of `node` (selected by
    /// `spec.nodeName` on the server, so a node sees only its own). `changed` is notified after
    /// every change (and once a list completes).
    ///
    /// Services and EndpointSlices are selected by label on the server as `proxy` says (see
    /// [`ProxyName`]): a Service that gains or loses the label comes or goes as any other.
    ///
    /// With `watch_node`, this node's Node object is watched too (selected by
    /// `metadata.name`) for its zone (see [`NodeZone`]) and whether it is being deleted.
    pub fn start(
        client: Client,
        node: Option<&str>,
        watch_node: bool,
        proxy: &ProxyName,
        changed: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cfg = watcher::Config::default().any_semantic();
        let kept = client.clone();
        let (services, slices) = (Arc::new(Watched::default()), Arc::new(Watched::default()));
        // Read slim: what the model never reads of them is skipped as the JSON is read.
        let svc_cfg = cfg.clone().labels(&proxy.service_selector());
        let svc_stream = watcher::watcher(Api::<SlimService>::all(client.clone()), svc_cfg)
            .map_ok(|e| unwrap_event(e, |s| s.0));
        let slice_cfg = cfg.clone().labels(&proxy.slice_selector());
        let slice_stream = watcher::watcher(Api::<SlimSlice>::all(client.clone()), slice_cfg)
            .map_ok(|e| unwrap_event(e, |s| s.0));
        let mut tasks = vec![
            tokio::spawn(drive("services", svc_stream, services.clone(), changed.clone(), metrics.clone())),
            tokio::spawn(drive(
                "endpointslices",
                slice_stream,
                slices.clone(),
                changed.clone(),
                metrics.clone(),
            )),
        ];
        let zone = node.filter(|_| watch_node).map(|node| {
            let zone = Arc::new(NodeZone::default());
            let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
            let stream = watcher::watcher(Api::<Node>::all(client.clone()), cfg);
            tasks.push(tokio::spawn(drive_zone(stream, zone.clone(), changed.clone(), metrics.clone())));
            zone
        });
        let pods = node.map(|node| {
            let pods = Arc::new(Watched::default());
            let cfg = cfg.fields(&format!("spec.nodeName={node}"));
            // Only what hostPorts need is kept of each pod.
            let stream = watcher::watcher(Api::<Pod>::all(client), cfg).modify(strip_pod);
            tasks.push(tokio::spawn(drive("pods", stream, pods.clone(), changed, metrics)));
            pods
        });
        Self { services, slices, pods, zone, client: kept, tasks }
    }

    /// Waits until every watch has a complete first list.
    pub async fn wait_ready(&self) {
        self.services.wait_ready().await;
        self.slices.wait_ready().await;
        if let Some(p) = &self.pods {
            p.wait_ready().await;
        }
    }
}

/// The label that names a node's zone, which EndpointSlice topology hints name.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// This node's zone as its Node object's [`ZONE_LABEL`] says, kept up to date by a watch.
/// The agent does not wait for it: until it is known (or when the Node cannot be read, with
/// an older ClusterRole say), zone hints are not used and every endpoint is.
#[derive(Default)]
pub struct NodeZone(Mutex<Option<String>>);

impl NodeZone {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Sets the zone; whether it changed.
    fn set(&self, zone: Option<String>) -> bool {
        let mut z = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *z != zone;
        *z = zone;
        changed
    }
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending to this node, as kube-proxy's health server
/// says it in `nodeEligible`: not while it is being deleted or is tainted for deletion by the
/// cluster autoscaler.
pub fn node_eligible(n: &Node) -> bool {
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    n.metadata.deletion_timestamp.is_none() && !tainted
}

/// Follows the Node's zone label (`changed` is notified when it changes) and whether the node
/// is eligible for load balancers' traffic (in `metrics`, for the node health server).
async fn drive_zone<S>(stream: S, zone: Arc<NodeZone>, changed: Arc<Notify>, metrics: Arc<Metrics>)
where
    S: Stream<Item = Result<Event<Node>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut retry = Retry::default();
    let label = |m: &Node| {
        m.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).filter(|z| !z.is_empty()).cloned()
    };
    let mut seen = false;
    while let Some(ev) = stream.next().await {
        let now = match ev {
            Ok(Event::Apply(n) | Event::InitApply(n)) => {
                seen = true;
                let eligible = node_eligible(&n);
                if eligible != metrics.node_eligible() {
                    info!(
                        eligible,
                        "this node is {} load balancers' traffic (node health server)",
                        if eligible { "eligible for" } else { "being deleted: no longer eligible for" }
                    );
                    metrics.set_node_eligible(eligible);
                }
                Some(label(&n))
            }
            Ok(Event::Delete(_)) => Some(None),
            Ok(Event::Init) => {
                seen = false;
                None
            }
            // A list without the Node: no zone.
            Ok(Event::InitDone) => (!seen).then_some(None),
            Err(e) => {
                metrics.watch_error("nodes");
                let wait = retry.next(ErrorKind::of(&e));
                if retry.failures() == 1 {
                    warn!(error = %e, "cannot watch this node's Node object for its zone (the ClusterRole needs list and watch of nodes): topology hints are not used until it can");
                } else {
                    debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "watch of this node failed again");
                }
                tokio::time::sleep(wait).await;
                None
            }
        };
        if let Some(z) = now {
            retry.reset();
            if zone.set(z.clone()) {
                info!(
                    zone = z.as_deref().unwrap_or("<none>"),
                    "this node's zone (for EndpointSlice topology hints)"
                );
                changed.notify_one();
            }
        }
    }
}

/// A watch event of a slim object as one of the object it holds.
fn unwrap_event<S, K>(e: Event<S>, f: impl Fn(S) -> K) -> Event<K> {
    match e {
        Event::Apply(o) => Event::Apply(f(o)),
        Event::Delete(o) => Event::Delete(f(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(f(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// Drops what the model never reads of a pod (managed fields, annotations, volumes, env...), so
/// that a node with many pods keeps the agent small.
fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.labels = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes = None;
        for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
            let ports = c.ports.take();
            *c = k8s_openapi::api::core::v1::Container {
                name: std::mem::take(&mut c.name),
                ports,
                ..Default::default()
            };
        }
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
}

/// How long to wait before the next request after a watch error; see the module's
/// documentation.
#[derive(Debug, Default)]
pub struct Retry {
    /// Errors in a row since the last success.
    failures: u32,
    /// A seed for the jitter.
    seed: u64,
}

/// The kinds of watch error, as [`Retry`] treats them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 410 Gone: the resourceVersion was compacted; the watcher lists again.
    Gone,
    /// No answer: connection refused or reset, DNS, TLS, timeout.
    Unreachable,
    /// The server answered with an error status (429, 5xx, 403...), or an answer it could not
    /// have meant (no resourceVersion).
    Answered,
}

impl ErrorKind {
    pub fn of(e: &watcher::Error) -> Self {
        match e {
            watcher::Error::WatchError(s) if s.code == 410 => ErrorKind::Gone,
            watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => ErrorKind::Answered,
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => match e {
                kube::Error::Api(s) if s.code == 410 => ErrorKind::Gone,
                kube::Error::Api(_) => ErrorKind::Answered,
                _ => ErrorKind::Unreachable,
            },
        }
    }
}

impl Retry {
    /// The first retry of an unreachable server comes after about this long...
    pub const UNREACHABLE_FIRST: Duration = Duration::from_millis(100);
    /// ...doubling to at most this.
    pub const UNREACHABLE_MAX: Duration = Duration::from_secs(1);
    /// An error the server answered with: from this...
    pub const ANSWERED_FIRST: Duration = Duration::from_millis(500);
    /// ...doubling to at most this.
    pub const ANSWERED_MAX: Duration = Duration::from_secs(10);

    /// The wait before the next request after an error of `kind`: the backoff of its kind for
    /// the errors in a row so far, less up to a quarter at random (so that the nodes of a
    /// cluster do not come back in step).
    pub fn next(&mut self, kind: ErrorKind) -> Duration {
        let (first, max) = match kind {
            ErrorKind::Gone => return Duration::ZERO,
            ErrorKind::Unreachable => (Self::UNREACHABLE_FIRST, Self::UNREACHABLE_MAX),
            ErrorKind::Answered => (Self::ANSWERED_FIRST, Self::ANSWERED_MAX),
        };
        let full = first.saturating_mul(1 << self.failures.min(16)).min(max);
        self.failures = self.failures.saturating_add(1);
        if self.seed == 0 {
            use std::hash::BuildHasher as _;
            self.seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id()) | 1;
        }
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        full - full.mul_f64((self.seed % 1000) as f64 / 4000.0)
    }

    /// A request succeeded: the next error starts from the first wait again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

async fn drive<K, S>(
    resource: &'static str,
    stream: S,
    watched: Arc<Watched<K>>,
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
) where
    K: Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    // A list in progress: handed over whole once complete.
    let mut listing: Vec<Arc<K>> = Vec::new();
    let mut retry = Retry::default();
    let mut failing_since: Option<Instant> = None;
    let mut last_warned = Instant::now();
    while let Some(ev) = stream.next().await {
        if ev.is_ok() {
            if let Some(since) = failing_since.take() {
                info!(
                    resource,
                    failures = retry.failures(),
                    after_ms = since.elapsed().as_millis() as u64,
                    "watch back"
                );
            }
            retry.reset();
        }
        match ev {
            Ok(Event::Apply(obj)) => {
                let key = ns_name(obj.meta());
                watched.with(|d| d.changes.insert(key, Some(Arc::new(obj))));
                metrics.changed();
                changed.notify_one();
            }
            Ok(Event::Delete(obj)) => {
                let key = ns_name(obj.meta());
                watched.with(|d| d.changes.insert(key, None));
                metrics.changed();
                changed.notify_one();
            }
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(obj)) => listing.push(Arc::new(obj)),
            Ok(Event::InitDone) => {
                if listed {
                    info!(resource, objects = listing.len(), "relisted");
                } else {
                    debug!(resource, objects = listing.len(), "listed");
                }
                listed = true;
                // The list holds everything: the changes seen before it are in it.
                let list = std::mem::take(&mut listing);
                watched.with(|d| *d = Delta::listed(list));
                watched.ready.send_replace(true);
                metrics.changed();
                changed.notify_one();
            }
            Err(e) => {
                // The watcher takes up where it was (or lists again, after 410) when polled
                // again; the model keeps what it holds meanwhile.
                metrics.watch_error(resource);
                let kind = ErrorKind::of(&e);
                let wait = retry.next(kind);
                // Said once when the failures start, then every 30 s while they last.
                if kind == ErrorKind::Gone {
                    info!(resource, "resource version expired (410 Gone): listing again");
                } else if failing_since.is_none() || last_warned.elapsed() >= Duration::from_secs(30) {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    last_warned = Instant::now();
                    warn!(
                        resource,
                        error = %e,
                        failing_for_s = since.elapsed().as_secs(),
                        retry_in_ms = wait.as_millis() as u64,
                        "watch failed; retrying, keeping the last known state"
                    );
                } else {
                    debug!(resource, error = %e, retry_in_ms = wait.as_millis() as u64, "watch failed again");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_come_at_once_after_410_within_a_second_when_unreachable_and_slower_when_refused() {
        let mut r = Retry::default();
        assert_eq!(r.next(ErrorKind::Gone), Duration::ZERO);
        assert_eq!(r.failures(), 0, "a 410 is no failure");
        let waits: Vec<Duration> = (0..20).map(|_| r.next(ErrorKind::Unreachable)).collect();
        assert!(waits[0] <= Retry::UNREACHABLE_FIRST && waits[0] >= Retry::UNREACHABLE_FIRST * 3 / 4);
        assert!(waits.iter().all(|w| *w <= Retry::UNREACHABLE_MAX), "{waits:?}");
        assert!(waits[10..].iter().all(|w| *w >= Retry::UNREACHABLE_MAX * 3 / 4), "{waits:?}");
        assert!(waits[10..].windows(2).any(|w| w[0] != w[1]), "jittered: {waits:?}");
        r.reset();
        assert!(r.next(ErrorKind::Unreachable) <= Retry::UNREACHABLE_FIRST);
        r.reset();
        let answered: Vec<Duration> = (0..20).map(|_| r.next(ErrorKind::Answered)).collect();
        assert!(answered[0] >= Retry::ANSWERED_FIRST * 3 / 4);
        assert!(answered.iter().all(|w| *w <= Retry::ANSWERED_MAX));
        assert!(answered[19] >= Retry::ANSWERED_MAX * 3 / 4, "{answered:?}");
    }

    #[test]
    fn errors_are_classified() {
        let status = |code| kube::core::Status { code, ..Default::default() };
        let gone = watcher::Error::WatchError(Box::new(status(410)));
        assert_eq!(ErrorKind::of(&gone), ErrorKind::Gone);
        let busy = watcher::Error::WatchError(Box::new(status(429)));
        assert_eq!(ErrorKind::of(&busy), ErrorKind::Answered);
        let listed = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status(503))));
        assert_eq!(ErrorKind::of(&listed), ErrorKind::Answered);
        let gone_start = watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status(410))));
        assert_eq!(ErrorKind::of(&gone_start), ErrorKind::Gone);
        let refused = watcher::Error::WatchStartFailed(kube::Error::LinesCodecMaxLineLengthExceeded);
        assert_eq!(ErrorKind::of(&refused), ErrorKind::Unreachable);
    }
}
