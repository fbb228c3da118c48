//! The `coffer` binary: parses the command line, then serves or runs the load tool.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use coffer::config::{Cli, Command, ServeArgs, WalCommand};
use coffer::load::{self, LoadArgs};
use coffer::Server;
use tracing_subscriber::EnvFilter;

/// mimalloc: the request path allocates many small, short-lived objects, and glibc's malloc
/// showed up as a fifth of the server's CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Wal(command) = &cli.command {
        return wal_tool(command);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(ServeArgs {
        workers: Some(workers),
        ..
    }) = &cli.command
    {
        // At least 1: the flag's parser refuses 0.
        builder.worker_threads(*workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("coffer: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Load(args) => runtime.block_on(run_load(args)),
        Command::Wal(command) => wal_tool(&command),
    }
}

/// `coffer wal verify` and `coffer wal dump`.
fn wal_tool(command: &WalCommand) -> ExitCode {
    match command {
        WalCommand::Verify(args) => {
            match coffer::audit::verify(&args.data_dir, args.archive.as_deref()) {
                Ok(found) => {
                    print!("{}", found.report());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("coffer wal verify: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        WalCommand::Dump(args) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let result = coffer::audit::dump(&args.data_dir, args.archive.as_deref(), &mut out);
            let flushed = std::io::Write::flush(&mut out);
            match (result, flushed) {
                (Ok(dumped), Ok(())) => {
                    eprintln!("coffer wal dump: {}", dumped.summary());
                    ExitCode::SUCCESS
                }
                (Err(error), _) => {
                    eprintln!("coffer wal dump: {error}");
                    ExitCode::FAILURE
                }
                (_, Err(error)) => {
                    eprintln!("coffer wal dump: cannot write: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: escapes in a log file or a pipe are noise.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    abort_on_panic();
    let config = match args.server_config() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "coffer cannot start");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start_with(config, args.engine_config()).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(%error, "coffer cannot start");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

/// Fail-stop: a panic anywhere (an invariant assertion in one account actor, say) ends the
/// whole process, logged, instead of one task while the others keep serving the accounts it
/// was changing. The next start recovers from the log, which holds only what was checked.
/// Release builds abort on panic anyway (`panic = "abort"`); this covers every build.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let location = info
            .location()
            .map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line()));
        tracing::error!(panic = %message, %location, "panic: stopping the process; the next start recovers from the log");
        report(info);
        std::process::abort();
    }));
}

async fn run_load(args: LoadArgs) -> ExitCode {
    let json = args.json;
    match load::run(args).await {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{}", report.text());
            }
            if report.mismatched_accounts == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(error) => {
            eprintln!("coffer load: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
