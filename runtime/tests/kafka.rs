//! Integration tests of the Kafka backend against a running Kafka-protocol broker (tansu in CI).
//! The bootstrap address comes from `PAYERX_TEST_KAFKA_BROKERS`; every test uses its own topics
//! and groups (uuid suffix) because tests share the broker. Run tansu with its SQLite storage
//! (scripts/tansu.sh does): its memory engine cannot fetch from inside a producer batch.
#![cfg(feature = "kafka")]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use runtime::kafka::KafkaLog;
use runtime::partitioner::partition_for;
use runtime::{Consumed, Consumer, Log, LogError, Record, TopicSpec};

async fn connect() -> KafkaLog {
    let brokers = std::env::var("PAYERX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "PAYERX_TEST_KAFKA_BROKERS is not set: start a broker \
             (scripts/tansu.sh start DIR) and export its host:port"
        )
    });
    KafkaLog::connect(&brokers, 1, &[]).await.expect("connect to the test broker")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// Polls until `count` records arrived or the deadline passes (then panics with what came).
async fn read(consumer: &mut dyn Consumer, count: usize, max: usize) -> Vec<Consumed> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < count {
        assert!(Instant::now() < deadline, "read {} of {count} records before the deadline", got.len());
        let batch = consumer.poll(max.min(count - got.len()), Duration::from_millis(500)).await.expect("poll");
        assert!(batch.len() <= max, "poll returned more than max");
        got.extend(batch);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration tier: needs a Kafka broker; run scripts/test-integration.sh"]
async fn ensure_topics_is_idempotent() {
    let log = connect().await;
    let topic = unique("ensure");
    let spec = TopicSpec { name: topic.clone(), partitions: 3 };
    log.ensure_topics(std::slice::from_ref(&spec)).await.expect("create");
    log.ensure_topics(std::slice::from_ref(&spec)).await.expect("create again");
    // An existing topic is left as it is, whatever the spec says now.
    log.ensure_topics(&[TopicSpec { name: topic.clone(), partitions: 5 }]).await.expect("existing topic");
    assert_eq!(log.partitions(&topic).await.expect("partitions"), 3);
    assert_eq!(log.end_offsets(&topic).await.expect("end offsets"), vec![0, 0, 0]);
    assert_eq!(log.backend(), "kafka");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration tier: needs a Kafka broker; run scripts/test-integration.sh"]
async fn unknown_topics_are_reported() {
    let log = connect().await;
    let topic = unique("missing");
    assert!(matches!(log.partitions(&topic).await, Err(LogError::UnknownTopic(_))));
    let appended = log.append(vec![Record::new(&topic, "k", b"v".to_vec())]).await;
    assert!(matches!(appended, Err(LogError::UnknownTopic(_))), "{appended:?}");
    assert!(matches!(log.assigned_consumer(&[(topic, 0, 0)]).await, Err(LogError::UnknownTopic(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration tier: needs a Kafka broker; run scripts/test-integration.sh"]
async fn append_then_read_back_in_partition_order() {
    let log = connect().await;
    let topic = unique("append");
    log.ensure_topics(&[TopicSpec { name: topic.clone(), partitions: 3 }]).await.expect("create");

    let records: Vec<Record> = (0..1000)
        .map(|i| {
            Record::new(&topic, format!("member-{}", i % 37), format!("value-{i}").into_bytes())
                .header("seq", i.to_string())
                .header("binary", vec![0u8, 255, (i % 256) as u8])
        })
        .collect();
    let appended = log.append(records.clone()).await.expect("append");
    assert_eq!(appended.len(), records.len());

    // Each record on its key's murmur2 partition, offsets dense and in input order per partition.
    let mut expected: BTreeMap<i32, Vec<(i64, &Record)>> = BTreeMap::new();
    for (record, at) in records.iter().zip(&appended) {
        assert_eq!(at.partition, partition_for(&record.key, 3), "partition of {}", record.key);
        expected.entry(at.partition).or_default().push((at.offset, record));
    }
    assert_eq!(expected.len(), 3, "keys spread over all partitions");
    for (partition, list) in &expected {
        let offsets: Vec<i64> = list.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (0..list.len() as i64).collect::<Vec<_>>(), "offsets of partition {partition}");
    }
    let ends = log.end_offsets(&topic).await.expect("end offsets");
    assert_eq!(ends, (0..3).map(|p| expected.get(&p).map_or(0, |l| l.len() as i64)).collect::<Vec<_>>());

    let assignment: Vec<(String, i32, i64)> = (0..3).map(|p| (topic.clone(), p, 0)).collect();
    let mut consumer = log.assigned_consumer(&assignment).await.expect("assigned consumer");
    let got = read(consumer.as_mut(), records.len(), 256).await;
    consumer.commit(&[(topic.clone(), 0, 1)]).await.expect("commit is a no-op");

    let mut by_partition: BTreeMap<i32, Vec<&Consumed>> = BTreeMap::new();
    for c in &got {
        assert_eq!(c.topic, topic);
        assert!(c.timestamp_ms > 0, "timestamp set");
        by_partition.entry(c.partition).or_default().push(c);
    }
    for (partition, list) in &expected {
        let read_back = &by_partition[partition];
        assert_eq!(read_back.len(), list.len(), "count of partition {partition}");
        for ((offset, record), consumed) in list.iter().zip(read_back) {
            assert_eq!(consumed.offset, *offset);
            assert_eq!(consumed.key, record.key);
            assert_eq!(consumed.value, record.value);
            assert_eq!(consumed.headers, record.headers, "headers at {}", consumed.coordinates());
        }
    }

    // Reading from the middle of one partition starts exactly there.
    let (partition, list) = expected.iter().next().expect("a partition");
    let from = list.len() as i64 / 2;
    let mut consumer = log.assigned_consumer(&[(topic.clone(), *partition, from)]).await.expect("assigned consumer");
    let got = read(consumer.as_mut(), list.len() - from as usize, 100).await;
    assert_eq!(got.first().map(|c| c.offset), Some(from));
    assert!(got.iter().all(|c| c.partition == *partition));
    assert!(consumer.poll(10, Duration::from_millis(300)).await.expect("poll").is_empty(), "nothing past the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration tier: needs a Kafka broker; run scripts/test-integration.sh"]
async fn group_consumer_resumes_after_commit() {
    let log = connect().await;
    let topic = unique("group");
    let group = unique("group");
    log.ensure_topics(&[TopicSpec { name: topic.clone(), partitions: 3 }]).await.expect("create");
    let records: Vec<Record> =
        (0..300).map(|i| Record::new(&topic, format!("k{i}"), format!("{i}").into_bytes())).collect();
    let appended = log.append(records).await.expect("append");
    let all: HashSet<(i32, i64)> = appended.iter().map(|a| (a.partition, a.offset)).collect();

    let mut first = log.group_consumer(&group, std::slice::from_ref(&topic)).await.expect("group consumer");
    let seen = read(first.as_mut(), 120, 40).await;
    let mut next: HashMap<i32, i64> = HashMap::new();
    for c in &seen {
        let n = next.entry(c.partition).or_insert(0);
        assert_eq!(c.offset, *n, "in order, from the start, on partition {}", c.partition);
        *n = c.offset + 1;
    }
    let commit: Vec<(String, i32, i64)> = next.iter().map(|(p, o)| (topic.clone(), *p, *o)).collect();
    first.commit(&commit).await.expect("commit");
    drop(first);

    // A new member of the same group starts after the committed offsets, and reads the rest.
    let mut second = log.group_consumer(&group, std::slice::from_ref(&topic)).await.expect("group consumer");
    let rest = read(second.as_mut(), all.len() - seen.len(), 100).await;
    let mut resumed_at: HashMap<i32, i64> = HashMap::new();
    for c in &rest {
        resumed_at.entry(c.partition).or_insert(c.offset);
    }
    for (partition, offset) in &resumed_at {
        assert_eq!(*offset, next.get(partition).copied().unwrap_or(0), "resumed at the commit on {partition}");
    }
    let mut union: HashSet<(i32, i64)> = seen.iter().map(|c| (c.partition, c.offset)).collect();
    for c in &rest {
        assert!(union.insert((c.partition, c.offset)), "{} read twice", c.coordinates());
    }
    assert_eq!(union, all);
}
