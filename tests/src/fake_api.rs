//! A fake Kubernetes API server for tests and benchmarks: Services, EndpointSlices and Pods
//! (with the `spec.nodeName` field selector) over the
//! list and watch protocol (resource versions, chunked watch streams, bookmarks every 300 ms,
//! 410 Gone for compacted versions), with knobs to drop watch connections and compact history.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};

use crate::rbac::{Attributes, Decision, Rbac};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
    sync::watch,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Slice,
    Pod,
    Node,
}

impl Kind {
    pub fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::Slice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Pod => "/api/v1/pods",
            Kind::Node => "/api/v1/nodes",
        }
    }
    pub fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::Slice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Pod => ("v1", "PodList"),
            Kind::Node => ("v1", "NodeList"),
        }
    }
}

#[derive(Default)]
pub struct State {
    pub rv: u64,
    /// (kind, namespace/name) -> object, with its resourceVersion set.
    pub objects: BTreeMap<(Kind, String), Value>,
    /// (rv, kind, type, object): the watch history.
    pub events: Vec<(u64, Kind, &'static str, Value)>,
    /// Versions at or below this are compacted: a watch from them gets 410 Gone.
    pub compacted: u64,
    /// Requests seen: (kind, "list" | "watch", resourceVersion asked for).
    pub requests: Vec<(Kind, &'static str, String)>,
    /// Bumped to make every open watch stream end (a dropped connection).
    pub generation: u64,
    /// When set, requests are authenticated and authorized (RBAC); otherwise all are served.
    pub rbac: Option<Rbac>,
    /// Every request the authorizer saw, with its decision and target (path and query).
    pub audit: Vec<(Attributes, Decision, String)>,
    /// Events created (events.k8s.io/v1), by namespace/name.
    pub events_created: BTreeMap<String, Value>,
    /// When each event (by resourceVersion) was first written to a watch stream.
    pub sent: BTreeMap<u64, std::time::Instant>,
}

pub struct FakeApi {
    pub state: Mutex<State>,
    /// Wakes the watch streams on every change (value: a change counter).
    tick: watch::Sender<u64>,
}

impl FakeApi {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(State { rv: 100, ..State::default() }), tick: watch::channel(0).0 })
    }

    pub fn wake(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    /// When the event of version `rv` was first written to a watch stream (the API server
    /// published it), if it was.
    pub fn sent_at(&self, rv: u64) -> Option<std::time::Instant> {
        self.state.lock().unwrap().sent.get(&rv).copied()
    }

    /// Stores `obj` (added or modified), and returns its new resourceVersion.
    pub fn put(&self, kind: Kind, mut obj: Value) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = format!(
            "{}/{}",
            // Cluster-scoped objects (nodes) have none.
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap()
        );
        let ty = if st.objects.insert((kind, key), obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        st.events.push((rv, kind, ty, obj));
        drop(st);
        self.wake();
        rv
    }

    pub fn delete(&self, kind: Kind, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let mut obj = st.objects.remove(&(kind, key.to_string())).expect("deleting an absent object");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, kind, "DELETED", obj));
        drop(st);
        self.wake();
    }

    /// As after a change no watch saw was compacted away: every open watch ends, and every
    /// watch resuming from a version it had seen gets 410 Gone and must list again (whether or
    /// not it had seen the latest event).
    pub fn expire_watches(&self) {
        {
            let mut st = self.state.lock().unwrap();
            st.rv += 1;
            st.compacted = st.rv;
            st.events.clear();
            st.generation += 1;
        }
        self.wake();
    }

    /// Forgets the history: watches from any version before now get 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.events.clear();
    }

    /// Ends every open watch stream, as a load balancer in front of the API server might.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().generation += 1;
        self.wake();
    }

    /// Authenticates and authorizes every request from now on, as an API server with `rbac`.
    pub fn enforce(&self, rbac: Rbac) {
        self.state.lock().unwrap().rbac = Some(rbac);
    }

    pub fn events_created(&self) -> BTreeMap<String, Value> {
        self.state.lock().unwrap().events_created.clone()
    }

    pub fn audit(&self) -> Vec<(Attributes, Decision, String)> {
        self.state.lock().unwrap().audit.clone()
    }

    pub fn requests(&self) -> Vec<(Kind, &'static str, String)> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// A continue token's key, in hex (nothing in it for a URL to escape).
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> String {
    let bytes: Vec<u8> =
        (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Serves list and watch requests on `listener` until the task is dropped.
pub async fn serve(api: Arc<FakeApi>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        // As Go's net/http (kube-apiserver): no Nagle delay on a watch stream's small writes.
        let _ = stream.set_nodelay(true);
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
        .map(|(k, v)| (k.to_string(), percent_decoded(v)))
        .collect()
}

/// A query value with its %XX escapes (and '+') decoded.
fn percent_decoded(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(c)) => {
                out.push(c);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an object's labels meet a label selector as kube-apiserver reads one:
/// comma-separated requirements `key`, `!key`, `key=value` (or `==`), `key!=value`.
pub fn labels_match(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').map(str::trim).filter(|r| !r.is_empty()).all(|r| {
        if let Some(key) = r.strip_prefix('!') {
            labels.get(key).is_none()
        } else if let Some((k, v)) = r.split_once("!=") {
            labels.get(k).and_then(Value::as_str) != Some(v)
        } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
            labels.get(k).and_then(Value::as_str) == Some(v)
        } else {
            labels.get(r).is_some()
        }
    })
}

/// Serves list and watch requests over TLS (as kube-apiserver: what an in-cluster client speaks)
/// on `listener` until the task is dropped.
pub async fn serve_tls(api: Arc<FakeApi>, listener: TcpListener, tls: tokio_rustls::TlsAcceptor) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let _ = stream.set_nodelay(true);
        let (api, tls) = (api.clone(), tls.clone());
        tokio::spawn(async move {
            if let Ok(stream) = tls.accept(stream).await {
                handle(api, stream).await;
            }
        });
    }
}

/// A TLS acceptor with the certificate chain and key of the PEM files `cert` and `key`.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context as _;
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Answers one request on `stream`, then closes it (over TLS: with the records flushed and a
/// close_notify).
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(api: Arc<FakeApi>, mut stream: S) {
    respond(api, &mut stream).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(api: Arc<FakeApi>, mut stream: &mut S) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let method = head.split_whitespace().next().unwrap_or("").to_string();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    if let Some(reply) = authorize(&api, &head, &method, &target) {
        let _ = stream.write_all(reply.as_bytes()).await;
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    if method == "POST" {
        create_event(&api, &mut stream, &buf, path).await;
        return;
    }
    let kind = match path {
        p if p == Kind::Service.path() => Kind::Service,
        p if p == Kind::Slice.path() => Kind::Slice,
        p if p == Kind::Pod.path() => Kind::Pod,
        p if p == Kind::Node.path() => Kind::Node,
        _ => {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
    };
    let q = query(&target);
    let rv_asked = q.get("resourceVersion").cloned().unwrap_or_default();
    // `fieldSelector=spec.nodeName=NAME` (pods) or `metadata.name=NAME` (the node), the only
    // field selectors the agent uses.
    let field = q.get("fieldSelector").and_then(|f| {
        let (k, v) = f.split_once('=')?;
        Some((k.split('.').map(str::to_owned).collect::<Vec<_>>(), v.to_owned()))
    });
    let label_selector = q.get("labelSelector").cloned().unwrap_or_default();
    let selected = move |obj: &Value| {
        field
            .as_ref()
            .is_none_or(|(path, v)| path.iter().fold(obj, |o, k| &o[k]).as_str() == Some(v.as_str()))
            && labels_match(&label_selector, obj)
    };
    if q.get("watch").map(String::as_str) != Some("true") {
        // A list, in pages of `limit` as kube-apiserver serves them: each page after the key
        // its `continue` token names, every page at the version of the first (so that the
        // watch from it misses nothing). Objects are written straight from the state (no copy
        // of a whole list: at 100,000 objects the copy cost more than the agent's work).
        let limit: usize =
            q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let (after, list_rv) = match q.get("continue").and_then(|c| c.split_once('.')) {
            Some((rv, key)) => (Some(unhex(key)), rv.parse::<u64>().ok()),
            None => (None, None),
        };
        let body = {
            let mut st = api.state.lock().unwrap();
            st.requests.push((kind, "list", rv_asked));
            let list_rv = list_rv.unwrap_or(st.rv);
            let start = match &after {
                Some(k) => std::ops::Bound::Excluded((kind, k.clone())),
                None => std::ops::Bound::Included((kind, String::new())),
            };
            let mut body = Vec::with_capacity(1 << 20);
            let (api_version, list_kind) = kind.list_kind();
            body.extend_from_slice(
                format!(r#"{{"apiVersion":"{api_version}","kind":"{list_kind}","items":["#).as_bytes(),
            );
            let mut n = 0;
            let mut last = None;
            let mut more = false;
            for ((k, key), v) in st.objects.range((start, std::ops::Bound::Unbounded)) {
                if *k != kind {
                    break;
                }
                if !selected(v) {
                    continue;
                }
                if n == limit {
                    more = true;
                    break;
                }
                if n > 0 {
                    body.push(b',');
                }
                serde_json::to_writer(&mut body, v).expect("a JSON value serializes");
                n += 1;
                last = Some(key.clone());
            }
            let cont = match (more, last) {
                (true, Some(key)) => format!(r#","continue":"{list_rv}.{}""#, hex(&key)),
                _ => String::new(),
            };
            body.extend_from_slice(
                format!(r#"],"metadata":{{"resourceVersion":"{list_rv}"{cont}}}}}"#).as_bytes(),
            );
            String::from_utf8(body).expect("JSON is UTF-8")
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
    // As kube-apiserver writes a watch event: "type" before "object" (a client may read the
    // object as it comes only when it knows the type first; serde_json's own map would write
    // "object" first).
    async fn send<S: AsyncWrite + Unpin>(stream: &mut S, ev: &Value) -> bool {
        let line = format!("{{\"type\":{},\"object\":{}}}\n", ev["type"], ev["object"]);
        stream.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await.is_ok()
            && stream.flush().await.is_ok()
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
            // The history is in version order: start after the last version sent, as
            // kube-apiserver's watch cache does, not at the beginning.
            let start = st.events.partition_point(|(rv, ..)| *rv <= sent_up_to);
            // An object changed so that the selector no longer selects it is DELETED to the
            // watch, as kube-apiserver has it (here whether or not it was selected before).
            let evs: Vec<Value> = st.events[start..]
                .iter()
                .filter(|(_, k, _, _)| *k == kind)
                .filter_map(|(_, _, ty, obj)| match (selected(obj), *ty) {
                    (true, _) => Some(json!({"type": ty, "object": obj})),
                    (false, "MODIFIED") => Some(json!({"type": "DELETED", "object": obj})),
                    (false, _) => None,
                })
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
            if let Some(rv) =
                ev["object"]["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok())
            {
                api.state.lock().unwrap().sent.entry(rv).or_insert_with(std::time::Instant::now);
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
                let k = match kind {
                    Kind::Service => "Service",
                    Kind::Slice => "EndpointSlice",
                    Kind::Pod => "Pod",
                    Kind::Node => "Node",
                };
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

/// `POST /apis/events.k8s.io/v1/namespaces/NS/events`: stores the event, or answers 409 when
/// one of that name exists (as the API server does); anything else POSTed is 404.
async fn create_event<S: AsyncRead + AsyncWrite + Unpin>(
    api: &FakeApi,
    stream: &mut S,
    buf: &[u8],
    path: &str,
) {
    let ns = path
        .strip_prefix("/apis/events.k8s.io/v1/namespaces/")
        .and_then(|r| r.strip_suffix("/events"))
        .filter(|ns| !ns.contains('/'));
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(buf.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let event: Option<Value> = serde_json::from_slice(&body).ok();
    let (code, reply) = match (ns, event) {
        (Some(ns), Some(ev)) => {
            let key = format!("{ns}/{}", ev["metadata"]["name"].as_str().unwrap_or(""));
            let mut st = api.state.lock().unwrap();
            match st.events_created.entry(key) {
                std::collections::btree_map::Entry::Occupied(o) => {
                    let message = format!("events.events.k8s.io {:?} already exists", o.key());
                    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": message, "reason": "AlreadyExists", "code": 409});
                    ("409 Conflict", status)
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(ev.clone());
                    ("201 Created", ev)
                }
            }
        }
        _ => {
            ("404 Not Found", json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}))
        }
    };
    let body = reply.to_string();
    let _ = stream
        .write_all(
            format!(
                "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
}

/// With RBAC enforced: records the request and answers 401 or 403 as the API server would, or
/// `None` to serve it.
fn authorize(api: &FakeApi, head: &str, method: &str, target: &str) -> Option<String> {
    let mut st = api.state.lock().unwrap();
    let rbac = st.rbac.as_ref()?;
    let authorization = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("authorization").then(|| v.trim().to_owned())
    });
    let attrs = Attributes::of(method, target);
    let decision = rbac.decide(authorization.as_deref(), &attrs);
    st.audit.push((attrs.clone(), decision.clone(), target.to_owned()));
    let (code, reason, message) = match &decision {
        Decision::Allowed(_) => return None,
        Decision::Unauthenticated => ("401 Unauthorized", "Unauthorized", "Unauthorized".to_owned()),
        Decision::Denied(user) => {
            let what = match &attrs.resource {
                Some(r) => format!(
                    "{} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {}",
                    r.resource,
                    user.name,
                    attrs.verb,
                    r.resource,
                    r.group,
                    if r.namespace.is_empty() {
                        "at the cluster scope".into()
                    } else {
                        format!("in the namespace \"{}\"", r.namespace)
                    }
                ),
                None => {
                    format!("forbidden: User \"{}\" cannot {} path \"{}\"", user.name, attrs.verb, attrs.path)
                }
            };
            ("403 Forbidden", "Forbidden", what)
        }
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code[..3].parse::<u16>().unwrap()})
    .to_string();
    Some(format!(
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// A ClusterIP Service with one TCP port named "http".
pub fn service(name: &str, ip: &str, port: u16, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}})
}

/// An EndpointSlice of ready endpoints for `svc`, port "http".
pub fn slice(name: &str, svc: &str, port: u16, addrs: &[&str]) -> Value {
    let eps: Vec<Value> =
        addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})
}

/// A running pod on `node` whose container port `port` is exposed on `host_port`.
pub fn pod(name: &str, node: &str, ip: &str, port: u16, host_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "c",
            "ports": [{"containerPort": port, "hostPort": host_port, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip}})
}

/// A Node, in `zone` (its `topology.kubernetes.io/zone` label) when given.
pub fn node(name: &str, zone: Option<&str>) -> Value {
    let labels = match zone {
        Some(z) => json!({"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": z}),
        None => json!({"kubernetes.io/hostname": name}),
    };
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
        "spec": {}, "status": {"addresses": [{"type": "InternalIP", "address": "198.18.100.1"}]}})
}
