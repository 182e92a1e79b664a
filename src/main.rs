//! The `ssegate` binary: parse flags, start logging, run the library's application until a
//! signal arrives (or send one event with `ssegate publish`).

use std::process::ExitCode;

use clap::Parser;
use ssegate::{
    config::{Cli, Command},
    startup::Application,
};

/// Exit code for bad configuration (EX_CONFIG would be 78; we use EX_USAGE, as clap does).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let telemetry = ssegate::telemetry::init(args.log_format);
            let app = match Application::build(*args).await {
                Ok(app) => app,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    telemetry.shutdown();
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let code = match app.run_until_stopped(signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "server failed");
                    ExitCode::FAILURE
                }
            };
            telemetry.shutdown();
            code
        }
        Command::Publish(args) => match ssegate::cli::publish(*args).await {
            Ok(id) => {
                println!("{id}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ssegate publish: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Completes on SIGINT or SIGTERM.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("signal received");
}
