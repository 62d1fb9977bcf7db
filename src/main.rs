//! The `tollgate` binary: parse the command line, load the config, run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tollgate::config::Config;
use tollgate::runtime::{Gateway, StartOptions};

/// mimalloc: the proxy path allocates and frees dozens of small buffers per
/// request across two threads (worker and store); glibc's malloc spent ~8%
/// of the gateway's CPU on them under load (issue 16).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An edge gateway that sells and meters access to OpenAI-compatible LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Run the built-in OpenAI- and Anthropic-compatible mock upstream on its own
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: std::net::SocketAddr,
        /// Content tokens per answer when the request does not bound it.
        #[arg(long, default_value_t = 16)]
        chunks: usize,
        /// Delay between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
    },
    /// Validate a configuration file and print it resolved (secrets masked).
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Cluster maintenance (see README "Running several nodes").
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    #[command(flatten)]
    Admin(tollgate::cli::AdminCommand),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Copy a stopped single node's store (`storage.path`) into the
    /// cluster's database (`[cluster]`): once, refusing different data.
    Import {
        /// The configuration file (its `storage.path` and `[cluster]`).
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::MockUpstream {
            listen,
            chunks,
            chunk_delay_ms,
        } => mock_upstream(listen, chunks, chunk_delay_ms),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&c.describe()).expect("a Value always serializes")
                );
                eprintln!("{}: OK", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Cluster {
            cmd: ClusterCmd::Import { config },
        } => tollgate::cluster::import::run(&config),
        Command::Admin(cmd) => tollgate::cli::run(cmd),
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Runs the gateway as if it were later: for tests of the subscription
    // lifecycle across a kill -9 of the real binary (it cannot be moved
    // from outside while running). Says so loudly: it moves every period.
    let clock = tollgate::clock::Clock::system();
    if let Some(ms) = std::env::var("TOLLGATE_CLOCK_OFFSET_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
    {
        tracing::warn!(
            offset_ms = ms,
            "TOLLGATE_CLOCK_OFFSET_MS: the clock runs ahead"
        );
        clock.advance(std::time::Duration::from_millis(ms));
    }
    let opts = StartOptions {
        clock,
        ..StartOptions::default()
    };
    let gateway = match Gateway::start(config, opts) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("Tollgate listening on http://{}", gateway.addr());
    wait_for_signal(&gateway);
    tracing::info!("shutting down: draining in-flight requests");
    gateway.shutdown();
    ExitCode::SUCCESS
}

fn mock_upstream(listen: std::net::SocketAddr, chunks: usize, chunk_delay_ms: u64) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime builds");
    let opts = tollgate_mock::MockOptions {
        chunks,
        chunk_delay: std::time::Duration::from_millis(chunk_delay_ms),
        ..Default::default()
    };
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!(
            "mock upstream listening on http://{}/v1",
            listener.local_addr()?
        );
        tollgate_mock::run(listener, opts, signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM can be handled");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Waits for SIGINT or SIGTERM; each SIGHUP meanwhile reloads the config
/// (a bad file is logged and the running config kept).
fn wait_for_signal(gateway: &Gateway) {
    use tokio::signal::unix::{SignalKind, signal as unix_signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime builds");
    rt.block_on(async {
        let mut hup = unix_signal(SignalKind::hangup()).expect("SIGHUP can be handled");
        let stop = signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = hup.recv() => {
                    // `reload` logs its outcome either way.
                    let _ = gateway.reload();
                }
            }
        }
    });
}
