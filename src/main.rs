use std::process::ExitCode;

use clap::Parser;
use krisp_ingest::{
    app::{self, Application, Database},
    auth, client,
    config::{Cli, Command, KeysCommand},
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

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.take().unwrap_or(Command::Serve);
    match command {
        Command::Serve => {
            let limits = cli.limits.limits()?;
            let options = ServeOptions {
                listen: cli.listen,
                limits,
                metrics: cli.metrics_listen.0,
                insecure: cli.insecure,
                tls: tls(&cli)?,
            };
            serve(cli.database, options).await
        }
        Command::Keys(command) => {
            let database = Database::connect(&cli.database).await?;
            let outcome = keys(&database, command).await;
            stop_local(database).await?;
            outcome
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

struct ServeOptions {
    listen: std::net::SocketAddr,
    limits: krisp_ingest::config::Limits,
    metrics: Option<std::net::SocketAddr>,
    insecure: bool,
    tls: Option<app::Tls>,
}

fn tls(cli: &Cli) -> anyhow::Result<Option<app::Tls>> {
    use anyhow::Context;
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else {
        return Ok(None);
    };
    Ok(Some(app::Tls {
        certificate_pem: read(cert)?,
        key_pem: read(key)?,
        client_ca_pem: cli.tls_client_ca.as_deref().map(read).transpose()?,
    }))
}

async fn keys(database: &Database, command: KeysCommand) -> anyhow::Result<()> {
    let pool = &database.pool;
    match command {
        KeysCommand::Create { name, scopes } => {
            let key = auth::create_key(pool, &name, &scopes).await?;
            println!("{key}");
            eprintln!("key {name:?} created; it is shown only now, keep it secret");
        }
        KeysCommand::Revoke { name } => {
            anyhow::ensure!(
                auth::revoke_key(pool, &name).await?,
                "no live key named {name:?}"
            );
            eprintln!("key {name:?} revoked");
        }
        KeysCommand::List => {
            for (name, scopes, revoked) in auth::list_keys(pool).await? {
                let state = if revoked { "revoked" } else { "live" };
                println!("{name}\t{}\t{state}", scopes.join(","));
            }
        }
    }
    Ok(())
}

async fn serve(
    database_args: krisp_ingest::config::DatabaseArgs,
    options: ServeOptions,
) -> anyhow::Result<()> {
    if options.metrics.is_some() {
        krisp_ingest::metrics::install()?;
    }
    let database = Database::connect(&database_args).await?;
    // Whatever happens next, a local cluster this process started is stopped again.
    let served = serve_on(&database, options).await;
    let stopped = stop_local(database).await;
    served.and(stopped)
}

async fn serve_on(database: &Database, options: ServeOptions) -> anyhow::Result<()> {
    let ServeOptions {
        listen,
        limits,
        metrics,
        insecure,
        tls,
    } = options;
    let keys = auth::KeyStore::load(&database.pool).await?;
    let limits = limits.within_retention(database.retention);
    database.maintain_partitions();
    app::check_exposure(listen, keys.is_some(), insecure)?;
    let application = Application::build(listen, database.pool.clone())
        .await?
        .with_limits(limits);
    let application = match keys {
        Some(keys) => {
            tracing::info!("API keys are required on every call but health");
            application.with_api_keys(keys, std::time::Duration::from_secs(5))
        }
        None => {
            tracing::info!("no API keys exist: calls are not authenticated (loopback only)");
            application
        }
    };
    let application = match metrics {
        Some(address) => application.with_metrics(address).await?,
        None => application,
    };
    let application = match tls {
        Some(tls) => application.with_tls(tls),
        None => application,
    };
    tracing::info!("listening on {}", application.local_addr());
    application.run_until_stopped(app::shutdown_signal()).await
}

/// Stops the local cluster if this process started it; one found running is left running.
async fn stop_local(database: Database) -> anyhow::Result<()> {
    database.pool.close().await;
    match database.local {
        Some(local) if local.started_here() => local.stop().await,
        _ => Ok(()),
    }
}
