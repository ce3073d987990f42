//! The agent's Kubernetes source against an HTTP server that speaks the API server's list and
//! watch protocol: resource versions, chunked watch streams, bookmarks, 410 Gone for compacted
//! versions, dropped connections and an API server that goes away. The agent's real source,
//! model, reconciler and control loop run against in-memory maps; no kernel is needed.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_common::{Backend4, Svc4Key, Svc4Value, SvcInfo};
use lb_userspace::{
    agent::{Source, Syncer, control_loop},
    cli,
    datapath::{Capacity, Datapath, DatapathError, MemDatapath},
    kube_source::KubeSource,
    metrics::Metrics,
    model::ModelConfig,
    reconcile::Reconciler,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};

// ---------------------------------------------------------------------------------------------
// The fake API server.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    Slice,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::Slice => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::Slice => ("discovery.k8s.io/v1", "EndpointSliceList"),
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace/name) -> object, with its resourceVersion set.
    objects: BTreeMap<(Kind, String), Value>,
    /// (rv, kind, type, object): the watch history.
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// Versions at or below this are compacted: a watch from them gets 410 Gone.
    compacted: u64,
    /// Requests seen: (kind, "list" | "watch", resourceVersion asked for).
    requests: Vec<(Kind, &'static str, String)>,
    /// Bumped to make every open watch stream end (a dropped connection).
    generation: u64,
}

struct FakeApi {
    state: Mutex<State>,
    /// Wakes the watch streams on every change (value: a change counter).
    tick: watch::Sender<u64>,
}

impl FakeApi {
    fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(State { rv: 100, ..State::default() }), tick: watch::channel(0).0 })
    }

    fn wake(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    fn put(&self, kind: Kind, mut obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap(),
            obj["metadata"]["name"].as_str().unwrap()
        );
        let ty = if st.objects.insert((kind, key), obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        st.events.push((rv, kind, ty, obj));
        drop(st);
        self.wake();
    }

    fn delete(&self, kind: Kind, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let mut obj = st.objects.remove(&(kind, key.to_string())).expect("deleting an absent object");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, kind, "DELETED", obj));
        drop(st);
        self.wake();
    }

    /// Forgets the history: watches from any version before now get 410 Gone.
    fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.events.clear();
    }

    /// Ends every open watch stream, as a load balancer in front of the API server might.
    fn drop_watches(&self) {
        self.state.lock().unwrap().generation += 1;
        self.wake();
    }

    fn requests(&self) -> Vec<(Kind, &'static str, String)> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn serve(api: Arc<FakeApi>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        tokio::spawn(handle(api.clone(), stream));
    }
}

fn query(target: &str) -> BTreeMap<String, String> {
    target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn handle(api: Arc<FakeApi>, mut stream: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let path = target.split('?').next().unwrap_or("");
    let kind = match path {
        p if p == Kind::Service.path() => Kind::Service,
        p if p == Kind::Slice.path() => Kind::Slice,
        _ => {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
    };
    let q = query(&target);
    let rv_asked = q.get("resourceVersion").cloned().unwrap_or_default();
    if q.get("watch").map(String::as_str) != Some("true") {
        // A list: everything, at the current version (no paging: the limit is never reached).
        let body = {
            let mut st = api.state.lock().unwrap();
            st.requests.push((kind, "list", rv_asked));
            let items: Vec<Value> =
                st.objects.iter().filter(|((k, _), _)| *k == kind).map(|(_, v)| v.clone()).collect();
            let (api_version, list_kind) = kind.list_kind();
            json!({"apiVersion": api_version, "kind": list_kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
                .to_string()
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        return;
    }

    // A watch: a chunked stream of JSON events.
    let from: u64 = rv_asked.parse().unwrap_or(0);
    let (generation, gone) = {
        let mut st = api.state.lock().unwrap();
        st.requests.push((kind, "watch", rv_asked.clone()));
        (st.generation, from < st.compacted)
    };
    if stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    async fn send(stream: &mut TcpStream, ev: &Value) -> bool {
        let line = format!("{ev}\n");
        stream.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await.is_ok()
    }
    if gone {
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
        let _ = send(&mut stream, &status).await;
        let _ = stream.write_all(b"0\r\n\r\n").await;
        return;
    }
    let mut tick = api.tick.subscribe();
    let mut sent_up_to = from;
    let mut bookmark = tokio::time::interval(Duration::from_millis(300));
    loop {
        let (events, now_rv, ended) = {
            let st = api.state.lock().unwrap();
            let evs: Vec<Value> = st
                .events
                .iter()
                .filter(|(rv, k, _, _)| *k == kind && *rv > sent_up_to)
                .map(|(_, _, ty, obj)| json!({"type": ty, "object": obj}))
                .collect();
            (evs, st.rv, st.generation != generation)
        };
        if ended {
            let _ = stream.write_all(b"0\r\n\r\n").await;
            return;
        }
        for ev in &events {
            if !send(&mut stream, ev).await {
                return;
            }
        }
        sent_up_to = sent_up_to.max(
            events
                .last()
                .and_then(|e| e["object"]["metadata"]["resourceVersion"].as_str()?.parse().ok())
                .unwrap_or(0),
        );
        tokio::select! {
            r = tick.changed() => if r.is_err() { return },
            _ = bookmark.tick() => {
                // A bookmark carries the newest version, which may come from the other kind.
                let (api_version, _) = kind.list_kind();
                let k = match kind { Kind::Service => "Service", Kind::Slice => "EndpointSlice" };
                let bm = json!({"type": "BOOKMARK", "object": {"kind": k, "apiVersion": api_version,
                    "metadata": {"resourceVersion": now_rv.to_string()}}});
                if !send(&mut stream, &bm).await {
                    return;
                }
                sent_up_to = sent_up_to.max(now_rv);
            }
        }
    }
}

fn service(name: &str, ip: &str, port: u16, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}})
}

fn slice(name: &str, svc: &str, port: u16, addrs: &[&str]) -> Value {
    let eps: Vec<Value> =
        addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})
}

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
            format!("{} -> {}", r.frontend, bes.join(","))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
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

    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::default());
    let changed = Arc::new(Notify::new());
    let source = Source::Kube(KubeSource::start(client, changed.clone(), metrics.clone()));
    let dp = Shared::default();
    let mut syncer = Syncer {
        rec: Reconciler::new(dp.clone()).unwrap(),
        cfg: ModelConfig::default(),
        metrics: metrics.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        source.wait_ready().await;
        changed.notify_one();
        control_loop(&source, &mut syncer, &changed, Duration::from_millis(5), async {
            let _ = stop_rx.await;
        })
        .await;
    });

    // 1. The first list.
    converge(&dp, &["198.18.0.10:80/TCP -> 198.18.1.1:8080"], "initial list").await;

    // 2. Watch events: an endpoint comes, a service comes.
    api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.1", "198.18.1.2"]));
    api.put(Kind::Service, service("db", "198.18.0.20", 5432, 15432));
    api.put(Kind::Slice, slice("db-1", "db", 15432, &["198.18.2.1"]));
    let both =
        ["198.18.0.10:80/TCP -> 198.18.1.1:8080,198.18.1.2:8080", "198.18.0.20:5432/TCP -> 198.18.2.1:15432"];
    converge(&dp, &both, "watch events").await;

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
    let resumed: Vec<_> = api.requests()[before..].to_vec();
    assert!(
        resumed.iter().any(|(k, verb, rv)| *k == Kind::Service
            && *verb == "watch"
            && rv.parse::<u64>().unwrap() >= newest),
        "the Service watch resumed from a bookmarked version (>= {newest}): {resumed:?}"
    );
    assert!(
        !resumed.iter().any(|(_, verb, _)| *verb == "list"),
        "a dropped watch resumes without a relist: {resumed:?}"
    );

    // 4. 410 Gone: the history is compacted while the watches are down, so they must relist.
    let lists_before = api.requests().iter().filter(|r| r.1 == "list").count();
    api.compact();
    api.delete(Kind::Service, "default/db");
    api.delete(Kind::Slice, "default/db-1");
    api.put(Kind::Service, service("cache", "198.18.0.30", 6379, 6379));
    api.put(Kind::Slice, slice("cache-1", "cache", 6379, &["198.18.3.1"]));
    api.compact();
    api.drop_watches();
    converge(
        &dp,
        &["198.18.0.10:80/TCP -> 198.18.1.2:8080", "198.18.0.30:6379/TCP -> 198.18.3.1:6379"],
        "after 410 Gone and a relist",
    )
    .await;
    let lists_after = api.requests().iter().filter(|r| r.1 == "list").count();
    assert!(
        lists_after >= lists_before + 2,
        "both resources relisted ({lists_before} -> {lists_after} lists)"
    );

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
