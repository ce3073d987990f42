//! The agent's own figures, rendered as Prometheus text for `/metrics`, and the health state
//! behind `/healthz` and `/readyz`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Upper bounds of the sync-latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// What the last sync produced, as gauges.
#[derive(Clone, Debug, Default)]
pub struct SyncFigures {
    pub services: u64,
    pub endpoint_slices: u64,
    pub service_ports: u64,
    pub frontends: u64,
    pub backends: u64,
    /// Rejected objects by kind (Service, EndpointSlice, Pod, manifest document).
    pub rejected: BTreeMap<String, u64>,
    /// Parts left out of objects otherwise served, by (kind, part): see `model::PARTS`.
    pub rejected_parts: BTreeMap<(String, String), u64>,
    /// Map entries in use and capacities: (map name, used, capacity).
    pub maps: Vec<(&'static str, u64, u64)>,
}

#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    syncs_ok: AtomicU64,
    syncs_failed: AtomicU64,
    writes: AtomicU64,
    deletes: AtomicU64,
    watch_errors: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram>,
    last: Mutex<SyncFigures>,
    /// Set once the datapath holds the first complete picture and is attached.
    ready: AtomicBool,
    /// When a change was seen that no successful sync has applied yet.
    pending_since: Mutex<Option<Instant>>,
    last_ok: Mutex<Option<Instant>>,
    /// See [`Metrics::set_capacity_exceeded`].
    capacity_exceeded: Mutex<Option<&'static str>>,
    /// Set when the agent is shutting down (the node health server answers 503).
    stopping: AtomicBool,
    /// Cleared while this node is being deleted (see `source::kube::node_eligible`).
    node_eligible: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            syncs_ok: AtomicU64::new(0),
            syncs_failed: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            watch_errors: Mutex::default(),
            latency: Mutex::default(),
            last: Mutex::default(),
            ready: AtomicBool::new(false),
            pending_since: Mutex::default(),
            last_ok: Mutex::default(),
            capacity_exceeded: Mutex::new(None),
            stopping: AtomicBool::new(false),
            node_eligible: AtomicBool::new(true),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// A change arrived from the source; it is pending until a sync succeeds.
    pub fn changed(&self) {
        lock(&self.pending_since).get_or_insert_with(Instant::now);
    }

    pub fn sync_ok(&self, elapsed: Duration, writes: u64, deletes: u64, figures: SyncFigures) {
        self.syncs_ok.fetch_add(1, Relaxed);
        self.writes.fetch_add(writes, Relaxed);
        self.deletes.fetch_add(deletes, Relaxed);
        self.observe(elapsed);
        *lock(&self.last) = figures;
        *lock(&self.pending_since) = None;
        *lock(&self.last_ok) = Some(Instant::now());
    }

    pub fn sync_failed(&self, elapsed: Duration) {
        self.syncs_failed.fetch_add(1, Relaxed);
        self.observe(elapsed);
    }

    fn observe(&self, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        let mut h = lock(&self.latency);
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// The capacity flag a map too small for the cluster asks to raise (the last sync failed
    /// for it), or `None`.
    pub fn set_capacity_exceeded(&self, flag: Option<&'static str>) {
        *lock(&self.capacity_exceeded) = flag;
    }

    pub fn watch_error(&self, resource: &str) {
        *lock(&self.watch_errors).entry(resource.to_owned()).or_default() += 1;
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    pub fn syncs(&self) -> (u64, u64) {
        (self.syncs_ok.load(Relaxed), self.syncs_failed.load(Relaxed))
    }

    /// Healthy unless a change has waited longer than `max_pending` for a successful sync
    /// (the datapath is falling behind Kubernetes), as kube-proxy's /healthz does.
    pub fn health(&self, max_pending: Duration) -> Result<(), String> {
        match *lock(&self.pending_since) {
            Some(t) if t.elapsed() > max_pending => Err(format!(
                "a change has waited {:.1}s for a successful sync (limit {:.0}s)",
                t.elapsed().as_secs_f64(),
                max_pending.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Relaxed);
    }

    /// Whether load balancers should send to this node (true unless its Node says it is being
    /// deleted).
    pub fn node_eligible(&self) -> bool {
        self.node_eligible.load(Relaxed)
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Relaxed);
    }

    /// The node's health as kube-proxy's health server (port 10256) tells it: healthy once a
    /// sync has succeeded, while no change has waited longer than `max_pending` for one, and
    /// until the agent begins to stop; with the wall-clock time of the last successful sync.
    pub fn node_health(&self, max_pending: Duration) -> (bool, Option<std::time::SystemTime>) {
        let last = *lock(&self.last_ok);
        let healthy = last.is_some() && self.health(max_pending).is_ok() && !self.stopping.load(Relaxed);
        (healthy, last.map(|t| std::time::SystemTime::now() - t.elapsed()))
    }

    /// Prometheus text exposition (format 0.0.4). `datapath` holds the kernel's counters:
    /// (counter name, packets, bytes).
    pub fn render(&self, datapath: &[(&str, u64, u64)]) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut o, "xlb_up_seconds", "gauge", "Seconds since the agent started.");
        let _ = writeln!(o, "xlb_up_seconds {:.3}", self.started.elapsed().as_secs_f64());
        head(
            &mut o,
            "xlb_ready",
            "gauge",
            "1 once the datapath holds the first full picture and is attached.",
        );
        let _ = writeln!(o, "xlb_ready {}", u8::from(self.is_ready()));
        head(&mut o, "xlb_syncs_total", "counter", "Syncs of the maps to the desired state, by result.");
        let _ = writeln!(o, "xlb_syncs_total{{result=\"ok\"}} {}", self.syncs_ok.load(Relaxed));
        let _ = writeln!(o, "xlb_syncs_total{{result=\"error\"}} {}", self.syncs_failed.load(Relaxed));
        head(&mut o, "xlb_map_writes_total", "counter", "Map entries written (updates) by the reconciler.");
        let _ = writeln!(o, "xlb_map_writes_total {}", self.writes.load(Relaxed));
        head(&mut o, "xlb_map_deletes_total", "counter", "Map entries deleted by the reconciler.");
        let _ = writeln!(o, "xlb_map_deletes_total {}", self.deletes.load(Relaxed));
        head(
            &mut o,
            "xlb_sync_duration_seconds",
            "histogram",
            "Time from the start of a sync to its last map write.",
        );
        {
            let h = lock(&self.latency);
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(o, "xlb_sync_duration_seconds_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(o, "xlb_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "xlb_sync_duration_seconds_sum {}", h.sum);
            let _ = writeln!(o, "xlb_sync_duration_seconds_count {}", h.count);
        }
        head(
            &mut o,
            "xlb_last_sync_age_seconds",
            "gauge",
            "Seconds since the last successful sync (-1: none yet).",
        );
        let age = lock(&self.last_ok).map_or(-1.0, |t| t.elapsed().as_secs_f64());
        let _ = writeln!(o, "xlb_last_sync_age_seconds {age:.3}");
        head(&mut o, "xlb_watch_errors_total", "counter", "Errors of the API-server watches, by resource.");
        for (r, n) in lock(&self.watch_errors).iter() {
            let _ = writeln!(o, "xlb_watch_errors_total{{resource=\"{r}\"}} {n}");
        }
        let last = lock(&self.last).clone();
        head(&mut o, "xlb_objects", "gauge", "Objects in the last synced picture, by kind.");
        let _ = writeln!(o, "xlb_objects{{kind=\"Service\"}} {}", last.services);
        let _ = writeln!(o, "xlb_objects{{kind=\"EndpointSlice\"}} {}", last.endpoint_slices);
        head(
            &mut o,
            "xlb_rejected_objects",
            "gauge",
            "Objects rejected as invalid in the last sync, by kind.",
        );
        for kind in ["Service", "EndpointSlice", "Pod", "Document"] {
            let n = last.rejected.get(kind).copied().unwrap_or(0);
            let _ = writeln!(o, "xlb_rejected_objects{{kind=\"{kind}\"}} {n}");
        }
        head(
            &mut o,
            "xlb_rejected_parts",
            "gauge",
            "Parts left out of objects that are otherwise served, in the last sync, by kind and part.",
        );
        for part in crate::model::PARTS {
            let kind = if *part == "endpoint" { "EndpointSlice" } else { "Service" };
            let n = last.rejected_parts.get(&(kind.to_string(), part.to_string())).copied().unwrap_or(0);
            let _ = writeln!(o, "xlb_rejected_parts{{kind=\"{kind}\",part=\"{part}\"}} {n}");
        }
        head(
            &mut o,
            "xlb_capacity_exceeded",
            "gauge",
            "1 while the maps are too small for the cluster and syncs fail: raise the flag named.",
        );
        let exceeded = *lock(&self.capacity_exceeded);
        for flag in ["--max-service-entries", "--max-backends", "--max-ipv6-entries"] {
            let _ =
                writeln!(o, "xlb_capacity_exceeded{{flag=\"{flag}\"}} {}", u8::from(exceeded == Some(flag)));
        }
        head(&mut o, "xlb_service_ports", "gauge", "Service ports programmed.");
        let _ = writeln!(o, "xlb_service_ports {}", last.service_ports);
        head(&mut o, "xlb_frontends", "gauge", "Frontends (address, port, protocol) programmed.");
        let _ = writeln!(o, "xlb_frontends {}", last.frontends);
        head(&mut o, "xlb_backends", "gauge", "Distinct backends (address, port, protocol) programmed.");
        let _ = writeln!(o, "xlb_backends {}", last.backends);
        head(&mut o, "xlb_map_entries", "gauge", "Entries in use in a kernel map.");
        for (m, used, _) in &last.maps {
            let _ = writeln!(o, "xlb_map_entries{{map=\"{m}\"}} {used}");
        }
        head(&mut o, "xlb_map_capacity", "gauge", "Capacity of a kernel map.");
        for (m, _, cap) in &last.maps {
            let _ = writeln!(o, "xlb_map_capacity{{map=\"{m}\"}} {cap}");
        }
        head(
            &mut o,
            "xlb_datapath_packets_total",
            "counter",
            "Packets seen by the XDP program, by verdict and reason.",
        );
        for (name, p, _) in datapath {
            let _ = writeln!(o, "xlb_datapath_packets_total{{counter=\"{name}\"}} {p}");
        }
        head(
            &mut o,
            "xlb_datapath_bytes_total",
            "counter",
            "Bytes seen by the XDP program, by verdict and reason.",
        );
        for (name, _, b) in datapath {
            let _ = writeln!(o, "xlb_datapath_bytes_total{{counter=\"{name}\"}} {b}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.sync_ok(
            Duration::from_millis(3),
            10,
            2,
            SyncFigures {
                services: 4,
                rejected: [("Service".to_string(), 1)].into(),
                rejected_parts: [(("Service".to_string(), "nodePort".to_string()), 2)].into(),
                maps: vec![("xlb_svc4_v1", 12, 100)],
                ..SyncFigures::default()
            },
        );
        m.sync_failed(Duration::from_millis(30));
        m.watch_error("services");
        let text = m.render(&[("rx", 5, 500)]);
        for want in [
            "xlb_syncs_total{result=\"ok\"} 1",
            "xlb_syncs_total{result=\"error\"} 1",
            "xlb_map_writes_total 10",
            "xlb_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "xlb_sync_duration_seconds_bucket{le=\"0.05\"} 2",
            "xlb_sync_duration_seconds_count 2",
            "xlb_rejected_objects{kind=\"Service\"} 1",
            "xlb_rejected_objects{kind=\"EndpointSlice\"} 0",
            "xlb_rejected_parts{kind=\"Service\",part=\"nodePort\"} 2",
            "xlb_rejected_parts{kind=\"EndpointSlice\",part=\"endpoint\"} 0",
            "xlb_map_entries{map=\"xlb_svc4_v1\"} 12",
            "xlb_map_capacity{map=\"xlb_svc4_v1\"} 100",
            "xlb_watch_errors_total{resource=\"services\"} 1",
            "xlb_datapath_packets_total{counter=\"rx\"} 5",
            "xlb_ready 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // Every sample line belongs to a declared metric.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(declared.contains(&name) || declared.contains(&base), "{l}");
        }
    }

    #[test]
    fn health_fails_only_when_a_change_waits_too_long() {
        let m = Metrics::default();
        assert!(m.health(Duration::ZERO).is_ok());
        m.changed();
        std::thread::sleep(Duration::from_millis(5));
        assert!(m.health(Duration::from_secs(60)).is_ok());
        assert!(m.health(Duration::from_millis(1)).unwrap_err().contains("waited"));
        m.sync_ok(Duration::ZERO, 0, 0, SyncFigures::default());
        assert!(m.health(Duration::from_millis(1)).is_ok());
    }
}
