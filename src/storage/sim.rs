//! A simulated disk for deterministic tests: in memory, single-process, with the failures a
//! real disk has on power loss. Nothing in it is random by itself: faults are armed by the
//! caller ([`SimStorage::arm`]) and a crash asks the caller for each choice
//! ([`SimStorage::crash`]), so a test driven by a seed (or by a fuzzer's bytes) reproduces
//! exactly.
//!
//! The model:
//! - Each file has the bytes a read sees now and the bytes that are durable. A write changes
//!   the first; a successful `sync` makes them the second.
//! - A created, renamed or removed name is visible at once and durable after `sync_dir` of
//!   its directory. Directories are durable once created (coffer creates them at start).
//! - **Crash**: every name goes back to its durable state; every file keeps its durable bytes
//!   plus a prefix of the writes made since its last sync, the last of which may be torn at
//!   any byte. Handles opened before the crash fail from then on (the process is gone).
//! - **Faults**: a write may fail after writing a prefix of its bytes (torn in flight); a sync
//!   may fail (nothing written since the last sync is then known to be durable); a read may
//!   return one flipped bit (the disk itself stays intact).
//!
//! Not modelled: writes since the last sync surviving out of order (a later page durable,
//! an earlier one lost), and damage to bytes that were already durable. Both are left to the
//! checksums, which the `wal_decode` fuzz target exercises on arbitrary bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{parent_of, Storage, StorageFile};

/// A fault to inject into the next call of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next `write_at` writes its first `written` bytes (at most all of them) and fails.
    Write {
        /// Bytes that reach the file before the failure.
        written: usize,
    },
    /// The next `sync` fails; what was written since the last sync stays not durable.
    Sync,
    /// The next `read` returns the file with bit `bit` (modulo its length in bits) flipped.
    ReadFlip {
        /// Which bit.
        bit: u64,
    },
}

/// Counters of what the simulated disk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// `write_at` calls.
    pub writes: u64,
    /// Successful file syncs.
    pub syncs: u64,
    /// `read` calls.
    pub reads: u64,
    /// Faults that fired.
    pub faults: u64,
    /// Crashes.
    pub crashes: u64,
    /// Bytes written since a sync that a crash threw away.
    pub bytes_lost: u64,
}

/// The simulated disk. Clones share the same disk.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    /// Bumped by every crash; handles from an older generation are dead.
    generation: u64,
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
    armed_write: Option<usize>,
    armed_sync: bool,
    armed_read: Option<u64>,
    stats: SimStats,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Changes since the last successful sync, in order.
    pending: Vec<Pending>,
}

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

fn dead() -> io::Error {
    io::Error::other("simulated disk: handle from before a crash")
}

fn offset_of(offset: u64) -> io::Result<usize> {
    usize::try_from(offset).map_err(|_| io::Error::other("simulated disk: offset too large"))
}

fn write_into(data: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    let end = offset + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset..end].copy_from_slice(bytes);
}

impl SimStorage {
    /// An empty disk.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// Arms a fault for the next call of its kind (replacing one armed before).
    pub fn arm(&self, fault: Fault) {
        let mut state = self.state.lock();
        match fault {
            Fault::Write { written } => state.armed_write = Some(written),
            Fault::Sync => state.armed_sync = true,
            Fault::ReadFlip { bit } => state.armed_read = Some(bit),
        }
    }

    /// Disarms every fault that has not fired.
    pub fn disarm(&self) {
        let mut state = self.state.lock();
        state.armed_write = None;
        state.armed_sync = false;
        state.armed_read = None;
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        self.state.lock().stats
    }

    /// Power loss. `choose(n)` must return a number below `n`; it picks, for each file in
    /// creation order, how many of its unsynced writes survive and where the next one is torn.
    pub fn crash(&self, choose: &mut dyn FnMut(u64) -> u64) {
        let mut state = self.state.lock();
        let state = &mut *state;
        state.generation += 1;
        state.stats.crashes += 1;
        state.names = state.durable_names.clone();
        state.armed_write = None;
        state.armed_sync = false;
        state.armed_read = None;
        let mut order: Vec<usize> = state.names.values().copied().collect();
        order.sort_unstable();
        order.dedup();
        let live: BTreeSet<usize> = order.iter().copied().collect();
        for (ino, inode) in state.inodes.iter_mut().enumerate() {
            if !live.contains(&ino) {
                // Unreachable after the crash: its content no longer matters.
                *inode = Inode::default();
                continue;
            }
            let pending = std::mem::take(&mut inode.pending);
            let keep = pick(choose, pending.len() as u64 + 1) as usize;
            let mut data = std::mem::take(&mut inode.durable);
            let mut lost = 0u64;
            for (index, change) in pending.iter().enumerate() {
                match change {
                    Pending::Write { offset, bytes } => {
                        let Ok(at) = usize::try_from(*offset) else {
                            continue;
                        };
                        if index < keep {
                            write_into(&mut data, at, bytes);
                        } else if index == keep {
                            let torn = pick(choose, bytes.len() as u64 + 1) as usize;
                            write_into(&mut data, at, &bytes[..torn]);
                            lost += (bytes.len() - torn) as u64;
                        } else {
                            lost += bytes.len() as u64;
                        }
                    }
                    Pending::SetLen(len) => {
                        if index < keep {
                            data.resize(usize::try_from(*len).unwrap_or(data.len()), 0);
                        }
                    }
                }
            }
            state.stats.bytes_lost += lost;
            inode.durable = data.clone();
            inode.data = data;
        }
    }

    /// The durable bytes of a file, for tests that inspect the disk.
    pub fn durable_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state.lock();
        let ino = *state.durable_names.get(path)?;
        Some(state.inodes[ino].durable.clone())
    }

    /// Replaces the content of a file, durably (for tests that plant bytes).
    pub fn put(&self, path: &Path, bytes: &[u8]) {
        let mut state = self.state.lock();
        let ino = state.inodes.len();
        state.inodes.push(Inode {
            data: bytes.to_vec(),
            durable: bytes.to_vec(),
            pending: Vec::new(),
        });
        state.dirs.insert(parent_of(path));
        state.names.insert(path.to_path_buf(), ino);
        state.durable_names.insert(path.to_path_buf(), ino);
    }

    fn handle(&self, ino: usize) -> Box<dyn StorageFile> {
        let generation = self.state.lock().generation;
        Box::new(SimFile {
            state: self.state.clone(),
            ino,
            generation,
        })
    }
}

fn pick(choose: &mut dyn FnMut(u64) -> u64, n: u64) -> u64 {
    if n <= 1 {
        0
    } else {
        choose(n).min(n - 1)
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let mut at = Some(dir);
        while let Some(d) = at {
            state.dirs.insert(d.to_path_buf());
            at = d.parent();
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        Ok(state
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut state = self.state.lock();
        state.stats.reads += 1;
        let ino = *state.names.get(path).ok_or(io::ErrorKind::NotFound)?;
        let mut bytes = state.inodes[ino].data.clone();
        if let Some(bit) = state.armed_read.take() {
            if !bytes.is_empty() {
                let bit = bit % (bytes.len() as u64 * 8);
                bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
                state.stats.faults += 1;
            }
        }
        Ok(bytes)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let ino = {
            let mut state = self.state.lock();
            if state.names.contains_key(path) {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            if !state.dirs.contains(&parent_of(path)) {
                return Err(io::ErrorKind::NotFound.into());
            }
            let ino = state.inodes.len();
            state.inodes.push(Inode::default());
            state.names.insert(path.to_path_buf(), ino);
            ino
        };
        Ok(self.handle(ino))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let ino = *self
            .state
            .lock()
            .names
            .get(path)
            .ok_or(io::ErrorKind::NotFound)?;
        Ok(self.handle(ino))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let ino = state.names.remove(from).ok_or(io::ErrorKind::NotFound)?;
        state.names.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.names.remove(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let state = &mut *state;
        state.durable_names.retain(|p, _| p.parent() != Some(dir));
        for (path, ino) in &state.names {
            if path.parent() == Some(dir) {
                state.durable_names.insert(path.clone(), *ino);
            }
        }
        Ok(())
    }
}

struct SimFile {
    state: Arc<Mutex<SimState>>,
    ino: usize,
    generation: u64,
}

impl SimFile {
    fn live<'a>(&self, state: &'a mut SimState) -> io::Result<&'a mut SimState> {
        if state.generation != self.generation {
            return Err(dead());
        }
        Ok(state)
    }
}

impl StorageFile for SimFile {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut guard = self.state.lock();
        let state = self.live(&mut guard)?;
        state.stats.writes += 1;
        let at = offset_of(offset)?;
        let (bytes, failed) = match state.armed_write.take() {
            Some(written) => {
                state.stats.faults += 1;
                (&bytes[..written.min(bytes.len())], true)
            }
            None => (bytes, false),
        };
        let inode = &mut state.inodes[self.ino];
        write_into(&mut inode.data, at, bytes);
        inode.pending.push(Pending::Write {
            offset,
            bytes: bytes.to_vec(),
        });
        if failed {
            return Err(io::Error::other("simulated write failure"));
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut guard = self.state.lock();
        let state = self.live(&mut guard)?;
        if std::mem::take(&mut state.armed_sync) {
            state.stats.faults += 1;
            return Err(io::Error::other("simulated fsync failure"));
        }
        state.stats.syncs += 1;
        let inode = &mut state.inodes[self.ino];
        inode.durable = inode.data.clone();
        inode.pending.clear();
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let mut guard = self.state.lock();
        let state = self.live(&mut guard)?;
        Ok(state.inodes[self.ino].data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut guard = self.state.lock();
        let state = self.live(&mut guard)?;
        let size = offset_of(len)?;
        let inode = &mut state.inodes[self.ino];
        inode.data.resize(size, 0);
        inode.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> PathBuf {
        PathBuf::from(text)
    }

    #[test]
    fn a_crash_keeps_synced_bytes_and_a_chosen_prefix_of_the_rest() {
        // Goal: synced data always survives; unsynced writes survive as a prefix, torn where
        // the choice says.
        let disk = SimStorage::new();
        disk.create_dir_all(&path("/d")).expect("dir");
        let mut file = disk.create(&path("/d/f")).expect("create");
        disk.sync_dir(&path("/d")).expect("sync dir");
        file.write_at(0, b"abc").expect("write");
        file.sync().expect("sync");
        file.write_at(3, b"def").expect("write");
        file.write_at(6, b"ghi").expect("write");
        // Keep the first unsynced write, tear the second after 1 byte.
        let mut choices = vec![1u64, 1].into_iter();
        disk.crash(&mut |_| choices.next().unwrap_or(0));
        assert_eq!(disk.read(&path("/d/f")).expect("read"), b"abcdefg");
        assert!(file.write_at(0, b"x").is_err(), "old handles are dead");
        assert_eq!(disk.stats().bytes_lost, 2);
    }

    #[test]
    fn a_name_not_synced_in_its_directory_is_lost_by_a_crash() {
        let disk = SimStorage::new();
        disk.create_dir_all(&path("/d")).expect("dir");
        let mut file = disk.create(&path("/d/f")).expect("create");
        file.write_at(0, b"abc").expect("write");
        file.sync().expect("sync");
        disk.crash(&mut |n| n - 1);
        assert!(disk.list(&path("/d")).expect("list").is_empty());
    }

    #[test]
    fn faults_fire_once() {
        let disk = SimStorage::new();
        disk.create_dir_all(&path("/d")).expect("dir");
        let mut file = disk.create(&path("/d/f")).expect("create");
        disk.arm(Fault::Write { written: 2 });
        assert!(file.write_at(0, b"abcd").is_err());
        assert_eq!(disk.read(&path("/d/f")).expect("read"), b"ab");
        disk.arm(Fault::Sync);
        assert!(file.sync().is_err());
        assert!(file.sync().is_ok());
        disk.arm(Fault::ReadFlip { bit: 0 });
        assert_eq!(disk.read(&path("/d/f")).expect("read"), b"`b");
        assert_eq!(disk.read(&path("/d/f")).expect("read"), b"ab");
        assert_eq!(disk.stats().faults, 3);
    }
}
