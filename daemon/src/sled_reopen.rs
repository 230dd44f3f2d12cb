//! Reopening a sled database after a write error, for the stores whose handles are shared:
//! the shadow store ([`crate::shadow::Store`]), the Device Defender store
//! ([`crate::defender::Store`]) and the webhook outbox ([`crate::rules::webhook::Outbox`]).
//!
//! sled 0.34 keeps the first I/O error of a write to its log (`ENOSPC` when the disk is full) as
//! the database's error and returns it from every later write on that `Db`, for good: without
//! this, a store would refuse every write until the daemon restarts, long after the disk has
//! room again. A [`Reopening`] keeps the database's handles behind one lock that all its clones
//! share:
//! - a write or flush that fails closes the database at once: every handle is dropped, so
//!   nothing more is read from a database whose memory may hold writes that never reached the
//!   disk, and sled's file lock is released. It is then opened again, which is what a restart
//!   does: what was flushed is there, what was not is gone;
//! - opening is tried at most once per [`REOPEN_EVERY`] (on the failure itself, and then by the
//!   next operation once that long has passed); meanwhile, and while opening fails (the disk is
//!   still full), every operation fails with [`StoreError::Closed`], which says what is closed,
//!   where, and what to do;
//! - [`Reopening::generation`] counts the reopens, so that the owner of in-memory state made
//!   from the store's contents knows when to make it again;
//! - failures are logged at most once per [`LOG_EVERY`] (an ERROR with how many there were
//!   since the last line, what they mean for the gateway and what to do), and a write that
//!   succeeds after them says so (a WARN, at most as often): a full disk does not write a
//!   journal line per failed write.
//!
//! The handles are only lent, to a closure, under the lock ([`Reopening::read`],
//! [`Reopening::write`]): nobody keeps a `Tree` or an iterator that would hold the old database
//! open, and closing waits for the operations in progress. A closure must not use the same
//! store again (the lock is not re-entrant). The one exception is [`Reopening::flush_async`],
//! which keeps a `Db` for the length of its flush, so as not to block its task: an attempt to
//! open again meanwhile finds the database still locked, and the store stays closed until the
//! next attempt. sled's own threads may also hold the lock for a moment after the last handle
//! is gone; opening waits up to 200 ms for that (the calling thread sleeps: this happens only
//! on a failure, at most once per second).
//!
//! The durable queue ([`crate::queue`]) recovers the same way with its own code
//! (`SledStore::recover`): it has a single owner and recounts its records when it reopens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Shortest time between two attempts to open a closed store again.
pub const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// At most one ERROR about a store's failures per this long, with their count since the last.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// After the handles are dropped, sled's own threads may hold its file lock for a moment (a log
/// buffer being written): opening again waits at most this long for it.
const LOCK_WAIT: Duration = Duration::from_millis(200);

/// The open database of a store: its `Db` and its trees.
pub trait Handles: Send + Sync + 'static {
    /// The database (to flush it).
    fn db(&self) -> &sled::Db;
}

/// A store's error: what failed, where, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (at start).
    #[error("{what} ({}): cannot open: {source}", dir.display())]
    Open {
        /// Which store.
        what: &'static str,
        /// Its directory.
        dir: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// An operation failed. A failed write closes the store, which is opened again by itself.
    #[error("{what} ({}): {source}; if the disk is full, free space in gateway.state_dir: the store is reopened by itself, no restart needed", dir.display())]
    Failed {
        /// Which store.
        what: &'static str,
        /// Its directory.
        dir: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The store was closed after a write error and is not open again yet.
    #[error("{what} ({}) is closed after a write error and not reopened yet ({cause}); free space in gateway.state_dir: it is reopened by itself (tried at most once per second), no restart needed", dir.display())]
    Closed {
        /// Which store.
        what: &'static str,
        /// Its directory.
        dir: PathBuf,
        /// The write error that closed it, or why it could not be opened again.
        cause: String,
    },
}

/// A sled database that is closed and opened again after a write error (see the module docs).
/// Cheap to clone; every clone sees the same database.
pub struct Reopening<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for Reopening<H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<H> std::fmt::Debug for Reopening<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopening")
            .field("what", &self.inner.what)
            .field("dir", &self.inner.dir)
            .field("generation", &self.inner.generation.load(Relaxed))
            .finish_non_exhaustive()
    }
}

struct Inner<H> {
    what: &'static str,
    /// What a failure means for the gateway, for the journal.
    consequence: &'static str,
    dir: PathBuf,
    open: fn(&Path) -> sled::Result<H>,
    /// `None` while closed.
    handles: RwLock<Option<H>>,
    /// Successful reopens.
    generation: AtomicU64,
    /// A write failed and none has succeeded since.
    failing: AtomicBool,
    /// Locked before `handles` whenever both are.
    recovery: Mutex<Recovery>,
}

#[derive(Debug, Default)]
struct Recovery {
    /// When opening again was last tried.
    last_try: Option<Instant>,
    /// Why it is closed.
    cause: String,
    /// Failed operations since the last journal line, and when that was.
    unlogged: u64,
    last_log: Option<Instant>,
    /// Failed operations since the last write that succeeded.
    failed: u64,
    /// When the last "written again" line was.
    last_recovery_log: Option<Instant>,
}

/// Whether `e` is sled saying another handle holds the database's file lock.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

impl<H: Handles> Reopening<H> {
    /// Open the store `what` in `dir` with `open` (which opens the database and its trees; it
    /// is used again to reopen). `consequence` says in the journal what a failure means.
    pub fn open(
        what: &'static str,
        consequence: &'static str,
        dir: &Path,
        open: fn(&Path) -> sled::Result<H>,
    ) -> Result<Self, StoreError> {
        let handles = open(dir).map_err(|source| StoreError::Open {
            what,
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                what,
                consequence,
                dir: dir.to_path_buf(),
                open,
                handles: RwLock::new(Some(handles)),
                generation: AtomicU64::new(0),
                failing: AtomicBool::new(false),
                recovery: Mutex::new(Recovery::default()),
            }),
        })
    }

    /// How many times the store was opened again since it was first opened: when it changes,
    /// what was written but not flushed before may be gone.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Relaxed)
    }

    /// Read with the handles (a closed store is opened again first, when it is time).
    pub fn read<R>(&self, f: impl FnOnce(&H) -> sled::Result<R>) -> Result<R, StoreError> {
        self.run(false, f)
    }

    /// Write with the handles; a failure closes the store and opens it again (see the module
    /// docs).
    pub fn write<R>(&self, f: impl FnOnce(&H) -> sled::Result<R>) -> Result<R, StoreError> {
        self.run(true, f)
    }

    /// Flush the database without blocking the task (a failure is a failed write).
    pub async fn flush_async(&self) -> Result<(), StoreError> {
        let (db, generation) = self.read(|h| Ok((h.db().clone(), self.generation())))?;
        let flushed = db.flush_async().await;
        // Dropped before a reopen can need its lock.
        drop(db);
        match flushed {
            Ok(_) => {
                self.succeeded();
                Ok(())
            }
            Err(e) => Err(self.failed(e, Some(generation))),
        }
    }

    fn handles(&self) -> std::sync::RwLockReadGuard<'_, Option<H>> {
        self.inner.handles.read().unwrap_or_else(|e| e.into_inner())
    }

    fn recovery(&self) -> std::sync::MutexGuard<'_, Recovery> {
        self.inner
            .recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn run<R>(&self, write: bool, f: impl FnOnce(&H) -> sled::Result<R>) -> Result<R, StoreError> {
        let (result, generation) = {
            let mut handles = self.handles();
            if handles.is_none() {
                drop(handles);
                let mut rec = self.recovery();
                self.reopen(&mut rec);
                handles = self.handles();
                if handles.is_none() {
                    drop(handles);
                    return Err(self.closed(&mut rec));
                }
            }
            let Some(h) = handles.as_ref() else {
                unreachable!("checked above, under the same guard")
            };
            // Changes only under the write lock: this is the generation `f` works with.
            (f(h), self.generation())
        };
        match result {
            Ok(r) => {
                if write {
                    self.succeeded();
                }
                Ok(r)
            }
            Err(e) => Err(self.failed(e, write.then_some(generation))),
        }
    }

    /// A write succeeded: if writes failed before, say that they work again (at most once per
    /// [`LOG_EVERY`], for a disk that is full one moment and not the next).
    fn succeeded(&self) {
        if !self.inner.failing.load(Relaxed) || !self.inner.failing.swap(false, Relaxed) {
            return;
        }
        let mut rec = self.recovery();
        let failed = std::mem::take(&mut rec.failed);
        if rec
            .last_recovery_log
            .is_some_and(|t| t.elapsed() < LOG_EVERY)
        {
            return;
        }
        rec.last_recovery_log = Some(Instant::now());
        log::warn!(
            store = self.inner.what, path:% = self.inner.dir.display(), failed = failed;
            "{} ({}) is written again after {failed} failed operations: reopened without a restart",
            self.inner.what, self.inner.dir.display()
        );
    }

    /// An operation failed with `e`. A write (`written`: the generation it wrote to) closes
    /// the store and opens it again when it is time — unless the store was opened again since
    /// (another clone's failure came first).
    fn failed(&self, e: sled::Error, written: Option<u64>) -> StoreError {
        let mut rec = self.recovery();
        let error = e.to_string();
        if let Some(generation) = written {
            rec.cause = error.clone();
            self.inner.failing.store(true, Relaxed);
            if generation == self.generation() {
                // Closed at once, even when it is too soon to open it again: its memory may
                // hold writes that never reached the disk, and nobody must read them.
                *self
                    .inner
                    .handles
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = None;
            }
            self.reopen(&mut rec);
        }
        self.note(&mut rec, &error, written.is_some());
        StoreError::Failed {
            what: self.inner.what,
            dir: self.inner.dir.clone(),
            source: e,
        }
    }

    /// The error of an operation refused because the store is closed.
    fn closed(&self, rec: &mut Recovery) -> StoreError {
        self.note(rec, "refused: closed after a write error", false);
        StoreError::Closed {
            what: self.inner.what,
            dir: self.inner.dir.clone(),
            cause: rec.cause.clone(),
        }
    }

    /// Count a failed operation (`error`: what went wrong; `write`: a failed write, which
    /// closed the store); an ERROR at most once per [`LOG_EVERY`].
    fn note(&self, rec: &mut Recovery, error: &str, write: bool) {
        rec.failed += 1;
        rec.unlogged += 1;
        if rec.last_log.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        let open = self.handles().is_some();
        let state = if open && write {
            "it was closed and opened again".to_owned()
        } else if open {
            "it is open".to_owned()
        } else {
            format!(
                "it is closed ({}) and opening it again is tried at most every {}s",
                rec.cause,
                REOPEN_EVERY.as_secs()
            )
        };
        let (what, dir) = (self.inner.what, self.inner.dir.display());
        log::error!(
            store = what, path:% = dir, error:% = error, failed = rec.unlogged, open = open;
            "{what} ({dir}) failed: {error}; {}; {state}; if the disk is full, free space in gateway.state_dir, no restart needed (failed operations since the last such line: {}; at most one such line per {}s)",
            self.inner.consequence, rec.unlogged, LOG_EVERY.as_secs()
        );
        rec.unlogged = 0;
        rec.last_log = Some(Instant::now());
    }

    /// Open a closed store again, unless it is open or it was tried less than
    /// [`REOPEN_EVERY`] ago.
    fn reopen(&self, rec: &mut Recovery) {
        if rec.last_try.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return;
        }
        // Waits until no operation uses the handles.
        let mut handles = self
            .inner
            .handles
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if handles.is_some() {
            return;
        }
        rec.last_try = Some(Instant::now());
        let deadline = Instant::now() + LOCK_WAIT;
        let opened = loop {
            match (self.inner.open)(&self.inner.dir) {
                Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r,
            }
        };
        match opened {
            Ok(h) => {
                *handles = Some(h);
                self.inner.generation.fetch_add(1, Relaxed);
                log::debug!(store = self.inner.what; "{} opened again after a write error", self.inner.what);
            }
            Err(e) => rec.cause = format!("opening it again failed: {e}"),
        }
    }
}

/// A small disk for the stores' full-disk tests.
#[cfg(test)]
pub(crate) mod testing {
    /// A tmpfs of `size` on `at`, unmounted (lazily if busy) when dropped. Needs root.
    pub(crate) struct SmallDisk(pub(crate) std::path::PathBuf);

    impl SmallDisk {
        pub(crate) fn new(at: &std::path::Path, size: &str) -> Self {
            std::fs::create_dir_all(at).unwrap();
            let mounted = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "wg-test",
                ])
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                mounted,
                "this test mounts a tmpfs on {}: run it as root",
                at.display()
            );
            Self(at.to_path_buf())
        }

        /// Take every free byte with `file`.
        pub(crate) fn fill(&self, file: &str) {
            use std::io::Write;
            let mut f = std::fs::File::create(self.0.join(file)).unwrap();
            for chunk in [1usize << 16, 512, 1] {
                while f.write(&vec![0u8; chunk]).is_ok_and(|n| n > 0) {}
            }
        }

        /// Assert that a store's `error` says what (`store`), where (`dir`) and what to do.
        pub(crate) fn assert_explains(error: &str, store: &str, dir: &std::path::Path) {
            for part in [
                store,
                dir.to_str().unwrap(),
                "free space in gateway.state_dir",
            ] {
                assert!(error.contains(part), "{part:?} not in {error:?}");
            }
        }

        /// Give back what [`SmallDisk::fill`] took.
        pub(crate) fn free(&self, file: &str) {
            std::fs::remove_file(self.0.join(file)).unwrap();
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}
