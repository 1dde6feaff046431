//! `tagstream-ingestor`: the per-site ingestor and its tools.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tagstream_crds::device::RegisterKind;
use tagstream_ingestor::{
    acquisition::write::Outcome,
    service::RunOptions,
    simulate::Faults,
    simulate_cmd::SimulateOptions,
    write_cmd::{self, WriteOptions},
};

#[derive(Debug, Parser)]
#[command(version, about = "Polls Modbus devices into NATS JetStream without losing a point")]
struct Cli {
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long, global = true)]
    log_json: bool,
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
    /// Poll every tag of the devices once and print raw registers and decoded values.
    Read {
        /// Manifest files or directories with the Devices to read.
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
        /// Read only this device.
        #[arg(long)]
        device: Option<String>,
        /// Also show every multi-register value under each byte order.
        #[arg(long)]
        all_orders: bool,
    },
    /// Write one value to a writable tag: directly on the device of a manifest (`-f`, for
    /// commissioning), or through the site's running ingestor over NATS (`--subject`), which
    /// performs it between polls and audits it. Exits 0 when written, 1 when the ingestor
    /// or device answered without writing, 2 when it could not be asked (no responders,
    /// unreachable, refused permissions, no answer in time).
    Write(WriteOptions),
    /// Run the ingestor: poll the site's devices, evaluate its formulas, queue every point
    /// on disk and publish it to JetStream. Reloads the manifests when they change.
    Run(RunOptions),
    /// Print the points arriving on a subject, decoded.
    Tail {
        /// NATS server URL; `nats://user:password@host:port` authenticates.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// A NATS credentials file (JWT and nkey seed, as `nsc` writes them).
        #[arg(long)]
        creds: Option<PathBuf>,
        /// Subject to follow, e.g. tagstream.default.plant-a.> for one site.
        #[arg(long, default_value = "tagstream.>")]
        subject: String,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Stop after this many points.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Serve every Device of the manifests as a Modbus server (TCP, RTU over TCP, RTU)
    /// with values following the tags' simulation waveforms.
    Simulate {
        /// Manifest files or directories with the Devices to simulate.
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
        /// Address to listen on; each device's port comes from its manifest.
        #[arg(long, default_value = "0.0.0.0")]
        listen: IpAddr,
        /// Serve RTU devices on this serial device or pty instead of their manifest path.
        #[arg(long)]
        rtu_path: Option<String>,
        /// Delay every answer by this much (e.g. 50ms).
        #[arg(long, value_parser = tagstream_core::config::parse_duration, default_value = "0s")]
        latency: Duration,
        /// Refuse reads covering this address with exception 2, as `holding:100`.
        #[arg(long, value_parser = parse_address)]
        exception_at: Vec<(RegisterKind, u16)>,
        /// Never answer this unit id (a dead device behind a gateway).
        #[arg(long)]
        silent_unit: Vec<u8>,
        /// Answer this unit id this much later, as `2=300ms` (replies after the timeout).
        #[arg(long, value_parser = parse_slow_unit)]
        slow_unit: Vec<(u8, Duration)>,
        /// Leave every Nth request to this unit id unanswered, as `3=10` (a lossy line).
        #[arg(long, value_parser = parse_lossy_unit)]
        lossy_unit: Vec<(u8, u64)>,
        /// Close every connection this long after it opened (e.g. 30s).
        #[arg(long, value_parser = tagstream_core::config::parse_duration)]
        drop_after: Option<Duration>,
    },
}

fn parse_slow_unit(text: &str) -> Result<(u8, Duration), String> {
    let (unit, delay) = text.split_once('=').ok_or("expected <unit>=<duration>, e.g. 2=300ms")?;
    Ok((
        unit.parse().map_err(|e| format!("unit {unit:?}: {e}"))?,
        tagstream_core::config::parse_duration(delay)?,
    ))
}

fn parse_lossy_unit(text: &str) -> Result<(u8, u64), String> {
    let (unit, every) = text.split_once('=').ok_or("expected <unit>=<n>, e.g. 3=10")?;
    let every: u64 = every.parse().map_err(|e| format!("every {every:?}: {e}"))?;
    if every == 0 {
        return Err("every 0th request cannot be lost: give 1 or more".into());
    }
    Ok((unit.parse().map_err(|e| format!("unit {unit:?}: {e}"))?, every))
}

fn parse_address(text: &str) -> Result<(RegisterKind, u16), String> {
    let (kind, address) = text
        .split_once(':')
        .ok_or("expected <table>:<address>, e.g. holding:100")?;
    let kind = match kind {
        "coil" => RegisterKind::Coil,
        "discreteInput" | "discrete" => RegisterKind::DiscreteInput,
        "holding" => RegisterKind::Holding,
        "input" => RegisterKind::Input,
        other => {
            return Err(format!(
                "unknown table {other:?}: coil, discreteInput, holding or input"
            ));
        }
    };
    Ok((kind, address.parse().map_err(|e| format!("address {address:?}: {e}"))?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Tools that print their own output keep the logs to warnings.
    let level = if matches!(
        cli.command,
        Command::Tail { .. } | Command::Read { .. } | Command::Check { .. } | Command::Write(_)
    ) {
        "warn"
    } else {
        "info"
    };
    tagstream_core::logging::init(cli.log_json, level);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match command {
        Command::Check { paths } => {
            let outcome = tagstream_ingestor::check::check(&paths)?;
            print!("{}", outcome.text);
            Ok(if outcome.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Read {
            paths,
            device,
            all_orders,
        } => {
            let text = runtime.block_on(tagstream_ingestor::read::read(&paths, device.as_deref(), all_orders))?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Write(options) => {
            let report = runtime.block_on(write_cmd::write(options))?;
            println!("{}", write_cmd::describe(&report));
            Ok(if report.outcome == Outcome::Written {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run(options) => {
            runtime.block_on(async {
                let shutdown = tagstream_core::logging::shutdown_on_signal();
                tagstream_ingestor::service::run(options, shutdown, None).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail {
            nats_url,
            creds,
            subject,
            json,
            count,
        } => {
            runtime.block_on(tagstream_ingestor::tail::tail(
                &nats_url,
                creds.as_deref(),
                &subject,
                json,
                count,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            paths,
            listen,
            rtu_path,
            latency,
            exception_at,
            silent_unit,
            slow_unit,
            lossy_unit,
            drop_after,
        } => {
            let options = SimulateOptions {
                listen,
                rtu_path,
                faults: Faults {
                    latency,
                    exception_at: exception_at.into_iter().collect(),
                    silent_units: silent_unit.into_iter().collect(),
                    slow_units: slow_unit.into_iter().collect(),
                    lossy_units: lossy_unit.into_iter().collect(),
                    drop_after,
                },
            };
            runtime.block_on(async {
                let shutdown = tagstream_core::logging::shutdown_on_signal();
                tagstream_ingestor::simulate_cmd::simulate(&paths, options, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
