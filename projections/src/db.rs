//! One database handle for both view stores: SQLite (embedded default) and PostgreSQL.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor, Row};

// The same WAL size and restart policy as the embedded log's.
use runtime::embedded::{flush_filesystem, CatchUp, RESTART_WAL_BYTES};

use crate::ProjectionError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// The runtime that opened the database. Connections are opened there, so that on SQLite
    /// their worker threads run at its priority (a lower-priority stage holding the write lock
    /// would hold back every other writer).
    home: tokio::runtime::Handle,
    /// SQLite: stops the checkpoint task when the last handle goes.
    _checkpoints: Option<std::sync::Arc<StopOnDrop>>,
}

struct StopOnDrop(tokio_util::sync::CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// How often the WAL of a SQLite views database is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints a SQLite views database in the background (PASSIVE: never blocks a writer), so
/// no projection commit pays for one.
///
/// PASSIVE never starts the WAL over; a writer does, at a moment no reader holds a snapshot in
/// it, and with the projections and the API reading all the time that moment may not come: the
/// WAL reached 2.5 GB in a 200,000-resource load. So past `RESTART_WAL_BYTES` a RESTART follows,
/// on a connection of its own that waits at most 50 ms for the readers (the writers wait as
/// long). Before it, rounds of (flush the folder's filesystem, PASSIVE) leave it little to copy
/// and sync while it holds back the writers, as in the embedded log.
fn spawn_checkpoints(pool: AnyPool, dir: Option<std::path::PathBuf>, restart_bytes: i64) -> std::sync::Arc<StopOnDrop> {
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut conn = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                _ = token.cancelled() => return,
            }
            if let Err(e) = checkpoint(&pool, &mut conn, dir.as_deref(), restart_bytes).await {
                // A new connection next round.
                conn = None;
                tracing::warn!(error = %e, "views checkpoint failed; retrying");
            }
        }
    });
    std::sync::Arc::new(StopOnDrop(stop))
}

async fn checkpoint(
    pool: &AnyPool,
    conn: &mut Option<(AnyConnection, i64)>,
    dir: Option<&Path>,
    restart_bytes: i64,
) -> Result<(), sqlx::Error> {
    if conn.is_none() {
        let mut c = pool.acquire().await?.detach();
        sqlx::query("PRAGMA busy_timeout=50").execute(&mut c).await?;
        let page_size: i64 = sqlx::query("PRAGMA page_size").fetch_one(&mut c).await?.try_get(0)?;
        *conn = Some((c, page_size.max(512)));
    }
    let Some((c, page_size)) = conn.as_mut() else { return Ok(()) };
    let passive = async |c: &mut AnyConnection| -> Result<(i64, i64), sqlx::Error> {
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(c).await?;
        Ok((row.try_get(1)?, row.try_get(2)?))
    };
    let (frames, copied) = passive(c).await?;
    if frames * *page_size >= restart_bytes {
        let mut rounds = CatchUp::new(copied, *page_size);
        loop {
            if let Some(dir) = dir {
                let dir = dir.to_path_buf();
                let _ = tokio::task::spawn_blocking(move || flush_filesystem(&dir)).await;
            }
            if !rounds.more(passive(c).await?.1) {
                break;
            }
        }
        sqlx::query("PRAGMA wal_checkpoint(RESTART)").execute(&mut *c).await?;
    }
    Ok(())
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Db {
    /// The embedded default: `<data_dir>/views.sqlite`.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!("sqlite://{}?mode=rwc", data_dir.join("views.sqlite").display())
    }

    /// Connects to `sqlite://…` or `postgres://…` and applies the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, ProjectionError> {
        Db::connect_with(url, max_connections, RESTART_WAL_BYTES).await
    }

    /// [`Db::connect`], starting a SQLite WAL over past `restart_bytes` (tests use a small one).
    async fn connect_with(url: &str, max_connections: u32, restart_bytes: i64) -> Result<Db, ProjectionError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(ProjectionError::Other(format!(
                "unsupported database URL {url:?}: use sqlite://… or postgres://…"
            )));
        };
        // The SQLite file's folder (created if missing), whose filesystem the checkpoints flush.
        let mut dir = None;
        if backend == Backend::Sqlite {
            if let Some(path) = url.strip_prefix("sqlite://").and_then(|p| p.split('?').next()) {
                if let Some(parent) = Path::new(path).parent() {
                    let _ = std::fs::create_dir_all(parent);
                    dir = Some(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }.to_path_buf());
                }
            }
        }
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            // Opened up front by the pool's own task on this runtime, not later by whichever
            // caller found none idle (see `home`).
            .min_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(SQLITE_SESSION.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        let checkpoints = (backend == Backend::Sqlite).then(|| spawn_checkpoints(pool.clone(), dir, restart_bytes));
        Ok(Db { pool, backend, home: tokio::runtime::Handle::current(), _checkpoints: checkpoints })
    }
}

/// Every SQLite connection's settings. WAL: readers never block the projection's writer; NORMAL
/// is durable across process crashes, and the log is the source of truth anyway. page_size only
/// takes effect on a new database; 16 KiB suits rows of kilobytes. No automatic checkpoints: one
/// would run (and fsync) inside the commit that crossed the threshold; `spawn_checkpoints` does
/// them apart.
static SQLITE_SESSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; \
         PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={RESTART_WAL_BYTES};"
    )
});

impl Db {
    /// A connection of the caller's own, outside the pool, set up like the pool's and opened on
    /// the database's runtime (see `home`).
    pub async fn own_connection(&self) -> Result<AnyConnection, sqlx::Error> {
        use sqlx::Connection;
        let (options, backend) = (self.pool.connect_options(), self.backend);
        let open = async move {
            let mut conn = AnyConnection::connect_with(&options).await?;
            if backend == Backend::Sqlite {
                conn.execute(SQLITE_SESSION.as_str()).await?;
            }
            Ok::<_, sqlx::Error>(conn)
        };
        self.home
            .spawn(open)
            .await
            .map_err(|e| sqlx::Error::Io(std::io::Error::other(format!("opening a connection: {e}"))))?
    }

    /// A transaction that will write, on `conn`. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred transaction that read first fails at its first write with
    /// "database is locked" whenever another writer committed in between (busy_timeout does not
    /// apply to that case), and several projections write the same file.
    pub async fn begin_write<'c>(
        &self,
        conn: &'c mut sqlx::AnyConnection,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, sqlx::Error> {
        use sqlx::Connection;
        match self.backend {
            Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => conn.begin().await,
        }
    }

    /// Runs one idempotent DDL statement (`CREATE … IF NOT EXISTS`), tolerating another process
    /// running the same statement at that moment: PostgreSQL's `IF NOT EXISTS` loses that race
    /// with a catalog unique violation (SQLSTATE 23505, 42P07, or 42710 for the table's row type)
    /// instead of finding the object, which processes starting together on a fresh database hit.
    pub async fn execute_ddl(&self, statement: &str) -> Result<(), sqlx::Error> {
        let mut attempt = 0u64;
        loop {
            match sqlx::query(statement).execute(&self.pool).await {
                Err(sqlx::Error::Database(e))
                    if attempt < 5 && matches!(e.code().as_deref(), Some("23505" | "42P07" | "42710")) =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                other => return other.map(|_| ()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sqlx::Connection;

    /// Readers that always overlap (each keeps its snapshot until the next has begun) never
    /// leave a writer the moment to start the WAL over; the checkpoint task must do it.
    async fn wal_size_under_overlapping_readers(restart_bytes: i64) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect_with(&Db::sqlite_url(dir.path()), 4, restart_bytes).await.unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)").execute(&db.pool).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let readers = {
            let (pool, stop) = (db.pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut a = pool.acquire().await.unwrap().detach();
                let mut b = pool.acquire().await.unwrap().detach();
                let mut held = a.begin().await.unwrap();
                sqlx::query("SELECT COUNT(*) FROM t").fetch_one(&mut *held).await.unwrap();
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    let mut next = b.begin().await.unwrap();
                    sqlx::query("SELECT COUNT(*) FROM t").fetch_one(&mut *next).await.unwrap();
                    held.commit().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    held = a.begin().await.unwrap();
                    sqlx::query("SELECT COUNT(*) FROM t").fetch_one(&mut *held).await.unwrap();
                    next.commit().await.unwrap();
                }
                held.commit().await.unwrap();
            })
        };
        // About 16 MB over 2.5 s, in 16 KB commits.
        let row = "x".repeat(16 << 10);
        for k in 0..1000 {
            sqlx::query("INSERT INTO t (k, v) VALUES ($1, $2)")
                .bind(k)
                .bind(row.as_str())
                .execute(&db.pool)
                .await
                .unwrap();
            if k % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        stop.cancel();
        readers.await.unwrap();
        std::fs::metadata(dir.path().join("views.sqlite-wal")).unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wal_that_readers_never_let_go_of_is_started_over() {
        // Never started over, it reaches about 50 MB here; started over past 1 MB, it stays near
        // what one checkpoint interval writes (about 8 MB).
        let wal = wal_size_under_overlapping_readers(1 << 20).await;
        assert!(wal < 24 << 20, "the WAL grew to {wal} bytes past a 1 MB restart size");
    }
}
