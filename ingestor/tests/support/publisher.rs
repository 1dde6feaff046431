//! The publisher running on a queue in the test's runtime, as the service runs it.

use std::sync::{Arc, Mutex};

use tagstream_core::report::PublisherStatus;
use tagstream_ingestor::{
    publish::{self, PublisherConfig},
    queue::Queue,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running publisher: its status, its stop token and its task.
pub struct RunningPublisher {
    pub status: Arc<Mutex<PublisherStatus>>,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

pub fn start(queue: &Queue, config: PublisherConfig) -> RunningPublisher {
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(publish::run(queue.clone(), config, Arc::clone(&status), stop.clone()));
    RunningPublisher { status, stop, task }
}
