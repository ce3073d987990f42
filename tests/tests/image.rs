//! The image, run as deploy/daemonset.yaml runs it.
//!
//! The image is built with the layout `cargo xtask image` builds (tests/src/image.rs), from the
//! tested `xlb` binary, and podman runs it on node-1 of the two-node bed with everything the
//! DaemonSet's pod spec says, read from the manifest (not restated here): the container's command
//! and args, the ConfigMap's environment and the container's own (NODE_NAME from spec.nodeName),
//! runAsUser, a read-only root filesystem (without the tmpfs podman would add), capabilities
//! dropped and added, the seccomp and AppArmor profiles, every hostPath mount, hostPID, and
//! hostNetwork as node-1's network namespace. What the kubelet adds is added as it would be: the
//! service account's token, CA and namespace at /var/run/secrets/kubernetes.io/serviceaccount,
//! and KUBERNETES_SERVICE_HOST/PORT (here the API server's own address, as the ConfigMap tells
//! an operator replacing kube-proxy to set). The agent thus finds its API server as in a
//! cluster: in-cluster configuration, over TLS, its token checked and its requests authorized
//! with deploy/'s ClusterRole.
//!
//! The host paths are node-1's: the hostPath /sys/fs/bpf is a directory of the bed's own on the
//! machine's bpffs, /sys/fs/cgroup the bed's cgroup for node-1 (never the machine's root cgroup),
//! /proc/sys/net the host's, whose files are those of the reader's network namespace (node-1's).
//! A hostPath this test does not know how to give the node fails it: a mount added to the
//! DaemonSet must be added here.
//!
//! Node-1 has two uplinks with a default route each (the client's network and the nodes' link),
//! so that the ConfigMap's `XLB_IFACE: auto` finds both. The Service's only pod is on node-2, so
//! the node port is SNATed to node-1.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::json;
use xlb_tests::{
    HeldConn, TwoNodes,
    deploy::{self, Deploy},
    fake_api::{FakeApi, Kind, node, serve_tls, slice, tls_acceptor},
    image, privileged,
    rbac::{Rbac, User},
    socket_lb_cgroup, tcp_request,
};

/// The API server: on the client's host, node-1's gateway (the control plane is off the node).
const API_HOST: &str = "198.18.100.2";
const API_PORT: u16 = 6443;
const TOKEN: &str = "xlb-image-test-token";
const CLUSTER_IP: &str = "198.18.0.60";
const NODE_PORT: u16 = 30080;
/// Node-1's address on the client's network.
const NODE1: &str = "198.18.100.1";

/// Skips (saying why) where podman is missing; under XLB_REQUIRE_PRIVILEGED=1 (`cargo xtask test`,
/// whose set-up installs podman) a missing podman fails.
fn podman_or_skip() -> bool {
    if image::podman_installed() {
        return true;
    }
    assert!(
        std::env::var("XLB_REQUIRE_PRIVILEGED").map_or(true, |v| v != "1"),
        "podman is not installed: `cargo xtask setup` installs it (with runc)"
    );
    eprintln!("SKIPPED: podman is not installed (`cargo xtask setup` installs it, with runc)");
    false
}

/// The image of this test, removed with it.
struct TestImage {
    tag: String,
    conf: PathBuf,
    size: u64,
}

impl TestImage {
    /// The image of the tested binary (its debug information left out, as a release build's
    /// image has none), with `cargo xtask image`'s layout.
    fn build(work: &Path, prefix: &str) -> anyhow::Result<Self> {
        let xlb = xlb_tests::workspace_bin("xlb", "XLB_BIN")?;
        let stripped = work.join("xlb");
        xlb_tests::run(
            "objcopy",
            &["--strip-debug", &xlb.display().to_string(), &stripped.display().to_string()],
        )?;
        let conf = image::containers_conf(&work.join("image"))?;
        reap_stale_podman(&conf);
        let tag = format!("localhost/{prefix}:test");
        let size = image::build(&work.join("image"), &stripped, &tag, &conf)?;
        Ok(Self { tag, conf, size })
    }

    fn podman(&self) -> Command {
        image::podman(&self.conf)
    }
}

/// Removes the containers and images of earlier runs of this test whose process is gone (a run
/// killed before its clean-up), as [`xlb_tests::reap_stale`] does for namespaces.
fn reap_stale_podman(conf: &Path) {
    let dead = |name: &str| {
        let pid =
            name.trim_start_matches("localhost/").strip_prefix("xlbt").and_then(|r| r.split('-').next());
        pid.and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
    };
    let list = |args: &[&str]| image::output(image::podman(conf).args(args)).unwrap_or_default();
    for name in list(&["ps", "-a", "--format", "{{.Names}}"]).lines().filter(|n| dead(n)) {
        let _ = image::podman(conf).args(["rm", "-f", "-t", "0", name]).output();
    }
    for name in list(&["images", "--format", "{{.Repository}}:{{.Tag}}"]).lines().filter(|n| dead(n)) {
        let _ = image::podman(conf).args(["rmi", "-f", name]).output();
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = self.podman().args(["rmi", "-f", &self.tag]).output();
    }
}

/// A container of this test, removed with it.
struct Container<'a> {
    name: String,
    image: &'a TestImage,
}

impl Container<'_> {
    fn logs(&self) -> String {
        let out = self.image.podman().args(["logs", &self.name]).output();
        out.map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// `podman exec` in the container (with its environment and capabilities).
    fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        image::output(self.image.podman().arg("exec").arg(&self.name).args(args))
    }

    fn state(&self) -> String {
        image::output(self.image.podman().args(["inspect", "--format", "{{.State.Status}}", &self.name]))
            .unwrap_or_default()
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- container {} ---\n{}", self.name, self.logs());
        }
        let _ = self.image.podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// Node-1's file for the DaemonSet's hostPath `host` (see the module's documentation).
fn node_path(bed: &TwoNodes, cgroup: &Path, host: &str) -> anyhow::Result<PathBuf> {
    match host {
        "/sys/fs/bpf" => {
            std::fs::create_dir_all(&bed.pin_dirs[0])?;
            Ok(bed.pin_dirs[0].clone())
        }
        "/sys/fs/cgroup" => Ok(cgroup.to_path_buf()),
        "/proc/sys/net" => Ok(PathBuf::from(host)),
        other => bail!("the DaemonSet mounts hostPath {other}, which this test does not give node-1: add it"),
    }
}

/// `podman run` arguments for the DaemonSet's agent on node-1, from deploy/'s manifests, with
/// `kubelet_env` (overridden by the pod's own, as the kubelet does) and the service account's
/// directory `sa`.
fn run_args(
    d: &Deploy,
    bed: &TwoNodes,
    cgroup: &Path,
    kubelet_env: &BTreeMap<String, String>,
    sa: &Path,
) -> anyhow::Result<Vec<String>> {
    let ds = d.daemon_set()?;
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).context("no pod spec")?;
    let c = d.agent()?;
    let mut a: Vec<String> = vec!["run".into(), "--detach".into(), "--pull".into(), "never".into()];
    let mut arg = |s: &str| a.push(s.to_owned());

    // The pod: the node's network and process namespaces.
    match pod.host_network {
        Some(true) => arg(&format!("--network=ns:{}", bed.nodes[0].path().display())),
        _ => bail!("the DaemonSet's pod is not on the host's network: the agent needs the node's"),
    }
    if pod.host_pid == Some(true) {
        arg("--pid=host");
    }
    if pod.host_ipc == Some(true) {
        arg("--ipc=host");
    }

    // The container's security context.
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        arg("--privileged");
    }
    if let Some(u) = sc.run_as_user {
        arg(&format!("--user={u}{}", sc.run_as_group.map(|g| format!(":{g}")).unwrap_or_default()));
    }
    if sc.read_only_root_filesystem == Some(true) {
        // Kubernetes adds no tmpfs on /tmp, /run or /var/tmp; podman would.
        arg("--read-only");
        arg("--read-only-tmpfs=false");
    }
    if sc.allow_privilege_escalation == Some(false) {
        arg("--security-opt=no-new-privileges");
    }
    if let Some(caps) = &sc.capabilities {
        for cap in caps.drop.iter().flatten() {
            arg(&format!("--cap-drop={cap}"));
        }
        for cap in caps.add.iter().flatten() {
            arg(&format!("--cap-add=CAP_{cap}"));
        }
    }
    match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("Unconfined") => arg("--security-opt=seccomp=unconfined"),
        None | Some("RuntimeDefault") => {}
        Some(other) => bail!("seccompProfile {other}: not translated by this test"),
    }
    match sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("Unconfined") => arg("--security-opt=apparmor=unconfined"),
        None | Some("RuntimeDefault") => {}
        Some(other) => bail!("appArmorProfile {other}: not translated by this test"),
    }
    if sc.run_as_non_root.is_some() || sc.se_linux_options.is_some() || sc.proc_mount.is_some() {
        bail!("the container's securityContext has fields this test does not translate: {sc:?}");
    }

    // Every hostPath mount, from node-1's files.
    let volumes = pod.volumes.clone().unwrap_or_default();
    for m in c.volume_mounts.iter().flatten() {
        let vol =
            volumes.iter().find(|v| v.name == m.name).with_context(|| format!("no volume {}", m.name))?;
        let hp = vol.host_path.as_ref().ok_or_else(|| anyhow!("volume {} is not a hostPath", m.name))?;
        if m.sub_path.is_some() || m.mount_propagation.is_some() {
            bail!("mount {}: subPath and mountPropagation are not translated by this test", m.mount_path);
        }
        let on_node = node_path(bed, cgroup, &hp.path)?;
        if hp.type_.as_deref() == Some("Directory") && !on_node.is_dir() {
            bail!("hostPath {} (type Directory) is not a directory on the node", hp.path);
        }
        let ro = if m.read_only == Some(true) { ":ro" } else { "" };
        arg(&format!("--volume={}:{}{ro}", on_node.display(), m.mount_path));
    }
    // The kubelet's service account volume (serviceAccountName, automounted).
    if pod.automount_service_account_token != Some(false) {
        arg(&format!("--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro", sa.display()));
    }

    // The environment: the kubelet's, then envFrom and env (which win).
    let mut env = kubelet_env.clone();
    env.extend(d.agent_env("node-1")?);
    for (k, v) in &env {
        arg(&format!("--env={k}={v}"));
    }

    // command replaces the image's entrypoint, args its CMD.
    if let Some(cmd) = &c.command {
        arg(&format!("--entrypoint={}", serde_json::to_string(cmd)?));
    }
    Ok(a)
}

/// The HTTP status of `GET path` on `addr` in node-1's namespace (`None`: no answer).
fn http_status(bed: &TwoNodes, addr: SocketAddr, path: &str) -> Option<u16> {
    bed.nodes[0].enter(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    })
}

/// The address and path of `p`, the agent container's probe `which` (`startupProbe` etc.), which must be
/// an httpGet on a numeric port.
fn probe(p: &Option<k8s_openapi::api::core::v1::Probe>, which: &str) -> (SocketAddr, String) {
    let get =
        p.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("no {which} httpGet probe"));
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p as u16,
        other => panic!("{which} probe port {other:?}: a number is expected"),
    };
    let host = get.host.clone().unwrap_or_else(|| NODE1.to_owned());
    (format!("{host}:{port}").parse().unwrap(), get.path.clone().unwrap_or_else(|| "/".into()))
}

/// Runs the agent container `name`; waits until its startup and readiness probes pass and
/// returns it with the time from `podman run` to ready.
fn start<'a>(
    image: &'a TestImage,
    name: &str,
    args: &[String],
    d: &Deploy,
    bed: &TwoNodes,
) -> (Container<'a>, Duration) {
    let c = d.agent().unwrap();
    let t0 = Instant::now();
    let out = image
        .podman()
        .args(args)
        .arg(format!("--name={name}"))
        .arg(&image.tag)
        .args(c.args.iter().flatten())
        .output()
        .unwrap();
    let container = Container { name: name.to_owned(), image };
    assert!(out.status.success(), "podman run: {}", String::from_utf8_lossy(&out.stderr));
    let (startup, startup_path) = probe(&c.startup_probe, "startup");
    let (ready, ready_path) = probe(&c.readiness_probe, "readiness");
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if http_status(bed, startup, &startup_path) == Some(200)
            && http_status(bed, ready, &ready_path) == Some(200)
        {
            break;
        }
        let state = container.state();
        assert!(state == "running" || state == "created", "the container is {state}:\n{}", container.logs());
        assert!(Instant::now() < deadline, "not ready within 60 s:\n{}", container.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t0.elapsed();
    let (live, live_path) = probe(&c.liveness_probe, "liveness");
    assert_eq!(http_status(bed, live, &live_path), Some(200), "liveness");
    (container, took)
}

/// A self-signed CA and the API server's certificate for `ip`, signed by it, in `dir`: (CA
/// certificate, server certificate, server key).
fn certificates(dir: &Path, ip: &str) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let p = |f: &str| dir.join(f).display().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=xlb-test-ca"];
    ca.extend(ec);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    xlb_tests::run("openssl", &ca)?;
    let (key, csr, crt, ext) = (p("server.key"), p("server.csr"), p("server.crt"), p("server.ext"));
    let mut req = vec!["req", "-subj", "/CN=kube-apiserver"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr]);
    xlb_tests::run("openssl", &req)?;
    std::fs::write(&ext, format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"))?;
    xlb_tests::run(
        "openssl",
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    )?;
    Ok((PathBuf::from(ca_crt), PathBuf::from(crt), PathBuf::from(key)))
}

/// The root namespace's reserved local ports (the agent writes node-1's; never these).
fn root_reserved_ports() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default()
}

/// A request from the client to `to`; the answer's pod and the peer the pod saw.
fn request(bed: &TwoNodes, to: &str) -> anyhow::Result<xlb_tests::Answer> {
    let to: SocketAddrV4 = to.parse()?;
    bed.client.enter(|| tcp_request(to, Duration::from_secs(2)))
}

#[test]
fn the_image_runs_as_the_daemon_set_says_serves_and_restarts_without_loss() {
    if !privileged("the image's end-to-end test needs root") || !podman_or_skip() {
        return;
    }
    let d = Deploy::load(&deploy::dir()).unwrap();
    // The tag `cargo xtask image` gives by default is the one the DaemonSet runs.
    assert_eq!(
        d.agent().unwrap().image.as_deref(),
        Some(format!("xlb:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "deploy/daemonset.yaml's image"
    );
    let root_ports = root_reserved_ports();
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = TwoNodes::with_pods(&[("pod-b", 1)], false).unwrap();
    let Some(cgroup) = socket_lb_cgroup(bed.cgroups[0].as_ref()) else { return };
    bed.start_servers(&testbed, &[8080], &[]).unwrap();
    // Node-1's two uplinks, each with a default route (see the module's documentation).
    let n1 = &bed.nodes[0];
    n1.ip(&["route", "add", "default", "via", API_HOST, "dev", "eth0", "metric", "100"]).unwrap();
    n1.ip(&["route", "add", "default", "via", "198.18.200.2", "dev", "eth1", "metric", "200"]).unwrap();

    // The API server, over TLS with a certificate for its address, enforcing deploy/'s RBAC.
    let tls = bed.work.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (ca, crt, key) = certificates(&tls, API_HOST).unwrap();
    let sa_account = d.service_account().unwrap();
    let sa_ns = sa_account.metadata.namespace.clone().unwrap();
    let sa = bed.work.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::copy(&ca, sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("token"), TOKEN).unwrap();
    std::fs::write(sa.join("namespace"), &sa_ns).unwrap();
    let api = FakeApi::new();
    api.put(
        Kind::Service,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "uid": "uid-web"},
            "spec": {"type": "NodePort", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                     "externalTrafficPolicy": "Cluster",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": NODE_PORT,
                                "protocol": "TCP"}]}}),
    );
    let mut web_slice = slice("web-1", "web", 8080, &["198.18.20.2"]);
    web_slice["endpoints"][0]["nodeName"] = json!("node-2");
    api.put(Kind::Slice, web_slice);
    api.put(Kind::Node, node("node-1", None));
    api.enforce(Rbac {
        tokens: [(
            TOKEN.to_owned(),
            User::service_account(&sa_ns, sa_account.metadata.name.as_deref().unwrap()),
        )]
        .into(),
        roles: vec![d.cluster_role().unwrap().clone()],
        bindings: vec![d.binding().unwrap().clone()],
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = bed.client.enter(|| std::net::TcpListener::bind((API_HOST, API_PORT))).unwrap();
    listener.set_nonblocking(true).unwrap();
    {
        let _guard = rt.enter();
        let acceptor = tls_acceptor(&crt, &key).unwrap();
        rt.spawn(serve_tls(api.clone(), tokio::net::TcpListener::from_std(listener).unwrap(), acceptor));
    }
    let kubelet_env: BTreeMap<String, String> = [
        ("KUBERNETES_SERVICE_HOST".to_owned(), API_HOST.to_owned()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), API_PORT.to_string()),
    ]
    .into();

    let t = Instant::now();
    let image = TestImage::build(&bed.work, &bed.prefix).unwrap();
    eprintln!(
        "image {}: {:.1} MB, built in {:.1} s",
        image.tag,
        image.size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let args = run_args(&d, &bed, &cgroup, &kubelet_env, &sa).unwrap();
    eprintln!("podman {}", args.join(" "));
    let (first, ready1) = start(&image, &format!("{}-agent-1", bed.prefix), &args, &d, &bed);
    eprintln!("first container: start to ready {:.2} s", ready1.as_secs_f64());
    let logs = first.logs();
    assert!(
        logs.contains(&format!("server=https://{API_HOST}:{API_PORT}")),
        "in-cluster configuration:\n{logs}"
    );

    // It serves: the ClusterIP, and the node port SNATed to node-1 for a pod on node-2.
    let deadline = Instant::now() + Duration::from_secs(10);
    let via_cluster_ip = loop {
        match request(&bed, &format!("{CLUSTER_IP}:80")) {
            Ok(a) => break a,
            Err(e) => assert!(Instant::now() < deadline, "ClusterIP: {e:#}\n{}", first.logs()),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(via_cluster_ip.pod, "pod-b");
    assert_eq!(via_cluster_ip.from.to_string(), format!("{CLUSTER_IP}:80"));
    let via_node_port = request(&bed, &format!("{NODE1}:{NODE_PORT}")).unwrap();
    assert_eq!(via_node_port.pod, "pod-b");
    // SNATed to the node address the client called (the pod never sees the client's).
    assert_eq!(via_node_port.peer.ip().to_string(), NODE1, "SNATed to node-1");
    assert_eq!(via_node_port.from.to_string(), format!("{NODE1}:{NODE_PORT}"));

    // What an operator runs in the pod: the CLI and bpftool on the pinned maps.
    let services = first.exec(&["xlb", "get", "services"]).unwrap();
    assert!(
        services.contains(&format!("{CLUSTER_IP}:80/TCP")) && services.contains(&NODE_PORT.to_string()),
        "{services}"
    );
    let env = d.agent_env("node-1").unwrap();
    let pins = env.get("XLB_PIN_DIR").expect("the DaemonSet sets XLB_PIN_DIR");
    let dump = first
        .exec(&[image::BPFTOOL_AT, "map", "dump", "pinned", &format!("{pins}/{}", lb_common::MAP_SERVICES)])
        .unwrap();
    assert!(dump.contains("\"key\"") || dump.contains("key:"), "{dump}");
    // The pins are node-1's (the hostPath), where they outlive the container.
    let on_node = bed.pin_dirs[0].join(pins.trim_start_matches("/sys/fs/bpf/")).join(lb_common::MAP_SERVICES);
    assert!(on_node.exists(), "{} is not on the node", on_node.display());

    // Established connections, through the ClusterIP and the node port.
    let mut held: Vec<HeldConn> = [format!("{CLUSTER_IP}:80"), format!("{NODE1}:{NODE_PORT}")]
        .iter()
        .map(|to| {
            let to: SocketAddrV4 = to.parse().unwrap();
            bed.client.enter(|| HeldConn::open(to, Duration::from_secs(2))).unwrap()
        })
        .collect();
    for h in &mut held {
        assert_eq!(h.request(Duration::from_secs(2)).unwrap().pod, "pod-b");
    }

    // The agent is killed (SIGKILL, as an OOM kill or a node-pressure eviction would): the
    // datapath stays in the kernel; established connections and new ones go on.
    image::output(image.podman().args(["kill", "--signal", "KILL", &first.name])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.state() == "running" {
        assert!(Instant::now() < deadline, "the container did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    for h in &mut held {
        assert_eq!(h.request(Duration::from_secs(2)).unwrap().pod, "pod-b", "with the agent down");
    }
    assert_eq!(request(&bed, &format!("{CLUSTER_IP}:80")).unwrap().pod, "pod-b", "a new flow, agent down");
    drop(first);

    // A new container takes over the pins and the node: the connections survive, and it
    // applies changes.
    let (second, ready2) = start(&image, &format!("{}-agent-2", bed.prefix), &args, &d, &bed);
    eprintln!("second container: start to ready {:.2} s", ready2.as_secs_f64());
    for h in &mut held {
        assert_eq!(h.request(Duration::from_secs(2)).unwrap().pod, "pod-b", "after the restart");
    }
    api.put(Kind::Service, xlb_tests::fake_api::service("web2", "198.18.0.61", 80, 8080));
    let mut s2 = slice("web2-1", "web2", 8080, &["198.18.20.2"]);
    s2["endpoints"][0]["nodeName"] = json!("node-2");
    api.put(Kind::Slice, s2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(&bed, "198.18.0.61:80").is_err() {
        assert!(
            Instant::now() < deadline,
            "the new container did not apply a new Service:\n{}",
            second.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = second.logs();
    assert!(!logs.contains("ermission") && !logs.contains("not permitted"), "{logs}");
    assert_eq!(root_reserved_ports(), root_ports, "the machine's own sysctl was left alone");
    println!(
        "image {:.1} MB; start to ready {:.2} s (first container), {:.2} s (second, taking over the pins)",
        image.size as f64 / 1e6,
        ready1.as_secs_f64(),
        ready2.as_secs_f64()
    );
    drop(held);
    drop(second);
    drop(rt);
}
