//! The application, assembled in one place for `main`, the tests and the benchmark alike:
//! [`Application::build`] loads the API keys, checks the exposure, binds the listener and
//! the metrics endpoint, and [`Application::run_until_stopped`] serves gRPC (the service,
//! health, reflection) until shutdown. [`serve`] is the `serve` command: the database,
//! then the application.

mod database;
mod tls;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::Layer;

pub use database::{Database, pool_options};
pub use tls::{Tls, check_exposure};

use crate::{
    auth::KeyStore,
    config::{DatabaseArgs, Limits},
    grpc::{
        IngestGrpcAdapter,
        middleware::{
            HookLayer,
            admission::Admission,
            auth::Auth,
            request_id::RequestId,
            rpc_metrics::{ReceivedMessagesLayer, RpcMetrics},
            transport_status,
        },
    },
    proto::{self, ingest_service_server::IngestServiceServer},
    service::{IngestService, StreamLimits},
    storage::{SpoolSettings, Spooler, Storage},
};

/// What an application is built from: what `serve` takes from its flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to serve gRPC; port 0 picks a free port ([`Application::local_addr`]).
    pub listen: SocketAddr,
    pub limits: Limits,
    /// Where and how much open streams spool.
    pub spool: SpoolSettings,
    /// Where to serve Prometheus metrics, if anywhere (port 0 picks one).
    pub metrics: Option<SocketAddr>,
    /// Serve beyond loopback although no API keys exist.
    pub insecure: bool,
    pub tls: Option<Tls>,
    /// How often the API keys are re-read, so that revocations take effect.
    pub key_refresh: Duration,
}

impl Default for Settings {
    /// Loopback, a free port, the default limits, no metrics endpoint, no TLS.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            limits: Limits::default(),
            spool: SpoolSettings::default(),
            metrics: None,
            insecure: false,
            tls: None,
            key_refresh: Duration::from_secs(5),
        }
    }
}

/// The `serve` command: connects to (or starts) the database, builds the application,
/// keeps the partitions maintained, and serves until SIGINT/SIGTERM. A local cluster
/// this process started is stopped again, whatever happens.
pub async fn serve(settings: Settings, database: &DatabaseArgs) -> anyhow::Result<()> {
    if settings.metrics.is_some() {
        // Before the database: the partition maintenance it starts may count before the
        // endpoint serves.
        crate::metrics::install()?;
    }
    let database = Database::connect(database).await?;
    // Before the address is announced: whoever read it may signal at once.
    let stop = shutdown_signal();
    let served = async {
        let settings = Settings {
            limits: settings.limits.within_retention(database.retention),
            ..settings
        };
        let application = Application::build(settings, database.pool.clone()).await?;
        database.maintain_partitions();
        tracing::info!("listening on {}", application.local_addr());
        application.run_until_stopped(stop).await
    }
    .await;
    let stopped = database.stop().await;
    served.and(stopped)
}

/// HTTP/2 flow-control windows: per stream, and per connection.
const STREAM_WINDOW_BYTES: u32 = 1 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;

/// How often health re-checks the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one health probe may take before the database counts as unreachable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// A bound, ready-to-serve krisp-ingest.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    storage: Storage,
    spooler: Arc<Spooler>,
    limits: Limits,
    metrics_addr: Option<SocketAddr>,
    keys: KeyStore,
    key_refresh: Duration,
    tls: Option<Tls>,
}

/// After the grace period, how long cancelled calls get to send their status.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

impl Application {
    /// Builds the application over an already migrated pool: loads the API keys (none:
    /// calls are not authenticated, and only loopback may be served unless `insecure`),
    /// binds the gRPC listener and, when asked, the metrics endpoint.
    pub async fn build(settings: Settings, pool: PgPool) -> anyhow::Result<Self> {
        let keys = KeyStore::load(&pool).await?;
        check_exposure(settings.listen, keys.required(), settings.insecure)?;
        if keys.required() {
            tracing::info!("API keys are required on every call but health");
        } else {
            tracing::info!(
                "no API keys exist: calls are not authenticated (loopback only) until the \
                 first key is created"
            );
        }
        let spooler = Arc::new(Spooler::open(&settings.spool)?);
        tracing::info!(dir = %spooler.dir().display(), "open streams spool here");
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let local_addr = listener.local_addr()?;
        let metrics_addr = match settings.metrics {
            Some(address) => {
                let bound = crate::metrics::serve(address, pool.clone()).await?;
                tracing::info!(address = %bound, "serving Prometheus metrics on /metrics");
                Some(bound)
            }
            None => None,
        };
        Ok(Self {
            listener,
            local_addr,
            storage: Storage::new(pool),
            spooler,
            limits: settings.limits,
            metrics_addr,
            keys,
            key_refresh: settings.key_refresh,
            tls: settings.tls,
        })
    }

    /// Where metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
            Arc::clone(&self.spooler),
            StreamLimits {
                max_items: limits.max_stream_items,
                max_duration: limits.max_stream_duration,
                writer_idle: limits.stream_writer_idle,
            },
            limits.item_clock,
            cancel_calls.clone(),
        );
        let api = IngestServiceServer::new(IngestGrpcAdapter::new(service))
            .max_decoding_message_size(limits.max_message_bytes);
        let api = HookLayer(Admission::new(
            limits.max_concurrent_calls,
            limits.max_open_streams,
        ))
        .layer(api);

        // Not serving until the first database probe says otherwise.
        let ingest_name = <IngestServiceServer<IngestGrpcAdapter> as NamedService>::NAME;
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
        self.keys
            .keep_fresh(self.storage.pool().clone(), self.key_refresh);
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
            if limits.max_connection_age_grace < limits.max_stream_duration {
                tracing::warn!(
                    grace = ?limits.max_connection_age_grace,
                    max_stream = ?limits.max_stream_duration,
                    "the connection age grace is shorter than the stream limit: streams \
                     older than the grace are cut (nothing of them stored) when their \
                     connection ages out"
                );
            }
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
            .layer(HookLayer(RequestId))
            .layer(HookLayer(RpcMetrics))
            .layer(ReceivedMessagesLayer)
            .layer(HookLayer(Auth(self.keys.clone())))
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
    let service_name = <IngestServiceServer<IngestGrpcAdapter> as NamedService>::NAME;
    let mut last = None;
    // Not through the pool: a pool busy with calls must not make health say NOT_SERVING
    // (a load balancer would eject every busy replica at once).
    let mut probe = storage.health_probe();
    loop {
        let status = match tokio::time::timeout(HEALTH_TIMEOUT, probe.check()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            Ok(Err(error)) => {
                tracing::warn!(%error, "database health probe failed");
                ServingStatus::NotServing
            }
            Err(_) => {
                tracing::warn!("database health probe timed out");
                probe.reset();
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            tracing::info!(?status, "health changed");
            metrics::gauge!(crate::metrics::SERVING).set(if status == ServingStatus::Serving {
                1.0
            } else {
                0.0
            });
            health.set_service_status("", status).await;
            health.set_service_status(service_name, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
    metrics::gauge!(crate::metrics::SERVING).set(0.0);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(service_name, ServingStatus::NotServing)
        .await;
}

/// Listens for SIGINT and SIGTERM from now on (a signal that comes before the returned
/// future is first polled still counts; until this call, either stops the process), and
/// completes on the first.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listening = signal(SignalKind::interrupt()).and_then(|interrupt| {
        signal(SignalKind::terminate()).map(|terminate| (interrupt, terminate))
    });
    async move {
        match listening {
            Ok((mut interrupt, mut terminate)) => tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            },
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGINT and SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    }
}
