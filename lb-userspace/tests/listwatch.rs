//! The agent's Kubernetes source against an HTTP server that speaks the API server's list and
//! watch protocol: resource versions, chunked watch streams, bookmarks, 410 Gone for compacted
//! versions, dropped connections and an API server that goes away. The agent's real source,
//! model, reconciler and control loop run against in-memory maps; no kernel is needed.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_common::{Backend4, Svc4Key, Svc4Value, SvcInfo};
use lb_userspace::{
    agent::metrics::Metrics,
    agent::{Source, Syncer, control_loop},
    cli,
    datapath::{Capacity, Datapath, DatapathError, MemDatapath},
    model::ModelConfig,
    reconcile::Reconciler,
    source::{ProxyName, SERVICE_PROXY_NAME_LABEL, kube::KubeSource},
};
use tokio::{net::TcpListener, sync::Notify};
use xlb_tests::fake_api::{FakeApi, Kind, node, pod, serve, service, slice};

// ---------------------------------------------------------------------------------------------
// The agent side: in-memory maps shared with the test.

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<MemDatapath>>);

impl Datapath for Shared {
    fn capacity(&self) -> Capacity {
        self.0.lock().unwrap().capacity()
    }
    fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError> {
        self.0.lock().unwrap().read_services()
    }
    fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError> {
        self.0.lock().unwrap().read_backend(id)
    }
    fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError> {
        self.0.lock().unwrap().read_svc_infos()
    }
    fn write_backend(&mut self, id: u32, v: Backend4) -> Result<(), DatapathError> {
        self.0.lock().unwrap().write_backend(id, v)
    }
    fn write_service(&mut self, k: Svc4Key, v: Svc4Value) -> Result<(), DatapathError> {
        self.0.lock().unwrap().write_service(k, v)
    }
    fn delete_service(&mut self, k: Svc4Key) -> Result<(), DatapathError> {
        self.0.lock().unwrap().delete_service(k)
    }
    fn write_svc_info(&mut self, id: u32, i: SvcInfo) -> Result<(), DatapathError> {
        self.0.lock().unwrap().write_svc_info(id, i)
    }
    fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError> {
        self.0.lock().unwrap().delete_svc_info(id)
    }
    fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError> {
        self.0.lock().unwrap().reset_backend_flows(id)
    }
    fn read_source_ranges(&self) -> Result<Vec<(u32, lb_userspace::model::Cidr)>, DatapathError> {
        self.0.lock().unwrap().read_source_ranges()
    }
    fn write_source_range(&mut self, id: u32, r: lb_userspace::model::Cidr) -> Result<(), DatapathError> {
        self.0.lock().unwrap().write_source_range(id, r)
    }
    fn delete_source_range(&mut self, id: u32, r: lb_userspace::model::Cidr) -> Result<(), DatapathError> {
        self.0.lock().unwrap().delete_source_range(id, r)
    }
    fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError> {
        self.0.lock().unwrap().read_backend_flows(id)
    }
    fn read_ct(&self) -> Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>, DatapathError> {
        self.0.lock().unwrap().read_ct()
    }
    fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        self.0.lock().unwrap().read_stats()
    }
}

/// What the maps serve: "frontend -> backend, backend" lines.
fn served(dp: &Shared) -> Vec<String> {
    let guard = dp.0.lock().unwrap();
    cli::service_rows(&*guard)
        .unwrap()
        .into_iter()
        .map(|r| {
            let bes: Vec<String> = r
                .backends
                .iter()
                .filter(|b| b.selectable)
                .map(|b| format!("{}:{}", b.address, b.port))
                .collect();
            format!("{} -> {}", r.frontend.unwrap_or_default(), bes.join(","))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The value of the sample `series` (a metric's name with its labels) in /metrics' text.
fn sample(metrics: &Metrics, series: &str) -> Option<f64> {
    metrics.render(&[]).lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn converge(dp: &Shared, want: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = served(dp);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: did not converge\n want {want:?}\n  got {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_converges_through_disconnects_relists_and_an_absent_api_server() {
    let api = FakeApi::new();
    api.put(Kind::Service, service("web", "198.18.0.10", 80, 8080));
    api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.1"]));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mut server = tokio::spawn(serve(api.clone(), listener));

    let dp = Shared::default();
    // This agent is node-1's, with one address (for hostPorts).
    let cfg = ModelConfig {
        node_name: Some("node-1".into()),
        node_addrs: vec!["198.18.100.1".parse().unwrap()],
        ..ModelConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, agent) = start_agent(addr, &dp, cfg, metrics.clone());

    // 1. The first list.
    converge(&dp, &["198.18.0.10:80/TCP -> 198.18.1.1:8080"], "initial list").await;

    // 2. Watch events: an endpoint comes, a service comes.
    api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.1", "198.18.1.2"]));
    api.put(Kind::Service, service("db", "198.18.0.20", 5432, 15432));
    api.put(Kind::Slice, slice("db-1", "db", 15432, &["198.18.2.1"]));
    let both =
        ["198.18.0.10:80/TCP -> 198.18.1.1:8080,198.18.1.2:8080", "198.18.0.20:5432/TCP -> 198.18.2.1:15432"];
    converge(&dp, &both, "watch events").await;

    // 2b. Pods: only this node's are watched (field selector spec.nodeName), for their
    // hostPorts; a pod of node-2 with a hostPort is never seen here.
    api.put(Kind::Pod, pod("other", "node-2", "198.18.20.2", 8080, 8082));
    api.put(Kind::Pod, pod("mine", "node-1", "198.18.10.2", 8080, 8081));
    let with_pod = [both[0], both[1], "198.18.100.1:8081/TCP -> 198.18.10.2:8080"];
    converge(&dp, &with_pod, "a hostPort of this node's pod").await;
    assert!(
        api.requests().iter().any(|(k, verb, _)| *k == Kind::Pod && *verb == "watch"),
        "pods are watched: {:?}",
        api.requests()
    );
    api.delete(Kind::Pod, "default/mine");
    converge(&dp, &both, "the pod is gone").await;

    // 3. Bookmarks: slice changes move the version on; the Service watch hears of it only
    // through bookmarks. After a dropped connection it resumes from the bookmark's version.
    api.put(Kind::Slice, slice("db-1", "db", 15432, &["198.18.2.1", "198.18.2.2"]));
    let newest = api.state.lock().unwrap().rv;
    tokio::time::sleep(Duration::from_millis(700)).await; // at least one bookmark
    let service_events_max =
        api.state.lock().unwrap().events.iter().filter(|e| e.1 == Kind::Service).map(|e| e.0).max().unwrap();
    assert!(service_events_max < newest);
    let before = api.requests().len();
    api.drop_watches();
    api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.2"]));
    converge(
        &dp,
        &[
            "198.18.0.10:80/TCP -> 198.18.1.2:8080",
            "198.18.0.20:5432/TCP -> 198.18.2.1:15432,198.18.2.2:15432",
        ],
        "after dropped watches",
    )
    .await;
    // The maps may converge through the slice watch before the Service watch is back: wait for
    // it (its retry comes with the watcher's backoff).
    let service_resumed = |r: &[(Kind, &str, String)]| {
        r.iter().any(|(k, verb, rv)| {
            *k == Kind::Service && *verb == "watch" && rv.parse::<u64>().unwrap() >= newest
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !service_resumed(&api.requests()[before..]) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed: Vec<_> = api.requests()[before..].to_vec();
    assert!(
        service_resumed(&resumed),
        "the Service watch resumed from a bookmarked version (>= {newest}): {resumed:?}"
    );
    assert!(
        !resumed.iter().any(|(_, verb, _)| *verb == "list"),
        "a dropped watch resumes without a relist: {resumed:?}"
    );

    // 4. 410 Gone: the history is compacted while the watches are down, so they must relist.
    let lists = |kind: Kind| api.requests().iter().filter(|r| r.0 == kind && r.1 == "list").count();
    let (services_before, slices_before) = (lists(Kind::Service), lists(Kind::Slice));
    api.compact();
    api.delete(Kind::Service, "default/db");
    api.delete(Kind::Slice, "default/db-1");
    api.put(Kind::Service, service("cache", "198.18.0.30", 6379, 6379));
    api.put(Kind::Slice, slice("cache-1", "cache", 6379, &["198.18.3.1"]));
    // The open watches may already have seen these events; expiring them makes both resume
    // from a compacted version all the same.
    api.expire_watches();
    converge(
        &dp,
        &["198.18.0.10:80/TCP -> 198.18.1.2:8080", "198.18.0.30:6379/TCP -> 198.18.3.1:6379"],
        "after 410 Gone and a relist",
    )
    .await;
    // Each expired watch relists (the watches may have converged the maps before that).
    let relisted = |kind: Kind| api.requests().iter().filter(|r| r.0 == kind && r.1 == "list").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while relisted(Kind::Service) < services_before + 1 || relisted(Kind::Slice) < slices_before + 1 {
        assert!(
            Instant::now() < deadline,
            "both resources relist after 410 Gone: services {services_before} -> {}, slices {slices_before} -> {}",
            relisted(Kind::Service),
            relisted(Kind::Slice)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 5. The API server goes away: the datapath keeps the last known state, and watch errors
    // are counted.
    server.abort();
    let _ = (&mut server).await;
    api.drop_watches();
    let errors_at = |m: &Metrics| {
        let text = m.render(&[]);
        text.lines()
            .filter(|l| l.starts_with("xlb_watch_errors_total"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while errors_at(&metrics) == 0 {
        assert!(Instant::now() < deadline, "no watch error counted while the API server was away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        served(&dp),
        ["198.18.0.10:80/TCP -> 198.18.1.2:8080", "198.18.0.30:6379/TCP -> 198.18.3.1:6379"],
        "nothing is flushed while the API server is away"
    );

    // 6. It comes back (same address) with changes made meanwhile, its history compacted.
    api.delete(Kind::Service, "default/cache");
    api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.3"]));
    api.compact();
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));
    converge(&dp, &["198.18.0.10:80/TCP -> 198.18.1.3:8080"], "after the API server came back").await;

    let (ok, _) = metrics.syncs();
    assert!(ok >= 5, "{ok} syncs");
    let _ = stop_tx.send(());
    agent.await.unwrap();
    server.abort();
}

/// Map writes that fail are reported (log, `xlb_syncs_total{result="error"}`) and retried by the
/// control loop with backoff until the maps hold the whole picture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_map_writes_are_retried_until_the_maps_converge() {
    use lb_userspace::datapath::FaultyDatapath;
    let api = FakeApi::new();
    let mut want = Vec::new();
    for i in 0..20u16 {
        let name = format!("s{i}");
        api.put(Kind::Service, service(&name, &format!("198.18.0.{i}"), 80, 8080));
        api.put(
            Kind::Slice,
            slice(&format!("{name}-1"), &name, 8080, &[&format!("198.18.1.{i}"), &format!("198.18.2.{i}")]),
        );
        want.push(format!("198.18.0.{i}:80/TCP -> 198.18.1.{i}:8080,198.18.2.{i}:8080"));
    }
    want.sort();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let metrics = Arc::new(Metrics::default());
    let changed = Arc::new(Notify::new());
    let source = Source::Kube(KubeSource::start(
        client,
        Some("node-1"),
        true,
        &Default::default(),
        changed.clone(),
        metrics.clone(),
    ));
    let dp = Shared::default();
    // One write in twenty fails (retries back off from 100 ms, doubling).
    let faulty = FaultyDatapath::new(dp.clone(), 3, 50, 0);
    let mut syncer = Syncer::new(Reconciler::new(faulty).unwrap(), ModelConfig::default(), metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        source.wait_ready().await;
        changed.notify_one();
        control_loop(&source, &mut syncer, &changed, Duration::ZERO, async {
            let _ = stop_rx.await;
        })
        .await;
        syncer
    });
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    converge(&dp, &want, "through failing writes").await;
    let _ = stop_tx.send(());
    let syncer = agent.await.unwrap();
    let (ok, failed) = metrics.syncs();
    assert!(failed >= 1, "writes failed and were reported ({failed} failed syncs, {ok} good)");
    assert!(syncer.rec.datapath().injected >= 1);
    assert!(metrics.render(&[]).contains(&format!("xlb_syncs_total{{result=\"error\"}} {failed}")));
    server.abort();
}

/// An agent (source, syncer, control loop) with `cfg` against the API server at `addr`, writing
/// to `dp`; it stops when the sender is dropped or sent to.
fn start_agent(
    addr: SocketAddr,
    dp: &Shared,
    cfg: ModelConfig,
    metrics: Arc<Metrics>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    start_agent_with(addr, dp, cfg, metrics, false, ProxyName::default())
}

/// [`start_agent`], writing events to the API server when `events`.
fn start_agent_with(
    addr: SocketAddr,
    dp: &Shared,
    cfg: ModelConfig,
    metrics: Arc<Metrics>,
    events: bool,
    proxy: ProxyName,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let changed = Arc::new(Notify::new());
    let node = cfg.node_name.clone();
    let source = Source::Kube(KubeSource::start(
        client.clone(),
        node.as_deref(),
        true,
        &proxy,
        changed.clone(),
        metrics.clone(),
    ));
    let mut syncer = Syncer::new(Reconciler::new(dp.clone()).unwrap(), cfg, metrics);
    if let Source::Kube(k) = &source {
        syncer.node_zone = k.zone.clone();
    }
    if events {
        syncer.events = Some(lb_userspace::agent::events::EventReporter::start(client, node.as_deref()));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        source.wait_ready().await;
        changed.notify_one();
        control_loop(&source, &mut syncer, &changed, Duration::ZERO, async {
            let _ = stop_rx.await;
        })
        .await;
    });
    (stop_tx, agent)
}

/// The API server goes away for `outage` and comes back restarted: its history compacted (every
/// watch resuming gets 410 Gone) and a Service added meanwhile. Returns how long after its return
/// the new Service was in the maps.
async fn recovery_after(outage: Duration) -> Duration {
    let api = FakeApi::new();
    api.put(Kind::Service, service("web", "198.18.0.10", 80, 8080));
    api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.1"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));
    let dp = Shared::default();
    let (stop, agent) = start_agent(addr, &dp, ModelConfig::default(), Arc::new(Metrics::default()));
    converge(&dp, &["198.18.0.10:80/TCP -> 198.18.1.1:8080"], "initial list").await;

    // Down: the listener is closed and every open watch ends; connections are refused.
    server.abort();
    let _ = server.await;
    api.drop_watches();
    tokio::time::sleep(outage).await;
    // Restarted: a newer resource version, the old history gone, a change made meanwhile.
    api.put(Kind::Service, service("db", "198.18.0.20", 5432, 5432));
    api.put(Kind::Slice, slice("db-1", "db", 5432, &["198.18.2.1"]));
    api.compact();
    let listener = TcpListener::bind(addr).await.unwrap();
    let back = Instant::now();
    let server = tokio::spawn(serve(api.clone(), listener));
    let want = ["198.18.0.10:80/TCP -> 198.18.1.1:8080", "198.18.0.20:5432/TCP -> 198.18.2.1:5432"];
    converge(&dp, &want, &format!("after a {outage:?} outage")).await;
    let took = back.elapsed();
    let _ = stop.send(());
    agent.await.unwrap();
    server.abort();
    took
}

/// However long the API server was away, a change made while it was away is in the maps
/// within 2 s of its return (kube-rs' default backoff had grown to 30 s by then, and a 410 on
/// resuming cost one more backoff before the relist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_api_server_is_heard_from_within_two_seconds_of_its_return() {
    let outages = [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)];
    let took = futures::future::join_all(outages.map(recovery_after)).await;
    for (outage, took) in outages.iter().zip(&took) {
        eprintln!("outage {outage:?}: the change was in the maps {took:?} after the API server's return");
    }
    for (outage, took) in outages.iter().zip(&took) {
        assert!(*took <= Duration::from_secs(2), "after a {outage:?} outage the change took {took:?}");
    }
}

/// A relist (410 Gone on resume) with nothing changed on the API server writes no map entry:
/// the new objects are modelled again, and the reconciler finds nothing to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_with_nothing_changed_writes_no_map_entry() {
    let api = FakeApi::new();
    let mut want = Vec::new();
    for i in 0..50u16 {
        let name = format!("s{i}");
        api.put(Kind::Service, service(&name, &format!("198.18.0.{i}"), 80, 8080));
        api.put(Kind::Slice, slice(&format!("{name}-1"), &name, 8080, &[&format!("198.18.1.{i}")]));
        want.push(format!("198.18.0.{i}:80/TCP -> 198.18.1.{i}:8080"));
    }
    want.sort();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));
    let dp = Shared::default();
    let metrics = Arc::new(Metrics::default());
    let (stop, agent) = start_agent(addr, &dp, ModelConfig::default(), metrics.clone());
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    converge(&dp, &want, "initial list").await;
    let counter = |name: &str| sample(&metrics, name).expect("a counter") as u64;
    let lists = |kind: Kind| api.requests().iter().filter(|r| r.0 == kind && r.1 == "list").count();
    let (writes, deletes) = (counter("xlb_map_writes_total"), counter("xlb_map_deletes_total"));
    let (svc_lists, slice_lists) = (lists(Kind::Service), lists(Kind::Slice));
    let (syncs, _) = metrics.syncs();

    api.expire_watches();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lists(Kind::Service) == svc_lists
        || lists(Kind::Slice) == slice_lists
        || metrics.syncs().0 < syncs + 2
    {
        assert!(Instant::now() < deadline, "both resources relist and the agent syncs after them");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The relists' last sync comes after their lists are complete.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served(&dp), want, "the same picture");
    assert_eq!(counter("xlb_map_writes_total"), writes, "no entry written by the relist's syncs");
    assert_eq!(counter("xlb_map_deletes_total"), deletes, "nothing deleted");
    assert!(writes > 0, "the first sync wrote the maps");
    let _ = stop.send(());
    agent.await.unwrap();
    server.abort();
}

/// A cluster that outgrows a map: the sync writes nothing (never a partial datapath), and says
/// so in its error, in the metric `xlb_capacity_exceeded{flag}` and in one Warning event
/// `CapacityExceeded` on the node, naming the flag to raise; once the Services fit again, the
/// metric goes back to 0 and the maps follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_outgrows_a_map_is_told_by_error_metric_and_event() {
    let api = FakeApi::new();
    let each = |i: u16| (format!("s{i}"), format!("198.18.0.{i}"));
    for i in 0..2u16 {
        let (name, ip) = each(i);
        api.put(Kind::Service, service(&name, &ip, 80, 8080));
        api.put(Kind::Slice, slice(&format!("{name}-1"), &name, 8080, &["198.18.1.1", "198.18.1.2"]));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));
    // Room for 8 service entries: two Services of one frontend and two slots fit (6), three not.
    let cap = Capacity { service_entries: 8, backends: 64, ipv6_entries: 64 };
    let dp = Shared(Arc::new(Mutex::new(MemDatapath::with_capacity(cap))));
    let metrics = Arc::new(Metrics::default());
    let cfg = ModelConfig { node_name: Some("node-1".into()), ..ModelConfig::default() };
    let (stop_tx, agent) = start_agent_with(addr, &dp, cfg, metrics.clone(), true, ProxyName::default());
    let two = [
        "198.18.0.0:80/TCP -> 198.18.1.1:8080,198.18.1.2:8080",
        "198.18.0.1:80/TCP -> 198.18.1.1:8080,198.18.1.2:8080",
    ];
    converge(&dp, &two, "two Services fit").await;
    let exceeded = || sample(&metrics, "xlb_capacity_exceeded{flag=\"--max-service-entries\"}");
    assert_eq!(exceeded(), Some(0.0));

    // A third Service: 9 entries, the map holds 8.
    let (name, ip) = each(2);
    api.put(Kind::Slice, slice("s2-1", &name, 8080, &["198.18.1.1", "198.18.1.2"]));
    api.put(Kind::Service, service(&name, &ip, 80, 8080));
    let deadline = Instant::now() + Duration::from_secs(10);
    while exceeded() != Some(1.0) {
        assert!(Instant::now() < deadline, "the metric says the map is too small: {:?}", exceeded());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing of the sync that does not fit is written: the maps hold the last picture that fit
    // (the Service may have come in a sync before its slice, then without endpoints).
    let now = served(&dp);
    assert!(now.starts_with(&two.map(String::from)), "{now:?}");
    assert!(now.len() == 2 || now[2] == "198.18.0.2:80/TCP -> ", "{now:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let node_events = || {
        api.events_created()
            .into_values()
            .filter(|e| e["regarding"]["kind"] == "Node" && e["reason"] == "CapacityExceeded")
            .collect::<Vec<_>>()
    };
    while node_events().is_empty() {
        assert!(Instant::now() < deadline, "an event on the node: {:?}", api.events_created());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = node_events();
    assert_eq!(events.len(), 1, "once, not at every retry: {events:?}");
    assert_eq!(events[0]["regarding"]["name"], "node-1");
    let note = events[0]["note"].as_str().unwrap();
    assert!(note.contains("raise --max-service-entries") && note.contains("room for 8 entries"), "{note}");

    // The Service goes: everything fits again.
    api.delete(Kind::Service, "default/s2");
    converge(&dp, &two, "after the third Service is gone").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while exceeded() != Some(0.0) {
        assert!(Instant::now() < deadline, "the metric goes back to 0: {:?}", exceeded());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    agent.await.unwrap();
    server.abort();
}

/// service.kubernetes.io/service-proxy-name, as kube-proxy honours it: by default the Services
/// with the label (and the slices the EndpointSlice controller copies it to) are another
/// proxy's, selected out on the server, and the slices of headless Services are not read; a
/// Service given the label later goes, as the watch says it is deleted. With a name, only the
/// Services labelled with it are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_another_proxy_are_left_to_it_and_a_named_agent_serves_only_its_own() {
    let labelled = |mut v: serde_json::Value, key: &str, value: &str| {
        v["metadata"]["labels"][key] = serde_json::json!(value);
        v
    };
    let api = FakeApi::new();
    api.put(Kind::Service, service("mine", "198.18.0.1", 80, 8080));
    api.put(Kind::Slice, slice("mine-1", "mine", 8080, &["198.18.1.1"]));
    // Not a slice a proxy reads: a headless Service's (it would add an endpoint to "mine").
    api.put(
        Kind::Slice,
        labelled(slice("mine-2", "mine", 8080, &["198.18.1.9"]), "service.kubernetes.io/headless", ""),
    );
    for (name, ip, pod) in [("theirs", "198.18.0.2", "198.18.1.2"), ("ours", "198.18.0.3", "198.18.1.3")] {
        let owner = if name == "ours" { "xlb-b" } else { "other" };
        api.put(Kind::Service, labelled(service(name, ip, 80, 8080), SERVICE_PROXY_NAME_LABEL, owner));
        api.put(
            Kind::Slice,
            labelled(slice(&format!("{name}-1"), name, 8080, &[pod]), SERVICE_PROXY_NAME_LABEL, owner),
        );
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));

    let (dp, named) = (Shared::default(), Shared::default());
    let (stop, agent) = start_agent_with(
        addr,
        &dp,
        ModelConfig::default(),
        Arc::new(Metrics::default()),
        false,
        ProxyName::default(),
    );
    let b = ProxyName::new(Some("xlb-b".into())).unwrap();
    let (stop_b, agent_b) =
        start_agent_with(addr, &named, ModelConfig::default(), Arc::new(Metrics::default()), false, b);
    converge(&dp, &["198.18.0.1:80/TCP -> 198.18.1.1:8080"], "the unlabelled Service only").await;
    converge(&named, &["198.18.0.3:80/TCP -> 198.18.1.3:8080"], "the Service labelled xlb-b only").await;

    // "mine" handed to another proxy: gone from the default agent, not taken by the named one.
    api.put(
        Kind::Service,
        labelled(service("mine", "198.18.0.1", 80, 8080), SERVICE_PROXY_NAME_LABEL, "other"),
    );
    converge(&dp, &[], "a Service given the label goes").await;
    // ... and to xlb-b: the named agent takes it, with its unlabelled hand-made slice.
    api.put(
        Kind::Service,
        labelled(service("mine", "198.18.0.1", 80, 8080), SERVICE_PROXY_NAME_LABEL, "xlb-b"),
    );
    converge(
        &named,
        &["198.18.0.1:80/TCP -> 198.18.1.1:8080", "198.18.0.3:80/TCP -> 198.18.1.3:8080"],
        "a Service labelled xlb-b later comes to the named agent",
    )
    .await;
    converge(&dp, &[], "still another proxy's").await;
    let _ = (stop.send(()), stop_b.send(()));
    agent.await.unwrap();
    agent_b.await.unwrap();
    server.abort();
}

#[test]
fn a_service_proxy_name_must_be_a_label_value() {
    assert!(ProxyName::new(Some("xlb-b".into())).is_ok());
    for bad in ["", "-x", "x-", "a b", "a/b", &"x".repeat(64)] {
        let e = ProxyName::new(Some(bad.into())).expect_err(bad);
        assert!(e.contains("label value"), "{e}");
    }
}

/// EndpointSlice topology hints with the zone of this node's Node object: while every endpoint
/// is hinted and some for this zone, the node's cluster-wide traffic uses those only; the zone
/// label changed, the other zone's; the label gone, every endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_hints_follow_the_zone_of_this_nodes_node_object() {
    let api = FakeApi::new();
    api.put(Kind::Node, node("node-1", Some("a")));
    api.put(Kind::Node, node("node-2", Some("b")));
    api.put(Kind::Service, service("web", "198.18.0.1", 80, 8080));
    let mut s = slice("web-1", "web", 8080, &["198.18.1.1", "198.18.1.2"]);
    s["endpoints"][0]["hints"] = serde_json::json!({"forZones": [{"name": "a"}]});
    s["endpoints"][1]["hints"] = serde_json::json!({"forZones": [{"name": "b"}]});
    api.put(Kind::Slice, s);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(api.clone(), listener));
    let dp = Shared::default();
    let cfg = ModelConfig { node_name: Some("node-1".into()), ..ModelConfig::default() };
    let metrics = Arc::new(Metrics::default());
    let (stop, agent) = start_agent(addr, &dp, cfg, metrics.clone());
    converge(&dp, &["198.18.0.1:80/TCP -> 198.18.1.1:8080"], "zone a's endpoint only").await;
    // The cluster autoscaler taints the node for deletion: not eligible (the node health
    // server's /healthz then answers 503), and eligible again once the taint goes.
    let mut tainted = node("node-1", Some("a"));
    tainted["spec"]["taints"] =
        serde_json::json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]);
    api.put(Kind::Node, tainted);
    let eligible = |want: bool| {
        let metrics = metrics.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while metrics.node_eligible() != want {
                assert!(Instant::now() < deadline, "node eligible should be {want}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    eligible(false).await;
    api.put(Kind::Node, node("node-1", Some("a")));
    eligible(true).await;
    api.put(Kind::Node, node("node-1", Some("b")));
    converge(&dp, &["198.18.0.1:80/TCP -> 198.18.1.2:8080"], "the node moved to zone b").await;
    api.put(Kind::Node, node("node-1", None));
    converge(&dp, &["198.18.0.1:80/TCP -> 198.18.1.1:8080,198.18.1.2:8080"], "no zone: every endpoint").await;
    let requests = api.requests();
    assert!(requests.iter().any(|(k, verb, _)| *k == Kind::Node && *verb == "watch"), "{requests:?}");
    let _ = stop.send(());
    agent.await.unwrap();
    server.abort();
}
