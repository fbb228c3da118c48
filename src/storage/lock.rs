//! One process per data directory: `DIR/LOCK`, an advisory exclusive lock (`flock`) held for
//! the life of the server, with the holder's pid written in the file so that a second server
//! can say who holds it.
//!
//! Two servers on one directory would both append to the same log and remove each other's
//! segments: acknowledged changes would be lost. The kernel releases the lock when the file is
//! closed, so a killed process never leaves a stale lock behind; the file itself stays (its
//! pid is then only a hint), because removing it would let a new server lock a fresh inode
//! while an old one still holds the removed one.
//!
//! This is the real file system only: the simulated disk has one engine by construction.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file's name in the data directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// How often a refused server reads the holder's pid again while the file is still empty
/// (the holder writes it right after locking), and how long it waits between reads.
const HOLDER_READ_ATTEMPTS: usize = 20;
const HOLDER_READ_PAUSE: Duration = Duration::from_millis(5);

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another process holds the lock.
    #[error(
        "the data directory {} is in use by another coffer process ({}, lock file {}); stop \
         it first or use another --data-dir",
        dir.display(),
        pid.map_or("pid unknown".to_string(), |pid| format!("pid {pid}")),
        dir.join(LOCK_FILE_NAME).display()
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it (`None` if the file has none).
        pid: Option<u32>,
    },
    /// The directory or the lock file could not be created, opened, locked or written.
    #[error("cannot lock the data directory: {}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The exclusive lock on a data directory; released when dropped (or when the process ends,
/// however it ends).
#[derive(Debug)]
pub struct DirLock {
    /// Held open: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Creates `data_dir` if missing, takes the exclusive lock on `data_dir/LOCK` without
    /// waiting, and writes this process's pid into it. Fails at once if another process (or
    /// another `DirLock` in this one) holds it.
    pub fn acquire(data_dir: &Path) -> Result<DirLock, DirLockError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DirLockError::Io { path, source }
        };
        std::fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
        let path = data_dir.join(LOCK_FILE_NAME);
        // Not truncated on open: the file may belong to a live holder, whose pid a refused
        // server reads.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(DirLockError::Held {
                    dir: data_dir.to_path_buf(),
                    pid: read_holder(&path),
                })
            }
            Err(TryLockError::Error(source)) => return Err(DirLockError::Io { path, source }),
        }
        // Written over the old content, then cut to length: a reader sees the old pid or the
        // new one, never an empty file in between.
        let pid = format!("{}\n", std::process::id());
        file.write_all_at(pid.as_bytes(), 0)
            .map_err(io_error(&path))?;
        file.set_len(pid.len() as u64).map_err(io_error(&path))?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid in a held lock file. A holder that has just locked may not have written it yet:
/// read again for a moment before giving up.
fn read_holder(path: &Path) -> Option<u32> {
    for attempt in 0..HOLDER_READ_ATTEMPTS {
        if let Some(pid) = File::open(path).ok().and_then(|file| parse_pid(&file)) {
            return Some(pid);
        }
        if attempt + 1 < HOLDER_READ_ATTEMPTS {
            std::thread::sleep(HOLDER_READ_PAUSE);
        }
    }
    None
}

fn parse_pid(file: &File) -> Option<u32> {
    let mut text = String::new();
    file.take(64).read_to_string(&mut text).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        // Goal: the lock excludes a second holder (also in the same process), names the
        // holder, and is free again once dropped.
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = DirLock::acquire(&data).expect("the first lock");
        assert!(data.is_dir(), "the data directory is created");
        let pid = std::fs::read_to_string(first.path()).expect("read the lock file");
        assert_eq!(pid, format!("{}\n", std::process::id()));
        match DirLock::acquire(&data) {
            Err(error @ DirLockError::Held { .. }) => {
                let text = error.to_string();
                assert!(text.contains(&data.display().to_string()), "{text}");
                assert!(
                    text.contains(&format!("pid {}", std::process::id())),
                    "{text}"
                );
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        let again = DirLock::acquire(&data).expect("free after the first is dropped");
        drop(again);
    }

    #[test]
    fn a_longer_stale_pid_is_overwritten_whole() {
        // Goal: the pid written replaces a longer one left by an earlier holder.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCK_FILE_NAME), "123456789012\n").expect("write");
        let lock = DirLock::acquire(dir.path()).expect("lock");
        let text = std::fs::read_to_string(lock.path()).expect("read");
        assert_eq!(text, format!("{}\n", std::process::id()));
    }
}
