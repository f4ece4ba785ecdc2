//! `dr health`: asks a running agent's `/healthz`, for container health checks (the slim
//! image has no curl).

use std::process::ExitCode;
use std::time::Duration;

/// Exit 0 if the agent's /healthz answers 200, 1 otherwise.
#[derive(clap::Args)]
pub struct Args {
    /// The agent's health endpoint.
    #[arg(long, default_value = "http://127.0.0.1:9847/healthz")]
    url: String,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        match client.get(&self.url).send().await {
            Ok(r) if r.status().is_success() => {
                println!("healthy");
                Ok(ExitCode::SUCCESS)
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                println!("unhealthy: {status} {}", body.trim());
                Ok(ExitCode::FAILURE)
            }
            Err(e) => {
                println!("unhealthy: cannot reach {}: {e}", self.url);
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
