//! `tagstream-ingestor`: the per-site ingestor and its tools.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Polls Modbus devices into NATS JetStream without losing a point")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate manifests (schema, CEL rules, references, formula graph) and print each
    /// site's formula evaluation order. Exits 1 when anything is invalid.
    Check {
        /// Manifest files or directories (searched recursively for *.yaml and *.yml).
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { paths } => match tagstream_ingestor::check::check(&paths) {
            Ok(outcome) => {
                print!("{}", outcome.text);
                if outcome.errors == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
