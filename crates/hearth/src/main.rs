//! The `hearth` command: the platform (`hearth up`) and the daily commands around it.
mod cmd;

use clap::{Parser, Subcommand};

/// hearth: a self-hosted, Lambda-compatible serverless platform.
#[derive(Parser)]
#[command(name = "hearth", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every part in one process (front end, assignment, worker) on one data directory.
    Up(Box<cmd::up::UpArgs>),
    /// Build, import and list runtime images.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Deploy, list and delete functions.
    #[command(subcommand, name = "fn")]
    Function(cmd::client::FnCmd),
    /// Invoke a function and print its response.
    Invoke(cmd::client::InvokeArgs),
    /// Print a function's recent log.
    Logs(cmd::client::LogsArgs),
    /// Print the server's metrics (Prometheus' text format): asynchronous queues per function.
    Metrics(cmd::client::MetricsArgs),
    /// List, inspect, re-drive and delete failed asynchronous invocations.
    #[command(subcommand)]
    Events(cmd::client::EventsCmd),
    /// Inspect and collect the chunk store.
    #[command(subcommand)]
    Store(cmd::store::StoreCmd),
    /// Run one node of the replicated assignment service.
    Assignment(cmd::assign::AssignmentArgs),
    /// Run a worker (sandboxes) of a cluster: it registers with the assignment service.
    Worker(Box<cmd::cluster::WorkerNodeArgs>),
    /// Run a front end (the Lambda API) of a cluster: invocations run on its workers.
    Frontend(Box<cmd::cluster::FrontendArgs>),
    /// Show the assignment cluster: nodes, partitions and their leaders, sandboxes by state.
    Status(cmd::assign::StatusArgs),
    /// Benchmarks (results go to docs/perf.md).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Colour only a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| "hearth=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let result = match cli.command {
        Command::Up(args) => cmd::up::run(*args),
        Command::Image(c) => cmd::image::run(c),
        Command::Function(c) => cmd::client::run_fn(c),
        Command::Invoke(a) => cmd::client::run_invoke(a),
        Command::Logs(a) => cmd::client::run_logs(a),
        Command::Metrics(a) => cmd::client::run_metrics(a),
        Command::Events(c) => cmd::client::run_events(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Assignment(a) => cmd::assign::run_assignment(a),
        Command::Worker(a) => cmd::cluster::run_worker(*a),
        Command::Frontend(a) => cmd::cluster::run_frontend(*a),
        Command::Status(a) => cmd::assign::run_status(a),
        Command::Store(c) => cmd::store::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
