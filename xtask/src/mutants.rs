//! `cargo xtask mutants`: plausible bugs put into the kernel program one at a time, each run
//! against the packet tests (XDP, then the tc datapath's program if XDP's tables pass), the
//! trace tests and the fuzzer's bounded run. A mutant the tests fail on is killed; one they
//! pass is a bug they would let through. `--record` writes the table to docs/mutants.md.
//!
//! The list is written by hand (cargo-mutants' operators do not reach into `#![no_std]` BPF
//! code built by a build script); each entry is one line of a real bug class: a state not
//! refreshed, a flag lost, a check skipped, a checksum not updated, a length not validated.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

/// One mutation: in `file`, `find` (which must occur exactly once) becomes `replace`.
pub struct Mutant {
    pub file: &'static str,
    pub what: &'static str,
    pub find: &'static str,
    pub replace: &'static str,
}

pub const MUTANTS: &[Mutant] = &[
    Mutant {
        file: "lb-ebpf/src/ct.rs",
        what: "the conntrack touch never refreshes an entry's last-seen time",
        find: "        *e.last_seen() = now;",
        replace: "        let _ = now;",
    },
    Mutant {
        file: "lb-ebpf/src/lb.rs",
        what: "a ClientIP affinity entry is not refreshed when a new flow reuses it",
        find: "        unsafe { (*a).last_used = now };",
        replace: "        let _ = now;",
    },
    Mutant {
        file: "lb-ebpf/src/tc.rs",
        what: "TC egress loses BPF_F_MARK_MANGLED_0 for UDP (a zero checksum is rewritten)",
        find: "    let mangled = if pkt.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };",
        replace: "    let mangled = if pkt.proto == IPPROTO_UDP { 0 } else { 0 };",
    },
    Mutant {
        file: "lb-ebpf/src/lb6.rs",
        what: "an IPv6 SNATed UDP reply is not sent back to the client",
        find: "            if e.flags & CT_F_DNAT_BACK != 0 {\n                // A reply to a SNATed flow",
        replace: "            if e.flags & CT_F_DNAT_BACK != 0 && pkt.proto != IPPROTO_UDP {\n                // A reply to a SNATed flow",
    },
    Mutant {
        file: "lb-ebpf/src/nat.rs",
        what: "SCTP's CRC32c is not updated after a port translation",
        find: "    if old_ports == new_ports {\n        return crc;",
        replace: "    if old_ports == new_ports || true {\n        return crc;",
    },
    Mutant {
        file: "lb-ebpf/src/nat.rs",
        what: "the IPv4 header checksum is not updated after an XDP rewrite",
        find: "        store16(pkt.l3 + 10, csum::replace4(ip_check, old_addr, addr));",
        replace: "        let _ = ip_check;",
    },
    Mutant {
        file: "lb-ebpf/src/lb.rs",
        what: "loadBalancerSourceRanges are not enforced",
        find: "    if svc_flags & SVC_F_SOURCE_RANGES != 0 {",
        replace: "    if svc_flags & SVC_F_SOURCE_RANGES != 0 && svc_flags == 0 {",
    },
    Mutant {
        file: "lb-ebpf/src/lb.rs",
        what: "a Local traffic policy without a local endpoint answers instead of dropping",
        find: "        if svc_flags & SVC_F_NO_LOCAL_ENDPOINT == 0 && reject::answer",
        replace: "        if reject::answer",
    },
    Mutant {
        file: "lb-ebpf/src/reject.rs",
        what: "a reset to a SYN does not acknowledge it (IPv4)",
        find: "        (0u32, seq.wrapping_add(len), TCP_RST | TCP_ACK)\n    };\n    let (saddr, daddr, sport, dport)",
        replace: "        (0u32, seq.wrapping_add(len - len), TCP_RST | TCP_ACK)\n    };\n    let (saddr, daddr, sport, dport)",
    },
    Mutant {
        file: "lb-ebpf/src/reject.rs",
        what: "the ICMP answers' rate limit is not kept",
        find: "            (*b).credit_ns = credit;\n            return false;",
        replace: "            (*b).credit_ns = credit;\n            return true;",
    },
    Mutant {
        file: "lb-ebpf/src/lb.rs",
        what: "a first fragment's ports are not remembered (later fragments pass untranslated)",
        find: "        let _ = FRAG4.insert(frag_key(pkt.saddr, pkt.daddr, pkt.id, pkt.proto), ports, 0);",
        replace: "        let _ = ports;",
    },
    Mutant {
        file: "lb-ebpf/src/ct.rs",
        what: "UDP flows live as long as established TCP ones",
        find: "    } else if proto != IPPROTO_TCP {\n        udp",
        replace: "    } else if proto != IPPROTO_TCP {\n        est",
    },
    Mutant {
        file: "lb-ebpf/src/lb.rs",
        what: "Maglev hashes the frontend's address instead of the client's",
        find: "maglev_flow_hash(pkt.saddr.to_ne_bytes(), u16::from_be(pkt.sport), pkt.proto)",
        replace: "maglev_flow_hash(pkt.daddr.to_ne_bytes(), u16::from_be(pkt.sport), pkt.proto)",
    },
    Mutant {
        file: "lb-ebpf/src/parse.rs",
        what: "IPv4 options are ignored (the L4 header read at 20 bytes)",
        find: "    let ihl = usize::from(vihl & 0x0f) * 4;",
        replace: "    let ihl = usize::from(vihl & 0x0f) * 4 - usize::from(vihl & 0x0f) * 4 + 20;",
    },
    Mutant {
        file: "lb-ebpf/src/icmp.rs",
        what: "an ICMP error shorter than its quote is translated in its padding",
        find: "        || usize::from(tot_len) < q4 + 8 - l3\n",
        replace: "        || usize::from(tot_len) < 20\n",
    },
];

/// Restores a mutated file, whatever happens.
struct Restore(PathBuf, String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, &self.1);
    }
}

/// The tests a mutant is run against, with `hook` for the packet tables; `true` if they pass.
fn tests_pass(root: &Path, hook: &str) -> anyhow::Result<bool> {
    let mut cmd = crate::cargo();
    cmd.current_dir(root)
        .args(["test", "-q", "-p", "lb-userspace", "--test", "packet", "--test", "packet6"])
        .env("XLB_REQUIRE_PRIVILEGED", "1")
        .env("XLB_PACKET_HOOK", hook);
    if hook == "xdp" {
        cmd.args(["--test", "trace", "--test", "fuzz"]);
    }
    let out = cmd.output().context("running the tests")?;
    Ok(out.status.success())
}

/// Runs every mutant (or those whose text contains `only`); `record`: writes docs/mutants.md.
pub fn run(root: &Path, only: Option<&str>, record: bool) -> anyhow::Result<()> {
    let clean = Command::new("git").args(["diff", "--quiet", "--", "lb-ebpf"]).current_dir(root).status()?;
    if !clean.success() {
        bail!(
            "lb-ebpf has changes not committed: commit or stash them first (each mutant is undone by rewriting its file)"
        );
    }
    ensure!(
        tests_pass(root, "xdp")? && tests_pass(root, "tc")?,
        "the tests fail without any mutant: fix them first"
    );
    let mut rows = Vec::new();
    for m in MUTANTS.iter().filter(|m| only.is_none_or(|o| m.what.contains(o))) {
        let path = root.join(m.file);
        let text = std::fs::read_to_string(&path)?;
        ensure!(
            text.matches(m.find).count() == 1,
            "{}: the text of mutant '{}' is not there once",
            m.file,
            m.what
        );
        let _restore = Restore(path.clone(), text.clone());
        std::fs::write(&path, text.replacen(m.find, m.replace, 1))?;
        let started = Instant::now();
        let killed_by = if !tests_pass(root, "xdp")? {
            Some("XDP")
        } else if !tests_pass(root, "tc")? {
            Some("tc")
        } else {
            None
        };
        let secs = started.elapsed().as_secs();
        eprintln!(
            "xtask: {} - {} ({secs} s)",
            killed_by.map_or("SURVIVED".to_string(), |k| format!("killed ({k})")),
            m.what
        );
        rows.push((m, killed_by));
    }
    let killed = rows.iter().filter(|r| r.1.is_some()).count();
    println!("{killed} of {} mutants killed", rows.len());
    for (m, k) in &rows {
        println!("  {:<10} {} ({})", k.map_or("SURVIVED", |_| "killed"), m.what, m.file);
    }
    if record {
        let mut md = String::from(
            "# Mutation testing of the kernel program\n\nWritten by `cargo xtask mutants --record`: each line below is a bug put into the kernel program alone, then the packet tests (the XDP program, and the tc datapath's if those pass), the trace tests and the fuzzer's bounded run are run; the mutant is killed when they fail. The list is in `xtask/src/mutants.rs`.\n\n",
        );
        md += &format!(
            "**{killed} of {} killed.**\n\n| mutant | file | killed by |\n|---|---|---|\n",
            rows.len()
        );
        for (m, k) in &rows {
            md += &format!(
                "| {} | `{}` | {} |\n",
                m.what,
                m.file,
                k.map_or("**survived**", |k| if k == "XDP" { "the XDP tables" } else { "the tc tables" })
            );
        }
        std::fs::write(root.join("docs/mutants.md"), md)?;
        eprintln!("xtask: wrote docs/mutants.md");
    }
    Ok(())
}
