//! The datapath layer: the kernel maps behind a trait, so the reconciler and the CLI run the
//! same code against the real pinned maps ([`BpfMaps`]) and against memory ([`MemDatapath`]).
mod batch;
pub mod ebpf;
pub mod fuzz;
pub mod pinlock;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, HashOfMaps, IterableMap, Map, MapData, MapError, PerCpuArray,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use lb_common::{
    Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value, MAP_BACKEND_FLOWS, MAP_BACKENDS, MAP_BACKENDS6,
    MAP_CT, MAP_CT6, MAP_MAGLEV, MAP_SERVICES, MAP_SERVICES6, MAP_SOURCE_RANGES, MAP_SOURCE_RANGES6,
    MAP_STATS, MAP_SVC_INFO, STAT_COUNT, SrcRange4, SrcRange6, StatValue, Svc4Key, Svc4Value, Svc6Key,
    SvcInfo,
};

use crate::model::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "no pinned map at {path}: xlb agent has not run on this node with --pin-dir {dir} (or `xlb cleanup` removed it)",
        dir = path.parent().unwrap_or(path).display()
    )]
    NotPinned { path: PathBuf },
    #[error(
        "the maps under {dir} were pinned by {which} xlb: found {found}, this xlb reads {expected}. Run the xlb binary of the agent on this node (e.g. `kubectl exec` into its pod), or roll the agent out at this version, which takes the maps over",
        dir = dir.display()
    )]
    OtherVersion { dir: PathBuf, which: &'static str, found: String, expected: &'static str },
    #[error(
        "permission denied opening {path}: reading xlb's maps needs root (CAP_BPF, or CAP_SYS_ADMIN on kernels before 5.8) and access to the bpffs"
    )]
    Permission { path: PathBuf },
    #[error("opening the pinned map {path} failed: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error(
        "map {name} at {path} does not have the layout this xlb expects ({source}); it was pinned by another version of xlb"
    )]
    Layout { name: &'static str, path: PathBuf, source: MapError },
    #[error("{op} on map {name} failed: {source}")]
    Map { op: &'static str, name: &'static str, source: MapError },
    #[error("map {name} is full ({capacity} entries)")]
    Full { name: &'static str, capacity: u32 },
    #[error("injected fault: {0}")]
    Injected(String),
    #[error("this datapath has no {0}")]
    Unsupported(&'static str),
}

/// Capacities of the maps the reconciler allocates from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub service_entries: u32,
    pub backends: u32,
    /// Of each IPv6 map (frontends and slots; backends); 0: this datapath has none.
    pub ipv6_entries: u32,
}

/// Read and write access to the service, backend and service-info maps.
pub trait Datapath {
    fn capacity(&self) -> Capacity;
    fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError>;
    fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError>;
    fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError>;
    fn write_backend(&mut self, id: u32, value: Backend4) -> Result<(), DatapathError>;
    fn write_service(&mut self, key: Svc4Key, value: Svc4Value) -> Result<(), DatapathError>;
    fn delete_service(&mut self, key: Svc4Key) -> Result<(), DatapathError>;
    fn write_svc_info(&mut self, id: u32, info: SvcInfo) -> Result<(), DatapathError>;
    fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError>;
    /// Sends the writes a datapath may have held back to send them together; reads see them
    /// only after it. The reconciler calls it at the end of each apply.
    fn flush(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }
    /// Whether a write's error may be reported by a later call ([`Self::flush`]): the picture
    /// of the maps kept by the caller can then be ahead of them.
    fn defers_writes(&self) -> bool {
        false
    }
    /// Zeroes the new-flow count of a backend id (before the id names a new backend).
    fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError>;
    /// Every `loadBalancerSourceRanges` entry: (service port id, client prefix).
    fn read_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, DatapathError>;
    fn write_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError>;
    fn delete_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError>;
    /// The endpoint filter's words ([`lb_common::MAP_FILTER`]); empty: this datapath has none.
    fn read_filter(&self) -> Result<Vec<u64>, DatapathError> {
        Ok(Vec::new())
    }
    /// Writes words of the endpoint filter: (index, word).
    fn write_filter(&mut self, _words: &[(u32, u64)]) -> Result<(), DatapathError> {
        Ok(())
    }

    // What the CLI reads besides the above.
    /// New flows sent to backend `id`.
    fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError>;
    /// Every connection-tracking entry.
    fn read_ct(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, DatapathError>;
    /// The counters summed over CPUs: `(name, packets, bytes)` for every [`lb_common::Stat`].
    fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError>;

    // Maglev (used only when the reconciler builds tables).
    /// The keys of the Maglev tables present ([`lb_common::maglev_key`]).
    fn read_maglev_keys(&self) -> Result<Vec<u32>, DatapathError> {
        Ok(Vec::new())
    }
    /// Puts `table` (slots, one per entry) at `key`, replacing the table there at once.
    fn write_maglev(&mut self, _key: u32, _table: &[u16]) -> Result<(), DatapathError> {
        Err(DatapathError::Unsupported("Maglev tables"))
    }
    fn delete_maglev(&mut self, _key: u32) -> Result<(), DatapathError> {
        Err(DatapathError::Unsupported("Maglev tables"))
    }

    // IPv6 frontends and backends ([`lb_common::MAP_SERVICES6`], [`lb_common::MAP_BACKENDS6`]);
    // a datapath without them reads nothing and refuses writes.
    fn read_services6(&self) -> Result<Vec<(Svc6Key, Svc4Value)>, DatapathError> {
        Ok(Vec::new())
    }
    fn read_backend6(&self, _id: u32) -> Result<Backend6, DatapathError> {
        Ok(Backend6::default())
    }
    fn write_service6(&mut self, _key: Svc6Key, _value: Svc4Value) -> Result<(), DatapathError> {
        Err(DatapathError::Unsupported("IPv6 maps"))
    }
    fn delete_service6(&mut self, _key: Svc6Key) -> Result<(), DatapathError> {
        Err(DatapathError::Unsupported("IPv6 maps"))
    }
    fn write_backend6(&mut self, _id: u32, _value: Backend6) -> Result<(), DatapathError> {
        Err(DatapathError::Unsupported("IPv6 maps"))
    }
    /// Every IPv6 connection-tracking entry ([`lb_common::MAP_CT6`]).
    fn read_ct6(&self) -> Result<Vec<(Ct6Key, Ct6Value)>, DatapathError> {
        Ok(Vec::new())
    }
    /// New flows sent to IPv6 backend `id`.
    fn read_backend_flows6(&self, _id: u32) -> Result<u64, DatapathError> {
        Ok(0)
    }
    /// Starts IPv6 backend `id`'s count of new flows again.
    fn reset_backend_flows6(&mut self, _id: u32) -> Result<(), DatapathError> {
        Ok(())
    }
}

/// The IPv6 frontend and backend maps.
pub type Ipv6Maps = (HashMap<MapData, Svc6Key, Svc4Value>, Array<MapData, Backend6>);

/// The kernel maps, opened from their pins (CLI, agent) or taken from a freshly loaded object
/// (packet tests).
pub struct BpfMaps {
    pub services: HashMap<MapData, Svc4Key, Svc4Value>,
    pub backends: Array<MapData, Backend4>,
    pub ct: HashMap<MapData, Ct4Key, Ct4Value>,
    pub stats: PerCpuArray<MapData, StatValue>,
    pub svc_info: HashMap<MapData, u32, SvcInfo>,
    pub flows: Array<MapData, u64>,
    pub source_ranges: LpmTrie<MapData, SrcRange4, u8>,
    /// Taken or opened by [`Self::with_maglev`] (the agent, tests); the CLI does without.
    pub maglev: Option<HashOfMaps<MapData, u32, Array<MapData, u64>>>,
    /// The endpoint filter; `None` when opened from the pins of an agent that has none.
    pub filter: Option<Array<MapData, u64>>,
    /// The IPv6 maps; `None` when opened from the pins of an agent that has none.
    pub ipv6: Option<Ipv6Maps>,
    /// The IPv6 source ranges; `None` as for `ipv6`.
    pub source_ranges6: Option<LpmTrie<MapData, SrcRange6, u8>>,
    /// IPv6 connection tracking (read by the CLI); `None` as for `ipv6`.
    pub ct6: Option<HashMap<MapData, Ct6Key, Ct6Value>>,
    /// New flows per IPv6 backend; `None` as for `ipv6`.
    pub flows6: Option<Array<MapData, u64>>,
    capacity: Capacity,
    /// The filter's words, mapped at its first write and kept mapped: mapping the array again
    /// at each write costs more than the write (the kernel inserts every page of it).
    filter_area: Option<MappedWords>,
    /// Updates not sent yet (see [`batch`]): sent before any other operation and at
    /// [`Datapath::flush`].
    pending: batch::Pending,
    /// The thread that sends full runs, started at the first (see [`batch::Writer`]).
    writer: Option<batch::Writer>,
}

impl Drop for BpfMaps {
    /// Writes still held back go now (an error has no one left to hear it: the reconciler
    /// flushes at the end of every apply and reports it there).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Whether the filter array was made mappable (`BPF_F_MMAPABLE`; pins of an older agent's may
/// not be).
fn mmapable(f: &Array<MapData, u64>) -> bool {
    IterableMap::map(f).info().is_ok_and(|i| i.map_flags() & lb_common::FILTER_MAP_FLAGS != 0)
}

/// A shared mapping of a BPF array of u64 words (`BPF_F_MMAPABLE`), unmapped on drop.
struct MappedWords {
    ptr: *mut u64,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and written through `&mut self` only.
unsafe impl Send for MappedWords {}
// SAFETY: as above; `&self` gives no access to the words.
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps `elements` words of `map` (its `name`, for errors, as `op` failing on it).
    fn new(
        map: &MapData,
        elements: usize,
        op: &'static str,
        name: &'static str,
    ) -> Result<Self, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's value area, page-aligned (so u64-aligned).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                elements * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DatapathError::Map {
                op,
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error: std::io::Error::last_os_error(),
                }),
            });
        }
        Ok(Self { ptr: p.cast(), len: elements })
    }

    /// The words, for as long as `self` is borrowed.
    fn words(&mut self) -> &mut [u64] {
        // SAFETY: the mapping's `len` aligned words, which live as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Stores word `i` (an aligned u64 store, which the datapath's reads see whole).
    fn store(&mut self, i: usize, w: u64) {
        if i < self.len {
            // SAFETY: a valid, aligned element of the mapping, which lives as long as `self`.
            unsafe { std::ptr::write_volatile(self.ptr.add(i), w) };
        }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len * 8) };
    }
}

fn map_err(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { op, name, source }
}

/// A delete of a key that is already gone has done its job.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    name: &'static str,
    path: &Path,
    map: Map,
) -> Result<T, DatapathError> {
    T::try_from(map).map_err(|source| DatapathError::Layout { name, path: path.to_owned(), source })
}

/// The map `name` pinned under `pin_dir`, as the aya type `T` its layout must have.
fn pinned<T: TryFrom<Map, Error = MapError>>(pin_dir: &Path, name: &'static str) -> Result<T, DatapathError> {
    let path = pin_dir.join(name);
    let map = Map::from_map_data(open_pin(pin_dir, name)?).map_err(|source| DatapathError::Layout {
        name,
        path: path.clone(),
        source,
    })?;
    typed(name, &path, map)
}

impl BpfMaps {
    /// Holds back the update of `key` to `value`: added to the run waiting when it is of the same
    /// map (the run kind of `K` and `V`, [`batch::Run`]), else after that run is sent, as a new
    /// one. A run is
    /// sent once it fills a batch: a long one (a first sync writes hundreds of thousands of one
    /// map) goes out as it is made, from a buffer that stays small, in the same order.
    fn hold<K, V>(&mut self, key: K, value: V) -> Result<(), DatapathError>
    where
        batch::Pending: batch::Run<K, V>,
    {
        use batch::Run as _;
        if let Some((keys, values)) = self.pending.of() {
            keys.push(key);
            values.push(value);
            return if self.pending.is_full() { self.send_full() } else { Ok(()) };
        }
        // Another map's run was waiting: it goes first, to the writing thread when that has
        // runs before it (they are in order there), else at once.
        match &mut self.writer {
            Some(w) if w.busy() => {
                if !matches!(self.pending, batch::Pending::None) {
                    w.send(std::mem::take(&mut self.pending));
                }
            }
            _ => self.flush()?,
        }
        self.pending = batch::Pending::start(vec![key], vec![value]);
        Ok(())
    }

    /// Hands the run waiting, which fills a batch, to the writing thread (started now if it is
    /// not yet); written here if that thread cannot be had.
    fn send_full(&mut self) -> Result<(), DatapathError> {
        use std::os::fd::AsFd as _;
        if self.writer.is_none() {
            let fds = [
                IterableMap::map(&self.services).fd().as_fd().try_clone_to_owned(),
                IterableMap::map(&self.backends).fd().as_fd().try_clone_to_owned(),
                IterableMap::map(&self.flows).fd().as_fd().try_clone_to_owned(),
                IterableMap::map(&self.svc_info).fd().as_fd().try_clone_to_owned(),
            ];
            let ipv6 = self.ipv6.as_ref().map(|(s, b)| {
                [
                    IterableMap::map(s).fd().as_fd().try_clone_to_owned(),
                    b.map().fd().as_fd().try_clone_to_owned(),
                ]
            });
            let ipv6 = match ipv6 {
                None => Ok(None),
                Some([Ok(s), Ok(b)]) => Ok(Some([s, b])),
                Some(_) => Err(()),
            };
            if let ([Ok(s), Ok(b), Ok(f), Ok(i)], Ok(ipv6)) = (fds, ipv6) {
                self.writer = batch::Writer::spawn([s, b, f, i], ipv6).ok();
            }
        }
        let run = std::mem::take(&mut self.pending);
        match &mut self.writer {
            Some(w) => {
                w.send(run);
                Ok(())
            }
            None => run.write(&self.targets()),
        }
    }

    /// The maps a held run may be of.
    fn targets(&self) -> batch::Targets<'_> {
        use std::os::fd::AsFd as _;
        batch::Targets {
            services: IterableMap::map(&self.services).fd().as_fd(),
            backends: IterableMap::map(&self.backends).fd().as_fd(),
            flows: IterableMap::map(&self.flows).fd().as_fd(),
            infos: IterableMap::map(&self.svc_info).fd().as_fd(),
            ipv6: self.ipv6.as_ref().map(|(s, b)| (IterableMap::map(s).fd().as_fd(), b.map().fd().as_fd())),
        }
    }

    /// Opens the maps pinned under `pin_dir`, read and write. Errors say what is wrong: no agent
    /// ever ran, maps of another layout version, or no permission.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let mut maps = Self::new(
            pinned(pin_dir, MAP_SERVICES)?,
            pinned(pin_dir, MAP_BACKENDS)?,
            pinned(pin_dir, MAP_CT)?,
            pinned(pin_dir, MAP_STATS)?,
            pinned(pin_dir, MAP_SVC_INFO)?,
            pinned(pin_dir, MAP_BACKEND_FLOWS)?,
            pinned(pin_dir, MAP_SOURCE_RANGES)?,
        )?;
        let exists = |name: &str| pin_dir.join(name).exists();
        if exists(lb_common::MAP_FILTER) {
            maps.filter = Some(pinned(pin_dir, lb_common::MAP_FILTER)?);
        }
        if exists(MAP_SERVICES6) && exists(MAP_BACKENDS6) {
            maps.set_ipv6(pinned(pin_dir, MAP_SERVICES6)?, pinned(pin_dir, MAP_BACKENDS6)?);
        }
        if exists(lb_common::MAP_BACKEND_FLOWS6) {
            maps.flows6 = Some(pinned(pin_dir, lb_common::MAP_BACKEND_FLOWS6)?);
        }
        if exists(MAP_CT6) {
            maps.ct6 = Some(pinned(pin_dir, MAP_CT6)?);
        }
        if exists(MAP_SOURCE_RANGES6) {
            maps.source_ranges6 = Some(pinned(pin_dir, MAP_SOURCE_RANGES6)?);
        }
        Ok(maps)
    }

    /// Takes the maps out of a loaded object (which then no longer owns them).
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DatapathError> {
        let path = PathBuf::from("<loaded object>");
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| DatapathError::Layout {
                name,
                path: path.clone(),
                source: MapError::InvalidName { name: name.into() },
            })
        };
        let services = typed(MAP_SERVICES, &path, take(MAP_SERVICES)?)?;
        let backends = typed(MAP_BACKENDS, &path, take(MAP_BACKENDS)?)?;
        let ct = typed(MAP_CT, &path, take(MAP_CT)?)?;
        let stats = typed(MAP_STATS, &path, take(MAP_STATS)?)?;
        let svc_info = typed(MAP_SVC_INFO, &path, take(MAP_SVC_INFO)?)?;
        let flows = typed(MAP_BACKEND_FLOWS, &path, take(MAP_BACKEND_FLOWS)?)?;
        let source_ranges = typed(MAP_SOURCE_RANGES, &path, take(MAP_SOURCE_RANGES)?)?;
        let filter = typed(lb_common::MAP_FILTER, &path, take(lb_common::MAP_FILTER)?)?;
        let mut maps = Self::new(services, backends, ct, stats, svc_info, flows, source_ranges)?;
        maps.filter = Some(filter);
        let s6 = typed(MAP_SERVICES6, &path, take(MAP_SERVICES6)?)?;
        maps.set_ipv6(s6, typed(MAP_BACKENDS6, &path, take(MAP_BACKENDS6)?)?);
        maps.source_ranges6 = Some(typed(MAP_SOURCE_RANGES6, &path, take(MAP_SOURCE_RANGES6)?)?);
        maps.ct6 = Some(typed(MAP_CT6, &path, take(MAP_CT6)?)?);
        maps.flows6 =
            Some(typed(lb_common::MAP_BACKEND_FLOWS6, &path, take(lb_common::MAP_BACKEND_FLOWS6)?)?);
        Ok(maps)
    }

    fn new(
        services: HashMap<MapData, Svc4Key, Svc4Value>,
        backends: Array<MapData, Backend4>,
        ct: HashMap<MapData, Ct4Key, Ct4Value>,
        stats: PerCpuArray<MapData, StatValue>,
        svc_info: HashMap<MapData, u32, SvcInfo>,
        flows: Array<MapData, u64>,
        source_ranges: LpmTrie<MapData, SrcRange4, u8>,
    ) -> Result<Self, DatapathError> {
        let max = |m: &MapData, name| m.info().map(|i| i.max_entries()).map_err(map_err("info", name));
        let capacity = Capacity {
            service_entries: max(IterableMap::map(&services), MAP_SERVICES)?,
            backends: backends.len(),
            ipv6_entries: 0,
        };
        if stats.len() != STAT_COUNT {
            return Err(DatapathError::Layout {
                name: MAP_STATS,
                path: PathBuf::new(),
                source: MapError::InvalidValueSize {
                    size: stats.len() as usize,
                    expected: STAT_COUNT as usize,
                },
            });
        }
        if flows.len() < backends.len() {
            return Err(DatapathError::Layout {
                name: MAP_BACKEND_FLOWS,
                path: PathBuf::new(),
                source: MapError::InvalidValueSize {
                    size: flows.len() as usize,
                    expected: backends.len() as usize,
                },
            });
        }
        Ok(Self {
            services,
            backends,
            ct,
            stats,
            svc_info,
            flows,
            source_ranges,
            maglev: None,
            filter: None,
            ipv6: None,
            source_ranges6: None,
            ct6: None,
            flows6: None,
            capacity,
            filter_area: None,
            pending: batch::Pending::None,
            writer: None,
        })
    }

    fn set_ipv6(
        &mut self,
        services: HashMap<MapData, Svc6Key, Svc4Value>,
        backends: Array<MapData, Backend6>,
    ) {
        // Both have the same capacity (Capacities::ipv6_entries).
        self.capacity.ipv6_entries = backends.len();
        self.ipv6 = Some((services, backends));
    }

    /// Adds the Maglev map, pinned under `pin_dir` (the agent).
    pub fn with_maglev_pinned(mut self, pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join(MAP_MAGLEV);
        let data = open_pin(pin_dir, MAP_MAGLEV)?;
        let map = Map::from_map_data(data).map_err(|source| DatapathError::Layout {
            name: MAP_MAGLEV,
            path: path.clone(),
            source,
        })?;
        self.maglev = Some(typed(MAP_MAGLEV, &path, map)?);
        Ok(self)
    }

    /// Adds the Maglev map, taken from a loaded object (packet tests).
    pub fn with_maglev_taken(mut self, ebpf: &mut aya::Ebpf) -> Result<Self, DatapathError> {
        let path = PathBuf::from("<loaded object>");
        let map = ebpf.take_map(MAP_MAGLEV).ok_or_else(|| DatapathError::Layout {
            name: MAP_MAGLEV,
            path: path.clone(),
            source: MapError::InvalidName { name: MAP_MAGLEV.into() },
        })?;
        self.maglev = Some(typed(MAP_MAGLEV, &path, map)?);
        Ok(self)
    }

    /// The kernel's map ids, by name (to tell whether two handles are the same map).
    pub fn ids(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        let id = |m: &MapData, name| m.info().map(|i| (name, i.id())).map_err(map_err("info", name));
        let mut ids = vec![
            id(IterableMap::map(&self.services), MAP_SERVICES)?,
            id(IterableMap::map(&self.backends), MAP_BACKENDS)?,
            id(IterableMap::map(&self.ct), MAP_CT)?,
            id(IterableMap::map(&self.stats), MAP_STATS)?,
            id(IterableMap::map(&self.svc_info), MAP_SVC_INFO)?,
            id(IterableMap::map(&self.flows), MAP_BACKEND_FLOWS)?,
            id(IterableMap::map(&self.source_ranges), MAP_SOURCE_RANGES)?,
        ];
        // The IPv6 maps, where the agent has them (the trace program reads them too).
        if let Some((s6, b6)) = &self.ipv6 {
            ids.push(id(IterableMap::map(s6), MAP_SERVICES6)?);
            ids.push(id(b6.map(), MAP_BACKENDS6)?);
        }
        if let Some(ct6) = &self.ct6 {
            ids.push(id(IterableMap::map(ct6), MAP_CT6)?);
        }
        if let Some(r6) = &self.source_ranges6 {
            ids.push(id(IterableMap::map(r6), MAP_SOURCE_RANGES6)?);
        }
        Ok(ids)
    }
}

fn range_key(svc_id: u32, addr: std::net::Ipv4Addr, len: u8) -> LpmKey<SrcRange4> {
    LpmKey::new(32 + u32::from(len), SrcRange4 { svc_id, addr: addr.octets() })
}

fn range_key6(svc_id: u32, addr: std::net::Ipv6Addr, len: u8) -> LpmKey<SrcRange6> {
    LpmKey::new(32 + u32::from(len), SrcRange6 { svc_id, addr: addr.octets() })
}

/// Opens one pinned map, telling apart a missing pin, a pin of another layout version and a
/// permission problem.
/// Upgrade from the preallocated service map ([`lb_common::MAP_SERVICES_V1`]): when `pin_dir`
/// holds one and the current map is still empty, its entries are copied over, so that the
/// reconciler reads every service and backend back with its id and tracked flows keep their
/// backends. Returns the entries copied (0: nothing to do). The old map is removed with the
/// other maps of another layout, once the new program is attached.
pub fn copy_services_v1(pin_dir: &Path) -> Result<usize, DatapathError> {
    const OLD: &str = lb_common::MAP_SERVICES_V1;
    if !pin_dir.join(OLD).exists() {
        return Ok(0);
    }
    let mut new: HashMap<MapData, Svc4Key, Svc4Value> = pinned(pin_dir, MAP_SERVICES)?;
    if new.keys().next().is_some() {
        return Ok(0); // copied by an earlier start, and written since
    }
    let old: HashMap<MapData, Svc4Key, Svc4Value> = pinned(pin_dir, OLD)?;
    let mut n = 0;
    for entry in old.iter() {
        let (k, v) = entry.map_err(map_err("iterate", OLD))?;
        new.insert(k, v, 0).map_err(map_err("update", MAP_SERVICES))?;
        n += 1;
    }
    Ok(n)
}

pub fn open_pin(pin_dir: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    let path = pin_dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(DatapathError::Permission { path });
        }
        Err(_) => {
            if let Some(e) = other_version(pin_dir, name) {
                return Err(e);
            }
            return Err(DatapathError::NotPinned { path });
        }
    }
    MapData::from_pin(&path).map_err(|source| {
        let denied = matches!(&source, MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)));
        if denied {
            DatapathError::Permission { path: path.clone() }
        } else {
            DatapathError::Open { path, source }
        }
    })
}

/// Writes the datapath's settings into the loaded object's [`lb_common::MAP_CONFIG`].
pub fn write_config(ebpf: &mut aya::Ebpf, cfg: lb_common::DatapathConfig) -> Result<(), DatapathError> {
    write_single(ebpf, lb_common::MAP_CONFIG, cfg)
}

/// Writes the one entry of the loaded object's array map `name`.
fn write_single<T: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    value: T,
) -> Result<(), DatapathError> {
    let path = PathBuf::from("<loaded object>");
    let map = ebpf.map_mut(name).ok_or(DatapathError::NotPinned { path: path.clone() })?;
    let mut arr: aya::maps::Array<&mut MapData, T> =
        aya::maps::Array::try_from(map).map_err(|source| DatapathError::Layout { name, path, source })?;
    arr.set(0, value, 0).map_err(|source| DatapathError::Map { op: "write", name, source })
}

/// The Service ranges as [`lb_common::MAP_SERVICE_CIDRS`] holds them; an error names a range
/// it cannot hold (a /0, or more than [`lb_common::MAX_SERVICE_CIDRS`] of a family).
pub fn service_cidrs(ranges: &[crate::model::Cidr]) -> Result<lb_common::ServiceCidrs, String> {
    let mut out = lb_common::ServiceCidrs::default();
    let (mut n4, mut n6) = (0, 0);
    for r in ranges {
        if r.len == 0 {
            return Err(format!("service CIDR {r}: a /0 is no Service range"));
        }
        let net = r.network();
        match net.addr {
            std::net::IpAddr::V4(a) => {
                let slot = out.v4.get_mut(n4).ok_or_else(|| {
                    format!("more than {} IPv4 service CIDRs", lb_common::MAX_SERVICE_CIDRS)
                })?;
                let mask = u32::MAX.checked_shl(32 - u32::from(r.len)).unwrap_or(0);
                *slot = [u32::from_ne_bytes(a.octets()), u32::from_ne_bytes(mask.to_be_bytes())];
                n4 += 1;
            }
            std::net::IpAddr::V6(a) => {
                let slot = out.v6.get_mut(n6).ok_or_else(|| {
                    format!("more than {} IPv6 service CIDRs", lb_common::MAX_SERVICE_CIDRS)
                })?;
                let mask = u128::MAX.checked_shl(128 - u32::from(r.len)).unwrap_or(0).to_be_bytes();
                let ([nh, nl], [mh, ml]) =
                    (lb_common::ipv6_halves(&a.octets()), lb_common::ipv6_halves(&mask));
                *slot = [nh, nl, mh, ml];
                n6 += 1;
            }
        }
    }
    Ok(out)
}

/// Writes the Service ranges into the loaded object's [`lb_common::MAP_SERVICE_CIDRS`] (none:
/// the slots are emptied, so that ranges an earlier agent wrote do not stay).
pub fn write_service_cidrs(
    ebpf: &mut aya::Ebpf,
    cidrs: lb_common::ServiceCidrs,
) -> Result<(), DatapathError> {
    write_single(ebpf, lb_common::MAP_SERVICE_CIDRS, cidrs)
}

/// Splits `xlb_svcinfo_v2` into (`xlb_svcinfo`, 2).
pub fn layout_version(name: &str) -> Option<(&str, u32)> {
    let (base, v) = name.rsplit_once("_v")?;
    Some((base, v.parse().ok()?))
}

/// When `name` is missing from `pin_dir`, a pin of the same map at another layout version.
fn other_version(pin_dir: &Path, name: &'static str) -> Option<DatapathError> {
    let (base, want) = layout_version(name)?;
    let mut found = Vec::new();
    for e in std::fs::read_dir(pin_dir).ok()?.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        if let Some((b, v)) = layout_version(&f)
            && b == base
            && v != want
        {
            found.push((v, f));
        }
    }
    found.sort();
    let (v, f) = found.pop()?;
    Some(DatapathError::OtherVersion {
        dir: pin_dir.to_owned(),
        which: if v < want { "an older" } else { "a newer" },
        found: f,
        expected: name,
    })
}

/// Pins under `pin_dir` of xlb maps at a layout version other than this xlb's (left by an
/// older or newer agent).
pub fn other_version_pins(pin_dir: &Path) -> Vec<PathBuf> {
    let ours: Vec<(&str, u32)> = lb_common::ALL_MAPS.iter().filter_map(|m| layout_version(m)).collect();
    let Ok(dir) = std::fs::read_dir(pin_dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            matches!(layout_version(&f), Some((b, v)) if ours.iter().any(|&(ob, ov)| ob == b && ov != v))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

impl Datapath for BpfMaps {
    fn read_services6(&self) -> Result<Vec<(Svc6Key, Svc4Value)>, DatapathError> {
        let Some((m, _)) = &self.ipv6 else { return Ok(Vec::new()) };
        m.iter().collect::<Result<Vec<_>, _>>().map_err(map_err("iterate", MAP_SERVICES6))
    }

    fn read_backend6(&self, id: u32) -> Result<Backend6, DatapathError> {
        let Some((_, b)) = &self.ipv6 else { return Ok(Backend6::default()) };
        b.get(&id, 0).map_err(map_err("read", MAP_BACKENDS6))
    }

    fn write_service6(&mut self, key: Svc6Key, value: Svc4Value) -> Result<(), DatapathError> {
        if self.ipv6.is_none() {
            return Err(DatapathError::Unsupported("IPv6 maps"));
        }
        self.hold(key, value)
    }

    fn delete_service6(&mut self, key: Svc6Key) -> Result<(), DatapathError> {
        self.flush()?;
        let (m, _) = self.ipv6.as_mut().ok_or(DatapathError::Unsupported("IPv6 maps"))?;
        absent_ok(m.remove(&key)).map_err(map_err("delete", MAP_SERVICES6))
    }

    fn write_backend6(&mut self, id: u32, value: Backend6) -> Result<(), DatapathError> {
        if self.ipv6.is_none() {
            return Err(DatapathError::Unsupported("IPv6 maps"));
        }
        self.hold(id, value)
    }

    fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn read_filter(&self) -> Result<Vec<u64>, DatapathError> {
        let Some(f) = &self.filter else { return Ok(Vec::new()) };
        if mmapable(f) {
            // Read through a mapping: one call, not one per word (131,072 of them).
            let mut area =
                MappedWords::new(IterableMap::map(f), f.len() as usize, "mmap", lb_common::MAP_FILTER)?;
            return Ok(area.words().to_vec());
        }
        (0..f.len()).map(|i| f.get(&i, 0).map_err(map_err("read", lb_common::MAP_FILTER))).collect()
    }

    fn write_filter(&mut self, words: &[(u32, u64)]) -> Result<(), DatapathError> {
        self.flush()?;
        let Some(f) = &mut self.filter else { return Ok(()) };
        if words.is_empty() {
            return Ok(());
        }
        // Once mapped, it is known to be mappable: no call to ask again at each write.
        if self.filter_area.is_none() && !mmapable(f) {
            for &(i, w) in words {
                f.set(i, w, 0).map_err(map_err("update", lb_common::MAP_FILTER))?;
            }
            return Ok(());
        }
        if self.filter_area.is_none() {
            self.filter_area =
                Some(MappedWords::new(IterableMap::map(f), f.len() as usize, "mmap", lb_common::MAP_FILTER)?);
        }
        if let Some(area) = &mut self.filter_area {
            for &(i, w) in words {
                area.store(i as usize, w);
            }
        }
        Ok(())
    }

    fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError> {
        self.services.iter().map(|r| r.map_err(map_err("iterate", MAP_SERVICES))).collect()
    }

    fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError> {
        self.backends.get(&id, 0).map_err(map_err("lookup", MAP_BACKENDS))
    }

    fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError> {
        self.svc_info.iter().map(|r| r.map_err(map_err("iterate", MAP_SVC_INFO))).collect()
    }

    fn write_backend(&mut self, id: u32, value: Backend4) -> Result<(), DatapathError> {
        self.hold(id, value)
    }

    fn write_service(&mut self, key: Svc4Key, value: Svc4Value) -> Result<(), DatapathError> {
        self.hold(key, value)
    }

    fn delete_service(&mut self, key: Svc4Key) -> Result<(), DatapathError> {
        self.flush()?;
        absent_ok(self.services.remove(&key)).map_err(map_err("delete", MAP_SERVICES))
    }

    fn write_svc_info(&mut self, id: u32, info: SvcInfo) -> Result<(), DatapathError> {
        self.hold(id, info)
    }

    fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError> {
        self.flush()?;
        absent_ok(self.svc_info.remove(&id)).map_err(map_err("delete", MAP_SVC_INFO))
    }

    fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError> {
        self.hold(id, 0)
    }

    fn flush(&mut self) -> Result<(), DatapathError> {
        let run = std::mem::take(&mut self.pending);
        // The runs sent before this one first; none after one that failed.
        if let Some(w) = &mut self.writer {
            w.wait()?;
        }
        run.write(&self.targets())
    }

    fn defers_writes(&self) -> bool {
        true
    }

    fn read_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, DatapathError> {
        let mut out: Vec<(u32, Cidr)> = self
            .source_ranges
            .keys()
            .map(|k| {
                let k = k.map_err(map_err("iterate", MAP_SOURCE_RANGES))?;
                let d = k.data();
                let len = k.prefix_len().saturating_sub(32).min(32) as u8;
                Ok((d.svc_id, Cidr { addr: std::net::Ipv4Addr::from(d.addr).into(), len }))
            })
            .collect::<Result<_, DatapathError>>()?;
        for k in self.source_ranges6.iter().flat_map(|m| m.keys()) {
            let k = k.map_err(map_err("iterate", MAP_SOURCE_RANGES6))?;
            let d = k.data();
            let len = k.prefix_len().saturating_sub(32).min(128) as u8;
            out.push((d.svc_id, Cidr { addr: std::net::Ipv6Addr::from(d.addr).into(), len }));
        }
        Ok(out)
    }

    fn write_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError> {
        self.flush()?;
        match range.addr {
            std::net::IpAddr::V4(a) => self
                .source_ranges
                .insert(&range_key(svc_id, a, range.len), 1, 0)
                .map_err(map_err("update", MAP_SOURCE_RANGES)),
            std::net::IpAddr::V6(a) => self
                .source_ranges6
                .as_mut()
                .ok_or(DatapathError::Unsupported("IPv6 source ranges"))?
                .insert(&range_key6(svc_id, a, range.len), 1, 0)
                .map_err(map_err("update", MAP_SOURCE_RANGES6)),
        }
    }

    fn delete_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError> {
        self.flush()?;
        match range.addr {
            std::net::IpAddr::V4(a) => absent_ok(self.source_ranges.remove(&range_key(svc_id, a, range.len)))
                .map_err(map_err("delete", MAP_SOURCE_RANGES)),
            std::net::IpAddr::V6(a) => {
                let Some(m) = self.source_ranges6.as_mut() else { return Ok(()) };
                absent_ok(m.remove(&range_key6(svc_id, a, range.len)))
                    .map_err(map_err("delete", MAP_SOURCE_RANGES6))
            }
        }
    }

    fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError> {
        self.flows.get(&id, 0).map_err(map_err("lookup", MAP_BACKEND_FLOWS))
    }

    fn read_ct(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, DatapathError> {
        self.ct.iter().map(|r| r.map_err(map_err("iterate", MAP_CT))).collect()
    }

    fn read_ct6(&self) -> Result<Vec<(Ct6Key, Ct6Value)>, DatapathError> {
        let Some(m) = &self.ct6 else { return Ok(Vec::new()) };
        m.iter().map(|r| r.map_err(map_err("iterate", MAP_CT6))).collect()
    }

    fn read_backend_flows6(&self, id: u32) -> Result<u64, DatapathError> {
        let Some(m) = &self.flows6 else { return Ok(0) };
        m.get(&id, 0).map_err(map_err("lookup", lb_common::MAP_BACKEND_FLOWS6))
    }

    fn reset_backend_flows6(&mut self, id: u32) -> Result<(), DatapathError> {
        self.flush()?;
        let Some(m) = &mut self.flows6 else { return Ok(()) };
        m.set(id, 0, 0).map_err(map_err("update", lb_common::MAP_BACKEND_FLOWS6))
    }

    fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        (0..STAT_COUNT)
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0).map_err(map_err("lookup", MAP_STATS))?;
                let (p, b) = per_cpu.iter().fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
                Ok((lb_common::STAT_NAMES[i as usize], p, b))
            })
            .collect()
    }

    fn read_maglev_keys(&self) -> Result<Vec<u32>, DatapathError> {
        let Some(m) = &self.maglev else { return Ok(Vec::new()) };
        m.keys().collect::<Result<_, _>>().map_err(map_err("iterate", MAP_MAGLEV))
    }

    fn write_maglev(&mut self, key: u32, table: &[u16]) -> Result<(), DatapathError> {
        self.flush()?;
        let Some(m) = &mut self.maglev else { return Err(DatapathError::Unsupported("Maglev map")) };
        let elements = lb_common::maglev_elements(table.len() as u32);
        let inner = Array::<MapData, u64>::create(elements, lb_common::MAGLEV_TABLE_FLAGS)
            .map_err(map_err("create a table for", MAP_MAGLEV))?;
        let mut packed = vec![0u64; elements as usize];
        for (i, &slot) in table.iter().enumerate() {
            packed[i / 4] |= u64::from(slot) << ((i % 4) * 16);
        }
        fill_mmapped(IterableMap::map(&inner), &packed)?;
        // One update swaps the whole table in: a packet sees the old table or the new one.
        m.insert(key, &inner, 0).map_err(map_err("update", MAP_MAGLEV))
    }

    fn delete_maglev(&mut self, key: u32) -> Result<(), DatapathError> {
        self.flush()?;
        let Some(m) = &mut self.maglev else { return Err(DatapathError::Unsupported("Maglev map")) };
        absent_ok(m.remove(&key)).map_err(map_err("delete", MAP_MAGLEV))
    }
}

/// Copies `data` into a new, BPF_F_MMAPABLE array map through a shared mapping of it: one copy
/// instead of a syscall per element.
fn fill_mmapped(map: &MapData, data: &[u64]) -> Result<(), DatapathError> {
    with_mmapped(map, data.len(), "mmap a table of", MAP_MAGLEV, |area| area.copy_from_slice(data))
}

/// Runs `f` on the first `elements` u64 values of a BPF_F_MMAPABLE array map (which must hold at
/// least that many), through a shared mapping made for the call.
fn with_mmapped(
    map: &MapData,
    elements: usize,
    op: &'static str,
    name: &'static str,
    f: impl FnOnce(&mut [u64]),
) -> Result<(), DatapathError> {
    if elements == 0 {
        return Ok(());
    }
    f(MappedWords::new(map, elements, op, name)?.words());
    Ok(())
}

/// The maps in memory, with the same capacity rules as the kernel's, for tests of the reconciler
/// and the CLI without a kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemDatapath {
    pub services: BTreeMap<Svc4Key, Svc4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub svc_info: BTreeMap<u32, SvcInfo>,
    pub flows: BTreeMap<u32, u64>,
    pub ct: BTreeMap<Ct4Key, Ct4Value>,
    /// Packets and bytes by [`lb_common::Stat`] index (missing ones are zero).
    pub stats: BTreeMap<u32, (u64, u64)>,
    pub source_ranges: std::collections::BTreeSet<(u32, Cidr)>,
    pub capacity: Option<Capacity>,
    /// Every write and delete, in order, as `(op, key)` strings, for ordering assertions.
    pub log: Vec<String>,
    /// Maglev tables by key.
    pub maglev: BTreeMap<u32, Vec<u16>>,
    /// The endpoint filter's words; empty (the default): none.
    pub filter: Vec<u64>,
    pub services6: BTreeMap<Svc6Key, Svc4Value>,
    pub backends6: BTreeMap<u32, Backend6>,
}

impl MemDatapath {
    pub fn with_capacity(capacity: Capacity) -> Self {
        Self { capacity: Some(capacity), ..Self::default() }
    }

    #[cfg(test)]
    /// Everything the maps say, by names instead of ids (ids depend on the order things came
    /// in): entries, slots, backends, names, source ranges, Maglev tables and the filter.
    pub fn contents(&self) -> Vec<String> {
        let dp = self;
        let name = |id: u32| match dp.svc_info.get(&id) {
            Some(i) => format!(
                "{}/{}:{}",
                crate::reconcile::unfixed(&i.namespace),
                crate::reconcile::unfixed(&i.name),
                crate::reconcile::unfixed(&i.port_name)
            ),
            None => format!("unnamed {id}"),
        };
        let mut out = Vec::new();
        let v4 =
            dp.services.iter().map(|(k, v)| (std::net::IpAddr::from(k.addr), k.port, k.proto, k.slot, v));
        let v6 =
            dp.services6.iter().map(|(k, v)| (std::net::IpAddr::from(k.addr), k.port, k.proto, k.slot, v));
        for (addr, port, proto, slot, v) in v4.chain(v6) {
            let fe = format!("{addr} {port}/{proto}");
            if slot == 0 {
                out.push(format!(
                    "{fe}: {} count {} flags {:#x} affinity {}",
                    name(v.svc_id),
                    v.count,
                    v.flags,
                    v.affinity_timeout
                ));
            } else {
                let be = match addr {
                    std::net::IpAddr::V4(_) => dp.backends.get(&v.backend_id).map(|b| format!("{b:?}")),
                    std::net::IpAddr::V6(_) => dp.backends6.get(&v.backend_id).map(|b| format!("{b:?}")),
                };
                out.push(format!("{fe} slot {slot}: {} {be:?}", name(v.svc_id)));
            }
        }
        out.extend(dp.backends.values().filter(|b| b.state != 0).map(|b| format!("backend {b:?}")));
        out.extend(dp.backends6.values().filter(|b| b.state != 0).map(|b| format!("backend {b:?}")));
        out.extend(
            dp.svc_info
                .iter()
                .map(|(&id, i)| format!("{}: {:?}", name(id), (i.port, i.node_port, i.svc_type, i.backends))),
        );
        out.extend(dp.source_ranges.iter().map(|(id, c)| format!("range {} {c:?}", name(*id))));
        out.extend(dp.maglev.iter().map(|(k, t)| format!("maglev {} {} {t:?}", name(k >> 1), k & 1)));
        out.push(format!(
            "filter {:?}",
            dp.filter.iter().enumerate().filter(|(_, w)| **w != 0).collect::<Vec<_>>()
        ));
        out.sort();
        out
    }
}

impl Datapath for MemDatapath {
    fn read_services6(&self) -> Result<Vec<(Svc6Key, Svc4Value)>, DatapathError> {
        Ok(self.services6.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_backend6(&self, id: u32) -> Result<Backend6, DatapathError> {
        Ok(self.backends6.get(&id).copied().unwrap_or_default())
    }

    fn write_service6(&mut self, key: Svc6Key, value: Svc4Value) -> Result<(), DatapathError> {
        let cap = self.capacity().ipv6_entries;
        if !self.services6.contains_key(&key) && self.services6.len() as u32 >= cap {
            return Err(DatapathError::Full { name: MAP_SERVICES6, capacity: cap });
        }
        let addr = std::net::Ipv6Addr::from(key.addr);
        self.log.push(format!("service [{addr}]:{} slot {} count={}", key.port, key.slot, value.count));
        self.services6.insert(key, value);
        Ok(())
    }

    fn delete_service6(&mut self, key: Svc6Key) -> Result<(), DatapathError> {
        let addr = std::net::Ipv6Addr::from(key.addr);
        self.log.push(format!("delete [{addr}]:{} slot {}", key.port, key.slot));
        self.services6.remove(&key);
        Ok(())
    }

    fn write_backend6(&mut self, id: u32, value: Backend6) -> Result<(), DatapathError> {
        let cap = self.capacity().ipv6_entries;
        if id >= cap {
            return Err(DatapathError::Full { name: MAP_BACKENDS6, capacity: cap });
        }
        self.log.push(format!("backend6 {id} state={}", value.state));
        if value == Backend6::default() {
            self.backends6.remove(&id);
        } else {
            self.backends6.insert(id, value);
        }
        Ok(())
    }

    fn read_filter(&self) -> Result<Vec<u64>, DatapathError> {
        Ok(self.filter.clone())
    }

    fn write_filter(&mut self, words: &[(u32, u64)]) -> Result<(), DatapathError> {
        for &(i, w) in words {
            if let Some(x) = self.filter.get_mut(i as usize) {
                *x = w;
            }
        }
        Ok(())
    }

    fn capacity(&self) -> Capacity {
        self.capacity.unwrap_or(Capacity {
            service_entries: lb_common::DEFAULT_MAX_SERVICE_ENTRIES,
            backends: lb_common::DEFAULT_MAX_BACKENDS,
            ipv6_entries: lb_common::DEFAULT_MAX_IPV6_ENTRIES,
        })
    }

    fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError> {
        if id >= self.capacity().backends {
            return Err(DatapathError::Full { name: MAP_BACKENDS, capacity: self.capacity().backends });
        }
        Ok(self.backends.get(&id).copied().unwrap_or_default())
    }

    fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError> {
        Ok(self.svc_info.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn write_backend(&mut self, id: u32, value: Backend4) -> Result<(), DatapathError> {
        let cap = self.capacity().backends;
        if id >= cap {
            return Err(DatapathError::Full { name: MAP_BACKENDS, capacity: cap });
        }
        self.log.push(format!("backend {id} state={}", value.state));
        if value == Backend4::default() {
            self.backends.remove(&id);
        } else {
            self.backends.insert(id, value);
        }
        Ok(())
    }

    fn write_service(&mut self, key: Svc4Key, value: Svc4Value) -> Result<(), DatapathError> {
        let cap = self.capacity().service_entries;
        if !self.services.contains_key(&key) && self.services.len() as u32 >= cap {
            return Err(DatapathError::Full { name: MAP_SERVICES, capacity: cap });
        }
        self.log.push(format!(
            "service {}:{} slot {} count={}",
            std::net::Ipv4Addr::from(key.addr),
            key.port,
            key.slot,
            value.count
        ));
        self.services.insert(key, value);
        Ok(())
    }

    fn delete_service(&mut self, key: Svc4Key) -> Result<(), DatapathError> {
        let addr = std::net::Ipv4Addr::from(key.addr);
        self.log.push(format!("delete {addr}:{} slot {}", key.port, key.slot));
        self.services.remove(&key);
        Ok(())
    }

    fn write_svc_info(&mut self, id: u32, info: SvcInfo) -> Result<(), DatapathError> {
        self.svc_info.insert(id, info);
        Ok(())
    }

    fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError> {
        self.svc_info.remove(&id);
        Ok(())
    }

    fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError> {
        self.flows.remove(&id);
        Ok(())
    }

    fn read_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, DatapathError> {
        Ok(self.source_ranges.iter().copied().collect())
    }

    fn write_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError> {
        self.log.push(format!("source range {svc_id} {range}"));
        self.source_ranges.insert((svc_id, range));
        Ok(())
    }

    fn delete_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError> {
        self.log.push(format!("delete source range {svc_id} {range}"));
        self.source_ranges.remove(&(svc_id, range));
        Ok(())
    }

    fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError> {
        Ok(self.flows.get(&id).copied().unwrap_or(0))
    }

    fn read_ct(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, DatapathError> {
        Ok(self.ct.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        Ok((0..STAT_COUNT)
            .map(|i| {
                let (p, b) = self.stats.get(&i).copied().unwrap_or_default();
                (lb_common::STAT_NAMES[i as usize], p, b)
            })
            .collect())
    }

    fn read_maglev_keys(&self) -> Result<Vec<u32>, DatapathError> {
        Ok(self.maglev.keys().copied().collect())
    }

    fn write_maglev(&mut self, key: u32, table: &[u16]) -> Result<(), DatapathError> {
        self.log.push(format!("maglev {key}"));
        self.maglev.insert(key, table.to_vec());
        Ok(())
    }

    fn delete_maglev(&mut self, key: u32) -> Result<(), DatapathError> {
        self.log.push(format!("maglev-delete {key}"));
        self.maglev.remove(&key);
        Ok(())
    }
}

/// A datapath that fails some of its operations on purpose, to test that the reconciler
/// reports a failed write, never leaves a half-written service behind, and finishes on retry.
///
/// Which operations fail is decided by a seeded generator, so a failing test repeats.
#[derive(Clone, Debug)]
pub struct FaultyDatapath<D> {
    pub inner: D,
    /// Chance that a write or delete fails, in 1/1000.
    pub write_fail_per_mille: u32,
    /// Chance that a read fails, in 1/1000.
    pub read_fail_per_mille: u32,
    /// Operations failed so far.
    pub injected: u64,
    seed: u64,
    reads: std::cell::Cell<u64>,
}

impl<D: Datapath> FaultyDatapath<D> {
    pub fn new(inner: D, seed: u64, write_fail_per_mille: u32, read_fail_per_mille: u32) -> Self {
        Self {
            inner,
            write_fail_per_mille,
            read_fail_per_mille,
            injected: 0,
            seed,
            reads: Default::default(),
        }
    }

    fn roll(&mut self, per_mille: u32, what: &str) -> Result<(), DatapathError> {
        // A 64-bit LCG (Knuth's MMIX constants): enough to scatter faults, and repeatable.
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if ((self.seed >> 33) % 1000) < u64::from(per_mille) {
            self.injected += 1;
            return Err(DatapathError::Injected(format!("{what} failed (fault {})", self.injected)));
        }
        Ok(())
    }

    /// Reads go through `&self`; their faults are decided from a hash of the read count.
    fn read_roll(&self, what: &str) -> Result<(), DatapathError> {
        let n = self.reads.get();
        self.reads.set(n + 1);
        let x = (n ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
        if (x % 1000) < u64::from(self.read_fail_per_mille) {
            return Err(DatapathError::Injected(format!("{what} failed")));
        }
        Ok(())
    }
}

impl<D: Datapath> Datapath for FaultyDatapath<D> {
    fn flush(&mut self) -> Result<(), DatapathError> {
        self.inner.flush()
    }
    fn defers_writes(&self) -> bool {
        self.inner.defers_writes()
    }
    fn capacity(&self) -> Capacity {
        self.inner.capacity()
    }
    fn read_services(&self) -> Result<Vec<(Svc4Key, Svc4Value)>, DatapathError> {
        self.read_roll("reading the service map")?;
        self.inner.read_services()
    }
    fn read_backend(&self, id: u32) -> Result<Backend4, DatapathError> {
        self.read_roll("reading a backend")?;
        self.inner.read_backend(id)
    }
    fn read_svc_infos(&self) -> Result<Vec<(u32, SvcInfo)>, DatapathError> {
        self.read_roll("reading the service-info map")?;
        self.inner.read_svc_infos()
    }
    fn write_backend(&mut self, id: u32, value: Backend4) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing a backend")?;
        self.inner.write_backend(id, value)
    }
    fn write_service(&mut self, key: Svc4Key, value: Svc4Value) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing a service entry")?;
        self.inner.write_service(key, value)
    }
    fn delete_service(&mut self, key: Svc4Key) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "deleting a service entry")?;
        self.inner.delete_service(key)
    }
    fn write_svc_info(&mut self, id: u32, info: SvcInfo) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing a service info")?;
        self.inner.write_svc_info(id, info)
    }
    fn delete_svc_info(&mut self, id: u32) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "deleting a service info")?;
        self.inner.delete_svc_info(id)
    }
    fn reset_backend_flows(&mut self, id: u32) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "resetting a backend's flow count")?;
        self.inner.reset_backend_flows(id)
    }
    fn read_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, DatapathError> {
        self.read_roll("reading the source ranges")?;
        self.inner.read_source_ranges()
    }
    fn write_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing a source range")?;
        self.inner.write_source_range(svc_id, range)
    }
    fn delete_source_range(&mut self, svc_id: u32, range: Cidr) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "deleting a source range")?;
        self.inner.delete_source_range(svc_id, range)
    }
    fn read_filter(&self) -> Result<Vec<u64>, DatapathError> {
        self.read_roll("reading the endpoint filter")?;
        self.inner.read_filter()
    }
    fn write_filter(&mut self, words: &[(u32, u64)]) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing the endpoint filter")?;
        self.inner.write_filter(words)
    }
    fn read_backend_flows(&self, id: u32) -> Result<u64, DatapathError> {
        self.inner.read_backend_flows(id)
    }
    fn read_ct(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, DatapathError> {
        self.inner.read_ct()
    }
    fn read_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        self.inner.read_stats()
    }
    fn read_maglev_keys(&self) -> Result<Vec<u32>, DatapathError> {
        self.read_roll("reading the Maglev tables")?;
        self.inner.read_maglev_keys()
    }
    fn write_maglev(&mut self, key: u32, table: &[u16]) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing a Maglev table")?;
        self.inner.write_maglev(key, table)
    }
    fn delete_maglev(&mut self, key: u32) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "deleting a Maglev table")?;
        self.inner.delete_maglev(key)
    }
    fn read_services6(&self) -> Result<Vec<(Svc6Key, Svc4Value)>, DatapathError> {
        self.read_roll("reading the IPv6 service map")?;
        self.inner.read_services6()
    }
    fn read_backend6(&self, id: u32) -> Result<Backend6, DatapathError> {
        self.read_roll("reading an IPv6 backend")?;
        self.inner.read_backend6(id)
    }
    fn write_service6(&mut self, key: Svc6Key, value: Svc4Value) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing an IPv6 service entry")?;
        self.inner.write_service6(key, value)
    }
    fn delete_service6(&mut self, key: Svc6Key) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "deleting an IPv6 service entry")?;
        self.inner.delete_service6(key)
    }
    fn write_backend6(&mut self, id: u32, value: Backend6) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "writing an IPv6 backend")?;
        self.inner.write_backend6(id, value)
    }
    fn reset_backend_flows6(&mut self, id: u32) -> Result<(), DatapathError> {
        self.roll(self.write_fail_per_mille, "resetting an IPv6 backend's flow count")?;
        self.inner.reset_backend_flows6(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidrs_are_held_as_the_datapath_compares_them() {
        let r = |s: &str| s.parse::<crate::model::Cidr>().unwrap();
        let c = service_cidrs(&[r("198.18.0.7/24"), r("2001:db8:1::/112"), r("10.96.0.0/12")]).unwrap();
        let a4 = |s: &str| u32::from_ne_bytes(s.parse::<std::net::Ipv4Addr>().unwrap().octets());
        assert!(
            c.contains4(a4("198.18.0.99")) && c.contains4(a4("198.18.0.0")) && c.contains4(a4("10.111.2.3"))
        );
        assert!(!c.contains4(a4("198.18.1.1")) && !c.contains4(a4("10.112.0.1")));
        let a6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert!(c.contains6(&a6("2001:db8:1::ffff")));
        assert!(!c.contains6(&a6("2001:db8:1::1:0")));
        assert!(!lb_common::ServiceCidrs::default().contains4(a4("198.18.0.1")), "none: nothing");
        assert!(service_cidrs(&[r("0.0.0.0/0")]).is_err());
        let five: Vec<_> = (0..5).map(|i| r(&format!("198.18.{i}.0/24"))).collect();
        assert!(service_cidrs(&five).unwrap_err().contains("more than 4 IPv4"));
    }
}
