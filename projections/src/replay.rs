//! Replay: rebuild a projection from offset 0 into a fresh generation of its tables while the
//! current one keeps serving, then swap the served generation in one transaction. A running
//! worker notices the swap and continues from the new generation's offsets.

use std::sync::Arc;
use std::time::Duration;

use runtime::Log;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::worker::{active_generation, progress, Projection, ProjectionWorker};
use crate::{Db, ProjectionError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub old_generation: i64,
    pub new_generation: i64,
    pub events: i64,
}

/// Rebuilds `projection`. `on_progress(applied, end)` is called as the new generation fills.
pub async fn replay(
    db: &Db,
    log: Arc<dyn Log>,
    projection: Arc<dyn Projection>,
    on_progress: impl Fn(i64, i64) + Send + Sync + 'static,
) -> Result<ReplayReport, ProjectionError> {
    let name = projection.name();
    let old = active_generation(db, projection.as_ref()).await?;
    let building: Option<i64> = sqlx::query("SELECT building FROM view_generations WHERE projection = $1")
        .bind(name)
        .fetch_one(&db.pool)
        .await?
        .try_get(0)?;
    let new = old.max(building.unwrap_or(0)) + 1;
    // A leftover from an interrupted replay is discarded: start clean.
    projection.drop_generation(db, new).await?;
    projection.create_generation(db, new).await?;
    sqlx::query("UPDATE view_generations SET building = $1 WHERE projection = $2")
        .bind(new)
        .bind(name)
        .execute(&db.pool)
        .await?;

    let worker = ProjectionWorker {
        db: db.clone(),
        log: log.clone(),
        projection: projection.clone(),
        notifier: None,
        max_batch: 2000,
    };
    loop {
        let (_, target) = progress(db, log.as_ref(), projection.as_ref(), new).await?;
        let on = &on_progress;
        worker
            .build(new, CancellationToken::new(), move |applied| {
                on(applied, target);
                applied >= target
            })
            .await?;
        // Swap only when nothing arrived since the target was read; otherwise catch up again.
        let mut tx = db.pool.begin().await?;
        let (applied, end) = progress(db, log.as_ref(), projection.as_ref(), new).await?;
        if applied >= end {
            sqlx::query("UPDATE view_generations SET active = $1, building = NULL WHERE projection = $2")
                .bind(new)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            on_progress(applied, end);
            // Give readers holding the old generation a moment before its tables go.
            tokio::time::sleep(Duration::from_secs(1)).await;
            projection.drop_generation(db, old).await?;
            return Ok(ReplayReport { old_generation: old, new_generation: new, events: applied });
        }
        tx.rollback().await?;
    }
}
