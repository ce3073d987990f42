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
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{MapData, MapError};

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
pub fn update_all<K: Copy, V: Copy>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), std::io::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    debug_assert_eq!(keys.len(), values.len());
    let fd = map.fd().as_fd().as_raw_fd();
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
pub fn write_error(name: &'static str, e: std::io::Error) -> super::DatapathError {
    super::DatapathError::Map {
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
}

/// Gives the keys and values of the run waiting when it is of one map (a variant of [`Pending`]).
pub type RunOf<K, V> = fn(&mut Pending) -> Option<(&mut Vec<K>, &mut Vec<V>)>;
