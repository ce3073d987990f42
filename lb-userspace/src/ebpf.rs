//! Loading the kernel program: the embedded object, map capacities, pins, and attachment.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode},
};
use lb_common::{MAP_BACKENDS, MAP_CT, MAP_SERVICES, MAP_STATS, MAP_SVC_INFO, PROG_XDP};

/// The object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-ebpf"));

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this xlb binary was built without its eBPF object (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error(
        "{dir} is not on a bpffs: mount one with `mount -t bpf bpf /sys/fs/bpf` (the DaemonSet mounts the host's)"
    )]
    NoBpffs { dir: PathBuf },
    #[error("cannot create pin directory {dir}: {source}")]
    PinDir { dir: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {PROG_XDP} is missing from the object or is not XDP")]
    NoProgram,
    #[error("loading program {PROG_XDP} into the kernel failed: {0}")]
    Verify(ProgramError),
    #[error("attaching XDP to interface {iface} failed: {source}")]
    Attach { iface: String, source: ProgramError },
}

/// Map capacities; defaults from lb-common.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub service_entries: u32,
    pub backends: u32,
    pub ct_entries: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            service_entries: lb_common::DEFAULT_MAX_SERVICE_ENTRIES,
            backends: lb_common::DEFAULT_MAX_BACKENDS,
            ct_entries: lb_common::DEFAULT_MAX_CT_ENTRIES,
        }
    }
}

/// True when `dir` lies on a bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into a zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Loads the object and its XDP program. With `pin_dir`, every map is pinned there, and maps
/// already pinned there (by an earlier agent) are reused with their content.
pub fn load(pin_dir: Option<&Path>, caps: Capacities) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(MAP_SERVICES, caps.service_entries)
        .map_max_entries(MAP_BACKENDS, caps.backends)
        .map_max_entries(MAP_CT, caps.ct_entries);
    let paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|source| LoadError::PinDir { dir: dir.to_owned(), source })?;
            if !is_bpffs(dir) {
                return Err(LoadError::NoBpffs { dir: dir.to_owned() });
            }
            [MAP_SERVICES, MAP_BACKENDS, MAP_CT, MAP_STATS, MAP_SVC_INFO]
                .into_iter()
                .map(|m| (m, dir.join(m)))
                .collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT)?;
    xdp(&mut ebpf)?.load().map_err(LoadError::Verify)?;
    Ok(ebpf)
}

/// The loaded XDP program.
pub fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    ebpf.program_mut(PROG_XDP).ok_or(LoadError::NoProgram)?.try_into().map_err(|_| LoadError::NoProgram)
}

/// Attaches the XDP program to `iface` (native mode where the driver supports it).
pub fn attach(ebpf: &mut Ebpf, iface: &str, mode: XdpMode) -> Result<(), LoadError> {
    xdp(ebpf)?
        .attach(iface, mode)
        .map(|_| ())
        .map_err(|source| LoadError::Attach { iface: iface.to_owned(), source })
}
