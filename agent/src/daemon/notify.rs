//! Webhook notifications: generic JSON or Slack-compatible. Sent from their own tasks with
//! retries and backoff, so a slow or dead receiver never delays a backup.

use std::sync::Arc;
use std::time::Duration;

use dr_core::config::{NotifyConfig, NotifyEvent, NotifyFormat};
use serde::Serialize;

const ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: NotifyEvent,
    pub environment: String,
    pub database: Option<String>,
    pub message: String,
    pub at: jiff::Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
}

#[derive(Clone)]
pub struct Notifier {
    targets: Arc<Vec<NotifyConfig>>,
    client: reqwest::Client,
}

impl Notifier {
    pub fn new(targets: Vec<NotifyConfig>) -> Notifier {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("dr/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("http client");
        Notifier {
            targets: Arc::new(targets),
            client,
        }
    }

    /// Fire and forget: each target gets its own task with retries.
    pub fn send(&self, event: Event) {
        for (i, target) in self.targets.iter().enumerate() {
            if !wants(target, event.event) {
                continue;
            }
            let (client, target, event) = (self.client.clone(), target.clone(), event.clone());
            tokio::spawn(async move {
                if let Err(e) = deliver(&client, &target, &event).await {
                    tracing::warn!(target = i, error = %e, event = ?event.event, "notification not delivered");
                }
            });
        }
    }

    /// Sends to every target and waits: for `dr notify test`. Returns (target index, error).
    pub async fn send_and_wait(&self, event: Event) -> Vec<(usize, Result<(), String>)> {
        let mut out = Vec::new();
        for (i, target) in self.targets.iter().enumerate() {
            out.push((i, deliver(&self.client, target, &event).await));
        }
        out
    }
}

fn wants(target: &NotifyConfig, event: NotifyEvent) -> bool {
    event == NotifyEvent::Test
        || target
            .events
            .as_ref()
            .is_none_or(|events| events.contains(&event))
}

async fn deliver(
    client: &reqwest::Client,
    target: &NotifyConfig,
    event: &Event,
) -> Result<(), String> {
    let body = match target.format {
        NotifyFormat::Json => serde_json::to_value(event).expect("event serializes"),
        NotifyFormat::Slack => serde_json::json!({ "text": slack_text(event) }),
    };
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            // 1 s, 4 s, 16 s, with jitter so many agents do not retry in step.
            let base = 4u64.pow(attempt - 1) * 1000;
            let jitter = rand::random::<u64>() % (base / 2 + 1);
            tokio::time::sleep(Duration::from_millis(base + jitter)).await;
        }
        match client.post(&target.url).json(&body).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("the receiver answered {}", r.status()),
            // The URL may carry a token: report only what failed, never the URL.
            Err(e) => last = describe(&e),
        }
    }
    Err(format!("after {ATTEMPTS} attempts: {last}"))
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        "request failed".into()
    }
}

fn slack_text(e: &Event) -> String {
    let icon = match e.event {
        NotifyEvent::RpoRecovered | NotifyEvent::Test => ":white_check_mark:",
        _ => ":rotating_light:",
    };
    let db = e
        .database
        .as_deref()
        .map(|d| format!("/{d}"))
        .unwrap_or_default();
    format!("{icon} dr {}{db}: {}", e.environment, e.message)
}
