//! API keys on every call but health: a missing or unknown key is UNAUTHENTICATED, a
//! key without the call's scope PERMISSION_DENIED ([`crate::auth`] keeps the keys).

use tonic::Status;

use super::Hook;
use crate::auth::KeyStore;

#[derive(Debug, Clone)]
pub struct Auth(pub KeyStore);

impl Hook for Auth {
    type Carry = ();

    fn before<B>(&self, request: &http::Request<B>) -> Result<(), Box<Status>> {
        let path = request.uri().path();
        if path.starts_with("/grpc.health.v1.Health/") {
            return Ok(());
        }
        self.0
            .check(request.headers().get(http::header::AUTHORIZATION), path)
            .map_err(|status| {
                tracing::info!(code = ?status.code(), "call refused: {}", status.message());
                Box::new(status)
            })
    }
}
