//! The development broker: librdkafka's mock cluster, which speaks the real
//! Kafka protocol over TCP on localhost. Its data lives only in memory.
//! `MockCluster` is not `Send`, so it lives on a thread of its own until the
//! handle is dropped.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;

pub struct DevBroker {
    bootstrap: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DevBroker {
    /// Starts a one-broker mock cluster with `topics` created with
    /// `partitions` partitions each.
    pub fn start(topics: &[String], partitions: i32) -> Result<DevBroker, String> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let topics = topics.to_vec();
        let thread = std::thread::Builder::new()
            .name("sluice-dev-broker".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("mock cluster: {e}")));
                        return;
                    }
                };
                for t in &topics {
                    if let Err(e) = cluster.create_topic(t, partitions, 1) {
                        let _ = ready_tx.send(Err(format!("create topic {t}: {e}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Held until the handle drops (or its sender does).
                let _ = stop_rx.recv();
                drop(cluster);
            })
            .map_err(|e| e.to_string())?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| "dev broker thread exited".to_string())??;
        Ok(DevBroker {
            bootstrap,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
