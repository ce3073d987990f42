//! The datapath fuzzer (`lb_userspace::datapath::fuzz`): `cargo xtask fuzz [--frames N]
//! [--seed S] [--replay FILE]`. Prints what it ran and checked, and every failure; exits 1 when
//! a frame failed (the failing frames are in the file it names).
use std::path::PathBuf;

use lb_userspace::datapath::fuzz::{self, Options};

fn main() -> anyhow::Result<()> {
    let mut opts = Options {
        frames: 1_000_000,
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        replay: None,
        failures: PathBuf::from("fuzz-failures.txt"),
    };
    let mut record: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--frames" => opts.frames = val()?.parse()?,
            "--seed" => opts.seed = val()?.parse()?,
            "--replay" => opts.replay = Some(val()?.into()),
            "--failures" => opts.failures = val()?.into(),
            "--record" => record = Some(val()?.into()),
            other => anyhow::bail!(
                "unknown argument {other:?} (--frames N --seed S --replay FILE --failures FILE --record FILE)"
            ),
        }
    }
    let started = std::time::Instant::now();
    let r = fuzz::run(&opts)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "xlb datapath fuzzer, seed {}: {} frames, {} program runs, {} checks, {} translations, {} failures in {secs:.1} s ({:.0} runs/s)",
        opts.seed,
        r.frames,
        r.runs,
        r.checks,
        r.translated,
        r.failures.len(),
        r.runs as f64 / secs
    );
    for (verdict, n) in &r.verdicts {
        println!("  {verdict:<32} {n}");
    }
    for (program, n) in &r.not_run {
        println!("  {program:<32} {n} frames BPF_PROG_TEST_RUN would not run");
    }
    for f in r.failures.iter().take(20) {
        println!("FAIL {}: {}", f.program, f.reason);
    }
    if let Some(path) = record {
        std::fs::write(&path, summary(&opts, &r, secs))?;
        println!("summary written to {}", path.display());
    }
    if !r.failures.is_empty() {
        println!(
            "failing frames written to {} (--replay {0} runs them alone; --seed {} --frames {} runs the whole run again)",
            opts.failures.display(),
            opts.seed,
            opts.frames
        );
        std::process::exit(1);
    }
    Ok(())
}

/// The run as BENCHMARKS.md shows it (`cargo xtask bench-report` includes the file).
fn summary(opts: &Options, r: &fuzz::Report, secs: f64) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let commit = std::env::var("XLB_COMMIT").unwrap_or_else(|_| "unknown".into());
    let mut s = format!(
        "`cargo xtask fuzz --frames {} --seed {}` at commit {commit}, kernel {}: {} frames, {} program runs, {} invariant checks, {} translations, **{} failures**, in {secs:.0} s.\n\n| program | verdict | runs |\n|---|---|---:|\n",
        opts.frames,
        opts.seed,
        kernel.trim(),
        r.frames,
        r.runs,
        r.checks,
        r.translated,
        r.failures.len(),
    );
    for (k, n) in &r.verdicts {
        let (program, verdict) = k.split_once(' ').unwrap_or((k, ""));
        let verdict = if program == "xlb_tc_egress" && verdict == "0" { "ok" } else { verdict };
        s += &format!("| {program} | {verdict} | {n} |\n");
    }
    for (program, n) in &r.not_run {
        s += &format!("| {program} | not run (BPF_PROG_TEST_RUN refused the frame) | {n} |\n");
    }
    s
}
