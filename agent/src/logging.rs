//! Logs go to stderr (stdout carries results for scripts): human on a terminal, JSON lines
//! otherwise, so journald and log shippers get structured records.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Auto,
    Human,
    Json,
}

pub fn init(format: Format, verbose: u8) {
    let default = match verbose {
        0 => "info,aws_config=warn,aws_smithy_runtime=warn,aws_sdk_s3=warn,hyper=warn",
        1 => "debug,aws_config=info,aws_smithy_runtime=info,aws_sdk_s3=info,hyper=info,h2=info,rustls=info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = match format {
        Format::Json => true,
        Format::Human => false,
        Format::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.compact().init();
    }
}
