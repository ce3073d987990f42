//! Endpoints that come and go under load (KEP-1669): a Service scaled 5 -> 1 -> 5 three times
//! while a client keeps opening TCP connections, holds connections open and streams UDP
//! datagrams. Scaling down marks four endpoints terminating (still serving), then removes
//! them, as the EndpointSlice controller does during a rollout.
//!
//! What must hold: no new connection fails; every held connection to an endpoint that stays
//! keeps working; a held connection whose endpoint was removed is reset at its next request
//! instead of hanging; the UDP stream's datagrams go to a live endpoint from the first one sent
//! after a removal took effect.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{
    collections::BTreeSet,
    net::{SocketAddrV4, UdpSocket},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb_tests::{HeldConn, SingleNode, epoch_ms, privileged, session_lines, tcp_request};

const PODS: [&str; 5] = ["pod-0", "pod-1", "pod-2", "pod-3", "pod-4"];

fn pod_ip(i: usize) -> String {
    format!("198.18.{}.2", 10 + i)
}

/// The Service and its slice: `ready` pods ready, `terminating` pods terminating but serving.
fn manifest(ready: &[usize], terminating: &[usize]) -> String {
    let mut eps = String::new();
    for &i in ready {
        eps += &format!("- {{addresses: [{}], conditions: {{ready: true, serving: true}}}}\n", pod_ip(i));
    }
    for &i in terminating {
        eps += &format!(
            "- {{addresses: [{}], conditions: {{ready: false, serving: true, terminating: true}}}}\n",
            pod_ip(i)
        );
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: churn, namespace: default}}\nspec:\n  clusterIP: 198.18.0.60\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: churn-1, namespace: default, labels: {{kubernetes.io/service-name: churn}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}"
    )
}

/// Waits until the datapath holds exactly `selectable` (new flows) and `all` backends for the
/// TCP frontend.
fn wait_applied(bed: &SingleNode, selectable: &[usize], all: usize) {
    let want: BTreeSet<String> = selectable.iter().map(|&i| pod_ip(i)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = bed.xlb_cli(&["services", "-o", "json"]).unwrap();
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let done = rows.as_array().unwrap().iter().filter(|r| r["name"] == "churn").all(|r| {
            let bes = r["backends"].as_array().unwrap();
            let sel: BTreeSet<String> = bes
                .iter()
                .filter(|b| b["selectable"] == true)
                .map(|b| b["address"].as_str().unwrap().to_string())
                .collect();
            sel == want && bes.len() == all
        });
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "the datapath never reached {want:?} ({all} in all):\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scaling_5_to_1_to_5_under_load_loses_nothing_that_should_live() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&PODS).expect("test bed");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[5353]).expect("servers");
    let all: Vec<usize> = (0..5).collect();
    bed.write_manifest("churn.yaml", &manifest(&all, &[])).unwrap();
    bed.start_agent().expect("agent");
    wait_applied(&bed, &all, 5);
    let (vip, dns): (SocketAddrV4, SocketAddrV4) =
        ("198.18.0.60:80".parse().unwrap(), "198.18.0.60:53".parse().unwrap());

    let stop = AtomicBool::new(false);
    // (time sent, pod that answered) of every datagram of the stream; errors as "".
    let udp_log: Mutex<Vec<(Instant, String)>> = Mutex::new(Vec::new());
    // Every new connection's result.
    let new_conns: Mutex<Vec<Result<String, String>>> = Mutex::new(Vec::new());
    // When each removal took effect in the datapath, and which pods were left.
    let mut removals: Vec<(Instant, BTreeSet<String>)> = Vec::new();
    let mut held_report = Vec::new();

    std::thread::scope(|s| {
        s.spawn(|| {
            bed.client.enter(|| {
                while !stop.load(Ordering::Relaxed) {
                    let r =
                        tcp_request(vip, Duration::from_secs(3)).map(|a| a.pod).map_err(|e| format!("{e:#}"));
                    new_conns.lock().unwrap().push(r);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        });
        s.spawn(|| {
            bed.client.enter(|| {
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    sock.send_to(b"stream\n", dns).unwrap();
                    let pod = match sock.recv_from(&mut buf) {
                        Ok((n, _)) => String::from_utf8_lossy(&buf[..n])
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string(),
                        Err(_) => String::new(),
                    };
                    udp_log.lock().unwrap().push((sent, pod));
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        });

        for cycle in 0..3 {
            // Connections held open across the scale-down, spread over the pods.
            let mut held: Vec<(HeldConn, String)> = bed.client.enter(|| {
                (0..15)
                    .map(|_| {
                        let mut c =
                            HeldConn::open(vip, Duration::from_secs(3)).expect("open a held connection");
                        let pod = c.request(Duration::from_secs(3)).expect("first request").pod;
                        (c, pod)
                    })
                    .collect()
            });
            std::thread::sleep(Duration::from_millis(200));
            // 5 -> 1: four pods terminating, still serving their connections.
            bed.write_manifest("churn.yaml", &manifest(&[0], &[1, 2, 3, 4])).unwrap();
            wait_applied(&bed, &[0], 5);
            for (c, pod) in held.iter_mut() {
                let a = c.request(Duration::from_secs(3));
                assert_eq!(
                    a.as_ref().map(|a| a.pod.as_str()).ok(),
                    Some(pod.as_str()),
                    "cycle {cycle}: a connection to terminating {pod} must keep working: {a:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(300));
            // The terminating pods go away.
            bed.write_manifest("churn.yaml", &manifest(&[0], &[])).unwrap();
            wait_applied(&bed, &[0], 1);
            removals.push((Instant::now(), BTreeSet::from(["pod-0".to_string()])));
            for (c, pod) in held.iter_mut() {
                let started = Instant::now();
                let a = c.request(Duration::from_secs(3));
                let took = started.elapsed();
                if pod == "pod-0" {
                    assert!(
                        a.as_ref().is_ok_and(|a| a.pod == "pod-0"),
                        "cycle {cycle}: a connection to pod-0, which stays, broke: {a:?}"
                    );
                } else {
                    // The flow's backend is gone: its next packet is balanced again, and pod-0,
                    // which knows no such connection, resets it.
                    assert!(a.is_err(), "cycle {cycle}: a connection to removed {pod} still answers: {a:?}");
                    assert!(
                        took < Duration::from_secs(1),
                        "cycle {cycle}: reset promptly, not after {took:?}"
                    );
                }
                held_report.push((cycle, pod.clone(), a.is_ok()));
            }
            std::thread::sleep(Duration::from_millis(300));
            // 1 -> 5.
            bed.write_manifest("churn.yaml", &manifest(&all, &[])).unwrap();
            wait_applied(&bed, &all, 5);
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
    });

    let new_conns = new_conns.into_inner().unwrap();
    let failed: Vec<&String> = new_conns.iter().filter_map(|r| r.as_ref().err()).collect();
    let pods: BTreeSet<&String> = new_conns.iter().filter_map(|r| r.as_ref().ok()).collect();
    eprintln!("{} new connections, {} failed, pods {pods:?}", new_conns.len(), failed.len());
    assert!(new_conns.len() >= 100, "only {} new connections", new_conns.len());
    assert!(failed.is_empty(), "new connections failed: {failed:?}\n{}", bed.logs());
    assert_eq!(pods.len(), 5, "new connections reached every pod");
    let kept = held_report.iter().filter(|r| r.1 == "pod-0").count();
    assert!(kept >= 1, "no held connection landed on pod-0 to show it survives: {held_report:?}");

    // UDP: every datagram after a removal took effect went to a pod still there.
    let udp = udp_log.into_inner().unwrap();
    let lost = udp.iter().filter(|(_, p)| p.is_empty()).count();
    eprintln!("{} datagrams, {lost} unanswered", udp.len());
    for (at, left) in &removals {
        let after: Vec<&(Instant, String)> =
            udp.iter().filter(|(t, _)| t > at && *t < *at + Duration::from_millis(300)).collect();
        assert!(!after.is_empty(), "no datagram right after a removal");
        for (_, pod) in after {
            assert!(left.contains(pod), "a datagram after the removal went to {pod:?}, not to {left:?}");
        }
    }
    assert_eq!(lost, 0, "every datagram was answered");
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["ct_stale_backend"]["packets"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["drop_stale_slot"]["packets"], 0, "{stats}");
}

/// (epoch ms, "ok POD" or "err ...") lines of an `xlb-testbed session` log.
#[test]
fn sockets_connected_to_a_removed_backend_are_terminated_and_reconnect_to_a_live_one() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    sockets_of_a_removed_backend_are_terminated(Vec::new());
}

/// The agent run with the capabilities deploy/'s DaemonSet gives it and no others (the bounding
/// set, which for root is what exec leaves): it loads and attaches everything, writes the node's
/// sysctl, and terminates sockets in other namespaces, which needs the most of them.
#[test]
fn the_agent_does_all_its_work_with_the_daemon_sets_capabilities_only() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let deploy = xlb_tests::deploy::Deploy::load(&xlb_tests::deploy::dir()).unwrap();
    let caps: Vec<String> =
        deploy.capabilities().unwrap().iter().map(|c| format!("+{}", c.to_lowercase())).collect();
    assert!(!caps.is_empty());
    let wrapper = vec![
        "setpriv".to_string(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--inh-caps=-all".to_string(),
        "--".to_string(),
    ];
    let Some(bed) = sockets_of_a_removed_backend_are_terminated(wrapper.clone()) else { return };
    let log = bed.agent.as_ref().unwrap().log_text();
    // Its effective set was the DaemonSet's, and nothing it does was refused.
    assert!(log.contains("reserved the SNAT source ports"), "{log}");
    assert!(!log.contains("CAP_") && !log.contains("ermission") && !log.contains("not permitted"), "{log}");

    // What an operator runs in the pod (kubectl exec gets the container's capabilities): the
    // CLI, `xlb trace`, and bpftool on the pinned maps.
    let in_pod = |cmd: &str, args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", bed.node.path().display()))
            .args(&wrapper)
            .arg(cmd)
            .args(args)
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{cmd} {}` with the pod's capabilities: {text}", args.join(" "));
        text
    };
    let xlb = bed.xlb.display().to_string();
    let pins = bed.pin_dir.display().to_string();
    let svc = in_pod(&xlb, &["--pin-dir", &pins, "services"]);
    assert!(svc.contains("198.18.0.60:80/TCP"), "{svc}");
    let trace =
        in_pod(&xlb, &["--pin-dir", &pins, "trace", "--from", "198.18.0.2:40000", "--to", "198.18.0.60:80"]);
    assert!(trace.contains("frontend") && trace.contains("backend(s) take new flows"), "{trace}");
    let dump = in_pod("bpftool", &["map", "dump", "pinned", &format!("{pins}/{}", lb_common::MAP_SERVICES)]);
    assert!(dump.contains("\"key\"") || dump.contains("key:"), "{dump}");
}

/// Returns the test bed, its agent still running (`None`: skipped).
fn sockets_of_a_removed_backend_are_terminated(agent_wrapper: Vec<String>) -> Option<SingleNode> {
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = SingleNode::new(&["pod-0", "pod-1"]).expect("test bed");
    bed.agent_wrapper = agent_wrapper;
    let cg = xlb_tests::socket_lb_cgroup(bed.cgroup.as_ref())?;
    bed.start_servers(&testbed, &[8080], &[5353]).expect("servers");
    bed.write_manifest("churn.yaml", &manifest(&[0, 1], &[])).unwrap();
    bed.start_agent().expect("agent");
    wait_applied(&bed, &[0, 1], 2);

    // A node process with a connected UDP socket and one with a TCP connection, both opened
    // through the ClusterIP (balanced at the socket: the node has no route to it).
    let mut sessions = Vec::new();
    for (udp, to) in [(true, "198.18.0.60:53"), (false, "198.18.0.60:80")] {
        let log = bed.work.join(format!("session-{udp}.log"));
        sessions.push(xlb_tests::spawn_session(&testbed, &bed.node, &cg, udp, to, &log).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions.iter().any(|s| session_lines(&s.log_text()).len() < 10) {
        assert!(Instant::now() < deadline, "sessions did not start:\n{}", bed.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Remove pod-0 when one session uses it, else pod-1; the sessions' pods, by their answers.
    let using = |s: &xlb_tests::Proc| session_lines(&s.log_text()).last().unwrap().1.clone();
    let (udp_pod, tcp_pod) = (using(&sessions[0]), using(&sessions[1]));
    let gone = if udp_pod == "ok pod-0" || tcp_pod == "ok pod-0" { 0 } else { 1 };
    let stays = 1 - gone;
    bed.write_manifest("churn.yaml", &manifest(&[stays], &[])).unwrap();
    wait_applied(&bed, &[stays], 1);
    let applied = epoch_ms();
    for s in &mut sessions {
        let status = s.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "{}: {status}\n{}", s.name, s.log_text());
    }
    for (s, was) in sessions.iter().zip([udp_pod, tcp_pod]) {
        let lines = session_lines(&s.log_text());
        let after: Vec<&(u128, String)> = lines.iter().filter(|(t, _)| *t > applied + 100).collect();
        assert!(after.len() >= 10, "{}: too few requests after the removal: {lines:?}", s.name);
        // From shortly after the removal on, only the pod that stays answers.
        assert!(
            after.iter().all(|(_, r)| *r == format!("ok pod-{stays}")),
            "{}: a request after the removal of pod-{gone} did not reach pod-{stays}: {after:?}",
            s.name
        );
        if was == format!("ok pod-{gone}") {
            // This session's socket was on the removed pod: it was terminated, and reconnected.
            let err = lines.iter().find(|(_, r)| r.starts_with("err"));
            assert!(err.is_some_and(|(t, _)| *t >= applied.saturating_sub(1000)), "{}: {lines:?}", s.name);
        }
    }
    assert!(
        bed.logs().contains("terminated sockets connected to removed backends"),
        "the agent says what it did:\n{}",
        bed.logs()
    );
    Some(bed)
}
