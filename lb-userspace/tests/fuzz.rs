//! The datapath fuzzer's bounded run (`lb_userspace::datapath::fuzz`; `cargo xtask fuzz` runs
//! it longer): 200,000 frames, made from valid frames of every kind and mutated, through the XDP,
//! TC ingress and TC egress programs, every run checked against what the programs may do.
//!
//! Needs root (BPF_PROG_TEST_RUN). Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1.
use lb_userspace::datapath::fuzz::{self, Options};
use xlb_tests::privileged;

#[test]
fn the_datapath_keeps_its_invariants_on_200000_fuzzed_frames() {
    if !privileged("the fuzzer needs root (BPF_PROG_TEST_RUN)") {
        return;
    }
    // A seed of its own each run (printed), so that the suite covers new frames every time.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let failures = std::env::temp_dir().join(format!("xlb-fuzz-failures-{seed}.txt"));
    let opts = Options { frames: 200_000, seed, replay: None, failures: failures.clone() };
    let r = fuzz::run(&opts).expect("the fuzzer runs");
    eprintln!(
        "seed {seed}: {} frames, {} program runs, {} checks, {} translations, {} failures; {:?}",
        r.frames,
        r.runs,
        r.checks,
        r.translated,
        r.failures.len(),
        r.verdicts
    );
    assert_eq!(r.frames, 200_000);
    // Not vacuous: most frames reach a frontend or a flow, and every verdict is seen.
    assert!(r.translated > 50_000, "{} translations", r.translated);
    for v in
        ["xlb_xdp pass", "xlb_xdp drop", "xlb_xdp answer", "xlb_tc_ingress pass", "xlb_tc_ingress answer"]
    {
        assert!(r.verdicts.get(v).copied().unwrap_or(0) > 100, "{v}: {:?}", r.verdicts);
    }
    let shown: Vec<String> =
        r.failures.iter().take(10).map(|f| format!("{}: {}", f.program, f.reason)).collect();
    assert!(
        r.failures.is_empty(),
        "{} failures (frames in {}; run again with `cargo xtask fuzz -- --seed {seed} --frames 200000`):\n{}",
        r.failures.len(),
        failures.display(),
        shown.join("\n")
    );
}
