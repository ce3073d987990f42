//! Map writes taken together: consecutive updates of one map go to the kernel in one
//! `BPF_MAP_UPDATE_BATCH` call per few thousand entries instead of one `BPF_MAP_UPDATE_ELEM`
//! each (a first sync at 100,000 Services is over a million writes; the syscall, not the
//! update, was most of their cost).
//!
//! Order is kept whole: only a run of updates of the same map is gathered, any other operation
//! (another map, a delete, a read) sends the run first, and a batch is applied by the kernel in
//! its order, as the single updates would have been. A run is sent once it fills a batch
//! ([`CHUNK`]), and at the latest when the reconciler flushes at the end of an apply. A kernel
//! without batch operations (before 5.6) gets the single updates.
//!
//! A run that fills a batch is sent by a thread of its own ([`Writer`]) while the reconciler goes
//! on making the next: a first sync's kernel work (a million updates) is done beside its own,
//! not after it. The thread writes the runs in the order they came and none after one that
//! failed; the caller waits for it before any other operation and at the end of an apply, so
//! the order of all writes stays the one the reconciler made. A run that does not fill a batch
//! (a change of a few entries) never goes to the thread: a lone change has no hand-over to wait
//! for.
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use aya::maps::MapError;
use lb_common::{MAP_BACKEND_FLOWS, MAP_BACKENDS, MAP_BACKENDS6, MAP_SERVICES, MAP_SERVICES6, MAP_SVC_INFO};

use super::DatapathError;

/// Entries per batch call: large enough that the call's cost vanishes, small enough that the
/// kernel's copy of keys and values stays small.
pub const CHUNK: usize = 4096;

/// `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether the kernel takes batch updates: 0 not tried yet, 1 yes, 2 no.
static BATCH_WORKS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Updates `keys[i]` to `values[i]` in `map`, in order, up to the first that fails.
fn update_all<K: Copy, V: Copy>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<(), std::io::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    debug_assert_eq!(keys.len(), values.len());
    let fd = map.as_raw_fd();
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(CHUNK);
        if BATCH_WORKS.load(Relaxed) != 2 {
            let mut attr = BatchAttr {
                keys: keys[done..].as_ptr() as u64,
                values: values[done..].as_ptr() as u64,
                count: n as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            // SAFETY: `attr` names `n` keys and values that live through the call; the kernel
            // reads them and writes `count` back into `attr`.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_UPDATE_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            if r == 0 {
                BATCH_WORKS.store(1, Relaxed);
                done += n;
                continue;
            }
            let e = std::io::Error::last_os_error();
            // EINVAL, EOPNOTSUPP, or the kernel's ENOTSUPP (524): no batch updates for this map.
            let unsupported = matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | 524));
            if !(unsupported && BATCH_WORKS.load(Relaxed) == 0 && attr.count == 0) {
                return Err(e);
            }
            // No batch operations here: single updates from now on.
            BATCH_WORKS.store(2, Relaxed);
        }
        for i in done..done + n {
            let attr = elem_attr(fd, &keys[i], &values[i]);
            // SAFETY: one key and one value of the types the map was made for, read by the
            // kernel during the call (BPF_MAP_UPDATE_ELEM, 2).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    2 as libc::c_long,
                    &attr as *const ElemAttr,
                    std::mem::size_of::<ElemAttr>(),
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        done += n;
    }
    Ok(())
}

/// The `BPF_MAP_UPDATE_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_attr<K, V>(fd: i32, k: &K, v: &V) -> ElemAttr {
    ElemAttr { map_fd: fd as u32, _pad: 0, key: k as *const K as u64, value: v as *const V as u64, flags: 0 }
}

/// A map error for a failed write of `name`.
fn write_error(name: &'static str, e: std::io::Error) -> DatapathError {
    DatapathError::Map {
        op: "update",
        name,
        source: MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error: e }),
    }
}

/// Updates waiting to be sent: the latest run, of one map.
#[derive(Default)]
pub enum Pending {
    #[default]
    None,
    Services(Vec<lb_common::Svc4Key>, Vec<lb_common::Svc4Value>),
    Backends(Vec<u32>, Vec<lb_common::Backend4>),
    Flows(Vec<u32>, Vec<u64>),
    Infos(Vec<u32>, Vec<lb_common::SvcInfo>),
    Services6(Vec<lb_common::Svc6Key>, Vec<lb_common::Svc4Value>),
    Backends6(Vec<u32>, Vec<lb_common::Backend6>),
}

/// A kind of run (a variant of [`Pending`]), by its key and value types.
pub trait Run<K, V> {
    /// The keys and values of the run waiting, when it is of this kind.
    fn of(&mut self) -> Option<(&mut Vec<K>, &mut Vec<V>)>;
    /// A new run of this kind.
    fn start(keys: Vec<K>, values: Vec<V>) -> Self;
}

macro_rules! runs {
    ($($variant:ident($k:ty, $v:ty)),* $(,)?) => {$(
        impl Run<$k, $v> for Pending {
            fn of(&mut self) -> Option<(&mut Vec<$k>, &mut Vec<$v>)> {
                match self {
                    Pending::$variant(k, v) => Some((k, v)),
                    _ => None,
                }
            }
            fn start(keys: Vec<$k>, values: Vec<$v>) -> Self {
                Pending::$variant(keys, values)
            }
        }
    )*};
}

runs!(
    Services(lb_common::Svc4Key, lb_common::Svc4Value),
    Backends(u32, lb_common::Backend4),
    Flows(u32, u64),
    Infos(u32, lb_common::SvcInfo),
    Services6(lb_common::Svc6Key, lb_common::Svc4Value),
    Backends6(u32, lb_common::Backend6),
);

/// The maps a run may be of.
pub struct Targets<'a> {
    pub services: BorrowedFd<'a>,
    pub backends: BorrowedFd<'a>,
    pub flows: BorrowedFd<'a>,
    pub infos: BorrowedFd<'a>,
    /// The IPv6 frontends and backends, when the datapath has them (runs of them are made
    /// only then).
    pub ipv6: Option<(BorrowedFd<'a>, BorrowedFd<'a>)>,
}

impl Pending {
    /// Whether this run fills a batch.
    pub fn is_full(&self) -> bool {
        let len = match self {
            Pending::None => 0,
            Pending::Services(k, _) => k.len(),
            Pending::Backends(k, _) => k.len(),
            Pending::Flows(k, _) => k.len(),
            Pending::Infos(k, _) => k.len(),
            Pending::Services6(k, _) => k.len(),
            Pending::Backends6(k, _) => k.len(),
        };
        len >= CHUNK
    }

    /// Sends the run to its map, in order, up to the first update that fails.
    pub fn write(&self, to: &Targets<'_>) -> Result<(), DatapathError> {
        match self {
            Pending::None => Ok(()),
            Pending::Services(k, v) => {
                update_all(to.services, k, v).map_err(|e| write_error(MAP_SERVICES, e))
            }
            Pending::Backends(k, v) => {
                update_all(to.backends, k, v).map_err(|e| write_error(MAP_BACKENDS, e))
            }
            Pending::Flows(k, v) => update_all(to.flows, k, v).map_err(|e| write_error(MAP_BACKEND_FLOWS, e)),
            Pending::Infos(k, v) => update_all(to.infos, k, v).map_err(|e| write_error(MAP_SVC_INFO, e)),
            Pending::Services6(k, v) => match to.ipv6 {
                Some((s, _)) => update_all(s, k, v).map_err(|e| write_error(MAP_SERVICES6, e)),
                None => Err(DatapathError::Unsupported("IPv6 maps")),
            },
            Pending::Backends6(k, v) => match to.ipv6 {
                Some((_, b)) => update_all(b, k, v).map_err(|e| write_error(MAP_BACKENDS6, e)),
                None => Err(DatapathError::Unsupported("IPv6 maps")),
            },
        }
    }
}

/// Full runs queued to the writing thread before the caller must wait for it: enough that
/// neither side waits for the other while both work, few enough that the runs in between stay
/// a few hundred KiB.
const QUEUED: usize = 4;

/// A thread that sends full runs to the kernel, in the order they are queued (see the module's
/// documentation).
pub struct Writer {
    jobs: Option<mpsc::SyncSender<Pending>>,
    done: mpsc::Receiver<Result<(), DatapathError>>,
    /// Set by the thread when a run fails: it writes no later run until [`Self::wait`] clears it.
    failed: Arc<AtomicBool>,
    /// Runs queued and not yet seen done.
    in_flight: usize,
    /// The first error seen since the last wait.
    error: Option<DatapathError>,
    thread: Option<std::thread::JoinHandle<()>>,
}

// SAFETY: a `Writer` is used through `&mut self` only (no method takes `&self`), so sharing a
// reference to it between threads gives access to nothing; its channel ends are `Send`.
unsafe impl Sync for Writer {}

impl Writer {
    /// Starts the thread, with its own descriptors of the maps (`[services, backends, flows,
    /// infos]`, and the IPv6 frontends and backends when the datapath has them).
    pub fn spawn(fds: [OwnedFd; 4], ipv6: Option<[OwnedFd; 2]>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::sync_channel::<Pending>(QUEUED);
        let (tx, done) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let stop = failed.clone();
        let thread = std::thread::Builder::new().name("xlb-write".into()).spawn(move || {
            let [services, backends, flows, infos] = &fds;
            let to = Targets {
                services: services.as_fd(),
                backends: backends.as_fd(),
                flows: flows.as_fd(),
                infos: infos.as_fd(),
                ipv6: ipv6.as_ref().map(|[s, b]| (s.as_fd(), b.as_fd())),
            };
            for run in rx {
                // After a failed run the later ones are dropped: they may depend on it.
                let r = if stop.load(Ordering::Acquire) { Ok(()) } else { run.write(&to) };
                if r.is_err() {
                    stop.store(true, Ordering::Release);
                }
                drop(run);
                if tx.send(r).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self { jobs: Some(jobs), done, failed, in_flight: 0, error: None, thread: Some(thread) })
    }

    /// Queues `run` after those queued before it; nothing is queued once one of them has failed
    /// (the error comes from the next [`Self::wait`]). Blocks while [`QUEUED`] runs wait.
    pub fn send(&mut self, run: Pending) {
        while let Ok(r) = self.done.try_recv() {
            self.seen(r);
        }
        if self.error.is_some() || self.failed.load(Ordering::Acquire) {
            return;
        }
        match self.jobs.as_ref().map(|j| j.send(run)) {
            Some(Ok(())) => self.in_flight += 1,
            _ => self.error = Some(gone()),
        }
    }

    /// Whether runs are queued and not yet seen done.
    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Waits until every queued run is written (or dropped after a failure); the first error
    /// since the last wait.
    pub fn wait(&mut self) -> Result<(), DatapathError> {
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(r) => self.seen(r),
                Err(_) => {
                    self.in_flight = 0;
                    self.error.get_or_insert_with(gone);
                }
            }
        }
        // Nothing is queued: the thread reads the flag again only for a run sent after this.
        self.failed.store(false, Ordering::Release);
        self.error.take().map_or(Ok(()), Err)
    }

    fn seen(&mut self, r: Result<(), DatapathError>) {
        self.in_flight -= 1;
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }
}

/// The writing thread ended (it panicked): what it was sent may not be in the maps.
fn gone() -> DatapathError {
    write_error(MAP_SERVICES, std::io::Error::other("the map-writing thread ended"))
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The thread ends when its queue closes.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
