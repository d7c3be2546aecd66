//! The log abstraction shared by both backends.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// A record to append. The partition is chosen from the key (Kafka's murmur2, on both backends,
/// so a key lands on the same partition number whichever backend wrote it).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn new(topic: impl Into<String>, key: impl Into<String>, value: Vec<u8>) -> Self {
        Record { topic: topic.into(), key: key.into(), value, headers: vec![] }
    }

    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub partition: i32,
    pub offset: i64,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Append time, milliseconds since the epoch.
    pub timestamp_ms: i64,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// `topic/partition/offset`, for logs and dead-letter headers.
    pub fn coordinates(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Worth retrying: the broker or the file is busy or unreachable for now.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    #[error("log configuration: {0}")]
    Config(String),
    #[error("log storage: {0}")]
    Storage(String),
}

impl LogError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, LogError::Unavailable(_))
    }
}

/// An append-only, partitioned, durable log.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// `embedded` or `kafka`, for metrics and logs.
    fn backend(&self) -> &'static str;

    /// The same log, for a stage's own outputs and commits. Where the backend orders the writes
    /// itself (the embedded log's one writer), these go after the clients' appends that are
    /// waiting, so acknowledgements do not queue behind derived events; elsewhere it is `self`.
    fn background(self: Arc<Self>) -> Arc<dyn Log>;

    /// Creates missing topics (existing ones are left as they are).
    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), LogError>;

    /// Number of partitions of a topic.
    async fn partitions(&self, topic: &str) -> Result<i32, LogError>;

    /// Appends records and returns once every one of them is durable (acknowledged by all
    /// in-sync replicas on Kafka; committed to the WAL on the embedded log). Results are in the
    /// order of `records`. Order is kept per partition.
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError>;

    /// The next offset to be written, per partition (index = partition).
    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError>;

    /// A consumer that reads exactly the given partitions from the given offsets. Used by
    /// projections (which keep their offsets in their own database) and by tools.
    async fn assigned_consumer(&self, assignment: &[(String, i32, i64)]) -> Result<Box<dyn Consumer>, LogError>;

    /// A consumer in a named group: partitions are shared among the group's members and it
    /// resumes from the group's committed offsets (or the beginning). Used by processors.
    async fn group_consumer(&self, group: &str, topics: &[String]) -> Result<Box<dyn Consumer>, LogError>;
}

#[async_trait]
pub trait Consumer: Send {
    /// Up to `max` records, waiting up to `wait` for the first one. Empty on timeout.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError>;

    /// Records the group's progress: `next_offset` per (topic, partition). Call only after
    /// everything derived from the records before it is durable.
    async fn commit(&mut self, offsets: &[(String, i32, i64)]) -> Result<(), LogError>;
}
