//! Health check node ports, as kube-proxy serves them: a LoadBalancer Service with
//! externalTrafficPolicy Local has a `healthCheckNodePort`, which the cloud load balancer probes
//! on every node to learn which nodes have endpoints of the Service (the others drop its
//! traffic). On that port, on every address of the node, any path answers 200 while this node
//! has ready endpoints of the Service and the agent is healthy (as its node health server says),
//! else 503, with kube-proxy's JSON body.
//!
//! The table follows the service ports each sync changes (a change costs its own ports, not a
//! pass over every Service), and a listener is opened for each port the table names and closed
//! when none does.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::info;

use super::{AbortOnDrop, http, metrics::Metrics};
use crate::model::{BackendState, PortRef, incremental::PortChanges};

/// One health check node port: the Service it tells of, and its endpoints on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node, summed over the Service's ports (as kube-proxy counts).
    pub local_endpoints: usize,
    /// Service ports naming this health check node port.
    ports: usize,
}

/// The health check node ports of the Services on this node, and their listeners.
pub struct HealthChecks {
    metrics: Arc<Metrics>,
    max_pending: Duration,
    /// By service port: (its health check node port, its ready endpoints on this node).
    by_port: Mutex<HashMap<PortRef, (u16, usize)>>,
    served: Arc<Mutex<BTreeMap<u16, Served>>>,
    listeners: Mutex<HashMap<u16, AbortOnDrop>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HealthChecks {
    pub fn new(metrics: Arc<Metrics>, max_pending: Duration) -> Self {
        Self {
            metrics,
            max_pending,
            by_port: Mutex::default(),
            served: Arc::default(),
            listeners: Mutex::default(),
        }
    }

    /// Takes the service ports a sync changed; opens and closes listeners to match (within a
    /// tokio runtime; the table alone otherwise).
    pub fn update(&self, changes: &PortChanges) {
        let mut moved = false;
        {
            let (mut by_port, mut served) = (lock(&self.by_port), lock(&self.served));
            for (id, new) in changes {
                if let Some((hc, n)) = by_port.remove(id)
                    && let Some(s) = served.get_mut(&hc)
                {
                    s.local_endpoints -= n;
                    s.ports -= 1;
                    if s.ports == 0 {
                        served.remove(&hc);
                        moved = true;
                    }
                }
                let Some(p) = new.as_deref().filter(|p| p.shown.health_check_node_port != 0) else {
                    continue;
                };
                let hc = p.shown.health_check_node_port;
                let n = p.backends.iter().filter(|b| b.local && b.state == BackendState::Active).count();
                by_port.insert(id.clone(), (hc, n));
                let s = served.entry(hc).or_insert_with(|| {
                    moved = true;
                    Served {
                        namespace: id.namespace.to_string(),
                        name: id.name.to_string(),
                        local_endpoints: 0,
                        ports: 0,
                    }
                });
                s.local_endpoints += n;
                s.ports += 1;
            }
        }
        if moved {
            self.sync_listeners();
        }
    }

    /// The health check node ports and what each tells.
    pub fn served(&self) -> BTreeMap<u16, Served> {
        lock(&self.served).clone()
    }

    fn sync_listeners(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let wanted: Vec<u16> = lock(&self.served).keys().copied().collect();
        let mut listeners = lock(&self.listeners);
        listeners.retain(|port, _| {
            let keep = wanted.contains(port);
            if !keep {
                info!(port, "health check node port closed: no Service has it any more");
            }
            keep
        });
        for port in wanted {
            listeners.entry(port).or_insert_with(|| {
                let (served, metrics, max_pending) =
                    (self.served.clone(), self.metrics.clone(), self.max_pending);
                AbortOnDrop(rt.spawn(async move {
                    // Every address of the node: IPv6 and IPv4 on one socket (IPv4 alone on a
                    // node without IPv6).
                    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                    let listener = http::bind_retrying(addr, "a health check node port").await;
                    info!(port, "serving a health check node port");
                    let route: http::Route = Arc::new(move |_path| {
                        let (healthy, _) = metrics.node_health(max_pending);
                        answer(lock(&served).get(&port), healthy)
                    });
                    http::serve_with(listener, route).await
                }))
            });
        }
    }
}

/// kube-proxy's answer on any path: 200 while the node has ready endpoints of the Service and
/// the agent is `healthy` (as the node health server says), else 503; its JSON body.
fn answer(served: Option<&Served>, healthy: bool) -> http::Answer {
    let (namespace, name, n) =
        served.map_or(("", "", 0), |s| (s.namespace.as_str(), s.name.as_str(), s.local_endpoints));
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {n},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        serde_json::Value::from(namespace),
        serde_json::Value::from(name),
    );
    let status = if n > 0 && healthy { "200 OK" } else { "503 Service Unavailable" };
    (status, "application/json", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredBackend, DesiredPort, Family, Proto, Shown, SvcType};

    fn port(
        name: &str,
        hc: u16,
        backends: &[(u8, bool, BackendState)],
    ) -> (PortRef, Option<Arc<DesiredPort>>) {
        let id = PortRef {
            namespace: "shop".into(),
            name: name.into(),
            port_name: String::new(),
            proto: Proto::Tcp,
            family: Family::V4,
        };
        let p = DesiredPort {
            id: id.clone(),
            svc_type: SvcType::LoadBalancer,
            port: 80,
            node_port: Some(30080),
            frontends: Vec::new(),
            frontend_kinds: Vec::new(),
            backends: backends
                .iter()
                .map(|&(i, local, state)| DesiredBackend {
                    addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 1, i)),
                    port: 8080,
                    state,
                    local,
                    topo: true,
                })
                .collect(),
            shown: Shown { health_check_node_port: hc, ..Shown::default() },
            source_ranges: Vec::new(),
        };
        (id, Some(Arc::new(p)))
    }

    #[test]
    fn the_table_counts_ready_local_endpoints_and_follows_each_change() {
        use BackendState::*;
        let hc = HealthChecks::new(Arc::new(Metrics::default()), Duration::from_secs(60));
        hc.update(&vec![
            port("web", 32001, &[(1, true, Active), (2, true, Terminating), (3, false, Active)]),
            port("nohc", 0, &[(4, true, Active)]),
        ]);
        let s = hc.served();
        assert_eq!(
            s.keys().copied().collect::<Vec<_>>(),
            [32001],
            "only a port with a health check node port"
        );
        assert_eq!((s[&32001].name.as_str(), s[&32001].local_endpoints), ("web", 1), "ready and local only");
        // The local endpoint goes: 0, and the answer turns 503.
        hc.update(&vec![port("web", 32001, &[(3, false, Active)])]);
        assert_eq!(hc.served()[&32001].local_endpoints, 0);
        // The Service goes: the port with it.
        let (id, _) = port("web", 32001, &[]);
        hc.update(&vec![(id, None)]);
        assert!(hc.served().is_empty());
    }

    #[test]
    fn answers_as_kube_proxy() {
        let s = Served { namespace: "shop".into(), name: "web".into(), local_endpoints: 2, ports: 1 };
        // The agent is not healthy (not synced yet, say): 503 whatever the endpoints.
        assert_eq!(answer(Some(&s), false).0, "503 Service Unavailable");
        let (status, ctype, body) = answer(Some(&s), true);
        assert_eq!((status, ctype), ("200 OK", "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let none = Served { local_endpoints: 0, ..s };
        assert_eq!(answer(Some(&none), true).0, "503 Service Unavailable");
    }
}
