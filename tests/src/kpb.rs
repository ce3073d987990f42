//! `xlb-testbed kpb-plugin`: xlb behind the custom mode of ../shared/kube-proxy-baseline, the
//! harness that programs what kube-proxy's iptables and nftables modes program and measures them
//! in network namespaces. The harness calls
//!
//! - `kpb-plugin full NETNS CLUSTER_JSON`: program every service of the cluster into NETNS;
//! - `kpb-plugin update NETNS CLUSTER_JSON`: one service's endpoints changed;
//!
//! and times each call, then sends its traffic through NETNS. Here a call writes the cluster as
//! Service and EndpointSlice manifests (JSON, 100 services per file; an update rewrites only the
//! changed service's file), starts `xlb agent` in NETNS on that directory if none runs there yet
//! (XDP and TC on every interface of NETNS), tells it to read the directory at once (SIGHUP), and
//! returns when the agent's next successful sync, read from its /metrics, has written the maps.
//!
//! The agent keeps running after the call: the harness stops every process of its namespaces
//! when it removes them. Its pins live under `/sys/fs/bpf/xlb-kpb-<NETNS>`, which
//! `kpb-plugin cleanup NETNS` removes (with the agent's state directory) afterwards.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Where the agent of the namespace serves /metrics (inside the namespace).
const HTTP_ADDR: &str = "127.0.0.1:10249";
/// Services per manifest file.
const PER_FILE: usize = 100;
/// Longest wait for the agent (start, or one sync).
const WAIT: Duration = Duration::from_secs(900);

fn state_dir(netns: &str) -> PathBuf {
    PathBuf::from(std::env::var("XLB_KPB_STATE").unwrap_or_else(|_| "/run/xlb-kpb".into())).join(netns)
}

fn pin_dir(netns: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/xlb-kpb-{netns}"))
}

pub fn main(args: &[String]) -> anyhow::Result<()> {
    match args {
        [cmd, netns, cluster] if cmd == "full" || cmd == "update" => {
            check_name(netns)?;
            let text = std::fs::read_to_string(cluster).with_context(|| format!("reading {cluster}"))?;
            let cluster: Value = serde_json::from_str(&text).with_context(|| format!("parsing {cluster}"))?;
            program(netns, &cluster, cmd == "update")
        }
        [cmd, netns] if cmd == "cleanup" => {
            check_name(netns)?;
            cleanup(netns)
        }
        _ => bail!("usage: xlb-testbed kpb-plugin (full|update) NETNS CLUSTER_JSON | cleanup NETNS"),
    }
}

fn check_name(netns: &str) -> anyhow::Result<()> {
    if netns.is_empty() || !netns.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("namespace name {netns:?}: letters, digits, - and _ only");
    }
    Ok(())
}

/// The Service and its EndpointSlice(s) for one service of the harness's cluster.
fn objects(svc: &Value) -> anyhow::Result<Vec<Value>> {
    let s = |k: &str| svc[k].as_str().with_context(|| format!("service without {k}: {svc}"));
    let (namespace, name, port_name) = (s("namespace")?, s("name")?, s("port_name")?);
    // The harness writes "tcp"; the API has "TCP".
    let proto = s("protocol")?.to_ascii_uppercase();
    let port = svc["port"].as_u64().context("service without port")?;
    let node_port = svc["node_port"].as_u64().filter(|&p| p != 0);
    let endpoints = svc["endpoints"].as_array().context("service without endpoints")?;
    let target = endpoints.first().and_then(|e| e["port"].as_u64()).unwrap_or(port);
    let mut sport = json!({"name": port_name, "port": port, "protocol": proto, "targetPort": target});
    if let Some(np) = node_port {
        sport["nodePort"] = json!(np);
    }
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": if node_port.is_some() { "NodePort" } else { "ClusterIP" },
            "clusterIP": s("cluster_ip")?,
            "ports": [sport],
        },
    });
    let mut out = vec![service];
    // One slice per endpoint port (a slice has one port list).
    let mut by_port: std::collections::BTreeMap<u64, Vec<&str>> = Default::default();
    for e in endpoints {
        let ip = e["ip"].as_str().context("endpoint without ip")?;
        by_port.entry(e["port"].as_u64().context("endpoint without port")?).or_default().push(ip);
    }
    for (i, (p, ips)) in by_port.into_iter().enumerate() {
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-{i}"), "namespace": namespace,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": p, "protocol": proto}],
            "endpoints": ips.iter().map(|ip| json!({
                "addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(out)
}

fn file_name(chunk: usize) -> String {
    format!("svc-{chunk:05}.json")
}

/// Writes file `chunk` (services `chunk * PER_FILE ..`) whole, then renames it into place.
fn write_chunk(dir: &Path, chunk: usize, services: &[Value]) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for svc in services {
        items.extend(objects(svc)?);
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let tmp = dir.join(format!(".{}", file_name(chunk)));
    std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
    std::fs::rename(&tmp, dir.join(file_name(chunk)))?;
    Ok(())
}

fn program(netns: &str, cluster: &Value, update: bool) -> anyhow::Result<()> {
    let services = cluster["services"].as_array().context("cluster without services")?;
    let state = state_dir(netns);
    let dir = state.join("manifests");
    std::fs::create_dir_all(&dir)?;
    let agent = running_agent(&state);
    let before = match agent {
        Some(_) => syncs(netns)?.0,
        None => 0,
    };
    let chunks = services.len().div_ceil(PER_FILE);
    if update && agent.is_some() {
        let i = cluster["changed_index"].as_u64().context("update without changed_index")? as usize;
        let c = i / PER_FILE;
        write_chunk(&dir, c, &services[c * PER_FILE..((c + 1) * PER_FILE).min(services.len())])?;
    } else {
        for c in 0..chunks {
            write_chunk(&dir, c, &services[c * PER_FILE..((c + 1) * PER_FILE).min(services.len())])?;
        }
        // Files of a larger cluster programmed before.
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let idx =
                n.strip_prefix("svc-").and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok());
            if idx.is_some_and(|i: usize| i >= chunks) {
                std::fs::remove_file(&p)?;
            }
        }
    }
    match agent {
        Some(pid) => {
            // SAFETY: a signal to the agent this plugin started (its pid file, checked alive).
            if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
                bail!("cannot signal the agent (pid {pid}): {}", std::io::Error::last_os_error());
            }
            wait_sync(netns, &state, before)?;
        }
        None => start_agent(netns, &state, &dir)?,
    }
    // Every service programmed, none rejected: else the harness would time a failure.
    let m = get(netns, "/metrics")?;
    let gauge = |name: &str| {
        m.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or(u64::MAX)
    };
    let rejected = ["Service", "EndpointSlice", "Document"]
        .map(|k| gauge(&format!("xlb_rejected_objects{{kind=\"{k}\"}} ")))
        .iter()
        .sum::<u64>();
    let ports = gauge("xlb_service_ports ");
    if rejected != 0 || ports != services.len() as u64 {
        bail!(
            "xlb agent programmed {ports} of {} services ({rejected} objects rejected); its log:\n{}",
            services.len(),
            log_tail(&state)
        );
    }
    Ok(())
}

/// The pid of this namespace's agent if it still runs.
fn running_agent(state: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(state.join("agent.pid")).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains("agent").then_some(pid)
}

fn start_agent(netns: &str, state: &Path, dir: &Path) -> anyhow::Result<()> {
    let xlb = crate::workspace_bin("xlb", "XLB_BIN")?;
    let links = Command::new("ip").args(["-n", netns, "-o", "link", "show"]).output()?;
    if !links.status.success() {
        bail!("no namespace {netns}: {}", String::from_utf8_lossy(&links.stderr).trim());
    }
    // "2: kpb-n0@if3: <...>": every interface but loopback.
    let ifaces: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|n| !n.is_empty() && n != "lo")
        .collect();
    if ifaces.is_empty() {
        bail!("namespace {netns} has no interface but lo");
    }
    let log = std::fs::File::create(state.join("agent.log"))?;
    let mut cmd = Command::new("nsenter");
    // nsenter, not `ip netns exec`: the latter mounts a sysfs of its own, without the bpffs.
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .arg(&xlb)
        .arg("--pin-dir")
        .arg(pin_dir(netns))
        .args(["agent", "--manifests"])
        .arg(dir)
        .args(["--cgroup", "off", "--http-addr", HTTP_ADDR, "--batch-delay-ms", "0"])
        // Changes come with SIGHUP; the poll is only a fallback.
        .args(["--poll-ms", "60000", "--node-name", netns])
        .env("XLB_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for i in &ifaces {
        cmd.arg("--iface").arg(i);
    }
    // More agent options for the benchmark's runs (e.g. "--xdp-mode generic").
    if let Ok(extra) = std::env::var("XLB_KPB_AGENT_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    // Its own session: the harness's timeouts and signals to this plugin do not reach it.
    // SAFETY: setsid in the child before exec; async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting xlb agent")?;
    std::fs::write(state.join("agent.pid"), child.id().to_string())?;
    let deadline = Instant::now() + WAIT;
    loop {
        if get(netns, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{}", child.id())).exists() || Instant::now() > deadline {
            bail!("xlb agent did not become ready; its log:\n{}", log_tail(state));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn log_tail(state: &Path) -> String {
    let log = std::fs::read_to_string(state.join("agent.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits until the agent has finished a sync more than `before`; fails if one fails.
fn wait_sync(netns: &str, state: &Path, before: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, failed) = syncs(netns)?;
        if ok > before {
            return Ok(());
        }
        if failed > 0 {
            bail!("xlb agent: a sync failed; its log:\n{}", log_tail(state));
        }
        if Instant::now() > deadline {
            bail!("xlb agent: no sync within {WAIT:?}; its log:\n{}", log_tail(state));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// (successful, failed) syncs so far, from the agent's /metrics.
fn syncs(netns: &str) -> anyhow::Result<(u64, u64)> {
    let m = get(netns, "/metrics")?;
    let value = |label: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("xlb_syncs_total{{result=\"{label}\"}} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Ok((value("ok").context("no xlb_syncs_total in /metrics")?, value("error").unwrap_or(0)))
}

/// GET `path` from the agent, from a thread inside `netns`.
fn get(netns: &str, path: &str) -> anyhow::Result<String> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("no namespace {netns}"))?;
    let path = path.to_owned();
    std::thread::spawn(move || -> anyhow::Result<String> {
        // SAFETY: a namespace fd; setns changes only this thread's namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut s = TcpStream::connect(HTTP_ADDR)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

/// Stops the namespace's agent if it still runs, removes its pins and state.
fn cleanup(netns: &str) -> anyhow::Result<()> {
    let state = state_dir(netns);
    if let Some(pid) = running_agent(&state) {
        // SAFETY: the agent this plugin started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let pins = pin_dir(netns);
    if pins.exists() {
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
    }
    if state.exists() {
        std::fs::remove_dir_all(&state)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_harness_service_becomes_a_service_and_one_slice_per_endpoint_port() {
        let svc = json!({
            "namespace": "ns0", "name": "svc7", "port_name": "http", "protocol": "tcp",
            "cluster_ip": "198.18.128.8", "port": 80, "node_port": 30080,
            "endpoints": [
                {"ip": "198.19.0.1", "port": 8080},
                {"ip": "198.19.0.2", "port": 8080},
                {"ip": "198.19.0.3", "port": 9090},
            ],
        });
        let objs = objects(&svc).unwrap();
        assert_eq!(objs.len(), 3, "{objs:#?}");
        let s = &objs[0];
        assert_eq!((s["kind"].as_str(), s["spec"]["type"].as_str()), (Some("Service"), Some("NodePort")));
        assert_eq!(s["spec"]["clusterIP"], "198.18.128.8");
        let port = &s["spec"]["ports"][0];
        // The API's protocol names are upper case; the harness writes them in lower case.
        assert_eq!((port["protocol"].as_str(), port["port"].as_u64()), (Some("TCP"), Some(80)));
        assert_eq!((port["nodePort"].as_u64(), port["targetPort"].as_u64()), (Some(30080), Some(8080)));
        let slices: Vec<(u64, Vec<&str>)> = objs[1..]
            .iter()
            .map(|o| {
                assert_eq!(o["metadata"]["labels"]["kubernetes.io/service-name"], "svc7");
                assert_eq!(o["ports"][0]["name"], "http");
                let ips =
                    o["endpoints"].as_array().unwrap().iter().map(|e| e["addresses"][0].as_str().unwrap());
                (o["ports"][0]["port"].as_u64().unwrap(), ips.collect())
            })
            .collect();
        assert_eq!(slices, vec![(8080, vec!["198.19.0.1", "198.19.0.2"]), (9090, vec!["198.19.0.3"])]);
        // Without a node port: a ClusterIP Service.
        let mut plain = svc.clone();
        plain["node_port"] = Value::Null;
        let objs = objects(&plain).unwrap();
        assert_eq!(objs[0]["spec"]["type"], "ClusterIP");
        assert!(objs[0]["spec"]["ports"][0].get("nodePort").is_none());
    }

    #[test]
    fn namespace_names_are_checked_before_use_in_paths() {
        assert!(check_name("kpb-node").is_ok());
        for bad in ["", "../x", "a b", "kpb/node"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
