//! Projections: consume events, keep views, serve queries. Each projection stores the offsets
//! it applied in the same database transaction as its rows (`projection_offsets`), so a crash,
//! a redelivery or a replay never double-applies or loses an event.

pub mod db;
pub mod links;
pub mod member_match;
pub mod outcomes;
pub mod replay;
pub mod resources;
pub mod search;
pub mod worker;

pub use db::{Backend, Db};
pub use links::{LinkProjection, LinkStore};
pub use member_match::{MemberMatchConfig, MemberMatchProjection, MemberMatchStore};
pub use outcomes::{EntryOutcome, WriteNotifier, WriteOutcome};
pub use resources::{ResourceProjection, ResourceStore, StoredResource};
pub use worker::{Applied, Projection, ProjectionWorker};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Log(#[from] runtime::LogError),
    /// A search the client must fix (rendered as 400 naming the parameter).
    #[error("search parameter {0}")]
    Search(search::SearchIssue),
    #[error("{0}")]
    Other(String),
}

impl ProjectionError {
    /// Connection trouble and lock contention are worth retrying; the rest is a defect.
    pub fn is_retriable(&self) -> bool {
        match self {
            ProjectionError::Db(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || e.to_string().contains("database is locked")
            }
            ProjectionError::Log(e) => e.is_retriable(),
            _ => false,
        }
    }
}
