//! One agent per pin directory. Two agents on one node and one `--pin-dir` (a manual run beside
//! the DaemonSet's, or an update whose pods overlap) would each replace the other's programs on
//! the pinned links and write their own picture into the same maps: traffic would follow
//! whichever wrote last, and what one of them rejects the other would serve.
//!
//! The agent takes an exclusive `flock` on the pin directory itself before it creates, pins or
//! attaches anything, and holds it while it runs. The kernel drops the lock with the process, so
//! an agent that was killed never blocks the next one. The lock lives on the directory's inode
//! in the bpffs, which every container that mounts the host's /sys/fs/bpf shares, so it holds
//! across pods too. A second agent finds the holder in /proc/locks and refuses to start, naming
//! it, having changed nothing.
use std::{
    fs::File,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

/// The lock on a pin directory, held until dropped.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the pin directory {dir} to lock it: {source}")]
    Open { dir: PathBuf, source: std::io::Error },
    #[error("cannot lock the pin directory {dir}: {source}")]
    Lock { dir: PathBuf, source: std::io::Error },
    #[error(
        "another xlb agent is running with the pin directory {dir} ({holder}); two agents on one pin directory would fight over the programs and maps. Stop it first, or give this one its own --pin-dir. Nothing was changed"
    )]
    Held { dir: PathBuf, holder: String },
}

/// Locks `dir` (which must exist) for this process, or says who holds it.
pub fn lock(dir: &Path) -> Result<PinDirLock, LockError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|source| LockError::Open { dir: dir.to_owned(), source })?;
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(PinDirLock { _dir: f });
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(LockError::Lock { dir: dir.to_owned(), source: err });
    }
    let holder = match f.metadata().ok().and_then(|md| holder_pid(md.dev(), md.ino())) {
        Some(pid) => {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if cmd.is_empty() { format!("pid {pid}") } else { format!("pid {pid}: {cmd}") }
        }
        // The holder runs in another PID namespace (a pod without hostPID) that this one cannot see.
        None => "its pid is not visible from here".into(),
    };
    Err(LockError::Held { dir: dir.to_owned(), holder })
}

/// The process holding a `flock` on the inode `ino` of device `dev`, from /proc/locks (where the
/// kernel gives the pid as seen from the reader's PID namespace, 0 or -1 when not visible).
fn holder_pid(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    parse_locks(&text, dev, ino)
}

fn parse_locks(text: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    text.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 17316 00:28:26128 0 EOF"; waiters are "1: -> FLOCK ...".
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            return None;
        }
        let mut id = f[5].split(':');
        let (ma, mi, i) = (id.next()?, id.next()?, id.next()?);
        let matches = u32::from_str_radix(ma, 16).ok()? == major
            && u32::from_str_radix(mi, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        f[4].parse::<u32>().ok().filter(|p| matches && *p > 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 900 00:28:26128 0 EOF\n2: FLOCK  ADVISORY  WRITE 17316 00:28:26128 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 17400 00:28:26128 0 EOF\n3: FLOCK  ADVISORY  WRITE 5 00:28:99 0 EOF\n";
        let dev = libc::makedev(0, 0x28);
        assert_eq!(parse_locks(text, dev, 26128), Some(17316));
        assert_eq!(parse_locks(text, dev, 99), Some(5));
        assert_eq!(parse_locks(text, dev, 7), None);
        assert_eq!(parse_locks("1: FLOCK  ADVISORY  WRITE 0 00:28:7 0 EOF\n", dev, 7), None, "not visible");
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("xlb-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = lock(&dir).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let err = lock(&dir).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("another xlb agent is running") && err.contains("Nothing was changed"), "{err}");
        drop(first);
        let again = lock(&dir);
        assert!(again.is_ok(), "released with its holder: {again:?}");
        drop(again);
        std::fs::remove_dir(&dir).unwrap();
    }
}
