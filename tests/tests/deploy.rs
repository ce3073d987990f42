//! deploy/, checked offline: every manifest against the Kubernetes API schema (k8s-openapi's
//! types, with unknown fields rejected), the kustomization against the files, and the
//! invariants the agent depends on: read-only RBAC bound to the agent's service account, host
//! networking and PIDs, the mounts, the capabilities, probes on the port the agent serves, a
//! rolling update that keeps the old agent until the new one can start, and a ConfigMap whose
//! every key is a setting the agent reads, with values it accepts (`xlb agent --dry-run`).
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use xlb_tests::{
    Netns,
    deploy::{self, Deploy, Object},
    privileged, unique_prefix, workspace_bin,
};

fn load() -> Deploy {
    Deploy::load(&deploy::dir()).unwrap_or_else(|e| panic!("deploy/: {e:#}"))
}

/// A DNS-1123 label, as names of namespaces, service accounts and containers must be.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[test]
fn every_manifest_matches_the_kubernetes_schema_strictly() {
    let d = load();
    let kinds: BTreeSet<&str> = d
        .objects()
        .map(|o| match o {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
        })
        .collect();
    assert_eq!(kinds.len(), 6, "one of each kind: {kinds:?}");
    assert_eq!(d.objects().count(), 6, "and no more");

    // Names are valid, and every namespaced object is in deploy/'s namespace.
    let ns = d.namespace().unwrap().metadata.name.clone().unwrap();
    assert!(dns_label(&ns), "{ns}");
    for o in d.objects() {
        let (meta, namespaced) = match o {
            Object::Namespace(n) => (&n.metadata, false),
            Object::ClusterRole(r) => (&r.metadata, false),
            Object::ClusterRoleBinding(b) => (&b.metadata, false),
            Object::ServiceAccount(s) => (&s.metadata, true),
            Object::ConfigMap(c) => (&c.metadata, true),
            Object::DaemonSet(ds) => (&ds.metadata, true),
        };
        let name = meta.name.as_deref().unwrap_or_default();
        assert!(dns_label(name), "name {name:?}");
        if namespaced {
            assert_eq!(meta.namespace.as_deref(), Some(ns.as_str()), "{name} is in {ns}");
        } else {
            assert_eq!(meta.namespace, None, "{name} is cluster-scoped");
        }
    }
    // Environment variable names are C identifiers (the kubelet refuses others).
    for k in d.agent_env("node-1").unwrap().keys() {
        assert!(
            k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !k.as_bytes()[0].is_ascii_digit(),
            "{k}"
        );
    }
}

#[test]
fn the_strict_check_rejects_what_the_api_server_would() {
    let ds = std::fs::read_to_string(deploy::dir().join("daemonset.yaml")).unwrap();
    let doc = deploy::documents(&ds).unwrap().remove(0);
    assert!(deploy::object(&doc).is_ok());
    let bad = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut d = doc.clone();
        f(&mut d);
        match deploy::object(&d) {
            Ok(_) => panic!("accepted: {d}"),
            Err(e) => format!("{e:#}"),
        }
    };
    // A misspelt field, at the top of the pod spec and deep in a container.
    let e = bad(&|d| d["spec"]["template"]["spec"]["hostNetwrok"] = json!(true));
    assert!(e.contains(".spec.template.spec.hostNetwrok"), "{e}");
    let e = bad(&|d| {
        d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["ad"] =
            json!(["BPF"])
    });
    assert!(e.contains("capabilities.ad"), "{e}");
    // A wrong type, a missing required field, a kind of another apiVersion.
    assert!(bad(&|d| d["spec"]["template"]["spec"]["hostNetwork"] = json!("yes")).contains("schema"));
    assert!(
        bad(&|d| {
            d["spec"]["template"]["spec"]["containers"][0].as_object_mut().unwrap().remove("name");
        })
        .contains("required fields missing: .spec.template.spec.containers[0].name")
    );
    assert!(bad(&|d| d["apiVersion"] = json!("v1")).contains("unexpected apiVersion"));
}

#[test]
fn the_kustomization_lists_every_manifest_and_builds() {
    let dir = deploy::dir();
    let k = deploy::kustomization(&dir).unwrap();
    let d = load();
    let files: BTreeSet<&str> = d.files.iter().map(|(n, _)| n.as_str()).collect();
    let listed: BTreeSet<&str> = k.resources.iter().map(String::as_str).collect();
    assert_eq!(listed, files, "kustomization.yaml's resources are deploy/'s manifests");
    let image = d.agent().unwrap().image.clone().unwrap();
    let image_name = image.split(':').next().unwrap();
    assert!(k.images.iter().any(|i| i.name == image_name), "the kustomization sets the image {image_name}");

    // The build itself, with kubectl's kustomize where the machine has kubectl.
    match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) if out.status.success() => {
            let built = deploy::documents(&String::from_utf8_lossy(&out.stdout)).unwrap();
            assert_eq!(built.len(), d.objects().count(), "kustomize emits every object");
            for doc in &built {
                deploy::object(doc).unwrap_or_else(|e| panic!("kustomize's output: {e:#}"));
            }
        }
        Ok(out) => panic!("kubectl kustomize deploy/ failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(_) => {
            eprintln!("NOT CHECKED: kubectl is not installed, so `kubectl kustomize deploy/` was not run")
        }
    }
}

#[test]
fn rbac_reads_and_creates_events_only_and_is_bound_to_the_agents_service_account() {
    let d = load();
    let read_only: BTreeSet<&str> = ["get", "list", "watch"].into();
    for r in d.rules().unwrap() {
        // Reads only, but for creating events (about the objects it rejects).
        let events = r.api_groups.as_deref() == Some(&["events.k8s.io".to_string()][..])
            && r.resources.as_deref() == Some(&["events".to_string()][..]);
        if events {
            assert_eq!(r.verbs, ["create"], "events are only created: {r:?}");
        } else {
            assert!(r.verbs.iter().all(|v| read_only.contains(v.as_str())), "read-only verbs: {r:?}");
        }
        let all = r.api_groups.iter().flatten().chain(r.resources.iter().flatten()).chain(&r.verbs);
        assert!(all.into_iter().all(|s| !s.contains('*')), "no wildcards: {r:?}");
        assert!(r.non_resource_urls.is_none() && r.resource_names.is_none(), "{r:?}");
    }
    let role = d.cluster_role().unwrap().metadata.name.clone().unwrap();
    let b = d.binding().unwrap();
    assert_eq!((b.role_ref.kind.as_str(), b.role_ref.name.as_str()), ("ClusterRole", role.as_str()));
    let sa = d.service_account().unwrap();
    let pod = d.daemon_set().unwrap().spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name, "the agent runs as the bound account");
    let subjects = b.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(
        (subjects[0].kind.as_str(), Some(&subjects[0].name), subjects[0].namespace.as_ref()),
        ("ServiceAccount", sa.metadata.name.as_ref(), sa.metadata.namespace.as_ref())
    );
}

#[test]
fn the_daemon_set_has_what_the_agent_needs() {
    let d = load();
    let ds = d.daemon_set().unwrap();
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let c = d.agent().unwrap();
    let env = d.agent_env("node-1").unwrap();

    assert_eq!(
        spec.selector.match_labels,
        spec.template.metadata.as_ref().unwrap().labels,
        "selector = labels"
    );
    assert_eq!(c.command.as_deref(), Some(&["xlb".to_string()][..]));
    assert_eq!(c.args.as_deref().and_then(|a| a.first()).map(String::as_str), Some("agent"));

    // The node's network and processes; the node's name from the downward API.
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true), "socket termination finds the pods' namespaces through /proc");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field =
        node_name.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));

    // Every node, even tainted ones; critical priority.
    let tolerates_all = pod
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none());
    assert!(tolerates_all, "a toleration of every taint: {:?}", pod.tolerations);
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));

    // The rolling update: one node at a time, the old pod gone before the new one starts.
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(ru.max_surge, Some(IntOrString::Int(0)), "two agents on a node would share its pins and port");
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));

    // The mounts: the host's bpffs (where the pins are), its cgroup2, its /proc/sys/net writable.
    let mounts = d.host_mounts().unwrap();
    let host_of = |path: &str| deploy::host_path(&mounts, path);
    assert_eq!(host_of(&env["XLB_PIN_DIR"]).as_deref(), Some("/sys/fs/bpf/xlb"), "{mounts:?}");
    assert_eq!(host_of(&env["XLB_CGROUP"]).as_deref(), Some("/sys/fs/cgroup"), "{mounts:?}");
    assert_eq!(host_of(&format!("{}/net", env["XLB_PROC_SYS"])).as_deref(), Some("/proc/sys/net"));
    let proc_mount =
        c.volume_mounts.iter().flatten().find(|m| mounts[&m.mount_path] == "/proc/sys/net").unwrap();
    assert_ne!(proc_mount.read_only, Some(true), "the SNAT ports are reserved by writing a sysctl");

    // Exactly the capabilities the agent uses, every other dropped, not privileged.
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<String> = d.capabilities().unwrap().into_iter().collect();
    let want: BTreeSet<String> =
        ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"].iter().map(|s| s.to_string()).collect();
    assert_eq!(added, want);

    // Probes on the agent's own address: /healthz for liveness and startup, /readyz for
    // readiness. A hostNetwork pod's probe goes to the node's IP unless told otherwise.
    let http: std::net::SocketAddr = env["XLB_HTTP_ADDR"].parse().unwrap();
    assert!(http.ip().is_loopback() || http.ip().is_unspecified(), "{http}");
    for (probe, path) in
        [(&c.liveness_probe, "/healthz"), (&c.startup_probe, "/healthz"), (&c.readiness_probe, "/readyz")]
    {
        let get =
            probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("a probe of {path}"));
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(get.port, IntOrString::Int(i32::from(http.port())));
        assert_eq!(get.path.as_deref(), Some(path));
    }

    // Resource requests, so that the scheduler counts the agent.
    let req = c.resources.as_ref().and_then(|r| r.requests.clone()).unwrap_or_default();
    assert!(req.contains_key("cpu") && req.contains_key("memory"), "{req:?}");
}

/// A ConfigMap value the agent would refuse, or a key it does not read, shows at once.
#[test]
fn the_config_map_holds_settings_the_agent_takes() {
    if !privileged("the agent's dry run of deploy/'s settings runs in a network namespace") {
        return;
    }
    let d = load();
    let xlb = workspace_bin("xlb", "XLB_BIN").unwrap();
    // A node: one uplink with a default route, and a second interface without one.
    let ns = Netns::new(format!("{}-deploy", unique_prefix())).unwrap();
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "side0"]).unwrap();
    for i in ["up0", "side0"] {
        ns.ip(&["link", "set", i, "up"]).unwrap();
    }
    ns.ip(&["addr", "add", "198.18.77.1/24", "dev", "up0"]).unwrap();
    ns.ip(&["addr", "add", "198.18.78.1/24", "dev", "side0"]).unwrap();
    ns.ip(&["route", "add", "default", "via", "198.18.77.2"]).unwrap();

    // The environment the kubelet gives the container, with the container's paths turned into
    // this machine's (the mounts are hostPaths).
    let mounts = d.host_mounts().unwrap();
    let mut env = d.agent_env("node-1").unwrap();
    for v in env.values_mut() {
        if let Some(h) = v.starts_with('/').then(|| deploy::host_path(&mounts, v)).flatten() {
            *v = h;
        }
    }
    let cgroup2 = xlb_tests::cgroup2_root();
    if cgroup2.is_none() {
        eprintln!("NOT CHECKED: this machine has no cgroup v2 hierarchy, so XLB_CGROUP is tried as off");
        env.insert("XLB_CGROUP".into(), "off".into());
    }
    let c = d.agent().unwrap();
    let dry_run = |env: &std::collections::BTreeMap<String, String>| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .arg(&xlb)
            .args(c.args.iter().flatten())
            .arg("--dry-run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = dry_run(&env);
    assert!(ok, "the agent refuses deploy/'s settings:\n{err}");
    assert!(!err.contains("unknown setting"), "every ConfigMap key is a setting:\n{err}");
    let line =
        |k: &str| out.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).unwrap_or_default().to_owned();
    assert_eq!(line("interfaces"), "up0", "--iface auto is the interface with the default route:\n{out}");
    assert_eq!(line("node name"), "node-1");
    assert_eq!(line("xdp mode"), env["XLB_XDP_MODE"]);
    assert_eq!(line("http"), env["XLB_HTTP_ADDR"]);
    assert_eq!(line("pin dir"), "/sys/fs/bpf/xlb");
    assert_eq!(line("sysctls"), "/proc/sys");
    assert_eq!(line("node port range"), env["XLB_NODE_PORT_RANGE"]);
    if let Some(root) = cgroup2 {
        assert_eq!(line("socket-level balancing"), format!("cgroup {}", root.display()), "{out}");
    }

    // And the same check catches a misspelt key and a bad value.
    let mut typo = env.clone();
    typo.insert("XLB_NODE_PORT_RANG".into(), "30000-50000".into());
    let (ok, _, err) = dry_run(&typo);
    assert!(ok && err.contains("unknown setting") && err.contains("XLB_NODE_PORT_RANG"), "{err}");
    let mut bad = env.clone();
    bad.insert("XLB_NODE_PORT_RANGE".into(), "30000-".into());
    let (ok, _, err) = dry_run(&bad);
    assert!(!ok && err.contains("node-port-range"), "{err}");
    let mut no_route = env;
    no_route.insert("XLB_IFACE".into(), "auto".into());
    ns.ip(&["route", "del", "default"]).unwrap();
    let (ok, _, err) = dry_run(&no_route);
    assert!(!ok && err.contains("no interface has a default route"), "{err}");
}

/// The Dockerfile's instructions by stage: (base image, instructions), continuation lines
/// joined and comments dropped.
fn dockerfile_stages(text: &str) -> Vec<(String, Vec<String>)> {
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur.push_str(&format!("{} ", part.trim())),
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for l in logical.into_iter().filter(|l| !l.is_empty()) {
        if let Some(from) = l.strip_prefix("FROM ") {
            stages.push((from.to_owned(), Vec::new()));
        } else if let Some((_, instrs)) = stages.last_mut() {
            instrs.push(l);
        }
    }
    stages
}

/// The Dockerfile needs a registry for its base images, which these machines cannot reach (the
/// image they build, with podman, comes from `cargo xtask image`); this checks that what the
/// Dockerfile builds is what the tests run, and that the runtime image has what the binary and
/// the DaemonSet need.
#[test]
fn the_image_builds_the_tested_agent_and_carries_what_it_needs() {
    let root = deploy::dir().parent().unwrap().to_owned();
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let rust_version = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION")
        .trim()
        .to_owned();
    let stages = dockerfile_stages(&text);
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    let (build_base, build) = &stages[0];
    let (run_base, runtime) = &stages[1];
    let has = |instrs: &[String], s: &str| instrs.iter().any(|i| i.contains(s));

    // The build: the project's own set-up and a locked release build of the binary.
    assert!(
        build_base.contains("${RUST_VERSION}")
            && build_base.contains("bookworm")
            && build_base.ends_with(" AS build")
    );
    assert!(has(build, "cargo xtask setup --build-only"), "{build:?}");
    assert!(has(build, "cargo build --release --locked -p lb-userspace --bin xlb"), "{build:?}");
    assert!(has(build, "target/release/xlb /out/xlb"), "{build:?}");
    // With the toolchains the tests were built with.
    let rustc = Command::new("rustc").arg("--version").output().unwrap();
    let rustc = String::from_utf8_lossy(&rustc.stdout).into_owned();
    assert!(
        rustc.starts_with(&format!("rustc {rust_version} ")),
        "the Dockerfile's Rust {rust_version}, here {rustc}"
    );
    let nightly =
        build.iter().find_map(|i| i.strip_prefix("ENV XLB_NIGHTLY=")).expect("ENV XLB_NIGHTLY").trim();
    let sysroot = Command::new("rustc").args(["+nightly", "--print", "sysroot"]).output().unwrap();
    let manifest = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim())
        .join("lib/rustlib/multirust-channel-manifest.toml");
    match std::fs::read_to_string(&manifest) {
        Ok(m) => {
            let date =
                m.lines().find_map(|l| l.strip_prefix("date = ")).unwrap_or_default().trim_matches('"');
            assert_eq!(
                nightly,
                format!("nightly-{date}"),
                "the Dockerfile's nightly is the one the tests build with"
            );
        }
        Err(e) => eprintln!("NOT CHECKED: the nightly's date ({}: {e})", manifest.display()),
    }

    // The runtime: Debian 12 like the build stage (same glibc), bpftool for the maps, the binary
    // where the DaemonSet's command finds it.
    assert!(run_base.starts_with("docker.io/library/debian:bookworm-slim"), "{run_base}");
    assert!(has(runtime, "apt-get install -y --no-install-recommends bpftool"), "{runtime:?}");
    assert!(has(runtime, "COPY --from=build /out/xlb /usr/local/bin/xlb"), "{runtime:?}");
    let d = load();
    let command = d.agent().unwrap().command.clone().unwrap();
    assert!(["xlb", "/usr/local/bin/xlb"].contains(&command[0].as_str()), "{command:?} is on Debian's PATH");

    // The binary needs only shared libraries every Debian image has (libc6, libgcc-s1).
    let xlb = workspace_bin("xlb", "XLB_BIN").unwrap();
    let ldd = Command::new("ldd").arg(&xlb).output().unwrap();
    let libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split("=> ").nth(1)?.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(!libs.is_empty(), "ldd found no libraries: {}", String::from_utf8_lossy(&ldd.stderr));
    for lib in &libs {
        let real = std::fs::canonicalize(lib).unwrap();
        match Command::new("dpkg").arg("-S").arg(&real).output() {
            Ok(o) if o.status.success() => {
                let pkg = String::from_utf8_lossy(&o.stdout);
                let pkg = pkg.split(':').next().unwrap_or_default();
                assert!(
                    ["libc6", "libgcc-s1"].contains(&pkg),
                    "{lib} comes from {pkg}, which the runtime image lacks"
                );
            }
            _ => eprintln!("NOT CHECKED: which package has {lib} (no dpkg, or not from a package)"),
        }
    }
}
