//! `dr keygen`: a new age identity, for the hosts that restore; its recipient goes in the
//! config of the hosts that back up.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Create an age identity (private key) and print its recipient (public key).
///
/// With --output the identity is written to FILE with mode 0600 and only the recipient is
/// printed. Keep the identity off the backup hosts: they need only the recipient.
#[derive(clap::Args)]
pub struct Args {
    /// Write the identity here (refuses to overwrite an existing file).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

impl Args {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let key = dr_core::keys::generate();
        match &self.output {
            Some(path) => {
                dr_core::keys::write_new_identity(path, &key)?;
                println!("{}", key.recipient);
                eprintln!(
                    "identity written to {} (mode 0600); put the recipient above in [encryption] recipients",
                    path.display()
                );
            }
            None => {
                if std::io::stdout().is_terminal() {
                    eprintln!("warning: printing a private key to the terminal; use --output FILE to write it to a file instead");
                }
                print!("{}", key.file_text);
                eprintln!("Public key: {}", key.recipient);
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
