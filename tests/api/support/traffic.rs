//! Steady write traffic against a running service, with every outcome recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinHandle;

/// One request of the traffic and what became of it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The name of the account the request tried to create.
    pub name: String,
    pub started: Instant,
    pub elapsed: Duration,
    /// HTTP status; 0 when no response came (connection error or client timeout).
    pub status: u16,
    /// The problem `code` of an error response.
    pub code: Option<String>,
    /// The id of the account a 201 created.
    pub id: Option<i64>,
}

impl Outcome {
    /// When the answer arrived.
    pub fn ended(&self) -> Instant {
        self.started + self.elapsed
    }
}

/// Clients that each create accounts in a loop until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Traffic {
    /// Starts `workers` clients posting `/accounts` to `base_url`, pausing `pause` between
    /// their requests. Names are `<prefix>-<worker>-<n>`.
    pub fn start(base_url: &str, workers: usize, pause: Duration, prefix: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|w| {
                let (stop, url, prefix) = (
                    stop.clone(),
                    format!("{base_url}/accounts"),
                    prefix.to_owned(),
                );
                tokio::spawn(async move {
                    // A bound far above any answer the service may give: a hang shows up
                    // as status 0 instead of a stuck test.
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(20))
                        .build()
                        .expect("client");
                    let mut outcomes = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let name = format!("{prefix}-{w}-{n}");
                        outcomes.push(create(&client, &url, &name).await);
                        tokio::time::sleep(pause).await;
                    }
                    outcomes
                })
            })
            .collect();
        Traffic { stop, workers }
    }

    /// Stops every client after its current request; returns all outcomes by start time.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for worker in self.workers {
            all.extend(worker.await.expect("traffic worker"));
        }
        all.sort_by_key(|o| o.started);
        all
    }
}

async fn create(client: &reqwest::Client, url: &str, name: &str) -> Outcome {
    let started = Instant::now();
    let response = client
        .post(url)
        .json(&json!({ "name": name, "balance": 1 }))
        .send()
        .await;
    let (status, body) = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
        Err(_) => (0, serde_json::Value::Null),
    };
    Outcome {
        name: name.to_owned(),
        started,
        elapsed: started.elapsed(),
        status,
        code: body["code"].as_str().map(str::to_owned),
        id: if status == 201 {
            body["id"].as_i64()
        } else {
            None
        },
    }
}

/// A one-line summary of outcomes for assertion messages: counts by status and code.
pub fn summary(outcomes: &[Outcome]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for o in outcomes {
        *counts
            .entry(format!("{} {}", o.status, o.code.as_deref().unwrap_or("")))
            .or_insert(0) += 1;
    }
    format!("{counts:?}")
}
