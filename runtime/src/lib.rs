//! The spine of payerx: an append-only, partitioned log behind one trait ([`Log`]) with two
//! backends — an embedded durable log on SQLite (the default) and Kafka — and the runtime that
//! moves events through pure processors ([`processor`]).

pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod log;
pub mod partitioner;
pub mod processor;

pub use log::{Appended, Consumed, Consumer, Log, LogError, Record, TopicSpec};
pub use processor::{ProcessError, Processor, RunOptions};

use std::sync::Arc;

/// Which log backend to open, from configuration.
#[derive(Debug, Clone)]
pub enum LogConfig {
    /// Embedded log in `<data_dir>/log.sqlite`.
    Embedded { data_dir: std::path::PathBuf, fsync: bool },
    /// Kafka (or a Kafka-protocol broker) at these bootstrap servers.
    Kafka { brokers: String, replication_factor: i16, extra: Vec<(String, String)> },
}

/// Opens the configured backend.
pub async fn open(config: &LogConfig) -> Result<Arc<dyn Log>, LogError> {
    match config {
        LogConfig::Embedded { data_dir, fsync } => Ok(Arc::new(embedded::EmbeddedLog::open(data_dir, *fsync)?)),
        #[cfg(feature = "kafka")]
        LogConfig::Kafka { brokers, replication_factor, extra } => {
            Ok(Arc::new(kafka::KafkaLog::connect(brokers, *replication_factor, extra).await?))
        }
        #[cfg(not(feature = "kafka"))]
        LogConfig::Kafka { .. } => Err(LogError::Config("built without the kafka feature".into())),
    }
}
