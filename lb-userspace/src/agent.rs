//! `xlb agent`: loads and attaches the datapath, then keeps its maps equal to the manifests.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use tracing::{error, info, warn};

use crate::{
    datapath::BpfMaps,
    ebpf::{self, Capacities},
    manifests,
    model::{self, ModelConfig},
    reconcile::Reconciler,
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub manifests: PathBuf,
    pub interfaces: Vec<String>,
    pub pin_dir: PathBuf,
    pub xdp_mode: XdpMode,
    pub capacities: Capacities,
    /// How often the manifest directory is checked for changes.
    pub poll: Duration,
}

/// (file, modification time, length) of every manifest: a change in any means re-read.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    manifests::manifest_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(&p).ok();
            let mtime = md.as_ref().and_then(|m| m.modified().ok());
            let len = md.map_or(0, |m| m.len());
            (p, mtime, len)
        })
        .collect()
}

/// One pass: read, model, reconcile. Errors in single objects are logged, not returned.
fn sync(dir: &Path, rec: &mut Reconciler<BpfMaps>, cfg: &ModelConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let objects = manifests::read_dir(dir)?;
    for e in &objects.errors {
        warn!(error = %e, "skipped manifest document");
    }
    let model = model::build(&objects.services, &objects.slices, cfg);
    for r in &model.rejected {
        warn!(object = %format!("{} {}/{}", r.kind, r.namespace, r.name), reason = %r.reason, "rejected object");
    }
    let stats = rec.apply(&model.ports).context("writing the datapath maps")?;
    info!(
        services = objects.services.len(),
        slices = objects.slices.len(),
        service_ports = model.ports.len(),
        rejected = model.rejected.len() + objects.errors.len(),
        writes = stats.writes,
        deletes = stats.deletes,
        elapsed_us = started.elapsed().as_micros() as u64,
        "synced"
    );
    Ok(())
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    if cfg.interfaces.is_empty() {
        anyhow::bail!("no interface given: pass --iface for each interface that carries Service traffic");
    }
    let mut ebpf = ebpf::load(Some(&cfg.pin_dir), cfg.capacities)?;
    let maps = BpfMaps::open(&cfg.pin_dir)?;
    let mut rec = Reconciler::new(maps).context("reading back the pinned maps")?;
    let model_cfg = ModelConfig::default();

    // Maps first, then attach: the program never runs against maps the agent has not filled.
    let mut seen = fingerprint(&cfg.manifests);
    if let Err(e) = sync(&cfg.manifests, &mut rec, &model_cfg) {
        error!(error = format!("{e:#}"), "initial sync failed; will retry");
    }
    for iface in &cfg.interfaces {
        ebpf::attach(&mut ebpf, iface, cfg.xdp_mode)?;
        info!(%iface, "attached XDP");
    }
    info!(pin_dir = %cfg.pin_dir.display(), manifests = %cfg.manifests.display(), "ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(cfg.poll);
    let mut failed = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        let now = fingerprint(&cfg.manifests);
        if now == seen && !failed {
            continue;
        }
        seen = now;
        failed = match sync(&cfg.manifests, &mut rec, &model_cfg) {
            Ok(()) => false,
            Err(e) => {
                error!(error = format!("{e:#}"), "sync failed; will retry");
                true
            }
        };
    }
    info!("stopping: maps stay pinned in {}; the XDP program is detached", cfg.pin_dir.display());
    Ok(())
}
