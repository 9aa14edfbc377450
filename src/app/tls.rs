//! TLS for the gRPC listener, and the rule that no unauthenticated server is exposed.

use std::net::SocketAddr;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

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
    pub(super) fn config(&self) -> ServerTlsConfig {
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
