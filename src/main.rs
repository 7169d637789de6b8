//! The `cmpirun` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cmpirun::exit;

/// Launch MPI jobs in unprivileged containers, one container per node.
#[derive(Debug, Parser)]
#[command(name = "cmpirun", version, about)]
struct Cli {
    /// More log detail (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    init_logging(cli.verbose);
    match cli.command {}
}

fn init_logging(verbose: u8) {
    // backhand logs every corrupt-image detail at error level; cmpirun reports those itself in
    // one line, so backhand's own messages appear only when asked for with -vv.
    let level = match verbose {
        0 => "warn,backhand=off",
        1 => "info,backhand=off",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMPIRUN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
