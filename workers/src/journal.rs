//! The award journal: a file where a worker writes down every award (attempt and fencing token)
//! before its handler starts, so that the same worker id, restarted, never starts it again.
//!
//! Why it is needed: the engine's outbox may publish an award a second time after an engine crash
//! (between the broker's confirmation and the row's removal), and RabbitMQ and Kafka deliver such
//! a copy; NATS drops it only within its duplicate window. A worker's memory of finished attempts
//! covers copies that arrive while it lives. A copy that arrives after the worker restarted would
//! start a non-idempotent task a second time; the journal closes that window (found by the fault
//! suite over RabbitMQ: the same worker id and token started `remediate` twice, 1.5 s apart).
//!
//! Format: one JSON object per line (`{"project", "runId", "task", "attempt", "token"}`).
//! Entries are written in groups by one thread and made durable (`fdatasync`) before any handler of
//! the group starts. A torn last line (a crash mid-write) is skipped on load: its handler never
//! started. The file keeps at least the newest [`Journal::CAPACITY`] entries: when it holds twice
//! as many it is rewritten to those (temporary file, fsync, rename, fsync of the directory).

use foldhash::HashSet;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use capstan_proto::AttemptRef;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{Error, Result};

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    attempt: AttemptRef,
    token: u64,
}

type Request = (Entry, oneshot::Sender<std::result::Result<(), String>>);

/// A handle on the journal's writer thread; cheap to clone. The thread ends when the last handle
/// is dropped.
#[derive(Clone)]
pub(crate) struct Journal {
    path: PathBuf,
    tx: std_mpsc::Sender<Request>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Journal {
    /// How many awards the journal (and the worker's memory) keeps: far more than an outbox
    /// republishes at once.
    pub(crate) const CAPACITY: usize = 16_384;

    /// Opens (or creates, with its directory) the journal, returning the awards it holds, oldest
    /// first.
    pub(crate) fn open(path: &Path) -> Result<(Journal, Vec<(AttemptRef, u64)>)> {
        let io = |source| Error::Journal { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let Contents { kept, mut lines, torn, ends_cleanly } = read(path).map_err(io)?;
        if torn > 0 {
            tracing::warn!(path = %path.display(), lines = torn, "skipped unreadable journal lines (a write cut by a crash)");
        }
        // The file is only rewritten when it is long: a worker that reconnects in the same process
        // may still have its previous writer appending for a moment, to the same file.
        if lines >= 2 * Self::CAPACITY {
            rewrite(path, &kept).map_err(io)?;
            lines = kept.len();
        }
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        if !ends_cleanly {
            // A torn last line is ended so that the next entry starts a line of its own.
            file.write_all(b"\n").and_then(|()| file.sync_data()).map_err(io)?;
        }
        let loaded: Vec<_> = kept.iter().map(|e| (e.attempt.clone(), e.token)).collect();
        let (tx, rx) = std_mpsc::channel();
        let writer = Writer { path: path.to_path_buf(), file, lines };
        std::thread::Builder::new().name("capstan-journal".into()).spawn(move || writer.run(rx)).map_err(io)?;
        tracing::info!(path = %path.display(), awards = loaded.len(), "award journal open");
        Ok((Journal { path: path.to_path_buf(), tx }, loaded))
    }

    /// Writes one award and returns once it is durable.
    pub(crate) async fn record(&self, attempt: &AttemptRef, token: u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let failed =
            |message: String| Error::Journal { path: self.path.clone(), source: std::io::Error::other(message) };
        self.tx
            .send((Entry { attempt: attempt.clone(), token }, tx))
            .map_err(|_| failed("the journal writer stopped".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(failed(message)),
            Err(_) => Err(failed("the journal writer stopped".into())),
        }
    }
}

/// Owns the file; runs on its own thread so that `fdatasync` never blocks the async runtime.
struct Writer {
    path: PathBuf,
    file: File,
    /// Lines in the file; at twice the capacity it is rewritten.
    lines: usize,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            // Everything queued meanwhile goes into the same write and the same sync.
            let mut group = vec![first];
            group.extend(rx.try_iter().take(4096));
            let written = self.append(group.iter().map(|(e, _)| e));
            let reply = written.as_ref().map(|_| ()).map_err(|e| e.to_string());
            if let Err(e) = &written {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the award journal");
            }
            for (_, tx) in group {
                let _ = tx.send(reply.clone());
            }
            if reply.is_ok()
                && self.lines >= 2 * Journal::CAPACITY
                && let Err(e) = self.compact()
            {
                // The appends go on to the longer file; the next group tries again.
                tracing::warn!(path = %self.path.display(), error = %e, "cannot compact the award journal");
            }
        }
    }

    fn append<'e>(&mut self, entries: impl Iterator<Item = &'e Entry>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut n = 0;
        for e in entries {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
            n += 1;
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.lines += n;
        Ok(())
    }

    /// Rewrites the file to its newest entries, read back from the file itself (compaction is
    /// rare: once per [`Journal::CAPACITY`] awards).
    fn compact(&mut self) -> std::io::Result<()> {
        let kept = read(&self.path)?.kept;
        rewrite(&self.path, &kept)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = kept.len();
        Ok(())
    }
}

/// What a journal file holds.
struct Contents {
    /// The newest [`Journal::CAPACITY`] readable entries, oldest first.
    kept: VecDeque<Entry>,
    lines: usize,
    /// Lines that do not parse (a write cut by a crash).
    torn: usize,
    /// Whether the last line ends with a newline (true for an empty or missing file).
    ends_cleanly: bool,
}

fn read(path: &Path) -> std::io::Result<Contents> {
    let mut c = Contents { kept: VecDeque::new(), lines: 0, torn: 0, ends_cleanly: true };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(c),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line)? > 0 {
        c.lines += 1;
        c.ends_cleanly = line.ends_with(b"\n");
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) => {
                c.kept.push_back(e);
                if c.kept.len() > Journal::CAPACITY {
                    c.kept.pop_front();
                }
            }
            Err(_) => c.torn += 1,
        }
        line.clear();
    }
    Ok(c)
}

/// Replaces the file by `entries`, atomically and durably.
fn rewrite(path: &Path, entries: &VecDeque<Entry>) -> std::io::Result<()> {
    let tmp = path.with_extension("journal-tmp");
    let mut buf = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut buf, e)?;
        buf.push(b'\n');
    }
    let mut file = File::create(&tmp)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Awards this worker started lately, by fencing token. The engine's outbox may publish an award
/// again after a crash (consumers deduplicate by CloudEvent id); NATS drops the copy within its
/// duplicate window, RabbitMQ and Kafka deliver it. Without this memory a copy arriving after the
/// attempt ended would run it again (found by the fault suite over RabbitMQ and Kafka); the
/// journal carries it over a restart.
#[derive(Default)]
pub(crate) struct Taken {
    order: VecDeque<(AttemptRef, u64)>,
    set: HashSet<(AttemptRef, u64)>,
}

impl Taken {
    /// How many awards are remembered: far more than an outbox republishes at once.
    const CAPACITY: usize = Journal::CAPACITY;

    pub(crate) fn insert(&mut self, attempt: AttemptRef, token: u64) {
        if self.set.insert((attempt.clone(), token)) {
            self.order.push_back((attempt, token));
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Forgets every token of `attempt`: its claim-free offer went back unreported.
    pub(crate) fn remove(&mut self, attempt: &AttemptRef) {
        self.set.retain(|(a, _)| a != attempt);
        self.order.retain(|(a, _)| a != attempt);
    }

    pub(crate) fn contains(&self, attempt: &AttemptRef, token: u64) -> bool {
        self.set.contains(&(attempt.clone(), token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(run: &str, n: u32) -> AttemptRef {
        AttemptRef { project: "p".into(), run_id: run.into(), task: "remediate".into(), attempt: n }
    }

    #[tokio::test]
    async fn awards_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w1.journal");
        let (journal, loaded) = Journal::open(&path).unwrap();
        assert!(loaded.is_empty());
        journal.record(&attempt("r1", 1), 6).await.unwrap();
        journal.record(&attempt("r2", 2), 9).await.unwrap();
        drop(journal);
        let (_journal, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded, vec![(attempt("r1", 1), 6), (attempt("r2", 2), 9)]);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w1.journal");
        let (journal, _) = Journal::open(&path).unwrap();
        journal.record(&attempt("r1", 1), 6).await.unwrap();
        drop(journal);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"project":"p","runId":"r2","ta"#).unwrap();
        drop(f);
        let (journal, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded, vec![(attempt("r1", 1), 6)]);
        journal.record(&attempt("r3", 1), 7).await.unwrap();
        drop(journal);
        let (_journal, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded, vec![(attempt("r1", 1), 6), (attempt("r3", 1), 7)]);
    }

    #[tokio::test]
    async fn the_file_is_compacted_to_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w1.journal");
        let (journal, _) = Journal::open(&path).unwrap();
        const WAVE: usize = 512;
        let total = 2 * Journal::CAPACITY + 10;
        // Concurrent records share writes and syncs; waves keep the order between them.
        for wave in (0..total).step_by(WAVE) {
            let mut waits = tokio::task::JoinSet::new();
            for i in wave..(wave + WAVE).min(total) {
                let journal = journal.clone();
                waits.spawn(async move { journal.record(&attempt(&format!("r{i}"), 1), i as u64).await });
            }
            while let Some(r) = waits.join_next().await {
                r.unwrap().unwrap();
            }
        }
        drop(journal);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < total, "the file was compacted: {lines} lines for {total} awards");
        let (_journal, loaded) = Journal::open(&path).unwrap();
        assert_eq!(loaded.len(), Journal::CAPACITY);
        let tokens: std::collections::HashSet<u64> = loaded.iter().map(|(_, t)| *t).collect();
        let newest = (total - Journal::CAPACITY + WAVE) as u64..total as u64;
        assert!(newest.clone().all(|t| tokens.contains(&t)), "the newest awards are kept: {newest:?}");
    }

    #[tokio::test]
    async fn the_directory_is_created_and_an_unusable_place_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(&dir.path().join("new-dir").join("w1.journal")).unwrap();
        drop(journal);
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let err = Journal::open(&file.join("w1.journal")).unwrap_err();
        assert!(err.to_string().contains("a-file/w1.journal"), "{err}");
    }
}
