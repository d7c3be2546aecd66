//! Kafka backend of [`Log`] (any Kafka-protocol broker: Apache Kafka, Redpanda, tansu).
//!
//! Delivery follows DESIGN.md §5: an idempotent producer with `acks=all`, `append` returns only
//! once every record is acknowledged, and consumers never commit on their own. The partition of a
//! record is computed here with [`partition_for`] (Kafka's murmur2) and passed explicitly, so a
//! key lands on the same partition on both backends whatever the librdkafka configuration says.
//!
//! librdkafka calls that block (metadata, watermarks, synchronous commits, consumer close) run on
//! tokio's blocking pool so they never stall the async workers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::log::{Appended, Consumed, Consumer, Log, LogError, Record, TopicSpec};
use crate::partitioner::partition_for;

/// Bound on one metadata / watermark / commit round trip.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ensure_topics` waits for new topics to show up with leaders in the metadata.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// librdkafka's delivery deadline per record (retries included); past it `append` fails with a
/// retriable error.
const MESSAGE_TIMEOUT_MS: &str = "30000";
/// How long `append` keeps retrying to enqueue while librdkafka's bounded send queue is full.
const QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings a caller may tune through `extra` (throughput and memory).
const PRODUCER_TUNING: &[(&str, &str)] = &[
    ("client.id", "payerx"),
    ("compression.type", "lz4"),
    ("linger.ms", "5"),
    ("message.timeout.ms", MESSAGE_TIMEOUT_MS),
    // Bounded send queue: memory stays bounded by configuration, not by load.
    ("queue.buffering.max.messages", "100000"),
    ("queue.buffering.max.kbytes", "65536"),
];

/// Settings the delivery guarantees depend on; applied last, so `extra` cannot weaken them.
const PRODUCER_INVARIANTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // Only matters if a record ever goes out without an explicit partition; same hash as ours.
    ("partitioner", "murmur2_random"),
    // Topics are created through the admin API (tansu and well-run clusters do not auto-create).
    ("allow.auto.create.topics", "false"),
];

const CONSUMER_TUNING: &[(&str, &str)] = &[
    ("client.id", "payerx"),
    // Low latency hand-off between stages; the broker answers a fetch after at most 10 ms.
    ("fetch.wait.max.ms", "10"),
    // Prefetch buffer per consumer, bounded (librdkafka's default is 64 MiB).
    ("queued.max.messages.kbytes", "16384"),
    ("queued.min.messages", "10000"),
    // Where no valid offset exists (new group, or a stored offset outside the retained range).
    ("auto.offset.reset", "earliest"),
];

const CONSUMER_INVARIANTS: &[(&str, &str)] = &[
    // Offsets are committed only through `Consumer::commit`, after the outputs are durable.
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "false"),
    ("allow.auto.create.topics", "false"),
];

/// The Kafka log. Cheap to share; one producer and one admin client per instance, one librdkafka
/// consumer per [`Consumer`].
pub struct KafkaLog {
    brokers: String,
    extra: Vec<(String, String)>,
    replication_factor: i16,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Partition counts by topic, for computing partitions on append. Partition counts only grow
    /// by an operator's hand (which breaks key order anyway); `ensure_topics` refreshes them.
    partition_counts: RwLock<HashMap<String, i32>>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `extra` may hold credentials: never print it.
        f.debug_struct("KafkaLog")
            .field("brokers", &self.brokers)
            .field("replication_factor", &self.replication_factor)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// Creates the clients and checks that the brokers answer. `extra` is applied to every client
    /// (producer, admin, consumers), e.g. `security.protocol`, `sasl.*`, `ssl.*`; it may override
    /// tuning settings but not the ones delivery semantics depend on (idempotence, acks, manual
    /// commits).
    pub async fn connect(
        brokers: &str,
        replication_factor: i16,
        extra: &[(String, String)],
    ) -> Result<KafkaLog, LogError> {
        if replication_factor < 1 {
            return Err(LogError::Config(format!("replication factor must be at least 1, got {replication_factor}")));
        }
        if brokers.trim().is_empty() {
            return Err(LogError::Config("no Kafka bootstrap servers configured".into()));
        }
        let producer: FutureProducer = client_config(brokers, PRODUCER_TUNING, extra, PRODUCER_INVARIANTS)
            .create()
            .map_err(|e| classify(&e, "creating the producer"))?;
        let admin: AdminClient<DefaultClientContext> =
            client_config(brokers, &[("client.id", "payerx-admin")], extra, &[])
                .create()
                .map_err(|e| classify(&e, "creating the admin client"))?;

        // librdkafka connects lazily; ask for metadata so a wrong address fails here, not later.
        let probe = producer.clone();
        blocking(move || {
            probe.client().fetch_metadata(None, REQUEST_TIMEOUT).map(|_| ()).map_err(|e| classify(&e, "connecting"))
        })
        .await?;

        Ok(KafkaLog {
            brokers: brokers.to_string(),
            extra: extra.to_vec(),
            replication_factor,
            producer,
            admin,
            partition_counts: RwLock::new(HashMap::new()),
        })
    }

    fn consumer(&self, group: &str) -> Result<Arc<StreamConsumer>, LogError> {
        let mut config = client_config(&self.brokers, CONSUMER_TUNING, &self.extra, CONSUMER_INVARIANTS);
        config.set("group.id", group);
        let consumer: StreamConsumer = config.create().map_err(|e| classify(&e, "creating a consumer"))?;
        Ok(Arc::new(consumer))
    }

    fn cached_partitions(&self, topic: &str) -> Option<i32> {
        self.partition_counts.read().ok().and_then(|m| m.get(topic).copied())
    }

    fn cache_partitions(&self, topic: &str, count: i32) {
        if let Ok(mut m) = self.partition_counts.write() {
            m.insert(topic.to_string(), count);
        }
    }

    fn forget_partitions(&self, topic: &str) {
        if let Ok(mut m) = self.partition_counts.write() {
            m.remove(topic);
        }
    }

    /// Partition count from the cache, or from the brokers.
    async fn partition_count(&self, topic: &str) -> Result<i32, LogError> {
        if let Some(n) = self.cached_partitions(topic) {
            return Ok(n);
        }
        let n = self.partitions(topic).await?;
        self.cache_partitions(topic, n);
        Ok(n)
    }

    /// Fails with `UnknownTopic` before a consumer is built on a topic that does not exist, instead
    /// of an error surfacing later from `poll`.
    async fn check_topics(&self, topics: &[&str]) -> Result<(), LogError> {
        for (i, topic) in topics.iter().enumerate() {
            if !topics[..i].contains(topic) {
                self.partition_count(topic).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Log for KafkaLog {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    /// The brokers order nothing across producers: the stages use the same producer.
    fn background(self: Arc<Self>) -> Arc<dyn Log> {
        self
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), LogError> {
        if topics.is_empty() {
            return Ok(());
        }
        let replication = i32::from(self.replication_factor);
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(replication))).collect();
        let options =
            AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT)).operation_timeout(Some(TOPIC_READY_TIMEOUT));
        let results = self.admin.create_topics(&new, &options).await.map_err(|e| classify(&e, "creating topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(classify_code(code, &format!("creating topic {name}"))),
            }
        }

        // Creation is asynchronous on the brokers: wait until every topic has all its partitions
        // led, so the first append or assignment does not race it.
        let deadline = Instant::now() + TOPIC_READY_TIMEOUT;
        for spec in topics {
            loop {
                let producer = self.producer.clone();
                let name = spec.name.clone();
                match blocking(move || topic_partitions(&producer, &name, true)).await {
                    Ok(n) => {
                        if n != spec.partitions {
                            tracing::warn!(
                                topic = %spec.name,
                                existing = n,
                                requested = spec.partitions,
                                "topic exists with another partition count; left as it is"
                            );
                        }
                        self.cache_partitions(&spec.name, n);
                        break;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        return Err(LogError::Unavailable(format!(
                            "topic {} not ready after creation: {e}",
                            spec.name
                        )));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<i32, LogError> {
        let producer = self.producer.clone();
        let topic = topic.to_string();
        blocking(move || topic_partitions(&producer, &topic, false)).await
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, LogError> {
        let mut counts: HashMap<&str, i32> = HashMap::new();
        for record in &records {
            if !counts.contains_key(record.topic.as_str()) {
                counts.insert(&record.topic, self.partition_count(&record.topic).await?);
            }
        }

        // Enqueue strictly in input order (librdkafka keeps per-partition order from there, with
        // idempotence even across retries), then await all acknowledgements together.
        let mut deliveries = Vec::with_capacity(records.len());
        for record in &records {
            let partitions = counts.get(record.topic.as_str()).copied().unwrap_or(1);
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (name, value) in &record.headers {
                headers = headers.insert(Header { key: name.as_str(), value: Some(value.as_slice()) });
            }
            let mut pending = FutureRecord::<str, [u8]>::to(&record.topic)
                .key(record.key.as_str())
                .payload(record.value.as_slice())
                .partition(partition_for(&record.key, partitions))
                .headers(headers);
            let queue_deadline = Instant::now() + QUEUE_FULL_TIMEOUT;
            loop {
                match self.producer.send_result(pending) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    // Back-pressure: wait for earlier records to drain rather than reorder them.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < queue_deadline =>
                    {
                        pending = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // Records already enqueued may still land; the caller retries the whole batch,
                    // which at-least-once plus deterministic event ids tolerates.
                    Err((e, _)) => return Err(self.append_error(&e, &record.topic)),
                }
            }
        }

        let mut appended = Vec::with_capacity(deliveries.len());
        let mut first_error = None;
        for (outcome, record) in futures::future::join_all(deliveries).await.into_iter().zip(&records) {
            match outcome {
                Ok(Ok((partition, offset))) => appended.push(Appended { partition, offset }),
                Ok(Err((e, _))) => {
                    first_error.get_or_insert_with(|| self.append_error(&e, &record.topic));
                }
                Err(_canceled) => {
                    first_error
                        .get_or_insert_with(|| LogError::Unavailable("producer shut down before delivery".into()));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(appended),
        }
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        let producer = self.producer.clone();
        let topic = topic.to_string();
        blocking(move || {
            let partitions = topic_partitions(&producer, &topic, false)?;
            (0..partitions)
                .map(|p| {
                    producer
                        .client()
                        .fetch_watermarks(&topic, p, REQUEST_TIMEOUT)
                        .map(|(_low, high)| high)
                        .map_err(|e| classify(&e, &format!("reading the end offset of {topic}/{p}")))
                })
                .collect()
        })
        .await
    }

    /// Reads exactly `assignment` from the given offsets. The consumer needs a group id (librdkafka
    /// requires one) but never joins or commits to that group: its `commit` is a no-op because the
    /// callers (projections, tools) store their offsets themselves.
    async fn assigned_consumer(&self, assignment: &[(String, i32, i64)]) -> Result<Box<dyn Consumer>, LogError> {
        let topics: Vec<&str> = assignment.iter().map(|(t, _, _)| t.as_str()).collect();
        self.check_topics(&topics).await?;
        let consumer = self.consumer(&format!("payerx-assigned-{}", uuid::Uuid::new_v4()))?;
        let mut list = TopicPartitionList::with_capacity(assignment.len());
        for (topic, partition, offset) in assignment {
            list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| classify(&e, &format!("assigning {topic}/{partition}")))?;
        }
        consumer.assign(&list).map_err(|e| classify(&e, "assigning partitions"))?;
        Ok(Box::new(KafkaConsumer { inner: Some(consumer), group: false }))
    }

    async fn group_consumer(&self, group: &str, topics: &[String]) -> Result<Box<dyn Consumer>, LogError> {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.check_topics(&names).await?;
        let consumer = self.consumer(group)?;
        consumer.subscribe(&names).map_err(|e| classify(&e, "subscribing"))?;
        Ok(Box::new(KafkaConsumer { inner: Some(consumer), group: true }))
    }
}

impl KafkaLog {
    fn append_error(&self, e: &KafkaError, topic: &str) -> LogError {
        let error = classify(e, &format!("appending to {topic}"));
        if matches!(error, LogError::UnknownTopic(_)) {
            // The topic went away (or was re-created): look its partitions up again next time.
            self.forget_partitions(topic);
            return LogError::UnknownTopic(topic.to_string());
        }
        error
    }
}

/// A librdkafka consumer; `group` tells a group member (commits to the group) from an assigned
/// reader (commit is a no-op).
struct KafkaConsumer {
    /// `Option` only so that `Drop` can move it onto the blocking pool.
    inner: Option<Arc<StreamConsumer>>,
    group: bool,
}

impl KafkaConsumer {
    fn inner(&self) -> Result<&Arc<StreamConsumer>, LogError> {
        self.inner.as_ref().ok_or_else(|| LogError::Storage("consumer already closed".into()))
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError> {
        let mut batch = Vec::new();
        if max == 0 {
            return Ok(batch);
        }
        let consumer = self.inner()?;
        let mut stream = consumer.stream();
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) | Ok(None) => return Ok(batch),
            Ok(Some(Err(e))) => return Err(classify(&e, "consuming")),
            Ok(Some(Ok(message))) => batch.push(consumed(&message)),
        }
        // Drain what is already fetched, without waiting.
        while batch.len() < max {
            match stream.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(consumed(&message)),
                // The records taken so far have advanced the position: hand them out rather than
                // lose them; a persistent error shows up again on the next poll.
                Some(Some(Err(e))) => {
                    tracing::debug!(error = %e, "consumer error; returning the records read first");
                    break;
                }
                Some(None) | None => break,
            }
        }
        Ok(batch)
    }

    async fn commit(&mut self, offsets: &[(String, i32, i64)]) -> Result<(), LogError> {
        if !self.group || offsets.is_empty() {
            return Ok(());
        }
        let consumer = Arc::clone(self.inner()?);
        let offsets = offsets.to_vec();
        blocking(move || {
            // Commit only partitions this member still owns: after a rebalance the new owner
            // resumes from the last committed offset (at-least-once), and an old member's commit
            // must not move the group's position under it.
            let owned = consumer.assignment().map_err(|e| classify(&e, "reading the assignment"))?;
            let mut list = TopicPartitionList::with_capacity(offsets.len());
            for (topic, partition, next_offset) in &offsets {
                if owned.find_partition(topic, *partition).is_some() {
                    list.add_partition_offset(topic, *partition, Offset::Offset(*next_offset))
                        .map_err(|e| classify(&e, &format!("committing {topic}/{partition}")))?;
                } else {
                    tracing::debug!(%topic, partition, "partition no longer assigned");
                }
            }
            if list.count() == 0 {
                return Ok(());
            }
            consumer.commit(&list, CommitMode::Sync).map_err(|e| classify(&e, "committing offsets"))
        })
        .await
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        // Closing a group member blocks (it leaves the group); keep that off the async workers.
        if let (Some(consumer), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn_blocking(move || drop(consumer));
        }
    }
}

fn consumed(message: &BorrowedMessage<'_>) -> Consumed {
    let headers = message
        .headers()
        .map(|headers| {
            headers.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()
        })
        .unwrap_or_default();
    Consumed {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        timestamp_ms: message.timestamp().to_millis().unwrap_or(-1),
    }
}

/// Bootstrap servers, then tuning, then the caller's `extra`, then the invariants.
fn client_config(
    brokers: &str,
    tuning: &[(&str, &str)],
    extra: &[(String, String)],
    invariants: &[(&str, &str)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in tuning {
        config.set(*key, *value);
    }
    for (key, value) in extra {
        config.set(key, value);
    }
    for (key, value) in invariants {
        if extra.iter().any(|(k, v)| k == key && v != value) {
            tracing::warn!(%key, "ignoring a Kafka setting that would weaken delivery guarantees");
        }
        config.set(*key, *value);
    }
    config
}

/// Partition count of `topic` from the brokers (blocking). With `require_leaders`, a partition
/// without a leader yet counts as not ready (`Unavailable`).
fn topic_partitions(producer: &FutureProducer, topic: &str, require_leaders: bool) -> Result<i32, LogError> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| classify(&e, &format!("reading metadata of {topic}")))?;
    let Some(entry) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(LogError::UnknownTopic(topic.to_string()));
    };
    if let Some(err) = entry.error() {
        return Err(classify_code(err.into(), &format!("reading metadata of {topic}")).named_topic(topic));
    }
    let partitions = entry.partitions();
    if partitions.is_empty() {
        return Err(LogError::UnknownTopic(topic.to_string()));
    }
    if require_leaders && partitions.iter().any(|p| p.leader() < 0 || p.error().is_some()) {
        return Err(LogError::Unavailable(format!("topic {topic} has partitions without a leader")));
    }
    i32::try_from(partitions.len()).map_err(|_| LogError::Storage(format!("topic {topic}: too many partitions")))
}

/// Runs blocking librdkafka work on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, LogError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, LogError> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await.map_err(|e| LogError::Storage(format!("Kafka client task failed: {e}")))?
}

trait NamedTopic {
    fn named_topic(self, topic: &str) -> Self;
}

impl NamedTopic for LogError {
    /// `UnknownTopic` carries the topic name, not the librdkafka message.
    fn named_topic(self, topic: &str) -> Self {
        match self {
            LogError::UnknownTopic(_) => LogError::UnknownTopic(topic.to_string()),
            other => other,
        }
    }
}

/// Maps a client error to the log's retriable / permanent classes.
fn classify(error: &KafkaError, context: &str) -> LogError {
    match error {
        KafkaError::AdminOp(code) => classify_code(*code, context),
        KafkaError::ClientConfig(..)
        | KafkaError::ClientCreation(_)
        | KafkaError::AdminOpCreation(_)
        | KafkaError::Nul(_) => LogError::Config(format!("{context}: {error}")),
        KafkaError::Subscription(_) => LogError::Config(format!("{context}: {error}")),
        KafkaError::Canceled | KafkaError::NoMessageReceived => LogError::Unavailable(format!("{context}: {error}")),
        KafkaError::Transaction(e) if e.is_retriable() => LogError::Unavailable(format!("{context}: {error}")),
        _ => match error.rdkafka_error_code() {
            Some(code) => classify_code(code, &format!("{context}: {error}")),
            None => LogError::Storage(format!("{context}: {error}")),
        },
    }
}

fn classify_code(code: RDKafkaErrorCode, context: &str) -> LogError {
    use RDKafkaErrorCode as C;
    let message = format!("{context}: {code}");
    match code {
        // The cluster, a broker, a leader or the group coordinator is busy, moving or unreachable.
        C::BrokerTransportFailure
        | C::Resolve
        | C::MessageTimedOut
        | C::AllBrokersDown
        | C::OperationTimedOut
        | C::QueueFull
        | C::TimedOutQueue
        | C::ISRInsufficient
        | C::WaitingForCoordinator
        | C::InProgress
        | C::PreviousInProgress
        | C::WaitCache
        | C::Retry
        | C::Interrupted
        | C::AssignmentLost
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::RequestTimedOut
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NetworkException
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::RebalanceInProgress
        | C::IllegalGeneration
        | C::UnknownMemberId
        | C::NotController
        | C::KafkaStorageError
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::EligibleLeadersNotAvailable
        | C::UnstableOffsetCommit
        | C::ThrottlingQuotaExceeded
        | C::StaleMemberEpoch
        | C::FencedMemberEpoch
        | C::RebootstrapRequired => LogError::Unavailable(message),
        C::UnknownTopic | C::UnknownPartition | C::UnknownTopicOrPartition | C::UnknownTopicId => {
            LogError::UnknownTopic(message)
        }
        // Fixing these takes an operator: settings, credentials, permissions, broker features.
        C::InvalidReplicationFactor
        | C::InvalidPartitions
        | C::InvalidReplicaAssignment
        | C::InvalidConfig
        | C::InvalidTopic
        | C::PolicyViolation
        | C::InvalidGroupId
        | C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::SSL
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::UnsupportedCompressionType
        | C::UnsupportedFeature
        | C::UnsupportedVersion => LogError::Config(message),
        _ => LogError::Storage(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(classify(&timeout, "x").is_retriable());
        let down = KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown);
        assert!(classify(&down, "x").is_retriable());
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert!(matches!(classify(&unknown, "x"), LogError::UnknownTopic(_)));
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify(&too_big, "x"), LogError::Storage(_)));
        let replication = KafkaError::AdminOp(RDKafkaErrorCode::InvalidReplicationFactor);
        assert!(matches!(classify(&replication, "x"), LogError::Config(_)));
    }

    #[test]
    fn invariants_override_extra() {
        let extra = vec![("acks".to_string(), "1".to_string()), ("linger.ms".to_string(), "50".to_string())];
        let config = client_config("b:9092", PRODUCER_TUNING, &extra, PRODUCER_INVARIANTS);
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
    }
}
