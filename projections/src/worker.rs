//! The projection worker: reads its topics from the offsets stored with its rows, applies
//! batches in one database transaction together with the new offsets, and follows generation
//! swaps made by `payerx replay`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use runtime::{Consumed, Log};
use sqlx::{Any, Row, Transaction};
use tokio_util::sync::CancellationToken;

use crate::{Db, ProjectionError, WriteNotifier, WriteOutcome};

/// A view kept from events.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Name, e.g. `resources`; offsets and generations are stored under it.
    fn name(&self) -> &'static str;
    /// Full names of the topics it reads.
    fn topics(&self) -> Vec<String>;
    /// The topics read while keeping the served generation up to date; all of [`topics`] by
    /// default. A projection that rebuilds from its own outputs (the member-match decisions)
    /// needs them only when building: live, it wrote them itself.
    ///
    /// [`topics`]: Projection::topics
    fn live_topics(&self) -> Vec<String> {
        self.topics()
    }
    /// Creates the tables of one generation (idempotent).
    async fn create_generation(&self, db: &Db, generation: i64) -> Result<(), ProjectionError>;
    /// Drops the tables of a retired generation.
    async fn drop_generation(&self, db: &Db, generation: i64) -> Result<(), ProjectionError>;
    /// Applies records inside `tx`. Returns the write outcomes to hand to waiting requests once
    /// the transaction has committed, and the events the projection decided to emit.
    async fn apply(
        &self,
        tx: &mut Transaction<'_, Any>,
        generation: i64,
        records: &[Consumed],
    ) -> Result<Applied, ProjectionError>;
}

/// What applying a batch produced besides its rows.
#[derive(Default)]
pub struct Applied {
    pub outcomes: Vec<(String, WriteOutcome)>,
    /// Events to append before the transaction commits, each with the index of the record it
    /// derives from (at-least-once: a crash in between appends them again with the same
    /// deterministic ids). A replay rebuilds state without repeating what the served generation
    /// already said: while building, only records the served generation has not applied emit.
    pub emit: Vec<(usize, runtime::Record)>,
}

/// Retires a generation: drops its tables and forgets its offsets.
pub async fn drop_generation_tables(
    db: &Db,
    projection: &str,
    generation: i64,
    tables: &[String],
) -> Result<(), ProjectionError> {
    for t in tables {
        sqlx::query(&format!("DROP TABLE IF EXISTS {t}")).execute(&db.pool).await?;
    }
    sqlx::query("DELETE FROM projection_offsets WHERE projection = $1 AND generation = $2")
        .bind(projection)
        .bind(generation)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// The generation `projection` serves, if it has started (query sides read through this).
pub async fn served_generation(db: &Db, projection: &str) -> Result<Option<i64>, ProjectionError> {
    Ok(sqlx::query("SELECT active FROM view_generations WHERE projection = $1")
        .bind(projection)
        .fetch_optional(&db.pool)
        .await?
        .map(|r| r.try_get::<i64, _>(0))
        .transpose()?)
}

/// The generation a projection serves, creating generation 1 on first use.
pub async fn active_generation(db: &Db, projection: &dyn Projection) -> Result<i64, ProjectionError> {
    let row = sqlx::query("SELECT active FROM view_generations WHERE projection = $1")
        .bind(projection.name())
        .fetch_optional(&db.pool)
        .await?;
    if let Some(row) = row {
        return Ok(row.try_get::<i64, _>(0)?);
    }
    projection.create_generation(db, 1).await?;
    sqlx::query("INSERT INTO view_generations (projection, active) VALUES ($1, 1) ON CONFLICT (projection) DO NOTHING")
        .bind(projection.name())
        .execute(&db.pool)
        .await?;
    Ok(1)
}

pub async fn load_offsets(
    db: &Db,
    projection: &str,
    generation: i64,
) -> Result<HashMap<(String, i32), i64>, ProjectionError> {
    let rows = sqlx::query(
        "SELECT topic, partition_id, next_offset FROM projection_offsets WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_all(&db.pool)
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        out.insert((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as i32), r.try_get::<i64, _>(2)?);
    }
    Ok(out)
}

/// How far a generation is behind the log: (applied, end) summed over the partitions of the
/// topics it reads while building.
pub async fn progress(
    db: &Db,
    log: &dyn Log,
    projection: &dyn Projection,
    generation: i64,
) -> Result<(i64, i64), ProjectionError> {
    progress_over(db, log, projection.name(), &projection.topics(), generation).await
}

async fn progress_over(
    db: &Db,
    log: &dyn Log,
    name: &str,
    topics: &[String],
    generation: i64,
) -> Result<(i64, i64), ProjectionError> {
    let offsets = load_offsets(db, name, generation).await?;
    let mut applied = 0;
    let mut end = 0;
    for t in topics {
        for (p, e) in log.end_offsets(t).await?.into_iter().enumerate() {
            end += e;
            applied += offsets.get(&(t.clone(), p as i32)).copied().unwrap_or(0);
        }
    }
    Ok((applied, end))
}

pub struct ProjectionWorker {
    pub db: Db,
    pub log: Arc<dyn Log>,
    pub projection: Arc<dyn Projection>,
    pub notifier: Option<Arc<WriteNotifier>>,
    pub max_batch: usize,
}

enum Step {
    /// The served generation changed: reload offsets and start over.
    Reload,
    Stop,
}

impl ProjectionWorker {
    /// Keeps the served generation up to date until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ProjectionError> {
        self.run_generation(None, shutdown, |_| false).await
    }

    /// Builds `generation` (used by replay) until `done(applied_total)` says so or `shutdown`.
    pub async fn build(
        &self,
        generation: i64,
        shutdown: CancellationToken,
        done: impl Fn(i64) -> bool,
    ) -> Result<(), ProjectionError> {
        self.run_generation(Some(generation), shutdown, done).await
    }

    async fn run_generation(
        &self,
        pinned: Option<i64>,
        shutdown: CancellationToken,
        done: impl Fn(i64) -> bool,
    ) -> Result<(), ProjectionError> {
        let name = self.projection.name();
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.follow(pinned, &shutdown, &done).await {
                Ok(Step::Stop) => return Ok(()),
                Ok(Step::Reload) => {
                    tracing::info!(projection = name, "served generation changed; reloading offsets");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    // Nothing of the failed batch was committed: start again from the stored offsets.
                    tracing::error!(projection = name, error = %e, retriable = e.is_retriable(), ?backoff, "projection batch failed; retrying");
                    metrics::counter!("payerx_projection_errors_total", "projection" => name).increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn follow(
        &self,
        pinned: Option<i64>,
        shutdown: &CancellationToken,
        done: &impl Fn(i64) -> bool,
    ) -> Result<Step, ProjectionError> {
        let name = self.projection.name();
        let generation = match pinned {
            Some(g) => g,
            None => active_generation(&self.db, self.projection.as_ref()).await?,
        };
        self.projection.create_generation(&self.db, generation).await?;
        let stored = load_offsets(&self.db, name, generation).await?;
        let topics = if pinned.is_some() { self.projection.topics() } else { self.projection.live_topics() };
        let mut assignment = Vec::new();
        for t in topics {
            for p in 0..self.log.partitions(&t).await? {
                assignment.push((t.clone(), p, stored.get(&(t.clone(), p)).copied().unwrap_or(0)));
            }
        }
        let mut applied: i64 = assignment.iter().map(|(_, _, o)| *o).sum();
        let mut consumer = self.log.assigned_consumer(&assignment).await?;
        // Every batch on one connection of its own: SQLite keeps a connection's page cache only
        // while no other connection writes, and the pool hands out its connections in turn, so
        // each batch started on a cold cache. Outside the pool, it does not count against it, so
        // readers (and this worker's own queries below) never wait for it. Its SQLite worker thread
        // runs at the clients' priority, not the stage's, so the write lock is never held by a
        // starved thread. An error drops it with this call; the retry opens another.
        let mut conn = self.db.own_connection().await?;
        let mut last_check = Instant::now();
        loop {
            if done(applied) {
                return Ok(Step::Stop);
            }
            let batch = tokio::select! {
                b = consumer.poll(self.max_batch, Duration::from_millis(200)) => b?,
                _ = shutdown.cancelled() => return Ok(Step::Stop),
            };
            if pinned.is_none() && (batch.is_empty() || last_check.elapsed() > Duration::from_secs(1)) {
                last_check = Instant::now();
                if active_generation(&self.db, self.projection.as_ref()).await? != generation {
                    return Ok(Step::Reload);
                }
                self.report_lag(generation).await;
            }
            if batch.is_empty() {
                continue;
            }
            let mut tx = self.db.begin_write(&mut conn).await?;
            if pinned.is_none() {
                // Checked inside the transaction, so a swap committed by a replay is never missed.
                let active: i64 = sqlx::query("SELECT active FROM view_generations WHERE projection = $1")
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
                if active != generation {
                    tx.rollback().await?;
                    return Ok(Step::Reload);
                }
            }
            let Applied { outcomes, emit } = self.projection.apply(&mut tx, generation, &batch).await?;
            if !emit.is_empty() {
                let served = match pinned {
                    None => HashMap::new(),
                    Some(_) => {
                        let active = active_generation(&self.db, self.projection.as_ref()).await?;
                        load_offsets(&self.db, name, active).await?
                    }
                };
                let new = |i: usize| {
                    let r = &batch[i];
                    r.offset >= served.get(&(r.topic.clone(), r.partition)).copied().unwrap_or(0)
                };
                let emit: Vec<_> = emit.into_iter().filter(|(i, _)| new(*i)).map(|(_, r)| r).collect();
                if !emit.is_empty() {
                    self.log.append(emit).await?;
                }
            }
            let mut next: HashMap<(String, i32), i64> = HashMap::new();
            for r in &batch {
                next.insert((r.topic.clone(), r.partition), r.offset + 1);
            }
            for ((topic, partition), offset) in &next {
                sqlx::query(
                    "INSERT INTO projection_offsets (projection, generation, topic, partition_id, next_offset) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (projection, generation, topic, partition_id) DO UPDATE SET next_offset = excluded.next_offset",
                )
                .bind(name)
                .bind(generation)
                .bind(topic.as_str())
                .bind(*partition as i64)
                .bind(*offset)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            applied += batch.len() as i64;
            for r in &batch {
                metrics::counter!("payerx_events_consumed_total", "topic" => r.topic.clone(), "consumer" => name)
                    .increment(1);
            }
            if let Some(n) = &self.notifier {
                n.complete(outcomes);
            }
        }
    }

    async fn report_lag(&self, generation: i64) {
        let (name, topics) = (self.projection.name(), self.projection.live_topics());
        if let Ok((applied, end)) = progress_over(&self.db, self.log.as_ref(), name, &topics, generation).await {
            metrics::gauge!("payerx_projection_lag", "projection" => self.projection.name())
                .set((end - applied).max(0) as f64);
        }
    }
}
