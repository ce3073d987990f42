//! The Kubernetes source: list/watch of Services, EndpointSlices (discovery.k8s.io/v1) and this
//! node's Pods (for hostPorts) into reflector stores, with kube-rs' watcher.
//!
//! The watcher lists, then watches from the list's resourceVersion with bookmarks; on a
//! dropped connection it resumes the watch, and when the API server answers 410 Gone (the
//! resourceVersion was compacted) it lists again. Errors are retried with exponential backoff.
//! The stores keep the last known objects through all of this: a relist replaces a store's
//! content only once the new list is complete, and an API server that is away leaves the
//! datapath as it is (never flushed).
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

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
    // Events about rejected objects (crate::events), in the objects' namespaces.
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

/// Services and EndpointSlices as the API server last said they were, and the pods of this
/// node (for their hostPorts).
pub struct KubeSource {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// `None` when the node has no name to select its pods by.
    pub pods: Option<Store<Pod>>,
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
    /// every change to a store (and once a relist completes).
    pub fn start(client: Client, node: Option<&str>, changed: Arc<Notify>, metrics: Arc<Metrics>) -> Self {
        let (services, w1) = reflector::store();
        let (slices, w2) = reflector::store();
        let cfg = watcher::Config::default().any_semantic();
        let kept = client.clone();
        let svc_stream = watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone())
            .default_backoff()
            .modify(strip_meta)
            .reflect(w1);
        let slice_stream = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone())
            .default_backoff()
            .modify(strip_meta)
            .reflect(w2);
        let mut tasks = vec![
            tokio::spawn(drive("services", svc_stream, changed.clone(), metrics.clone())),
            tokio::spawn(drive("endpointslices", slice_stream, changed.clone(), metrics.clone())),
        ];
        let pods = node.map(|node| {
            let (pods, w3) = reflector::store();
            let cfg = cfg.fields(&format!("spec.nodeName={node}"));
            // Only what hostPorts need is kept of each pod.
            let stream = watcher::watcher(Api::<Pod>::all(client), cfg)
                .default_backoff()
                .modify(strip_pod)
                .reflect(w3);
            tasks.push(tokio::spawn(drive("pods", stream, changed, metrics)));
            pods
        });
        Self { services, slices, pods, client: kept, tasks }
    }

    /// Waits until every store holds a complete first list.
    pub async fn wait_ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        if let Some(p) = &self.pods {
            let _ = p.wait_until_ready().await;
        }
    }
}

/// Drops what the model never reads of a Service or EndpointSlice and what is often the largest
/// part of one in a real cluster: its managed fields and `kubectl apply`'s copy of it.
fn strip_meta<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
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

async fn drive<K, S>(resource: &'static str, stream: S, changed: Arc<Notify>, metrics: Arc<Metrics>)
where
    K: Resource + Clone,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(_) | Event::Delete(_)) => {
                metrics.changed();
                changed.notify_one();
            }
            Ok(Event::InitDone) => {
                if listed {
                    info!(resource, "relisted");
                } else {
                    debug!(resource, "listed");
                }
                listed = true;
                metrics.changed();
                changed.notify_one();
            }
            // A list in progress: the store changes at InitDone, all at once.
            Ok(Event::Init | Event::InitApply(_)) => {}
            Err(e) => {
                // The watcher retries by itself (with backoff); the store keeps its content.
                metrics.watch_error(resource);
                warn!(resource, error = %e, "watch failed; retrying, keeping the last known state");
            }
        }
    }
}
