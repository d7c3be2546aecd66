//! The embedded log: a durable, partitioned log in one SQLite file (WAL mode), behind the same
//! trait as Kafka. It is the default backend, so it is a product, not a test double:
//!
//! - **Durability.** `append` returns after the transaction holding the records has committed
//!   to the WAL. With `synchronous=NORMAL` (the default) a committed append survives the process
//!   being killed (`kill -9`); with `fsync` on (`synchronous=FULL`) it also survives power loss.
//! - **Throughput.** One writer thread owns the write connection and commits every append that
//!   is waiting in a single transaction (group commit), so concurrent clients share the cost.
//! - **Clients first.** Appends and commits through a [`Log::background`] handle (the stages'
//!   own outputs) wait while clients' appends are waiting, for at most `BACKGROUND_MAX_WAIT`:
//!   the one writer is shared, and an acknowledgement should not queue behind derived events.
//! - **Several processes** may append to the same file (e.g. `payerx load` next to `payerx
//!   serve`): offsets are assigned inside the write transaction, and readers also re-check the
//!   file periodically, not only when this process appended.
//! - **Consumer groups** have a single member that owns every partition: the embedded log runs on
//!   one node. Scale out with Kafka.
//! - **Retention** is forever: the log is the source of truth that views are rebuilt from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{oneshot, watch};

use crate::log::{Appended, Consumed, Consumer, Log, LogError, Record, TopicSpec};
use crate::partitioner::partition_for;

/// How often readers look for appends made by other processes while idle.
const FOREIGN_APPEND_POLL: Duration = Duration::from_millis(50);
/// Upper bound of records committed in one writer transaction.
const MAX_RECORDS_PER_COMMIT: usize = 20_000;
/// The longest a background command waits for the clients' appends before it is committed with
/// them anyway, so the stages keep moving (slower) through a long load.
const BACKGROUND_MAX_WAIT: Duration = Duration::from_millis(200);

/// Whose writes these are: a client's being acknowledged, or a stage's own outputs and commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Foreground,
    Background,
}

/// A command waiting for the writer.
struct Queued {
    lane: Lane,
    since: Instant,
    cmd: WriteCmd,
}

/// A handle on the writer thread's queue, in one lane.
#[derive(Clone)]
struct Writer {
    tx: mpsc::Sender<Queued>,
    lane: Lane,
}

impl Writer {
    fn send(&self, cmd: WriteCmd) -> Result<(), LogError> {
        self.tx.send(Queued { lane: self.lane, since: Instant::now(), cmd }).map_err(|_| closed())
    }
}

#[derive(Clone)]
pub struct EmbeddedLog {
    path: PathBuf,
    writer: Writer,
    /// Appends committed per topic (cumulative), so this process's consumers wake at once, and
    /// only when one of their topics moved.
    appended: watch::Receiver<Appends>,
    partitions: Arc<Mutex<HashMap<String, i32>>>,
    /// Dropped with the log's last handle, which stops the checkpoint thread.
    _checkpoints: mpsc::Sender<()>,
}

/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL size past which the checkpoint thread starts the WAL over.
/// (Also the WAL file's `journal_size_limit`, so a restart reuses the file instead of paying to
/// truncate it in the next commit.)
pub const RESTART_WAL_BYTES: i64 = 256 << 20;
/// How long such a restart may hold back the writer while it waits for readers to move on.
const RESTART_WAIT: Duration = Duration::from_millis(50);
/// Before a restart, rounds of (flush, PASSIVE checkpoint) repeat, at most `CATCH_UP_ROUNDS`,
/// until one copies at most this much: the restart then has little to copy and sync while it
/// holds back the writer. (Without them a restart in a load stalled appends for 300-500 ms.)
const CATCH_UP_BYTES: i64 = 8 << 20;
const CATCH_UP_ROUNDS: usize = 6;

/// The rounds of (flush, PASSIVE checkpoint) before a WAL restart, for the log and the SQLite
/// views alike: after each round's checkpoint, [`CatchUp::more`] says whether to run another.
pub struct CatchUp {
    copied: i64,
    page_size: i64,
    rounds: usize,
}

impl CatchUp {
    /// After a PASSIVE checkpoint that had copied `copied` frames of `page_size` bytes.
    pub fn new(copied: i64, page_size: i64) -> CatchUp {
        CatchUp { copied, page_size, rounds: 0 }
    }

    /// Given the frames copied so far: whether the last round copied more than
    /// `CATCH_UP_BYTES` and another round is allowed.
    pub fn more(&mut self, copied: i64) -> bool {
        let fresh = copied - std::mem::replace(&mut self.copied, copied);
        self.rounds += 1;
        fresh * self.page_size > CATCH_UP_BYTES && self.rounds < CATCH_UP_ROUNDS
    }
}

/// How long a connection waits for a lock before an append or read fails as busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The step of those waits. SQLite's own handler sleeps in steps growing to 100 ms, so a writer
/// held back for 30 ms by a checkpoint could sleep 50 ms more; short steps resume it promptly.
const BUSY_STEP: Duration = Duration::from_micros(250);

/// Busy handler of every log connection: `BUSY_TIMEOUT` in short steps.
fn busy_wait(attempts: i32) -> bool {
    busy_step(attempts, BUSY_TIMEOUT)
}

/// Busy handler of the checkpoint thread: a restart gives up after `RESTART_WAIT`.
fn restart_wait(attempts: i32) -> bool {
    busy_step(attempts, RESTART_WAIT)
}

fn busy_step(attempts: i32, limit: Duration) -> bool {
    if BUSY_STEP * u32::try_from(attempts).unwrap_or(0) >= limit {
        return false;
    }
    std::thread::sleep(BUSY_STEP);
    true
}

/// Writes back the dirty pages of the filesystem holding `dir` (the log's, or the SQLite views'),
/// without holding any lock of the database. Through the folder, not the database file: closing
/// any other descriptor of the database file would drop the process's SQLite locks on it.
pub fn flush_filesystem(dir: &Path) {
    #[cfg(target_os = "linux")]
    match std::fs::File::open(dir) {
        Ok(d) => {
            if let Err(e) = rustix::fs::syncfs(&d) {
                tracing::debug!(error = %e, "checkpoints: syncfs failed");
            }
        }
        Err(e) => tracing::debug!(error = %e, "checkpoints: cannot open the database folder"),
    }
    #[cfg(not(target_os = "linux"))]
    let _ = dir;
}

/// A PASSIVE checkpoint: frames in the WAL and frames copied into the database.
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
}

/// Checkpoints the WAL (PASSIVE: never blocks the writer or readers) until the log is dropped.
///
/// A PASSIVE checkpoint copies the WAL into the database but never starts it over: only a
/// writer does that, and only at a moment no reader holds a snapshot in it. Busy readers may
/// never leave it one, and the WAL then grows without bound (gigabytes in a long load; its
/// eventual truncation stalled a commit for most of a second). So past `RESTART_WAL_BYTES` a
/// RESTART follows, once PASSIVE ones have left little to copy; it waits at most
/// `RESTART_WAIT` for the readers before giving up until the next round.
fn checkpoint_loop(conn: Connection, dir: &Path, restart_bytes: i64, stop: mpsc::Receiver<()>) {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap_or(4096).max(512);
    if let Err(e) = conn.busy_handler(Some(restart_wait)) {
        tracing::warn!(error = %e, "embedded log checkpoints: cannot set the busy handler");
    }
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        match passive_checkpoint(&conn) {
            Ok((frames, copied)) if frames * page_size >= restart_bytes => {
                // The restart holds back the writer while it copies what is left of the WAL and
                // syncs the database file, and PASSIVE checkpoints that did not reach the WAL's
                // end (all of them, under steady appends) never synced it. So first flush what
                // they copied and copy again, until one round copies little.
                let mut rounds = CatchUp::new(copied, page_size);
                loop {
                    flush_filesystem(dir);
                    match passive_checkpoint(&conn) {
                        Ok((_, now)) if rounds.more(now) => {}
                        _ => break,
                    }
                }
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "embedded log WAL restart failed; retrying");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "embedded log checkpoint failed; retrying"),
        }
    }
}

enum WriteCmd {
    Append(Vec<Record>, oneshot::Sender<Result<Vec<Appended>, LogError>>),
    Commit(String, Vec<(String, i32, i64)>, oneshot::Sender<Result<(), LogError>>),
    EnsureTopics(Vec<TopicSpec>, oneshot::Sender<Result<(), LogError>>),
}

fn storage(e: rusqlite::Error) -> LogError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            LogError::Unavailable(e.to_string())
        }
        _ => LogError::Storage(e.to_string()),
    }
}

fn closed() -> LogError {
    LogError::Unavailable("embedded log writer stopped".into())
}

fn open_conn(path: &Path, fsync: bool, read_only: bool) -> Result<Connection, LogError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(storage)?;
    conn.busy_handler(Some(busy_wait)).map_err(storage)?;
    let sync = if fsync { "FULL" } else { "NORMAL" };
    // No automatic checkpoints: one would run (and fsync) inside whichever commit crossed the
    // threshold, stalling that append for tens of milliseconds. A thread of its own does them.
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={RESTART_WAL_BYTES}; PRAGMA cache_size=-65536; PRAGMA mmap_size=268435456; PRAGMA temp_store=MEMORY;"
    ))
    .map_err(storage)?;
    Ok(conn)
}

const SCHEMA: &str = "
PRAGMA page_size=16384;
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL
);
-- A rowid table: records are kilobytes, too large for WITHOUT ROWID's in-tree rows; the
-- (topic, partition, offset) index stays small and appends go to the end of both trees.
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_position ON records (topic, partition, offset);
CREATE TABLE IF NOT EXISTS group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
";

impl EmbeddedLog {
    /// Opens (creating if needed) `<data_dir>/log.sqlite`.
    pub fn open(data_dir: &Path, fsync: bool) -> Result<EmbeddedLog, LogError> {
        EmbeddedLog::open_with(data_dir, fsync, RESTART_WAL_BYTES)
    }

    /// [`EmbeddedLog::open`], starting the WAL over past `restart_bytes` (tests use a small one).
    fn open_with(data_dir: &Path, fsync: bool, restart_bytes: i64) -> Result<EmbeddedLog, LogError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| LogError::Config(format!("data dir {}: {e}", data_dir.display())))?;
        let path = data_dir.join("log.sqlite");
        let conn = open_conn(&path, fsync, false)?;
        conn.execute_batch(SCHEMA).map_err(storage)?;
        let (tx, rx) = mpsc::channel();
        let (bump_tx, bump_rx) = watch::channel(Appends::default());
        std::thread::Builder::new()
            .name("payerx-log-writer".into())
            .spawn(move || writer_loop(conn, rx, bump_tx))
            .map_err(|e| LogError::Storage(format!("cannot start log writer: {e}")))?;
        let checkpointer = open_conn(&path, fsync, false)?;
        let (stop_tx, stop_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("payerx-log-checkpoint".into())
            .spawn({
                let dir = data_dir.to_path_buf();
                move || checkpoint_loop(checkpointer, &dir, restart_bytes, stop_rx)
            })
            .map_err(|e| LogError::Storage(format!("cannot start log checkpoints: {e}")))?;
        Ok(EmbeddedLog {
            path,
            writer: Writer { tx, lane: Lane::Foreground },
            appended: bump_rx,
            partitions: Arc::new(Mutex::new(HashMap::new())),
            _checkpoints: stop_tx,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> WriteCmd,
    ) -> Result<T, LogError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(make(tx))?;
        rx.await.map_err(|_| closed())?
    }

    fn reader(&self) -> Result<Connection, LogError> {
        open_conn(&self.path, false, true)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let conn = self.reader()?;
        tokio::task::spawn_blocking(move || f(conn)).await.map_err(|e| LogError::Storage(e.to_string()))?
    }

    fn consumer(
        &self,
        positions: BTreeMap<(String, i32), i64>,
        group: Option<String>,
    ) -> Result<EmbeddedConsumer, LogError> {
        Ok(EmbeddedConsumer {
            conn: Arc::new(Mutex::new(self.reader()?)),
            positions,
            group,
            writer: self.writer.clone(),
            appended: self.appended.clone(),
            rotation: 0,
        })
    }
}

/// Commits per topic since this process opened the log.
type Appends = Arc<HashMap<String, u64>>;

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Queued>, bump: watch::Sender<Appends>) {
    let mut topic_partitions: HashMap<String, i32> = HashMap::new();
    let (mut fg, mut bg) = (VecDeque::new(), VecDeque::new());
    loop {
        if fg.is_empty() && bg.is_empty() {
            match rx.recv() {
                Ok(q) => enqueue(q, &mut fg, &mut bg),
                Err(_) => return,
            }
        }
        while let Ok(q) = rx.try_recv() {
            enqueue(q, &mut fg, &mut bg);
        }
        let batch = next_batch(&mut fg, &mut bg, Instant::now());
        let result = apply_batch(&mut conn, &mut topic_partitions, &batch);
        let ok = result.is_ok();
        let mut touched: Vec<String> = batch
            .iter()
            .filter_map(|c| match c {
                WriteCmd::Append(r, _) => Some(r.iter().map(|r| r.topic.clone())),
                _ => None,
            })
            .flatten()
            .collect();
        touched.sort();
        touched.dedup();
        match result {
            Ok(mut results) => {
                for (cmd, res) in batch.into_iter().zip(results.drain(..)) {
                    reply(cmd, res);
                }
            }
            Err(e) => {
                // Nothing of this batch was committed: every waiter gets the error.
                let msg = e.to_string();
                let retriable = e.is_retriable();
                for cmd in batch {
                    let err =
                        if retriable { LogError::Unavailable(msg.clone()) } else { LogError::Storage(msg.clone()) };
                    reply(cmd, Err(err));
                }
            }
        }
        if ok && !touched.is_empty() {
            bump.send_modify(|m| {
                let m = Arc::make_mut(m);
                for t in touched {
                    *m.entry(t).or_default() += 1;
                }
            });
        }
    }
}

fn enqueue(q: Queued, fg: &mut VecDeque<Queued>, bg: &mut VecDeque<Queued>) {
    match q.lane {
        Lane::Foreground => fg.push_back(q),
        Lane::Background => bg.push_back(q),
    }
}

/// The commands of the next transaction (group commit), each lane in its order: the clients'
/// appends that are waiting, then background ones only when no client is waiting or when they
/// have waited `BACKGROUND_MAX_WAIT`; up to `MAX_RECORDS_PER_COMMIT` records, and at least one
/// command.
fn next_batch(fg: &mut VecDeque<Queued>, bg: &mut VecDeque<Queued>, now: Instant) -> Vec<WriteCmd> {
    let mut batch = Vec::new();
    let mut records = 0usize;
    let mut take = |q: &mut VecDeque<Queued>, batch: &mut Vec<WriteCmd>| {
        while let Some(front) = q.front() {
            let n = match &front.cmd {
                WriteCmd::Append(r, _) => r.len(),
                _ => 0,
            };
            if !batch.is_empty() && records + n > MAX_RECORDS_PER_COMMIT {
                break;
            }
            records += n;
            if let Some(queued) = q.pop_front() {
                batch.push(queued.cmd);
            }
        }
    };
    take(fg, &mut batch);
    if batch.is_empty() || bg.front().is_some_and(|q| now.saturating_duration_since(q.since) >= BACKGROUND_MAX_WAIT) {
        take(bg, &mut batch);
    }
    batch
}

enum CmdResult {
    Appended(Vec<Appended>),
    Done,
    Failed(LogError),
}

fn reply(cmd: WriteCmd, res: Result<CmdResult, LogError>) {
    match (cmd, res) {
        (WriteCmd::Append(_, tx), Ok(CmdResult::Appended(a))) => {
            let _ = tx.send(Ok(a));
        }
        (WriteCmd::Append(_, tx), Ok(CmdResult::Failed(e)) | Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (WriteCmd::Commit(_, _, tx) | WriteCmd::EnsureTopics(_, tx), Ok(CmdResult::Failed(e)) | Err(e)) => {
            let _ = tx.send(Err(e));
        }
        (WriteCmd::Commit(_, _, tx) | WriteCmd::EnsureTopics(_, tx), Ok(_)) => {
            let _ = tx.send(Ok(()));
        }
        (WriteCmd::Append(_, tx), Ok(CmdResult::Done)) => {
            let _ = tx.send(Ok(vec![]));
        }
    }
}

/// Applies a batch of commands in one transaction. A command that is invalid on its own (an
/// unknown topic) fails alone; a storage failure fails the whole batch.
fn apply_batch(
    conn: &mut Connection,
    topic_partitions: &mut HashMap<String, i32>,
    batch: &[WriteCmd],
) -> Result<Vec<Result<CmdResult, LogError>>, LogError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(storage)?;
    let mut out = Vec::with_capacity(batch.len());
    {
        let now_ms = (schemas::events::now_micros() / 1000) as i64;
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        let mut insert = tx
            .prepare_cached("INSERT INTO records (topic, partition, offset, key, value, headers, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
            .map_err(storage)?;
        let mut max_offset = tx
            .prepare_cached("SELECT MAX(offset) FROM records WHERE topic = ?1 AND partition = ?2")
            .map_err(storage)?;
        for cmd in batch {
            match cmd {
                WriteCmd::Append(records, _) => {
                    // Every topic must exist before anything of this append is written.
                    let mut unknown = None;
                    for r in records {
                        if partitions_of(&tx, topic_partitions, &r.topic)?.is_none() {
                            unknown = Some(r.topic.clone());
                            break;
                        }
                    }
                    if let Some(topic) = unknown {
                        out.push(Ok(CmdResult::Failed(LogError::UnknownTopic(topic))));
                        continue;
                    }
                    let mut appended = Vec::with_capacity(records.len());
                    for r in records {
                        let parts = topic_partitions.get(&r.topic).copied().unwrap_or(1);
                        let partition = partition_for(&r.key, parts);
                        let slot = (r.topic.clone(), partition);
                        let offset = match next.get(&slot) {
                            Some(o) => *o,
                            None => {
                                // Read inside the write transaction: other processes may append too.
                                let max: Option<i64> = max_offset
                                    .query_row(params![r.topic, partition], |row| row.get(0))
                                    .map_err(storage)?;
                                max.map_or(0, |m| m + 1)
                            }
                        };
                        next.insert(slot, offset + 1);
                        insert
                            .execute(params![
                                r.topic,
                                partition,
                                offset,
                                r.key,
                                r.value,
                                encode_headers(&r.headers),
                                now_ms
                            ])
                            .map_err(storage)?;
                        appended.push(Appended { partition, offset });
                    }
                    out.push(Ok(CmdResult::Appended(appended)));
                }
                WriteCmd::Commit(group, offsets, _) => {
                    let mut stmt = tx
                        .prepare_cached(
                            "INSERT INTO group_offsets (group_id, topic, partition, next_offset) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                        )
                        .map_err(storage)?;
                    for (topic, partition, off) in offsets {
                        stmt.execute(params![group, topic, partition, off]).map_err(storage)?;
                    }
                    out.push(Ok(CmdResult::Done));
                }
                WriteCmd::EnsureTopics(specs, _) => {
                    if let Some(bad) = specs.iter().find(|s| s.partitions < 1) {
                        out.push(Ok(CmdResult::Failed(LogError::Config(format!(
                            "topic {}: partitions must be at least 1",
                            bad.name
                        )))));
                        continue;
                    }
                    let mut stmt = tx
                        .prepare_cached(
                            "INSERT INTO topics (name, partitions) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                        )
                        .map_err(storage)?;
                    for s in specs {
                        stmt.execute(params![s.name, s.partitions]).map_err(storage)?;
                    }
                    out.push(Ok(CmdResult::Done));
                }
            }
        }
    }
    tx.commit().map_err(storage)?;
    Ok(out)
}

fn partitions_of(conn: &Connection, cache: &mut HashMap<String, i32>, topic: &str) -> Result<Option<i32>, LogError> {
    if let Some(p) = cache.get(topic) {
        return Ok(Some(*p));
    }
    let p: Option<i32> = conn
        .query_row("SELECT partitions FROM topics WHERE name = ?1", [topic], |r| r.get(0))
        .optional()
        .map_err(storage)?;
    if let Some(p) = p {
        cache.insert(topic.to_string(), p);
    }
    Ok(p)
}

/// Headers as `u32 name length, name, u32 value length, value`, repeated.
fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode_headers(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8]| -> Option<Vec<u8>> {
        if b.len() < 4 {
            return None;
        }
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if b.len() < 4 + n {
            return None;
        }
        let v = b[4..4 + n].to_vec();
        *b = &b[4 + n..];
        Some(v)
    };
    while let (Some(k), Some(v)) = (take(&mut b), take(&mut b)) {
        out.push((String::from_utf8_lossy(&k).into_owned(), v));
    }
    out
}

#[async_trait]
impl Log for EmbeddedLog {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn background(self: Arc<Self>) -> Arc<dyn Log> {
        let writer = Writer { tx: self.writer.tx.clone(), lane: Lane::Background };
        Arc::new(EmbeddedLog { writer, ..(*self).clone() })
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), LogError> {
        let specs = topics.to_vec();
        self.send(|tx| WriteCmd::EnsureTopics(specs, tx)).await
    }

    async fn partitions(&self, topic: &str) -> Result<i32, LogError> {
        if let Some(p) = self.partitions.lock().map_err(|_| closed())?.get(topic) {
            return Ok(*p);
        }
        let t = topic.to_string();
        let p = self
            .blocking(move |c| {
                c.query_row("SELECT partitions FROM topics WHERE name = ?1", [&t], |r| r.get::<_, i32>(0))
                    .optional()
                    .map_err(storage)
            })
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
        self.partitions.lock().map_err(|_| closed())?.insert(topic.to_string(), p);
        Ok(p)
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        if records.is_empty() {
            return Ok(vec![]);
        }
        self.send(|tx| WriteCmd::Append(records, tx)).await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        let parts = self.partitions(topic).await?;
        let t = topic.to_string();
        self.blocking(move |c| {
            let mut stmt =
                c.prepare("SELECT MAX(offset) FROM records WHERE topic = ?1 AND partition = ?2").map_err(storage)?;
            (0..parts)
                .map(|p| {
                    stmt.query_row(params![t, p], |r| r.get::<_, Option<i64>>(0))
                        .map(|m| m.map_or(0, |m| m + 1))
                        .map_err(storage)
                })
                .collect()
        })
        .await
    }

    async fn assigned_consumer(&self, assignment: &[(String, i32, i64)]) -> Result<Box<dyn Consumer>, LogError> {
        let positions = assignment.iter().map(|(t, p, o)| ((t.clone(), *p), *o)).collect();
        Ok(Box::new(self.consumer(positions, None)?))
    }

    async fn group_consumer(&self, group: &str, topics: &[String]) -> Result<Box<dyn Consumer>, LogError> {
        let mut positions = BTreeMap::new();
        for t in topics {
            let parts = self.partitions(t).await?;
            for p in 0..parts {
                positions.insert((t.clone(), p), 0);
            }
        }
        let g = group.to_string();
        let committed: Vec<(String, i32, i64)> = self
            .blocking(move |c| {
                let mut stmt = c
                    .prepare("SELECT topic, partition, next_offset FROM group_offsets WHERE group_id = ?1")
                    .map_err(storage)?;
                let rows = stmt.query_map([g], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(storage)?;
                rows.collect::<Result<_, _>>().map_err(storage)
            })
            .await?;
        for (t, p, o) in committed {
            if let Some(pos) = positions.get_mut(&(t, p)) {
                *pos = o;
            }
        }
        Ok(Box::new(self.consumer(positions, Some(group.to_string()))?))
    }
}

pub struct EmbeddedConsumer {
    conn: Arc<Mutex<Connection>>,
    positions: BTreeMap<(String, i32), i64>,
    group: Option<String>,
    writer: Writer,
    appended: watch::Receiver<Appends>,
    rotation: usize,
}

impl EmbeddedConsumer {
    /// Commits so far to the topics this consumer reads.
    fn commits_seen(&mut self) -> u64 {
        let m = self.appended.borrow_and_update();
        let mut last = None;
        let mut sum = 0;
        for (topic, _) in self.positions.keys() {
            if last != Some(topic) {
                sum += m.get(topic).copied().unwrap_or(0);
                last = Some(topic);
            }
        }
        sum
    }

    async fn read(&mut self, max: usize) -> Result<Vec<Consumed>, LogError> {
        let conn = self.conn.clone();
        // Start at a different partition each poll, so a busy partition cannot starve the rest.
        self.rotation = self.rotation.wrapping_add(1);
        let mut positions: Vec<((String, i32), i64)> = self.positions.iter().map(|(k, v)| (k.clone(), *v)).collect();
        if !positions.is_empty() {
            let n = positions.len();
            positions.rotate_left(self.rotation % n);
        }
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().map_err(|_| LogError::Storage("reader poisoned".into()))?;
            let mut stmt = conn
                .prepare_cached(
                    "SELECT offset, key, value, headers, ts_ms FROM records
                     WHERE topic = ?1 AND partition = ?2 AND offset >= ?3 ORDER BY offset LIMIT ?4",
                )
                .map_err(storage)?;
            let mut out = Vec::new();
            // One read transaction, so every partition is read from the same snapshot.
            conn.execute_batch("BEGIN").map_err(storage)?;
            for ((topic, partition), from) in &positions {
                let rows = stmt
                    .query_map(params![topic, partition, from, (max - out.len()) as i64], |r| {
                        Ok(Consumed {
                            topic: topic.clone(),
                            partition: *partition,
                            offset: r.get(0)?,
                            key: r.get(1)?,
                            value: r.get(2)?,
                            headers: decode_headers(&r.get::<_, Vec<u8>>(3)?),
                            timestamp_ms: r.get(4)?,
                        })
                    })
                    .map_err(storage)?;
                for row in rows {
                    out.push(row.map_err(storage)?);
                }
                if out.len() >= max {
                    break;
                }
            }
            conn.execute_batch("COMMIT").map_err(storage)?;
            Ok(out)
        })
        .await
        .map_err(|e| LogError::Storage(e.to_string()))?
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError> {
        let deadline = Instant::now() + wait;
        loop {
            // Note the commit counts of our topics before reading, so an append that lands
            // between the read and the wait still wakes us.
            let seen = self.commits_seen();
            let out = self.read(max).await?;
            if !out.is_empty() {
                for r in &out {
                    self.positions.insert((r.topic.clone(), r.partition), r.offset + 1);
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            // Sleep until one of our topics moves (appends to other topics do not wake us), or
            // until it is time to look for appends by other processes.
            let nap_until = tokio::time::Instant::now() + (deadline - now).min(FOREIGN_APPEND_POLL);
            while self.commits_seen() == seen {
                match tokio::time::timeout_at(nap_until, self.appended.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => break,
                }
            }
        }
    }

    async fn commit(&mut self, offsets: &[(String, i32, i64)]) -> Result<(), LogError> {
        let Some(group) = self.group.clone() else {
            return Ok(()); // assigned consumers keep their offsets elsewhere (projections)
        };
        let (tx, rx) = oneshot::channel();
        self.writer.send(WriteCmd::Commit(group, offsets.to_vec(), tx))?;
        rx.await.map_err(|_| closed())?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn queued(lane: Lane, since: Instant, tag: &str, records: usize) -> Queued {
        let (tx, _) = oneshot::channel();
        let records = (0..records).map(|i| Record::new("t", format!("{tag}{i}"), vec![])).collect();
        Queued { lane, since, cmd: WriteCmd::Append(records, tx) }
    }

    /// The first key of each append in a batch: which commands it took, in which order.
    fn tags(batch: &[WriteCmd]) -> Vec<String> {
        batch
            .iter()
            .map(|c| match c {
                WriteCmd::Append(r, _) => r[0].key.clone(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn clients_appends_are_committed_before_the_stages_waiting_ones() {
        let now = Instant::now();
        let young = now - BACKGROUND_MAX_WAIT / 4;
        let (mut fg, mut bg) = (VecDeque::new(), VecDeque::new());
        fg.extend([queued(Lane::Foreground, young, "f1-", 1), queued(Lane::Foreground, now, "f2-", 1)]);
        bg.extend([queued(Lane::Background, young, "b1-", 1), queued(Lane::Background, now, "b2-", 1)]);
        // Clients are waiting: only their appends, both, in order.
        assert_eq!(tags(&next_batch(&mut fg, &mut bg, now)), ["f1-0", "f2-0"]);
        // No client waiting: the stages' appends, in order.
        assert_eq!(tags(&next_batch(&mut fg, &mut bg, now)), ["b1-0", "b2-0"]);
        assert!(fg.is_empty() && bg.is_empty());
    }

    #[test]
    fn a_stage_append_that_waited_long_enough_goes_with_the_clients() {
        let now = Instant::now();
        let (mut fg, mut bg) = (VecDeque::new(), VecDeque::new());
        fg.push_back(queued(Lane::Foreground, now, "f-", 1));
        bg.push_back(queued(Lane::Background, now - BACKGROUND_MAX_WAIT, "old-", 1));
        bg.push_back(queued(Lane::Background, now, "new-", 1));
        // The old one's lane is taken in its order, the younger one behind it too.
        assert_eq!(tags(&next_batch(&mut fg, &mut bg, now)), ["f-0", "old-0", "new-0"]);
    }

    #[test]
    fn a_commit_holds_at_most_its_bound_of_records_and_at_least_one_command() {
        let now = Instant::now();
        let (mut fg, mut bg) = (VecDeque::new(), VecDeque::new());
        fg.push_back(queued(Lane::Foreground, now, "big-", MAX_RECORDS_PER_COMMIT + 1));
        fg.push_back(queued(Lane::Foreground, now, "a-", 1));
        fg.push_back(queued(Lane::Foreground, now, "b-", MAX_RECORDS_PER_COMMIT));
        assert_eq!(tags(&next_batch(&mut fg, &mut bg, now)), ["big-0"]);
        assert_eq!(tags(&next_batch(&mut fg, &mut bg, now)), ["a-0"]);
        assert_eq!(tags(&next_batch(&mut fg, &mut bg, now)), ["b-0"]);
    }

    #[tokio::test]
    async fn a_background_handle_appends_and_commits_to_the_same_log() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn Log> = Arc::new(log_with_topic(dir.path()).await);
        let stages = log.clone().background();
        let (a, b) = tokio::join!(
            log.append(vec![Record::new("t", "k", b"client".to_vec())]),
            stages.append(vec![Record::new("t", "k", b"stage".to_vec())]),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a[0].partition, b[0].partition);
        assert_ne!(a[0].offset, b[0].offset);
        let mut c = stages.group_consumer("g", &["t".to_string()]).await.unwrap();
        let mut got = vec![];
        while got.len() < 2 {
            got.extend(c.poll(10, Duration::from_millis(200)).await.unwrap());
        }
        c.commit(&[("t".into(), got[0].partition, got[1].offset + 1)]).await.unwrap();
        drop(c);
        // The group's commit went through the background lane and is seen by a new member.
        let mut again = log.group_consumer("g", &["t".to_string()]).await.unwrap();
        assert!(again.poll(10, Duration::from_millis(100)).await.unwrap().is_empty());
    }

    #[test]
    fn catch_up_rounds_end_once_one_copies_little_or_at_their_bound() {
        let page = 16 << 10;
        let big = CATCH_UP_BYTES / page + 1;
        let mut r = CatchUp::new(1000, page);
        assert!(r.more(1000 + big), "a round that copied more than the bound asks for another");
        assert!(!r.more(1000 + big + 1), "a round that copied little ends them");
        let mut r = CatchUp::new(0, page);
        let rounds = (1..).take_while(|n| r.more(n * big)).count() + 1;
        assert_eq!(rounds, CATCH_UP_ROUNDS, "never more than CATCH_UP_ROUNDS");
    }

    #[test]
    fn busy_waits_give_up_at_their_bound() {
        let steps = |limit: Duration| (0..).take_while(|n| busy_step(*n, limit)).count();
        assert_eq!(steps(Duration::from_millis(1)), 4);
        assert_eq!(steps(RESTART_WAIT), 200);
    }

    /// Readers that always hold a snapshot (two, overlapping) while records are appended: the
    /// WAL must still be started over. Never started over, it reaches about 135 MB here; started
    /// over past 1 MB, about 16 MB (what a checkpoint interval and its catch-up rounds write).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wal_that_readers_never_let_go_of_is_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open_with(dir.path(), false, 1 << 20).unwrap();
        log.ensure_topics(&[TopicSpec { name: "t".into(), partitions: 1 }]).await.unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers = {
            let (path, stop) = (dir.path().join("log.sqlite"), stop.clone());
            std::thread::spawn(move || {
                let open = || open_conn(&path, false, true).unwrap();
                let (a, b) = (open(), open());
                let read = |c: &Connection| {
                    c.execute_batch("BEGIN").unwrap();
                    c.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0)).unwrap();
                };
                read(&a);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(3));
                    read(&b);
                    a.execute_batch("COMMIT").unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                    read(&a);
                    b.execute_batch("COMMIT").unwrap();
                }
                a.execute_batch("COMMIT").unwrap();
            })
        };
        // 16 KB appends one after another for about 2.5 s: the checkpoints never find the WAL
        // copied to its end, so the readers never let the writer start it over itself.
        let value = vec![7u8; 16 << 10];
        for k in 0..2000 {
            log.append(vec![Record::new("t", format!("k{k}"), value.clone())]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        readers.join().unwrap();
        let wal = std::fs::metadata(dir.path().join("log.sqlite-wal")).unwrap().len();
        assert!(wal < 48 << 20, "the WAL grew to {wal} bytes past a 1 MB restart size");
    }

    async fn log_with_topic(dir: &Path) -> EmbeddedLog {
        let log = EmbeddedLog::open(dir, false).unwrap();
        log.ensure_topics(&[TopicSpec { name: "t".into(), partitions: 3 }]).await.unwrap();
        log
    }

    #[tokio::test]
    async fn append_read_back_in_partition_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with_topic(dir.path()).await;
        let records: Vec<Record> = (0..300)
            .map(|i| Record::new("t", format!("k{}", i % 7), format!("v{i}").into_bytes()).header("h", format!("{i}")))
            .collect();
        let acks = log.append(records.clone()).await.unwrap();
        for (r, a) in records.iter().zip(&acks) {
            assert_eq!(a.partition, partition_for(&r.key, 3));
        }
        assert_eq!(log.end_offsets("t").await.unwrap().iter().sum::<i64>(), 300);
        let mut c = log.assigned_consumer(&[("t".into(), 0, 0), ("t".into(), 1, 0), ("t".into(), 2, 0)]).await.unwrap();
        let mut got = vec![];
        while got.len() < 300 {
            got.extend(c.poll(64, Duration::from_millis(200)).await.unwrap());
        }
        // Per key, values come back in append order.
        for k in 0..7 {
            let key = format!("k{k}");
            let vals: Vec<i32> = got
                .iter()
                .filter(|r| r.key == key)
                .map(|r| String::from_utf8(r.value.clone()).unwrap()[1..].parse().unwrap())
                .collect();
            let mut sorted = vals.clone();
            sorted.sort();
            assert_eq!(vals, sorted);
            assert!(got.iter().filter(|r| r.key == key).all(|r| r.header("h").is_some()));
        }
        assert!(c.poll(10, Duration::from_millis(20)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn unknown_topic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with_topic(dir.path()).await;
        let err = log.append(vec![Record::new("nope", "k", vec![1])]).await.unwrap_err();
        assert!(matches!(err, LogError::UnknownTopic(_)));
        // The writer still works afterwards.
        log.append(vec![Record::new("t", "k", vec![1])]).await.unwrap();
    }

    #[tokio::test]
    async fn group_resumes_after_commit_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_with_topic(dir.path()).await;
            log.append((0..10).map(|i| Record::new("t", "same", vec![i])).collect()).await.unwrap();
            let mut c = log.group_consumer("g", &["t".into()]).await.unwrap();
            let first = c.poll(4, Duration::from_millis(100)).await.unwrap();
            assert_eq!(first.len(), 4);
            let last = first.last().unwrap();
            c.commit(&[(last.topic.clone(), last.partition, last.offset + 1)]).await.unwrap();
        }
        let log = EmbeddedLog::open(dir.path(), false).unwrap();
        let mut c = log.group_consumer("g", &["t".into()]).await.unwrap();
        let rest = c.poll(100, Duration::from_millis(100)).await.unwrap();
        assert_eq!(rest.iter().map(|r| r.value[0]).collect::<Vec<_>>(), (4..10).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(log_with_topic(dir.path()).await);
        let mut tasks = vec![];
        for t in 0..16 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut acks = vec![];
                for i in 0..50 {
                    acks.extend(log.append(vec![Record::new("t", "one-key", vec![t, i])]).await.unwrap());
                }
                acks
            }));
        }
        let mut offsets: Vec<i64> = vec![];
        for t in tasks {
            offsets.extend(t.await.unwrap().iter().map(|a| a.offset));
        }
        offsets.sort();
        assert_eq!(offsets, (0..800).collect::<Vec<i64>>());
    }

    #[test]
    fn headers_round_trip() {
        let h = vec![("a".to_string(), b"1".to_vec()), ("bb".to_string(), vec![])];
        assert_eq!(decode_headers(&encode_headers(&h)), h);
    }
}
