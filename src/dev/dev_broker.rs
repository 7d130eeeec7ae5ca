//! The development broker: librdkafka's mock cluster, which speaks the real
//! Kafka protocol over TCP on localhost. Its data lives only in memory.
//! `MockCluster` is not `Send`, so it lives on a thread of its own until the
//! handle is dropped.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;

pub struct DevBroker {
    bootstrap: String,
    control: Option<mpsc::Sender<Control>>,
    thread: Option<JoinHandle<()>>,
}

/// Commands for the broker thread. Dropping the sender stops it.
enum Control {
    /// Take broker 1 down (true) or back up (false): a Kafka outage as the
    /// clients see it, with the data kept.
    Down(bool),
}

impl DevBroker {
    /// Starts a one-broker mock cluster with `topics` created with
    /// `partitions` partitions each.
    pub fn start(topics: &[String], partitions: i32) -> Result<DevBroker, String> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (control_tx, control_rx) = mpsc::channel::<Control>();
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
                // Held until the handle (and with it the sender) drops.
                while let Ok(cmd) = control_rx.recv() {
                    match cmd {
                        Control::Down(true) => {
                            let _ = cluster.broker_down(1);
                        }
                        Control::Down(false) => {
                            let _ = cluster.broker_up(1);
                        }
                    }
                }
                drop(cluster);
            })
            .map_err(|e| e.to_string())?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| "dev broker thread exited".to_string())??;
        Ok(DevBroker {
            bootstrap,
            control: Some(control_tx),
            thread: Some(thread),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Simulates an outage: the broker refuses connections until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        if let Some(c) = &self.control {
            let _ = c.send(Control::Down(down));
        }
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        self.control.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
