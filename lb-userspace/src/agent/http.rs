//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` and `/readyz`; and the
//! node health server that load balancers probe, as kube-proxy's on port 10256 (`/healthz`,
//! `/livez`, with its JSON body).
//! A deliberately small HTTP/1.1 server: one request per connection, GET only.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

use crate::agent::metrics::Metrics;

/// Reads the datapath's counters at scrape time: (counter name, packets, bytes).
pub type CounterSource = Arc<dyn Fn() -> Vec<(&'static str, u64, u64)> + Send + Sync>;

pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub counters: CounterSource,
    /// `/healthz` fails when a change has waited this long for a successful sync.
    pub max_pending: Duration,
}

/// An answer: (status, content type, body).
pub type Answer = (&'static str, &'static str, String);

/// What answers a GET (or HEAD) of a path.
pub type Route = Arc<dyn Fn(&str) -> Answer + Send + Sync>;

const TEXT: &str = "text/plain; charset=utf-8";

/// Serves the agent's endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>) {
    serve_with(listener, Arc::new(move |path| route(path, &state))).await
}

/// Serves the node health server on `addr` until the task is dropped (see [`bind_retrying`]).
pub async fn serve_node_health(addr: SocketAddr, metrics: Arc<Metrics>, max_pending: Duration) {
    let listener = bind_retrying(addr, "the node health server (kube-proxy's)").await;
    tracing::info!(%addr, "serving the node's health (/healthz, /livez), as kube-proxy's health server");
    serve_with(listener, Arc::new(move |path| node_health_route(path, &metrics, max_pending))).await
}

/// Binds `addr`. While another process holds it (an agent being replaced, kube-proxy still
/// running) it is tried again every 5 s, said once. An unspecified IPv6 address (IPv6 and IPv4
/// on one socket) is the IPv4 one on a node without IPv6.
pub async fn bind_retrying(addr: SocketAddr, what: &str) -> TcpListener {
    let mut warned = false;
    loop {
        let e = match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && addr.ip() == Ipv6Addr::UNSPECIFIED => {
                match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()))).await {
                    Ok(l) => return l,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if !warned {
            warn!(%addr, error = %e, "cannot bind {what} yet; trying again every 5 s");
            warned = true;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Answers the requests of `listener` by `route`, each connection in a task of its own (given
/// 10 s), until the task is dropped.
pub async fn serve_with(listener: TcpListener, route: Route) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), respond(stream, &*route)).await {
                debug!(%peer, error = %e, "HTTP request timed out");
            }
        });
    }
}

/// Reads one request from `stream` and writes the answer `route` gives for its path (GET and
/// HEAD only), then closes the connection.
async fn respond(mut stream: TcpStream, route: &(dyn Fn(&str) -> Answer + Send + Sync)) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read up to the end of the headers (the body of a GET is ignored).
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method == "GET" || method == "HEAD" {
        route(path)
    } else {
        ("405 Method Not Allowed", TEXT, "only GET\n".into())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

fn route(path: &str, state: &HttpState) -> Answer {
    match path {
        "/metrics" => {
            let counters = (state.counters)();
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", state.metrics.render(&counters))
        }
        "/healthz" | "/livez" => match state.metrics.health(state.max_pending) {
            Ok(()) => ("200 OK", TEXT, "ok\n".into()),
            Err(why) => ("503 Service Unavailable", TEXT, format!("unhealthy: {why}\n")),
        },
        "/readyz" => {
            if state.metrics.is_ready() {
                ("200 OK", TEXT, "ok\n".into())
            } else {
                ("503 Service Unavailable", TEXT, "not ready: the first sync has not finished\n".into())
            }
        }
        _ => ("404 Not Found", TEXT, "not found: try /metrics, /healthz or /readyz\n".into()),
    }
}

/// kube-proxy's health server: `/healthz` and `/livez`, 200 while the node is healthy (see
/// [`Metrics::node_health`]), else 503, with its JSON body; `/healthz` also answers 503 while
/// the node is being deleted or is tainted for deletion by the cluster autoscaler
/// (`nodeEligible` false, from its Node object), `/livez` does not.
fn node_health_route(path: &str, metrics: &Metrics, max_pending: Duration) -> Answer {
    match path {
        "/healthz" | "/livez" => {
            let (healthy, last) = metrics.node_health(max_pending);
            let eligible = metrics.node_eligible();
            let body = format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {eligible}}}"#,
                last.map(go_time).unwrap_or_else(|| go_time(std::time::UNIX_EPOCH)),
                go_time(std::time::SystemTime::now())
            );
            let ok = healthy && (eligible || path == "/livez");
            (if ok { "200 OK" } else { "503 Service Unavailable" }, "application/json", body)
        }
        _ => ("404 Not Found", TEXT, "not found: try /healthz or /livez\n".into()),
    }
}

/// A time as Go's `time.Time.String()` writes it in UTC (kube-proxy's JSON has it so):
/// `2006-01-02 15:04:05.999999999 +0000 UTC`.
pub fn go_time(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac =
        if nanos == 0 { String::new() } else { format!(".{nanos:09}").trim_end_matches('0').to_string() };
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{frac} +0000 UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(HttpState {
            metrics: metrics.clone(),
            counters: Arc::new(|| vec![("rx", 7, 700)]),
            max_pending: Duration::from_secs(60),
        });
        let task = tokio::spawn(serve(listener, state));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.set_ready();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200") && m.contains("xlb_datapath_packets_total{counter=\"rx\"} 7"),
            "{m}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }

    #[test]
    fn times_are_written_as_go_writes_them() {
        let t = |s: u64, n: u32| go_time(std::time::UNIX_EPOCH + Duration::new(s, n));
        assert_eq!(t(0, 0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(t(951_782_400, 500_000_000), "2000-02-29 00:00:00.5 +0000 UTC");
        assert_eq!(t(1_796_675_696, 123_456_789), "2026-12-07 20:34:56.123456789 +0000 UTC");
    }

    /// kube-proxy's health server: 503 until the first sync, 200 after, 503 again once a change
    /// waits too long or the agent stops; the JSON body as kube-proxy writes it.
    #[tokio::test]
    async fn the_node_health_server_answers_as_kube_proxys() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let m = metrics.clone();
        let route: Route = Arc::new(move |path| node_health_route(path, &m, Duration::from_millis(300)));
        let task = tokio::spawn(serve_with(listener, route));
        let body = |r: &str| -> serde_json::Value {
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap()
        };
        let before = get(addr, "/healthz").await;
        assert!(before.starts_with("HTTP/1.1 503") && before.contains("application/json"), "{before}");
        assert_eq!(body(&before)["lastUpdated"], "1970-01-01 00:00:00 +0000 UTC");
        metrics.sync_ok(Duration::from_millis(1), 1, 0, Default::default());
        for path in ["/healthz", "/livez"] {
            let r = get(addr, path).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            let b = body(&r);
            assert_eq!(b["nodeEligible"], true);
            assert!(b["lastUpdated"].as_str().unwrap().ends_with(" +0000 UTC"), "{b}");
            assert!(b["currentTime"].as_str().unwrap() >= b["lastUpdated"].as_str().unwrap(), "{b}");
        }
        // A change not synced for longer than the limit.
        metrics.changed();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"));
        metrics.sync_ok(Duration::from_millis(1), 1, 0, Default::default());
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        // A node being deleted: /healthz says so (503, nodeEligible false), /livez does not.
        metrics.set_node_eligible(false);
        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 503") && body(&r)["nodeEligible"] == false, "{r}");
        assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200"));
        metrics.set_node_eligible(true);
        metrics.set_stopping();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
