//! Benchmark of the agent's control plane (not a test: it prints measured figures).
//!
//! The real `xlb agent` binary runs in a network namespace of its own, attached to that
//! namespace's loopback, against a fake API server (list/watch over HTTP, as kube-apiserver
//! speaks it) holding N Services with E ready endpoints each, with what a real cluster's
//! objects carry beside what xlb reads (labels, selector, owner, each endpoint's pod, node and
//! zone). It prints:
//! - cold start: from starting the agent to "ready" (program loaded, first list of everything
//!   received, all maps written, XDP attached), and the first sync's own duration;
//! - endpoint change: from the API server publishing one changed EndpointSlice (the benchmark
//!   storing it in the fake API server) to the new backend being readable in the kernel's maps
//!   (polled every ~50 µs), over several changes; and from the watch event written to the
//!   agent's stream to the map, which leaves out the fake API server's own latency (its task's
//!   wake-up on another thread, the event's encoding: about 0.3 ms on these machines);
//! - the agent's resident memory (VmRSS, and its peak VmHWM).
//!
//! With `--dual-stack`, every Service is dual-stack (an IPv4 and an IPv6 clusterIP, an IPv4 and
//! an IPv6 EndpointSlice): twice the frontends and backends, and the changes are made to the
//! IPv6 slices and timed to the IPv6 maps.
//!
//! With `--burst B`: after the timed changes, B slices (one per Service) change at once, timed
//! until the last is in the maps.
//!
//! Run with `cargo xtask bench-agent [-- --services N --endpoints E --changes C --burst B --dual-stack]`
//! (root).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_common::{IPPROTO_TCP, SCOPE_EXTERNAL, Svc4Key, Svc6Key};
use lb_userspace::datapath::BpfMaps;
use xlb_tests::{
    DirGuard, Netns, Proc,
    fake_api::{FakeApi, Kind, serve, service, slice},
    reap_stale, unique_prefix, workspace_bin,
};

struct Args {
    services: u32,
    endpoints: u32,
    changes: u32,
    /// Also write the figures here, as JSON (for `cargo xtask bench-report`).
    json: Option<PathBuf>,
    /// Dual-stack Services; the changes go to their IPv6 slices.
    dual_stack: bool,
    /// After the timed changes: this many slices changed at once (one per Service, published as
    /// fast as the fake API server takes them), timed until every one is in the maps.
    burst: u32,
    /// Services added (each until its clusterIP serves) and then deleted (each until its entry
    /// is gone), one at a time; default: as many as `changes`.
    service_changes: Option<u32>,
    /// Seconds of endpoint changes at 100 per second, each timed.
    sustained: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        services: 10_000,
        endpoints: 5,
        changes: 30,
        json: None,
        dual_stack: false,
        burst: 0,
        service_changes: None,
        sustained: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--dual-stack" {
            a.dual_stack = true;
            continue;
        }
        let mut val = || -> anyhow::Result<u32> { Ok(it.next().context("missing value")?.parse()?) };
        match flag.as_str() {
            "--services" => a.services = val()?,
            "--endpoints" => a.endpoints = val()?,
            "--changes" => a.changes = val()?,
            "--burst" => a.burst = val()?,
            "--service-changes" => a.service_changes = Some(val()?),
            "--sustained" => a.sustained = val()?,
            "--json" => a.json = Some(it.next().context("missing value")?.into()),
            other => bail!(
                "unknown argument {other:?} (--services N --endpoints E --changes C --burst B --service-changes S --sustained SECS --json FILE --dual-stack)"
            ),
        }
    }
    if a.services == 0 || a.services > 130_000 || a.endpoints == 0 || a.endpoints > 100 {
        bail!("--services must be 1..=130000 and --endpoints 1..=100");
    }
    if a.service_changes.unwrap_or(a.changes) > 1000 {
        bail!("--service-changes must be at most 1000");
    }
    Ok(a)
}

/// Service i's ClusterIP, in 198.18.0.0/15 (up to 131,072; no traffic is sent).
fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i)
}

/// Endpoint e of service i: an address of 198.19.<254 - i / 50000>.<1 + e> (fresh ones for
/// changes come after the service's own), and the port its slice gives, 10000 + i % 50000; so
/// every endpoint of every service is its own backend.
fn pod(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 254 - (i / 50_000) as u8, 1 + e as u8)
}

/// Service i's IPv6 clusterIP: 2001:db8:1::/64 + i.
fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0)) + u128::from(i))
}

/// As [`pod`], over IPv6: 2001:db8:ff::<i / 50000>:<1 + e>, on the same port.
fn pod6(i: u32, e: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, (i / 50_000) as u16, 1 + e as u16)
}

fn pod_port(i: u32) -> u16 {
    10_000 + (i % 50_000) as u16
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// True once `addr`:`port` is among the selectable backends of service i in the kernel maps.
fn serves(maps: &BpfMaps, i: u32, addr: Ipv4Addr, port: u16) -> bool {
    let key = |slot| Svc4Key {
        addr: vip(i).octets(),
        port: 80,
        proto: IPPROTO_TCP,
        scope: SCOPE_EXTERNAL,
        slot,
        _pad: 0,
    };
    let Ok(entry) = maps.services.get(&key(0), 0) else { return false };
    (1..=entry.count).any(|s| {
        maps.services
            .get(&key(s), 0)
            .ok()
            .and_then(|v| maps.backends.get(&v.backend_id, 0).ok())
            .is_some_and(|b| b.addr == addr.octets() && b.port == port)
    })
}

/// As [`serves`], for the IPv6 frontend of service i.
fn serves6(maps: &BpfMaps, i: u32, addr: Ipv6Addr, port: u16) -> bool {
    let Some((services, backends)) = &maps.ipv6 else { return false };
    let key = |slot| Svc6Key {
        addr: vip6(i).octets(),
        port: 80,
        proto: IPPROTO_TCP,
        scope: SCOPE_EXTERNAL,
        slot,
        _pad: 0,
    };
    let Ok(entry) = services.get(&key(0), 0) else { return false };
    (1..=entry.count).any(|s| {
        services
            .get(&key(s), 0)
            .ok()
            .and_then(|v| backends.get(&v.backend_id, 0).ok())
            .is_some_and(|b| b.addr == addr.octets() && b.port == port)
    })
}

/// What the API server and the EndpointSlice controller add to the bare objects, as a real
/// cluster's Services and slices carry it (labels, selector, owner, the endpoints' pods,
/// nodes and zones...): the agent must keep what it needs of them, not all of it.
fn as_in_a_cluster(kind: Kind, mut o: serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let name = o["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    o["metadata"]["creationTimestamp"] = json!("2026-12-07T00:00:00Z");
    match kind {
        Kind::Service => {
            o["metadata"]["labels"] = json!({"app": name, "app.kubernetes.io/part-of": "bench"});
            o["spec"]["selector"] = json!({"app": name});
            o["spec"]["sessionAffinity"] = json!("None");
            o["spec"]["internalTrafficPolicy"] = json!("Cluster");
            if o["spec"]["ipFamilies"].is_null() {
                o["spec"]["ipFamilies"] = json!(["IPv4"]);
                o["spec"]["ipFamilyPolicy"] = json!("SingleStack");
            }
            o["status"] = json!({"loadBalancer": {}});
        }
        Kind::Slice => {
            let svc =
                o["metadata"]["labels"]["kubernetes.io/service-name"].as_str().unwrap_or_default().to_owned();
            o["metadata"]["generateName"] = json!(format!("{svc}-"));
            o["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] =
                json!("endpointslice-controller.k8s.io");
            o["metadata"]["annotations"] =
                json!({"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-07T00:00:00Z"});
            o["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Service", "name": svc,
                "uid": format!("uid-{svc}"), "controller": true, "blockOwnerDeletion": true}]);
            for (e, ep) in o["endpoints"].as_array_mut().into_iter().flatten().enumerate() {
                ep["conditions"] = json!({"ready": true, "serving": true, "terminating": false});
                ep["nodeName"] = json!(format!("node-{}", e % 50));
                ep["zone"] = json!(format!("zone-{}", e % 3));
                ep["targetRef"] = json!({"kind": "Pod", "namespace": "default",
                    "name": format!("{svc}-7d9c5b6f4b-{e:05}"),
                    "uid": format!("0d5e4c3b-2a19-4f08-97e6-{:012}", e)});
            }
        }
        _ => {}
    }
    o
}

/// The Service and its slices as the API server holds them: one IPv4 slice, and with
/// `dual_stack` an IPv6 clusterIP and slice (`{name}-6`) too.
fn objects(i: u32, endpoints: u32, dual_stack: bool) -> Vec<(Kind, serde_json::Value)> {
    let name = format!("svc-{i}");
    let mut svc = service(&name, &vip(i).to_string(), 80, 8080);
    let addrs: Vec<String> = (0..endpoints).map(|e| pod(i, e).to_string()).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut out = vec![(Kind::Slice, slice(&format!("{name}-1"), &name, pod_port(i), &refs))];
    if dual_stack {
        svc["spec"]["clusterIPs"] = serde_json::json!([vip(i).to_string(), vip6(i).to_string()]);
        svc["spec"]["ipFamilies"] = serde_json::json!(["IPv4", "IPv6"]);
        svc["spec"]["ipFamilyPolicy"] = serde_json::json!("RequireDualStack");
        let eps: Vec<Ipv6Addr> = (0..endpoints).map(|e| pod6(i, e)).collect();
        out.push((Kind::Slice, slice6(&name, i, &eps)));
    }
    out.insert(0, (Kind::Service, svc));
    out.into_iter().map(|(k, o)| (k, as_in_a_cluster(k, o))).collect()
}

/// Service i's IPv6 EndpointSlice with `eps`.
fn slice6(name: &str, i: u32, eps: &[Ipv6Addr]) -> serde_json::Value {
    let addrs: Vec<String> = eps.iter().map(ToString::to_string).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut s = slice(&format!("{name}-6"), name, pod_port(i), &refs);
    s["addressType"] = serde_json::json!("IPv6");
    s
}

/// p50, p90, p99 and max of sorted durations, in ms (null when there are none).
fn quantiles(v: &[Duration]) -> serde_json::Value {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    match v.last() {
        None => serde_json::Value::Null,
        Some(max) => serde_json::json!({
            "p50": ms(percentile(v, 0.5)), "p90": ms(percentile(v, 0.9)), "p99": ms(percentile(v, 0.99)),
            "max": ms(*max), "count": v.len()}),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads BPF programs and makes a network namespace: run it as root");
    }
    reap_stale();
    xlb_tests::ensure_bpffs()?;
    let xlb = workspace_bin("xlb", "XLB_BIN")?;
    let prefix = unique_prefix();
    let work = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&work)?;
    let _work = DirGuard(work.clone());
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(&prefix);
    let _pins = DirGuard(pin_dir.clone());
    let ns = Netns::new(format!("{prefix}-bench"))?;

    // The API server's content.
    let t = Instant::now();
    let api = FakeApi::new();
    for i in 0..a.services {
        for (kind, obj) in objects(i, a.endpoints, a.dual_stack) {
            api.put(kind, obj);
        }
    }
    api.compact(); // a watch starts from the list's version, not from the build-up history
    eprintln!(
        "fake API server: {} Services, {} endpoints each, built in {:.1?}",
        a.services,
        a.endpoints,
        t.elapsed()
    );

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let std_listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0"))?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let _server = {
        let _g = rt.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        rt.spawn(serve(api.clone(), listener))
    };
    // The server runs on this runtime, driven by a thread of its own.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let driver = std::thread::spawn(move || {
        rt.block_on(async {
            let _ = stop_rx.await;
        })
    });

    let kubeconfig = work.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: bench, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\nusers: [{{name: bench, user: {{}}}}]\ncontexts: [{{name: bench, context: {{cluster: bench, user: bench}}}}]\ncurrent-context: bench\n"
        ),
    )?;
    let log = work.join("agent.log");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .arg(&xlb)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["agent", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--iface", "lo", "--xdp-mode", "generic", "--http-addr", "off"])
        // Never the machine's own cgroup: socket-level balancing is not what this measures.
        .args(["--cgroup", "off"])
        // Room for every frontend and slot, and every backend (and the changes' fresh ones): the
        // defaults where they suffice (100,000 Services x 5 endpoints), as a user runs it.
        .args(capacity_flag(
            "--max-service-entries",
            a.services * (a.endpoints + 1) + 1024,
            lb_common::DEFAULT_MAX_SERVICE_ENTRIES,
        ))
        .args(capacity_flag(
            "--max-backends",
            a.services * a.endpoints + a.changes + 1024,
            lb_common::DEFAULT_MAX_BACKENDS,
        ))
        .arg("--max-ipv6-entries")
        .arg(
            if a.dual_stack {
                (a.services * (a.endpoints + 1) + a.changes + 1024).next_power_of_two().max(65_536)
            } else {
                lb_common::DEFAULT_MAX_IPV6_ENTRIES
            }
            .to_string(),
        )
        .env("XLB_LOG", "info")
        .env_remove("XLB_BENCH_AGENT_LOG")
        .env_remove("XLB_PERF_AGENT");
    let started = Instant::now();
    let mut agent = Proc::spawn("xlb agent", &mut cmd, Some(&log))?;
    agent.wait_for_log(" ready pin_dir=", Duration::from_secs(300)).with_context(|| agent.log_text())?;
    let cold = started.elapsed();
    let text = agent.log_text();
    // With XLB_BENCH_AGENT_LOG=FILE: the agent's log up to ready, to see where the time went.
    if let Some(f) = std::env::var_os("XLB_BENCH_AGENT_LOG") {
        std::fs::write(&f, &text).with_context(|| format!("writing {}", PathBuf::from(&f).display()))?;
    }
    let first_sync = text.lines().find(|l| l.contains("synced")).unwrap_or("");
    let field = |name: &str| -> u64 {
        first_sync
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (sync_us, writes) = (field("elapsed_us"), field("writes"));
    // The kernel's load and verification of the programs (beside the list).
    let load_ms: u64 = text
        .lines()
        .find(|l| l.contains("programs loaded and verified"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("elapsed_ms=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rss_ready = status_kib(agent.pid(), "VmRSS:");

    // Endpoint changes: one slice at a time, a fresh address replacing the last endpoint.
    let maps = BpfMaps::open(&pin_dir)?;
    let last = a.services - 1;
    if !serves(&maps, last, pod(last, a.endpoints - 1), pod_port(last))
        || (a.dual_stack && !serves6(&maps, last, pod6(last, a.endpoints - 1), pod_port(last)))
    {
        bail!("the maps do not hold the last service after ready:\n{}", agent.log_text());
    }
    // With XLB_PERF_AGENT=FILE: a CPU profile of the agent during the changes, flat by symbol.
    let perf_file = std::env::var_os("XLB_PERF_AGENT").map(PathBuf::from);
    let perf = match &perf_file {
        Some(f) => Some(
            Command::new("perf")
                .args(["record", "-q", "-e", "cpu-clock", "-F", "10000", "-g", "-p"])
                .arg(agent.pid().to_string())
                .arg("-o")
                .arg(f.with_extension("data"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting perf")?,
        ),
        None => None,
    };
    if perf.is_some() {
        std::thread::sleep(Duration::from_millis(500)); // perf attaches
    }
    let mut lat = Vec::new();
    // From the watch event written to the agent's stream (the fake API server's own wake-up
    // and encoding left out) to the map.
    let mut from_wire = Vec::new();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for c in 0..a.changes {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let i = ((seed >> 33) % u64::from(a.services)) as u32;
        let name = format!("svc-{i}");
        let (obj, done): (serde_json::Value, Box<dyn Fn() -> bool>) = if a.dual_stack {
            let fresh = pod6(i, a.endpoints + c % 100);
            let mut eps: Vec<Ipv6Addr> = (0..a.endpoints - 1).map(|e| pod6(i, e)).collect();
            eps.push(fresh);
            let maps = &maps;
            (slice6(&name, i, &eps), Box::new(move || serves6(maps, i, fresh, pod_port(i))))
        } else {
            let fresh = pod(i, a.endpoints + c % 100);
            let mut addrs: Vec<String> = (0..a.endpoints - 1).map(|e| pod(i, e).to_string()).collect();
            addrs.push(fresh.to_string());
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let maps = &maps;
            (
                slice(&format!("{name}-1"), &name, pod_port(i), &refs),
                Box::new(move || serves(maps, i, fresh, pod_port(i))),
            )
        };
        let obj = as_in_a_cluster(Kind::Slice, obj);
        let t = Instant::now();
        let rv = api.put(Kind::Slice, obj);
        while !done() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("change to {name} not in the maps after 30 s:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let seen = Instant::now();
        lat.push(seen - t);
        if let Some(sent) = api.sent_at(rv) {
            from_wire.push(seen.saturating_duration_since(sent));
        }
        std::thread::sleep(Duration::from_millis(100)); // one change at a time
    }
    lat.sort();
    from_wire.sort();
    let wait = |what: &str, t: Instant, done: &dyn Fn() -> bool| -> anyhow::Result<Duration> {
        while !done() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{what} not in the maps after 30 s:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(t.elapsed())
    };
    // Services added, then deleted, one at a time (IPv4; their slices are there first, as the
    // EndpointSlice controller may write them before the agent sees the Service).
    let (mut added, mut deleted) = (Vec::new(), Vec::new());
    let extra = if a.dual_stack { 0 } else { a.service_changes.unwrap_or(a.changes) };
    for k in 0..extra {
        let j = a.services + k;
        let name = format!("svc-{j}");
        let objs = objects(j, a.endpoints, false);
        for (kind, o) in objs.iter().filter(|(k, _)| *k == Kind::Slice) {
            api.put(*kind, o.clone());
        }
        let svc = objs.into_iter().find(|(k, _)| *k == Kind::Service).map(|(_, o)| o).context("a Service")?;
        let t = Instant::now();
        api.put(Kind::Service, svc);
        added.push(wait(&format!("Service {name}"), t, &|| serves(&maps, j, pod(j, 0), pod_port(j)))?);
        std::thread::sleep(Duration::from_millis(20));
    }
    for k in 0..extra {
        let j = a.services + k;
        let gone = || {
            let key = Svc4Key {
                addr: vip(j).octets(),
                port: 80,
                proto: IPPROTO_TCP,
                scope: SCOPE_EXTERNAL,
                slot: 0,
                _pad: 0,
            };
            maps.services.get(&key, 0).is_err()
        };
        let t = Instant::now();
        api.delete(Kind::Service, &format!("default/svc-{j}"));
        deleted.push(wait(&format!("deletion of Service svc-{j}"), t, &gone)?);
        api.delete(Kind::Slice, &format!("default/svc-{j}-1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    added.sort();
    deleted.sort();
    // Sustained: an endpoint change every 10 ms (100 per second) for `sustained` seconds, each
    // timed to the map; the next one is published on its tick whatever the last one took.
    let mut steady = Vec::new();
    if a.sustained > 0 && !a.dual_stack {
        let start = Instant::now();
        let mut c = 0u32;
        while start.elapsed() < Duration::from_secs(u64::from(a.sustained)) {
            let i = c % a.services;
            let fresh = pod(i, a.endpoints + 100 + c % 100);
            let mut addrs: Vec<String> = (0..a.endpoints - 1).map(|e| pod(i, e).to_string()).collect();
            addrs.push(fresh.to_string());
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let obj = as_in_a_cluster(
                Kind::Slice,
                slice(&format!("svc-{i}-1"), &format!("svc-{i}"), pod_port(i), &refs),
            );
            let tick = start + Duration::from_millis(10 * u64::from(c));
            if let Some(d) = tick.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let t = Instant::now();
            api.put(Kind::Slice, obj);
            steady.push(wait(&format!("sustained change {c}"), t, &|| serves(&maps, i, fresh, pod_port(i)))?);
            c += 1;
        }
        steady.sort();
    }
    let rss = status_kib(agent.pid(), "VmRSS:");
    // A relist: every watch ends and its resume gets 410 Gone (history compacted), so the agent
    // lists everything again; nothing changed, so nothing may be written.
    let relist = {
        let before = agent.log_text().lines().count();
        let t = Instant::now();
        api.expire_watches();
        let synced_after = |text: &str| -> Option<(u64, u64)> {
            let lines: Vec<&str> = text.lines().skip(before).collect();
            // Services and EndpointSlices relisted (this node's pods, none here, come first),
            // and a sync after the last of them.
            let relisted = |kind: &str| {
                lines
                    .iter()
                    .rposition(|l| l.contains(" relisted ") && l.contains(&format!("resource=\"{kind}\"")))
            };
            let last_relist = relisted("services")?.max(relisted("endpointslices")?);
            lines[last_relist..].iter().any(|l| l.contains(" synced ")).then(|| {
                let field = |l: &str, f: &str| -> u64 {
                    l.split_whitespace().find_map(|w| w.strip_prefix(f)?.parse().ok()).unwrap_or(0)
                };
                let syncs = lines.iter().filter(|l| l.contains(" synced "));
                syncs.fold((0, 0), |(w, d), l| (w + field(l, "writes="), d + field(l, "deletes=")))
            })
        };
        loop {
            if let Some((writes, deletes)) = synced_after(&agent.log_text()) {
                let took = t.elapsed();
                // The agent gives the list's heap back after the sync it logged.
                std::thread::sleep(Duration::from_secs(1));
                break Some((took, writes, deletes, status_kib(agent.pid(), "VmRSS:")));
            }
            if t.elapsed() > Duration::from_secs(120) {
                eprintln!("no relist seen within 120 s");
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    if let (Some(mut p), Some(f)) = (perf, &perf_file) {
        // SAFETY: a signal to the perf process this benchmark started.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let _ = p.wait();
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "sym",
                "--percent-limit",
                "1",
                "-g",
                "none",
                "-i",
            ])
            .arg(f.with_extension("data"))
            .output()?;
        let text: String = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(30)
            .map(|l| format!("{}\n", l.trim_end()))
            .collect();
        std::fs::write(f, text)?;
        let _ = std::fs::remove_file(f.with_extension("data"));
    }
    // The agent's own time per sync after the first (model + diff + writes), from its log.
    let log_ms = |field: &str| {
        let mut v: Vec<f64> = agent
            .log_text()
            .lines()
            .filter(|l| l.contains(" synced "))
            .skip(1)
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(field))?.parse::<f64>().ok())
            .map(|us| us / 1e3)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (sync_ms, model_ms) = (log_ms("elapsed_us="), log_ms("model_us="));
    // Service ports that changed per sync, as logged.
    let changed_max = log_ms("changed_ports=").last().map_or(0.0, |v| v * 1e3);
    let hwm = status_kib(agent.pid(), "VmHWM:");
    // A burst: one new endpoint in each of the first `burst` Services' slices, all at once.
    let burst = if a.burst > 0 && !a.dual_stack {
        let n = a.burst.min(a.services);
        let t = Instant::now();
        let mut pending = Vec::with_capacity(n as usize);
        for i in 0..n {
            let name = format!("svc-{i}");
            let fresh = pod(i, a.endpoints + 100);
            let mut addrs: Vec<String> = (0..a.endpoints - 1).map(|e| pod(i, e).to_string()).collect();
            addrs.push(fresh.to_string());
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            api.put(
                Kind::Slice,
                as_in_a_cluster(Kind::Slice, slice(&format!("{name}-1"), &name, pod_port(i), &refs)),
            );
            pending.push((i, fresh));
        }
        let published = t.elapsed();
        while !pending.is_empty() {
            if t.elapsed() > Duration::from_secs(300) {
                bail!("{} of the burst's {n} changes not in the maps after 300 s", pending.len());
            }
            pending.retain(|&(i, fresh)| !serves(&maps, i, fresh, pod_port(i)));
            std::thread::sleep(Duration::from_millis(1));
        }
        Some((n, published, t.elapsed()))
    } else {
        None
    };
    let kernel = kernel_map_bytes(&pin_dir);
    agent.stop(Duration::from_secs(5));
    let _ = stop_tx.send(());
    let _ = driver.join();
    let _ = std::fs::remove_dir_all(&pin_dir); // detaches (the namespace goes next)

    let families = if a.dual_stack { 2 } else { 1 };
    println!(
        "xlb agent control plane: {} {}Services x {} endpoints ({} frontends, {} backends){}",
        a.services,
        if a.dual_stack { "dual-stack " } else { "" },
        a.endpoints,
        a.services * families,
        a.services * a.endpoints * families,
        if a.dual_stack { "; changes to the IPv6 slices" } else { "" }
    );
    println!(
        "  cold start to ready:        {:>10.1} ms  (load + list + model + {writes} map writes + attach)",
        cold.as_secs_f64() * 1e3
    );
    println!("  programs loaded, verified:  {load_ms:>8} ms  (beside the list)");
    println!("  first sync (model + maps):  {:>10.1} ms", sync_us as f64 / 1e3);
    println!(
        "  endpoint change -> map:     p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} changes (includes the agent's --batch-delay-ms, 0 by default)",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.9).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        lat.len()
    );
    if !from_wire.is_empty() {
        println!(
            "    from the event sent:      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (the fake API server's wake-up and encoding left out)",
            percentile(&from_wire, 0.5).as_secs_f64() * 1e3,
            percentile(&from_wire, 0.9).as_secs_f64() * 1e3,
            percentile(&from_wire, 0.99).as_secs_f64() * 1e3,
        );
    }
    if !sync_ms.is_empty() {
        println!(
            "  of which the agent's sync:  p50 {:.2} ms, max {:.2} ms over {} syncs",
            sync_ms[sync_ms.len() / 2],
            sync_ms[sync_ms.len() - 1],
            sync_ms.len()
        );
    }
    if !model_ms.is_empty() {
        println!(
            "    of which the model:        p50 {:.2} ms, at most {changed_max} service port(s) changed per sync (the rest is the reconciler's writes)",
            model_ms[model_ms.len() / 2]
        );
    }
    let line = |v: &[Duration]| {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {}",
            percentile(v, 0.5).as_secs_f64() * 1e3,
            percentile(v, 0.9).as_secs_f64() * 1e3,
            percentile(v, 0.99).as_secs_f64() * 1e3,
            v.last().unwrap().as_secs_f64() * 1e3,
            v.len()
        )
    };
    if !added.is_empty() {
        println!("  Service added -> map:       {}", line(&added));
        println!("  Service deleted -> map:     {}", line(&deleted));
    }
    if !steady.is_empty() {
        println!("  sustained 100 changes/s:    {} changes in {} s", line(&steady), a.sustained);
    }
    if let Some((took, writes, deletes, rss_after)) = relist {
        println!(
            "  relist (410 Gone), nothing changed: {writes} map writes, {deletes} deletes; listed and synced {:.0} ms after the watches ended; VmRSS {:.1} MiB after it",
            took.as_secs_f64() * 1e3,
            rss_after as f64 / 1024.0
        );
    }
    if let Some((n, published, all)) = burst {
        println!(
            "  burst of {n} changes:        all in the maps {:.1} ms after the first was published (publishing took {:.1} ms)",
            all.as_secs_f64() * 1e3,
            published.as_secs_f64() * 1e3
        );
    }
    println!(
        "  agent memory:               VmRSS {:.1} MiB at ready, {:.1} MiB after the changes, peak {:.1} MiB",
        rss_ready as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  kernel map memory:          {:.1} MiB (bytes_memlock of the pinned maps, as bpftool shows it)",
        kernel as f64 / (1024.0 * 1024.0)
    );
    if let Some(path) = &a.json {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let doc = serde_json::json!({
            "services": a.services, "endpoints": a.endpoints, "changes": lat.len(), "dual_stack": a.dual_stack,
            "date": run_date(), "commit": run_commit(),
            "cold_start_ms": ms(cold), "first_sync_ms": sync_us as f64 / 1e3, "load_ms": load_ms, "first_sync_writes": writes,
            "change_ms": {
                "p50": ms(percentile(&lat, 0.5)), "p90": ms(percentile(&lat, 0.9)),
                "p99": ms(percentile(&lat, 0.99)), "max": ms(*lat.last().unwrap()),
            },
            "change_from_sent_ms": quantiles(&from_wire),
            "sync_ms_p50": sync_ms.get(sync_ms.len() / 2), "model_ms_p50": model_ms.get(model_ms.len() / 2),
            "rss_ready_mib": rss_ready as f64 / 1024.0, "rss_mib": rss as f64 / 1024.0,
            "rss_peak_mib": hwm as f64 / 1024.0, "kernel_map_mib": kernel as f64 / (1024.0 * 1024.0),
            "service_add_ms": quantiles(&added), "service_delete_ms": quantiles(&deleted),
            "relist": relist.map(|(took, writes, deletes, rss_after)| serde_json::json!({
                "ms": took.as_secs_f64() * 1e3, "writes": writes, "deletes": deletes,
                "rss_after_mib": rss_after as f64 / 1024.0})),
            "sustained": (!steady.is_empty()).then(|| serde_json::json!({
                "seconds": a.sustained, "rate_per_s": 100, "change_ms": quantiles(&steady)})),
            "burst": burst.map(|(n, published, all)| serde_json::json!({
                "changes": n, "published_ms": ms(published), "all_in_maps_ms": ms(all)})),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Kernel memory of the maps pinned under `pin_dir` (their `bytes_memlock`, from bpftool).
fn kernel_map_bytes(pin_dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(pin_dir) else { return 0 };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let out =
                Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(e.path()).output().ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["bytes_memlock"].as_u64()
        })
        .sum()
}

/// `flag` with a capacity for `needed` entries, or nothing when the default holds them.
fn capacity_flag(flag: &str, needed: u32, default: u32) -> Vec<String> {
    if needed <= default {
        Vec::new()
    } else {
        vec![flag.to_string(), needed.next_power_of_two().to_string()]
    }
}

/// When the run was made, as `cargo xtask bench` records its own ("2026-12-07 10:20 UTC"): the
/// run's own date when that runs it (XLB_BENCH_DATE), else now.
fn run_date() -> String {
    if let Ok(d) = std::env::var("XLB_BENCH_DATE") {
        return d;
    }
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "?".to_string(), |s| s.trim().to_string())
}

/// The commit measured (of the checkout the benchmark runs in), as `cargo xtask bench` records it.
fn run_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "?".to_string(), |s| s.trim().to_string())
}
