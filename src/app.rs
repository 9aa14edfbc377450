//! The application: database connection, gRPC router (service, health, reflection),
//! serving, and graceful shutdown.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::net::TcpListener;
use tonic::{
    server::NamedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use tokio_util::sync::CancellationToken;
use tower::Layer;

use crate::{
    auth::{AuthLayer, KeyStore},
    config::{DatabaseArgs, Limits},
    grpc::{
        IngestApiHandler, admission::AdmissionLayer, request_id::RequestIdLayer, transport_status,
    },
    local_postgres::{self, LocalPostgres},
    metrics::RpcMetricsLayer,
    proto::{self, ingest_service_server::IngestServiceServer},
    service::{IngestService, StreamLimits},
    storage::{self, Storage},
};

/// HTTP/2 flow-control windows: per stream, and per connection.
const STREAM_WINDOW_BYTES: u32 = 1 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;

/// How often health re-checks the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one health probe may take before the database counts as unreachable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// The service's pool settings. Connections are not pinged before each use: that would
/// add a round trip to every unary call (measured in docs/BENCHMARKS.md); a connection
/// found broken fails its call with UNAVAILABLE and is replaced.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
}

/// The database the service runs against, and the local cluster behind it, if any.
pub struct Database {
    pub pool: PgPool,
    pub local: Option<LocalPostgres>,
    /// How long rows are kept (--retention), if not for ever.
    pub retention: Option<Duration>,
    /// The partition maintenance this process runs (as the schema owner), and whether
    /// its first round failed.
    maintenance: Option<(crate::partitions::Maintenance, bool)>,
}

impl Database {
    /// Connects to DATABASE_URL, or starts (or reuses) the local cluster when it is unset,
    /// and applies the migrations.
    pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<Self> {
        let pool_options = pool_options(args.max_connections);
        let (pool, local) = match &args.database_url {
            Some(url) => {
                tracing::info!(database = %url.redacted(), "using DATABASE_URL");
                let pool = pool_options.connect(url.expose()).await.with_context(|| {
                    format!(
                        "cannot connect to DATABASE_URL ({}); check that the server runs and \
                         accepts this user, or unset DATABASE_URL to use a local cluster",
                        url.redacted()
                    )
                })?;
                (pool, None)
            }
            None => {
                let data_dir = args
                    .data_dir
                    .clone()
                    .unwrap_or_else(local_postgres::default_data_dir);
                let local = LocalPostgres::ensure(&data_dir).await?;
                let pool = pool_options
                    .connect_with(local.connect_options(local_postgres::DATABASE))
                    .await
                    .context("cannot connect to the local PostgreSQL")?;
                (pool, Some(local))
            }
        };
        if args.skip_migrations {
            // Running as a role that may not change the schema: only check it.
            storage::check_migrated(&pool).await?;
            tracing::info!(
                "time partitions are left to the schema owner (--skip-migrations): \
                 `krisp-ingest migrate` registers them with pg_partman"
            );
        } else {
            storage::migrate(&pool)
                .await
                .context("cannot apply the database migrations")?;
        }
        let settings = args.partitions.check(&pool).await?;
        let retention = settings.retention.as_ref().map(|r| r.duration);
        let maintenance = if args.skip_migrations {
            None
        } else {
            // A failure is logged and counted; it never stops the service.
            let maintenance = crate::partitions::Maintenance::new(pool.clone(), settings.clone());
            let first = maintenance.run_once().await;
            if let Some(partitioning) = &first {
                partitioning.log(settings.maintenance_every);
            }
            Some((maintenance, first.is_none()))
        };
        Ok(Self {
            pool,
            local,
            retention,
            maintenance,
        })
    }

    /// Keeps maintaining the time partitions in the background while the process runs
    /// (when this process owns the schema; see `--partition-maintenance-seconds`).
    pub fn maintain_partitions(&self) {
        if let Some((maintenance, first_failed)) = &self.maintenance {
            maintenance.clone().spawn(*first_failed);
        }
    }
}

/// A bound, ready-to-serve krisp-ingest.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    storage: Storage,
    limits: Limits,
    metrics_addr: Option<SocketAddr>,
    keys: Option<KeyStore>,
    key_refresh: Duration,
    tls: Option<Tls>,
}

/// TLS for the gRPC listener: the server's certificate chain and key (PEM), and
/// optionally the CA whose client certificates it requires (mutual TLS).
#[derive(Clone)]
pub struct Tls {
    pub certificate_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.certificate_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Refuses to serve beyond loopback without authentication unless told to (`--insecure`).
pub fn check_exposure(
    listen: SocketAddr,
    authenticated: bool,
    insecure: bool,
) -> anyhow::Result<()> {
    if authenticated || listen.ip().is_loopback() {
        return Ok(());
    }
    if insecure {
        tracing::warn!(
            address = %listen,
            "serving a non-loopback address WITHOUT authentication (--insecure): anyone who \
             can reach it can read and write; create API keys with `krisp-ingest keys create`"
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {listen} without authentication: no API keys exist. Create one with \
         `krisp-ingest keys create --name NAME --scope ingest --scope read`, listen on loopback \
         (127.0.0.1), or pass --insecure to accept the risk"
    )
}

/// After the grace period, how long cancelled calls get to send their status.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

impl Application {
    /// Binds `listen` (port 0 picks a free port) over an already migrated pool.
    pub async fn build(listen: SocketAddr, pool: PgPool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            storage: Storage::new(pool),
            limits: Limits::default(),
            metrics_addr: None,
            keys: None,
            key_refresh: Duration::from_secs(5),
            tls: None,
        })
    }

    /// Serves Prometheus metrics on `address` (port 0 picks one; see [`Self::metrics_addr`]).
    pub async fn with_metrics(mut self, address: SocketAddr) -> anyhow::Result<Self> {
        let bound = crate::metrics::serve(address, self.storage.pool().clone()).await?;
        tracing::info!(address = %bound, "serving Prometheus metrics on /metrics");
        self.metrics_addr = Some(bound);
        Ok(self)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Requires API keys from `keys` on every call but health, re-reading them every
    /// `refresh` so that revocations take effect.
    pub fn with_api_keys(mut self, keys: KeyStore, refresh: Duration) -> Self {
        self.keys = Some(keys);
        self.key_refresh = refresh;
        self
    }

    /// Serves gRPC over TLS (and requires client certificates when a client CA is given).
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Replaces the default limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let limits = self.limits;
        // Cancelled when the shutdown grace period is over: open streams then roll back.
        let cancel_calls = CancellationToken::new();
        let service = IngestService::new(
            self.storage.clone(),
            StreamLimits {
                max_items: limits.max_stream_items,
                max_duration: limits.max_stream_duration,
            },
            limits.item_clock,
            cancel_calls.clone(),
        );
        let api = IngestServiceServer::new(IngestApiHandler::new(service))
            .max_decoding_message_size(limits.max_message_bytes);
        let api = AdmissionLayer::new(limits.max_concurrent_calls).layer(api);

        // Not serving until the first database probe says otherwise.
        let ingest_name = <IngestServiceServer<IngestApiHandler> as NamedService>::NAME;
        for name in ["", ingest_name] {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let (stop_health, health_stopped) = tokio::sync::oneshot::channel::<()>();
        let monitor = tokio::spawn(monitor_database(
            self.storage.clone(),
            health.clone(),
            health_stopped,
        ));

        tracing::info!(address = %self.local_addr, "krisp-ingest serving gRPC");
        if let Some(keys) = &self.keys {
            keys.keep_fresh(self.storage.pool().clone(), self.key_refresh);
        }
        // A custom incoming bypasses the builder's tcp_nodelay: set it on the listener,
        // or Nagle's algorithm delays small replies by up to 40 ms.
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let (begin_drain, drain_requested) = tokio::sync::oneshot::channel::<()>();
        let mut builder = Server::builder();
        if let Some(age) = limits.max_connection_age {
            // This replica's own age, so that replicas do not recycle connections in step.
            let random = f64::from(uuid::Uuid::new_v4().as_u128() as u32) / f64::from(u32::MAX);
            let age =
                crate::config::jittered(age, limits.max_connection_age_jitter_percent, random);
            tracing::info!(
                age = ?age,
                grace = ?limits.max_connection_age_grace,
                "client connections are recycled (GOAWAY) after their age"
            );
            builder = builder
                .max_connection_age(age)
                .max_connection_age_grace(limits.max_connection_age_grace);
        }
        if let Some(tls) = &self.tls {
            builder = builder
                .tls_config(tls.config())
                .context("invalid TLS configuration")?;
            tracing::info!(
                mutual = tls.client_ca_pem.is_some(),
                "serving gRPC over TLS"
            );
        }
        let server = builder
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            // tonic's own statuses for undecodable or oversized requests, made exact.
            .layer(tower::util::MapResponseLayer::new(
                transport_status::rewrite,
            ))
            // A request id and a span around every call, echoed to the client.
            .layer(RequestIdLayer)
            .layer(RpcMetricsLayer)
            .layer(tower::util::option_layer(
                self.keys.clone().map(AuthLayer::new),
            ))
            // Larger HTTP/2 windows than the 64 KiB default let a client keep several
            // batches of a stream in flight instead of waiting for window updates.
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(api)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = drain_requested.await;
            });
        let mut server = std::pin::pin!(server);
        let served = tokio::select! {
            served = &mut server => served,
            () = shutdown => {
                tracing::info!(grace = ?limits.shutdown_grace, "shutting down: refusing new calls, finishing in-flight ones");
                let _ = begin_drain.send(());
                match tokio::time::timeout(limits.shutdown_grace, &mut server).await {
                    Ok(served) => served,
                    Err(_) => {
                        // Open streams roll back and answer UNAVAILABLE (retryable).
                        tracing::warn!("shutdown grace period over: cancelling the calls still open");
                        cancel_calls.cancel();
                        match tokio::time::timeout(CANCEL_GRACE, &mut server).await {
                            Ok(served) => served,
                            // A peer that does not take its answer: drop its connection.
                            Err(_) => Ok(()),
                        }
                    }
                }
            }
        };
        let _ = stop_health.send(());
        let _ = monitor.await;
        served.context("gRPC server failed")
    }
}

/// Keeps the health status in step with the database: NOT_SERVING while it is unreachable.
async fn monitor_database(
    storage: Storage,
    health: HealthReporter,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let service_name = <IngestServiceServer<IngestApiHandler> as NamedService>::NAME;
    let mut last = None;
    loop {
        let status = match tokio::time::timeout(HEALTH_TIMEOUT, storage.ping()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            Ok(Err(error)) => {
                tracing::warn!(%error, "database health probe failed");
                ServingStatus::NotServing
            }
            Err(_) => {
                tracing::warn!("database health probe timed out");
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            tracing::info!(?status, "health changed");
            health.set_service_status("", status).await;
            health.set_service_status(service_name, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(service_name, ServingStatus::NotServing)
        .await;
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
