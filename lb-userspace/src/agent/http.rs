//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` and `/readyz`.
//! A deliberately small HTTP/1.1 server: one request per connection, GET only.
use std::{sync::Arc, time::Duration};

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

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), handle(stream, &state)).await {
                debug!(%peer, error = %e, "HTTP request timed out");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, state: &HttpState) {
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
    let (status, ctype, body) = route(method, path, state);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

fn route(method: &str, path: &str, state: &HttpState) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET\n".into());
    }
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
}
