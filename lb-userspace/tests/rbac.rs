//! The agent's rights: deploy/'s ClusterRole, bound to its service account, grants every request
//! the agent makes, and nothing it does not make.
//!
//! Statically, the role's rules are checked against [`API_CALLS`], the agent's list of its
//! requests. Then the real `xlb agent` runs (in a network namespace of its own, datapath
//! attached) with a kubeconfig whose token is the service account's, against an API server
//! that authenticates the token and authorizes every request with deploy/'s ClusterRole and
//! ClusterRoleBinding as RBAC does: the agent must become ready, program a Service, its
//! endpoints and a hostPort, and write an event about an invalid Service; no request may be
//! refused, and the requests it made must be exactly [`API_CALLS`] (so that the list cannot
//! fall behind the code). Last, the same run with one grant taken away is refused and never
//! gets ready, which shows the check can fail; without the events grant it serves all the same.
//!
//! The end-to-end part needs root. Without it, it skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI).
use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_userspace::source::kube::API_CALLS;
use xlb_tests::{
    DirGuard, Netns, Proc,
    deploy::{self, Deploy},
    fake_api::{FakeApi, Kind, pod, serve, service, slice},
    privileged,
    rbac::{Attributes, Decision, Rbac, User, rule_allows},
    unique_prefix,
};

const TOKEN: &str = "xlb-service-account-token";

fn load() -> Deploy {
    Deploy::load(&deploy::dir()).unwrap_or_else(|e| panic!("deploy/: {e:#}"))
}

/// The attributes of a call of [`API_CALLS`]: reads are cluster-wide (the agent watches every
/// namespace), events are created in an object's namespace.
fn call(verb: &str, group: &str, resource: &str) -> Attributes {
    let base = if group.is_empty() { "/api/v1".to_string() } else { format!("/apis/{group}/v1") };
    match verb {
        "create" => Attributes::of("POST", &format!("{base}/namespaces/default/{resource}")),
        "watch" => Attributes::of("GET", &format!("{base}/{resource}?watch=true")),
        _ => Attributes::of("GET", &format!("{base}/{resource}")),
    }
}

/// The requests the API server refused, as `verb group/resource`.
fn denied(api: &FakeApi) -> BTreeSet<String> {
    api.audit()
        .iter()
        .filter(|(_, d, _)| matches!(d, Decision::Denied(_)))
        .map(|(a, _, _)| a.short())
        .collect()
}

fn expected() -> BTreeSet<String> {
    API_CALLS.iter().map(|(v, g, r)| format!("{v} {g}/{r}")).collect()
}

#[test]
fn the_cluster_role_grants_the_agents_calls_and_nothing_else() {
    let rules = load().rules().unwrap();
    for (v, g, r) in API_CALLS {
        let a = call(v, g, r);
        assert!(
            rules.iter().any(|rule| rule_allows(rule, &a)),
            "deploy/'s ClusterRole does not grant {}",
            a.short()
        );
    }
    // Every (verb, group, resource) a rule names is a call the agent makes.
    for rule in &rules {
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert!(
                        API_CALLS.contains(&(v.as_str(), g.as_str(), r.as_str())),
                        "granted but never used: {v} {g}/{r}"
                    );
                }
            }
        }
    }
}

/// RBAC as deploy/ sets it up, with `rules` for its ClusterRole, and the service account's token.
fn rbac(d: &Deploy, rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>) -> Rbac {
    let sa = d.service_account().unwrap();
    let user = User::service_account(
        sa.metadata.namespace.as_deref().unwrap(),
        sa.metadata.name.as_deref().unwrap(),
    );
    let mut role = d.cluster_role().unwrap().clone();
    role.rules = Some(rules);
    Rbac {
        tokens: [(TOKEN.to_owned(), user)].into(),
        roles: vec![role],
        bindings: vec![d.binding().unwrap().clone()],
    }
}

/// A node namespace with an uplink (default route) and an API server listening inside it.
struct Bed {
    agent: Option<Proc>,
    api: Arc<FakeApi>,
    /// Runs the API server; dropped with the bed.
    _rt: tokio::runtime::Runtime,
    kubeconfig: PathBuf,
    xlb: PathBuf,
    pins: DirGuard,
    work: DirGuard,
    ns: Netns,
}

impl Bed {
    fn new(rbac: Rbac) -> Self {
        let prefix = unique_prefix();
        let ns = Netns::new(format!("{prefix}-rbac")).unwrap();
        ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "side0"]).unwrap();
        for i in ["up0", "side0"] {
            ns.ip(&["link", "set", i, "up"]).unwrap();
        }
        ns.ip(&["addr", "add", "198.18.79.1/24", "dev", "up0"]).unwrap();
        ns.ip(&["route", "add", "default", "via", "198.18.79.2"]).unwrap();
        let work = DirGuard(std::env::temp_dir().join(format!("{prefix}-rbac")));
        std::fs::create_dir_all(&work.0).unwrap();
        xlb_tests::ensure_bpffs().unwrap();
        let pins = DirGuard(PathBuf::from(format!("/sys/fs/bpf/{prefix}-rbac")));

        let api = FakeApi::new();
        api.put(Kind::Service, service("web", "198.18.0.10", 80, 8080));
        api.put(Kind::Slice, slice("web-1", "web", 8080, &["198.18.1.1"]));
        api.put(Kind::Pod, pod("hp", "node-1", "198.18.1.2", 8080, 9090));
        api.put(Kind::Pod, pod("elsewhere", "node-2", "198.18.2.2", 8080, 9091));
        // An invalid Service: rejected, and reported with an event.
        api.put(
            Kind::Service,
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "broken", "namespace": "default", "uid": "uid-broken"},
                "spec": {"type": "ClusterIP", "clusterIP": "198.18.0.11", "clusterIPs": ["198.18.0.11"], "ports": []}}),
        );
        api.enforce(rbac);
        let rt = tokio::runtime::Runtime::new().unwrap();
        // The API server listens on the node namespace's loopback, where the agent runs.
        let listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        {
            let _guard = rt.enter();
            rt.spawn(serve(api.clone(), tokio::net::TcpListener::from_std(listener).unwrap()));
        }
        let kubeconfig = work.0.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\n\
                 users:\n- name: xlb\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: xlb\n  context: {{cluster: fake, user: xlb}}\n\
                 current-context: xlb\n"
            ),
        )
        .unwrap();
        let xlb = PathBuf::from(env!("CARGO_BIN_EXE_xlb"));
        Bed { agent: None, api, _rt: rt, kubeconfig, xlb, pins, work, ns }
    }

    fn start_agent(&mut self) -> &mut Proc {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .arg(&self.xlb)
            .arg("--pin-dir")
            .arg(&self.pins.0)
            .args(["agent", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(["--iface", "auto", "--cgroup", "off", "--xdp-mode", "generic"])
            .env("NODE_NAME", "node-1")
            .env("XLB_LOG", "info");
        let log = self.work.0.join("agent.log");
        self.agent = Some(Proc::spawn("xlb agent", &mut cmd, Some(&log)).unwrap());
        self.agent.as_mut().unwrap()
    }

    fn services(&self) -> String {
        let out = Command::new(&self.xlb)
            .arg("--pin-dir")
            .arg(&self.pins.0)
            .args(["services", "-o", "json"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            if std::thread::panicking() {
                eprintln!("agent log:\n{}", a.log_text());
            }
            a.stop(Duration::from_secs(5));
        }
    }
}

#[test]
fn the_agent_bound_to_deploys_cluster_role_has_every_right_it_uses() {
    if !privileged("the agent's end-to-end run against an RBAC-enforcing API server needs root") {
        return;
    }
    let d = load();
    let mut bed = Bed::new(rbac(&d, d.rules().unwrap()));
    bed.start_agent().wait_for_log(" ready pin_dir=", Duration::from_secs(30)).unwrap();
    // The Service with its endpoint, and the hostPort of this node's pod (not the other's).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = bed.services();
        if s.contains("198.18.0.10:80") && s.contains("198.18.1.1") && s.contains("198.18.79.1:9090") {
            assert!(!s.contains("9091"), "node-2's hostPort is not this node's: {s}");
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not program the API server's objects:\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The invalid Service's event, once (by this agent; another would have got 409).
    while bed.api.events_created().is_empty() {
        assert!(Instant::now() < deadline, "no event about the invalid Service");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the watches run for a while (bookmarks, more requests if any would come).
    std::thread::sleep(Duration::from_secs(1));
    let events = bed.api.events_created();
    assert_eq!(events.len(), 1, "{events:#?}");
    let ev = events.values().next().unwrap();
    assert_eq!(ev["regarding"]["uid"], "uid-broken", "{ev}");
    assert_eq!(ev["regarding"]["kind"], "Service", "{ev}");
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some("Rejected")), "{ev}");
    assert!(ev["note"].as_str().unwrap().contains("no ports"), "{ev}");
    assert_eq!(ev["reportingInstance"], "xlb-node-1", "{ev}");
    let audit = bed.api.audit();
    let refused: Vec<String> = audit
        .iter()
        .filter(|(_, d, _)| !matches!(d, Decision::Allowed(_)))
        .map(|(a, d, t)| format!("{} ({t}): {d:?}", a.short()))
        .collect();
    assert!(refused.is_empty(), "requests refused to the agent: {refused:#?}");
    let made: BTreeSet<String> = audit.iter().map(|(a, _, _)| a.short()).collect();
    assert_eq!(made, expected(), "the agent's requests are exactly API_CALLS");
    for (a, _, target) in &audit {
        if a.short().ends_with("/pods") {
            assert!(
                target.contains("fieldSelector=spec.nodeName%3Dnode-1"),
                "pods of this node only: {target}"
            );
        }
        if a.verb != "create" {
            assert_eq!(a.resource.as_ref().map(|r| r.namespace.as_str()), Some(""), "cluster-wide: {target}");
        }
    }
    eprintln!("requests seen: {}", audit.len());
}

#[test]
fn the_agent_without_one_grant_is_refused_and_not_ready() {
    if !privileged("the agent's end-to-end run against an RBAC-enforcing API server needs root") {
        return;
    }
    let d = load();
    // The role without pods.
    let mut rules = d.rules().unwrap();
    for r in &mut rules {
        r.resources.as_mut().unwrap().retain(|x| x != "pods");
    }
    let mut bed = Bed::new(rbac(&d, rules));
    let agent = bed.start_agent();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.log_text().contains("watch failed") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.log_text();
    assert!(log.contains("pods") && log.contains("forbidden"), "the agent says what was refused:\n{log}");
    assert!(!log.contains(" ready pin_dir="), "ready without its pods:\n{log}");
    let denied = denied(&bed.api);
    assert_eq!(denied, ["list /pods".to_string()].into());
}

#[test]
fn the_agent_without_the_events_grant_still_serves_and_says_so() {
    if !privileged("the agent's end-to-end run against an RBAC-enforcing API server needs root") {
        return;
    }
    let d = load();
    let rules = d
        .rules()
        .unwrap()
        .into_iter()
        .filter(|r| !r.resources.iter().flatten().any(|x| x == "events"))
        .collect();
    let mut bed = Bed::new(rbac(&d, rules));
    bed.start_agent().wait_for_log(" ready pin_dir=", Duration::from_secs(30)).unwrap();
    let agent = bed.agent.as_mut().unwrap();
    agent.wait_for_log("cannot write an event", Duration::from_secs(15)).unwrap();
    let s = bed.services();
    assert!(
        s.contains("198.18.0.10:80") && s.contains("198.18.1.1"),
        "the datapath is programmed all the same: {s}"
    );
    let denied = denied(&bed.api);
    assert_eq!(denied, ["create events.k8s.io/events".to_string()].into());
}
