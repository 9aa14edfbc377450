//! `krisp-ingest`: the service (`serve`, the default) and its operator and client
//! commands. Parses the command line, sets up telemetry, runs the command.

mod cli;
mod client;
mod connection;
mod live;

/// mimalloc rather than the system allocator: with thousands of open streams, glibc's
/// malloc fragmented (RSS stayed at its peak after the streams ended) and showed in the
/// server's CPU profile (docs/decisions/0010-mimalloc.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, KeysCommand};
use krisp_ingest::{
    app::{self, Database},
    auth, storage, telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let otlp = cli.otlp_endpoint.clone().map(|endpoint| telemetry::Otlp {
        endpoint,
        sample_ratio: cli.otlp_sample_ratio.clamp(0.0, 1.0),
    });
    let telemetry = match telemetry::init(cli.log_format, otlp.as_ref()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("krisp-ingest: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.take().unwrap_or(Command::Serve);
    let database = match command {
        Command::Serve => return app::serve(cli.serve_settings()?, &cli.database).await,
        Command::Demo(args) => return client::demo(&args).await,
        Command::Feed(args) => return client::feed(&args).await,
        Command::Migrate | Command::GrantRuntimeRole { .. } | Command::Keys(_) => {
            Database::connect(&cli.database).await?
        }
    };
    // Nothing serves here: the maintenance round a server runs in the background is
    // waited for, so that the partitions are made before the command ends.
    database.maintain_now().await;
    let outcome = match command {
        Command::GrantRuntimeRole { role } => {
            storage::grant_runtime_role(&database.pool, &role).await.map(|()| {
                tracing::info!(%role, "granted the runtime privileges; run the service as this role with --skip-migrations");
            })
        }
        Command::Keys(command) => keys(&database, command).await,
        Command::Migrate | Command::Serve | Command::Demo(_) | Command::Feed(_) => {
            tracing::info!("migrations are applied");
            Ok(())
        }
    };
    outcome.and(database.stop().await)
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
            for key in auth::list_keys(pool).await? {
                let state = if key.revoked { "revoked" } else { "live" };
                println!("{}\t{}\t{state}", key.name, key.scopes.join(","));
            }
        }
    }
    Ok(())
}
