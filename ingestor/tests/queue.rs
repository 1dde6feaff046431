//! The sled queue on real files: order, sequences across restarts, group commit, both
//! full policies, a corrupt directory, and crashes of a real child process (SIGKILL).

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use tagstream_crds::site::FullPolicy;
use tagstream_ingestor::queue::{Acked, Queue, QueueConfig, QueueError, Stored};
use tagstream_proto::v1::{Point, PointBatch, point::Value};

use support::points::stored_values;

/// The publisher's ack of every record through `sequence` (the stream sequences matter
/// only to the power-cut repair).
fn acked(sequence: u64) -> Acked {
    Acked {
        sequence,
        stream_sequences: Vec::new(),
    }
}

fn batch(n: u64) -> PointBatch {
    PointBatch {
        source: "dev".into(),
        points: vec![Point {
            tag: "counter".into(),
            timestamp_ns: n as i64,
            value: Some(Value::UintValue(n)),
            ..Point::default()
        }],
        ..PointBatch::default()
    }
}

async fn everything(queue: &Queue) -> Vec<Stored> {
    queue.read(None, usize::MAX).await.unwrap()
}

#[tokio::test]
async fn records_come_back_in_order_and_sequences_never_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = QueueConfig::new(dir.path().join("q"));
    let queue = Queue::open(config.clone()).unwrap().queue;
    let epoch = queue.epoch();
    for n in 0..5 {
        queue.append(vec![batch(n)]).await.unwrap();
    }
    let stored = everything(&queue).await;
    assert_eq!(stored_values(&stored), [0, 1, 2, 3, 4]);
    let last = stored.last().unwrap().sequence;
    assert_eq!(queue.stats().points, 5);
    queue.ack(vec![acked(last)]).await.unwrap();
    assert_eq!(queue.stats().points, 0);
    queue.close().await.unwrap();

    // Reopened and drained: the epoch stays and the next record gets a new sequence.
    let queue = Queue::open(config).unwrap().queue;
    assert_eq!(queue.epoch(), epoch);
    queue.append(vec![batch(5)]).await.unwrap();
    let stored = everything(&queue).await;
    assert!(
        stored[0].sequence > last,
        "sequence {} reused after {last}",
        stored[0].sequence
    );
    queue.close().await.unwrap();
}

#[tokio::test]
async fn appends_within_a_flush_interval_share_one_group_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.flush_interval = Duration::from_millis(200);
    let queue = Queue::open(config).unwrap().queue;
    let appends = (0..100).map(|n| {
        let queue = queue.clone();
        tokio::spawn(async move { queue.append(vec![batch(n)]).await })
    });
    for append in appends.collect::<Vec<_>>() {
        append.await.unwrap().unwrap();
    }
    let stored = everything(&queue).await;
    let mut all = stored_values(&stored);
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    let stats = queue.stats();
    // Nothing acknowledged them: every record went to disk, in one or two groups (the
    // second for what came after the first's half interval).
    assert_eq!(stats.records_written, stored.len() as u64);
    assert!(
        stats.groups_written <= 2,
        "100 concurrent appends took {} group writes",
        stats.groups_written
    );
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_points_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.max_bytes = 64 << 10;
    config.flush_interval = Duration::from_millis(1);
    let queue = Queue::open(config).unwrap().queue;
    for n in 0..4000 {
        queue.append(vec![batch(n)]).await.unwrap();
    }
    let stats = queue.stats();
    assert!(stats.dropped_points > 0, "{stats:?}");
    assert!(
        (stats.payload_bytes as f64) * tagstream_ingestor::queue::DISK_AMPLIFICATION <= f64::from(64 << 10),
        "{stats:?}"
    );
    let kept = stored_values(&everything(&queue).await);
    assert_eq!(*kept.last().unwrap(), 3999, "the newest point is kept");
    assert_eq!(
        kept.len() as u64 + stats.dropped_points,
        4000,
        "every point is kept or counted as dropped"
    );
    assert!(
        kept.windows(2).all(|w| w[1] == w[0] + 1),
        "what is kept is one contiguous, newest run"
    );
}

/// The publisher reads on from the last record it sent, which the queue answers from the
/// records it flushed last when it can: those answers must be what sled holds, while the
/// full policy drops the oldest records and acks remove the head.
#[tokio::test]
async fn reading_on_from_a_record_sees_what_the_queue_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.max_bytes = 64 << 10;
    config.flush_interval = Duration::from_millis(1);
    let queue = Queue::open(config).unwrap().queue;
    let mut last = None;
    let mut read = 0;
    for n in 0..3000 {
        queue.append(vec![batch(n)]).await.unwrap();
        if n % 7 != 0 {
            continue;
        }
        // Fewer than appended: the reader falls behind and the drops overtake it.
        let on = queue.read(last, 4).await.unwrap();
        let held: Vec<Stored> = everything(&queue)
            .await
            .into_iter()
            .filter(|s| last.is_none_or(|l| s.sequence > l))
            .take(4)
            .collect();
        assert_eq!(on, held, "after {last:?}");
        read += on.len();
        last = on.last().map(|s| s.sequence).or(last);
        if n % 1001 == 0
            && let Some(through) = last
        {
            queue.ack(vec![acked(through)]).await.unwrap();
        }
    }
    assert!(queue.stats().dropped_points > 0, "the full policy dropped records");
    assert!(read > 1000, "{read} records read on");
}

#[tokio::test]
async fn pause_polling_holds_appends_until_the_publisher_frees_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.max_bytes = 8 << 10;
    config.policy = FullPolicy::PausePolling;
    config.flush_interval = Duration::from_millis(1);
    let queue = Queue::open(config).unwrap().queue;
    let mut n = 0;
    // Fill until an append stops returning.
    let blocked = loop {
        let append = queue.append(vec![batch(n)]);
        match tokio::time::timeout(Duration::from_millis(300), append).await {
            Ok(result) => result.unwrap(),
            Err(_) => break n,
        }
        n += 1;
        assert!(n < 10_000, "the queue never filled");
    };
    assert!(queue.stats().paused);
    assert_eq!(queue.stats().dropped_points, 0, "pausePolling drops nothing");
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.append(vec![batch(1_000_000)]).await }
    });
    let head = everything(&queue).await[0].sequence;
    queue.ack(vec![acked(head + 20)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("room was made")
        .unwrap()
        .unwrap();
    let kept = stored_values(&everything(&queue).await);
    assert!(kept.contains(&1_000_000));
    assert!(blocked > 0);
    assert!(
        queue.stats().retained_evicted > 0,
        "the acknowledged records kept for a broker's power cut gave way: {:?}",
        queue.stats()
    );
}

/// Acknowledged records move to `retained` with their stream sequences, come back as they
/// were stored, survive a reopen, take new stream sequences when published again, and
/// leave once their retention has passed.
#[tokio::test]
async fn acknowledged_records_are_retained_with_their_stream_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.acked_retention = Duration::from_millis(400);
    let queue = Queue::open(config.clone()).unwrap().queue;
    for n in 0..10 {
        queue.append(vec![batch(n)]).await.unwrap();
    }
    let stored = everything(&queue).await;
    let acks: Vec<Acked> = stored[..4]
        .iter()
        .map(|s| Acked {
            sequence: s.sequence,
            stream_sequences: vec![100 + s.sequence],
        })
        .collect();
    queue.ack(acks).await.unwrap();
    let stats = queue.stats();
    assert_eq!((stats.records, stats.retained_records), (6, 4), "{stats:?}");
    assert_eq!(
        queue.retained_bounds().await.unwrap(),
        Some((stored[0].sequence, stored[3].sequence))
    );
    let (sequence, ack) = queue.retained_at_or_after(stored[1].sequence).await.unwrap().unwrap();
    assert_eq!(
        (sequence, ack.stream_sequences),
        (stored[1].sequence, vec![100 + stored[1].sequence])
    );
    let again: Vec<Stored> = queue
        .read_retained(stored[2].sequence, stored[2].sequence, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(stored, _)| stored)
        .collect();
    assert_eq!(
        again,
        vec![stored[2].clone()],
        "a retained record reads back as it was stored"
    );
    queue.reack(stored[2].sequence, vec![500]).await.unwrap();
    queue.close().await.unwrap();

    let queue = Queue::open(config).unwrap().queue;
    let stats = queue.stats();
    assert_eq!(
        (stats.records, stats.retained_records),
        (6, 4),
        "after a reopen: {stats:?}"
    );
    let (_, ack) = queue.retained_at_or_after(stored[2].sequence).await.unwrap().unwrap();
    assert_eq!(ack.stream_sequences, vec![500]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue
        .ack(vec![Acked {
            sequence: stored[4].sequence,
            stream_sequences: vec![104],
        }])
        .await
        .unwrap();
    assert_eq!(
        queue.retained_bounds().await.unwrap(),
        Some((stored[4].sequence, stored[4].sequence)),
        "the records acknowledged more than a retention ago left"
    );
}

#[tokio::test]
async fn a_corrupt_queue_is_moved_aside_and_a_fresh_one_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let config = QueueConfig::new(&path);
    let old_epoch = {
        let queue = Queue::open(config.clone()).unwrap().queue;
        queue.append(vec![batch(1)]).await.unwrap();
        let epoch = queue.epoch();
        queue.close().await.unwrap();
        epoch
    };
    std::fs::write(path.join("conf"), b"\x00\xff garbage that is no sled config").unwrap();
    std::fs::write(path.join("db"), vec![0xAB; 4096]).unwrap();
    let opened = Queue::open(config).unwrap();
    let aside = opened.moved_aside.expect("the corrupt queue was moved aside");
    assert!(
        aside.exists() && aside.to_string_lossy().contains("q.corrupt-"),
        "{}",
        aside.display()
    );
    assert_ne!(opened.queue.epoch(), old_epoch, "a fresh queue has a fresh epoch");
    assert!(everything(&opened.queue).await.is_empty());
    opened.queue.append(vec![batch(2)]).await.unwrap();
}

/// In the child: append numbers from where the queue ends, printing each once persisted.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("TAGSTREAM_QUEUE_CRASH_CHILD") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut config = QueueConfig::new(dir);
        config.flush_interval = Duration::from_millis(1);
        let queue = Queue::open(config).unwrap().queue;
        let mut next = stored_values(&everything(&queue).await).last().map_or(0, |n| n + 1);
        loop {
            queue.append(vec![batch(next)]).await.unwrap();
            println!("persisted {next}");
            next += 1;
        }
    });
}

#[test]
fn nothing_reported_persisted_is_lost_when_the_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let mut reported = Vec::new();
    for round in 0..5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("TAGSTREAM_QUEUE_CRASH_CHILD", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it append a while, a different while each round, then kill it mid-write.
        let wanted = 200 + round * 150;
        let mut seen = 0;
        while seen < wanted {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(n) = line.strip_prefix("persisted ") {
                reported.push(n.parse::<u64>().unwrap());
                seen += 1;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(seen, wanted, "round {round}: the child stopped early");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stored = runtime.block_on(async {
        let queue = Queue::open(QueueConfig::new(&path)).unwrap().queue;
        everything(&queue).await
    });
    let kept = stored_values(&stored);
    for n in &reported {
        assert!(kept.contains(n), "{n} was reported persisted and is gone");
    }
    assert!(
        kept.windows(2).all(|w| w[0] < w[1]),
        "duplicates or disorder after crashes"
    );
    assert!(stored.windows(2).all(|w| w[0].sequence < w[1].sequence));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_records_when_acks_race_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.flush_interval = Duration::from_millis(1);
    let queue = Queue::open(config).unwrap().queue;
    let appender = tokio::spawn({
        let queue = queue.clone();
        async move {
            for n in 0..3000 {
                queue.append(vec![batch(n)]).await.unwrap();
            }
        }
    });
    // Read and acknowledge as fast as possible, as the publisher does: records can be
    // read and deleted before their group's flush returns.
    let mut seen = 0;
    while seen < 3000 {
        let stored = queue.read(None, 64).await.unwrap();
        if let Some(last) = stored.last() {
            seen += stored_values(&stored).len();
            queue.ack(vec![acked(last.sequence)]).await.unwrap();
        }
    }
    appender.await.unwrap();
    let stats = queue.stats();
    assert!(everything(&queue).await.is_empty());
    assert_eq!(
        (stats.records, stats.points, stats.payload_bytes),
        (0, 0, 0),
        "{stats:?}"
    );
}

/// The figures a queue reports: compared across reopens (disk size aside).
fn counted(queue: &Queue) -> (u64, u64, u64, Option<i64>) {
    let stats = queue.stats();
    (
        stats.records,
        stats.points,
        stats.payload_bytes,
        stats.oldest_enqueued_ns,
    )
}

/// Opening counts the queue from its first and last records (the bench shows the memory
/// this saves); what it reports must be what it holds: after head acks, after a corrupt
/// record was skipped in the middle, and once drained.
#[tokio::test]
async fn a_reopened_queue_reports_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let config = QueueConfig::new(dir.path().join("q"));
    let queue = Queue::open(config.clone()).unwrap().queue;
    for n in 0..20 {
        queue.append(vec![batch(n), batch(100 + n)]).await.unwrap();
    }
    let stored = everything(&queue).await;
    assert!(stored.len() >= 10, "{} records", stored.len());
    queue.ack(vec![acked(stored[3].sequence)]).await.unwrap();
    let before = counted(&queue);
    queue.close().await.unwrap();

    let queue = Queue::open(config.clone()).unwrap().queue;
    assert_eq!(counted(&queue), before);
    let middle = everything(&queue).await[5].sequence;
    queue.close().await.unwrap();

    // Garbage in the middle: the publisher skips it (its points are lost and counted as
    // corrupt), and the reopened queue counts what is left.
    {
        let db = sled::open(dir.path().join("q")).unwrap();
        db.open_tree("records")
            .unwrap()
            .insert(middle.to_be_bytes(), &b"garbage!!!!!!!!"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let queue = Queue::open(config.clone()).unwrap().queue;
    let left = everything(&queue).await;
    assert_eq!(queue.stats().corrupt_records, 1);
    let after_skip = counted(&queue);
    assert_eq!(after_skip.0, left.len() as u64);
    assert_eq!(after_skip.1, stored_values(&left).len() as u64);
    queue.close().await.unwrap();
    let queue = Queue::open(config.clone()).unwrap().queue;
    assert_eq!(counted(&queue), after_skip);

    // Drained, then refilled: the counting starts over.
    queue.ack(vec![acked(left.last().unwrap().sequence)]).await.unwrap();
    queue.append(vec![batch(7)]).await.unwrap();
    let refilled = counted(&queue);
    assert_eq!((refilled.0, refilled.1), (1, 1));
    queue.close().await.unwrap();
    let queue = Queue::open(config).unwrap().queue;
    assert_eq!(counted(&queue), refilled);
    queue.close().await.unwrap();
}

#[tokio::test]
async fn a_queue_directory_that_cannot_be_written_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // Root ignores permission bits; a directory below a regular file cannot be made by anyone.
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"").unwrap();
    let queue_dir = file.join("queue");
    let error = Queue::open(QueueConfig::new(&queue_dir)).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("the queue directory {} is not writable", queue_dir.display())),
        "{error}"
    );
    assert!(error.contains("writable volume"), "{error}");
}

/// `close` shuts the queue down even while another handle is kept elsewhere: appends
/// through it fail from then on, and what was appended before is kept (issue 28: close
/// waited up to a second for the other handles to go, and the writer ran on after it).
#[tokio::test]
async fn close_shuts_the_queue_down_for_every_handle() {
    let dir = tempfile::tempdir().unwrap();
    let config = QueueConfig::new(dir.path().join("q"));
    let queue = Queue::open(config.clone()).unwrap().queue;
    let other = queue.clone();
    queue.append(vec![batch(1)]).await.unwrap();
    queue.close().await.unwrap();
    assert!(
        matches!(other.append(vec![batch(2)]).await, Err(QueueError::Closed)),
        "an append after the close was taken"
    );
    drop(other);
    let reopened = Queue::open(config).unwrap().queue;
    assert_eq!(stored_values(&everything(&reopened).await), vec![1]);
    reopened.close().await.unwrap();
}

#[tokio::test]
async fn records_acknowledged_within_the_flush_interval_never_reach_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    // Long enough that no group commit can come before the ack, however slow the machine.
    config.flush_interval = Duration::from_secs(30);
    config.acked_retention = Duration::ZERO;
    let queue = Queue::open(config.clone()).unwrap().queue;
    let appending = queue.clone();
    let append = tokio::spawn(async move { appending.append((0..3).map(batch)).await });
    // Published at once: readable from memory long before its flush interval ends.
    let mut read = Vec::new();
    while read.is_empty() {
        read = queue.read(None, 10).await.unwrap();
        tokio::task::yield_now().await;
    }
    assert!(!append.is_finished(), "an append returns only once its points are safe");
    assert_eq!(stored_values(&read), vec![0, 1, 2]);
    queue.ack(vec![acked(read.last().unwrap().sequence)]).await.unwrap();
    tokio::time::timeout(Duration::from_millis(500), append)
        .await
        .expect("the acknowledgement answers the appender before any flush")
        .unwrap()
        .unwrap();
    let stats = queue.stats();
    assert_eq!((stats.records_written, stats.groups_written), (0, 0), "{stats:?}");
    assert_eq!(stats.records_acked_from_memory, 1);
    assert_eq!((stats.records, stats.points), (0, 0));
    queue.close().await.unwrap();
    let reopened = Queue::open(config).unwrap().queue;
    assert!(everything(&reopened).await.is_empty());
}

#[tokio::test]
async fn records_acknowledged_from_memory_are_retained_with_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.flush_interval = Duration::from_millis(300);
    let queue = Queue::open(config.clone()).unwrap().queue;
    let appending = queue.clone();
    let append = tokio::spawn(async move { appending.append(vec![batch(7)]).await });
    let read = loop {
        let read = queue.read(None, 10).await.unwrap();
        if !read.is_empty() {
            break read;
        }
        tokio::task::yield_now().await;
    };
    let sequence = read[0].sequence;
    queue
        .ack(vec![Acked {
            sequence,
            stream_sequences: vec![41],
        }])
        .await
        .unwrap();
    append.await.unwrap().unwrap();
    // Retained at the next group write, within a flush interval of the ack.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while queue.stats().retained_records == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never retained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = queue.stats();
    assert_eq!(
        stats.records_written, 0,
        "an acknowledged record is not written to `records`"
    );
    queue.close().await.unwrap();
    let reopened = Queue::open(config).unwrap().queue;
    assert!(everything(&reopened).await.is_empty());
    let retained = reopened.read_retained(sequence, sequence, 10).await.unwrap();
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].1.stream_sequences, vec![41]);
    assert_eq!(stored_values(&[retained[0].0.clone()]), vec![7]);
}

/// In the child: append and print the sequences the publisher would send from memory,
/// long before any flush, then wait to be killed.
#[test]
fn unflushed_child() {
    let Ok(dir) = std::env::var("TAGSTREAM_QUEUE_UNFLUSHED_CHILD") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut config = QueueConfig::new(dir);
        // Long enough that the kill always comes before the first group commit.
        config.flush_interval = Duration::from_secs(30);
        let queue = Queue::open(config).unwrap().queue;
        let appending = queue.clone();
        tokio::spawn(async move { appending.append((0..5).map(batch)).await });
        loop {
            let read = queue.read(None, 10).await.unwrap();
            if let Some(last) = read.last() {
                println!("published through {}", last.sequence);
                break;
            }
            tokio::task::yield_now().await;
        }
        std::future::pending::<()>().await;
    });
}

#[test]
fn a_sequence_published_from_memory_is_never_reused_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "unflushed_child", "--nocapture", "--test-threads=1"])
        .env("TAGSTREAM_QUEUE_UNFLUSHED_CHILD", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let published = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split_once("published through ")
                .map(|(_, n)| n.parse::<u64>().unwrap())
        })
        .expect("the child publishes from memory");
    child.kill().unwrap();
    child.wait().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let queue = Queue::open(QueueConfig::new(&path)).unwrap().queue;
        assert!(everything(&queue).await.is_empty(), "killed before its flush");
        queue.append(vec![batch(9)]).await.unwrap();
        let stored = everything(&queue).await;
        assert!(
            stored[0].sequence > published,
            "sequence {} was published before the kill and taken again by new points",
            stored[0].sequence
        );
    });
}
