use std::process::ExitCode;

use clap::Parser;
use krisp_ingest::{
    app::{self, Application, Database},
    client,
    config::{Cli, Command},
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let limits = cli.limits.limits();
            serve(cli.database, cli.listen, limits, cli.metrics_listen.0).await
        }
        Command::Migrate => {
            let database = Database::connect(&cli.database).await?;
            tracing::info!("migrations are applied");
            stop_local(database).await
        }
        Command::GrantRuntimeRole { role } => {
            let database = Database::connect(&cli.database).await?;
            krisp_ingest::storage::grant_runtime_role(&database.pool, &role).await?;
            tracing::info!(%role, "granted the runtime privileges; run the service as this role with --skip-migrations");
            stop_local(database).await
        }
        Command::Demo(args) => client::demo(&args).await,
        Command::Feed(args) => client::feed(&args).await,
    }
}

async fn serve(
    database_args: krisp_ingest::config::DatabaseArgs,
    listen: std::net::SocketAddr,
    limits: krisp_ingest::config::Limits,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let database = Database::connect(&database_args).await?;
    let application = Application::build(listen, database.pool.clone())
        .await?
        .with_limits(limits);
    let application = match metrics {
        Some(address) => application.with_metrics(address).await?,
        None => application,
    };
    tracing::info!("listening on {}", application.local_addr());
    let served = application.run_until_stopped(app::shutdown_signal()).await;
    database.pool.close().await;
    let stopped = stop_local(database).await;
    served.and(stopped)
}

/// Stops the local cluster if this process started it; one found running is left running.
async fn stop_local(database: Database) -> anyhow::Result<()> {
    database.pool.close().await;
    match database.local {
        Some(local) if local.started_here() => local.stop().await,
        _ => Ok(()),
    }
}
