//! API keys: bearer tokens in the `authorization` metadata, checked on every call except
//! health, against an in-memory copy of the (hashed) keys, so that a refused call never
//! reaches the database. Keys are stored as SHA-256 hashes; a key is shown once, when it
//! is created, and never logged.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use uuid::Uuid;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The write RPCs.
    Ingest,
    /// Get, List and Timeline RPCs.
    Read,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Read => "read",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "ingest" => Some(Self::Ingest),
            "read" => Some(Self::Read),
            _ => None,
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| format!("scope must be ingest or read, got {s:?}"))
    }
}

/// The scope a call needs, by its path; `None` for calls any valid key may make.
fn required_scope(path: &str) -> Option<Scope> {
    let method = path.strip_prefix("/krisp.ingest.v1.IngestService/")?;
    let reads = [
        "GetUser",
        "ListTimezones",
        "GetSession",
        "GetParticipation",
        "GetTimeline",
    ];
    Some(if reads.contains(&method) {
        Scope::Read
    } else {
        Scope::Ingest
    })
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key (244 random bits), shown once.
fn generate() -> String {
    format!(
        "krisp_{}{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    )
}

/// Creates a key named `name` with `scopes`; returns the key, which is not stored.
pub async fn create_key(pool: &PgPool, name: &str, scopes: &[Scope]) -> anyhow::Result<String> {
    anyhow::ensure!(!scopes.is_empty(), "a key needs at least one scope");
    let key = generate();
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    sqlx::query("INSERT INTO api_keys (name, key_hash, scopes) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(&hash(&key)[..])
        .bind(&scopes)
        .execute(pool)
        .await
        .map_err(
            |e| match e.as_database_error().and_then(|d| d.constraint()) {
                Some("api_keys_pkey") => anyhow::anyhow!("a key named {name:?} exists already"),
                Some("api_keys_name_format") => {
                    anyhow::anyhow!("key names are 1 to 64 letters, digits, '.', '_' or '-'")
                }
                _ => anyhow::Error::from(e),
            },
        )?;
    Ok(key)
}

/// Revokes the key named `name`; `false` when there is no such live key.
pub async fn revoke_key(pool: &PgPool, name: &str) -> anyhow::Result<bool> {
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
    )
    .bind(name)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(revoked == 1)
}

/// Names, scopes and state of every key (never the hashes).
pub async fn list_keys(pool: &PgPool) -> anyhow::Result<Vec<(String, Vec<String>, bool)>> {
    Ok(
        sqlx::query_as("SELECT name, scopes, revoked_at IS NOT NULL FROM api_keys ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

/// The live keys, by hash, kept in memory and refreshed from the database.
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    keys: Arc<RwLock<HashMap<[u8; 32], Vec<Scope>>>>,
}

impl KeyStore {
    /// Loads the keys; `None` when none was ever created (the server then runs without
    /// authentication, on loopback only unless told otherwise).
    pub async fn load(pool: &PgPool) -> anyhow::Result<Option<Self>> {
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
            .fetch_one(pool)
            .await?;
        if !any {
            return Ok(None);
        }
        let store = Self::default();
        store.refresh(pool).await?;
        Ok(Some(store))
    }

    async fn refresh(&self, pool: &PgPool) -> anyhow::Result<()> {
        let rows: Vec<(Vec<u8>, Vec<String>)> =
            sqlx::query_as("SELECT key_hash, scopes FROM api_keys WHERE revoked_at IS NULL")
                .fetch_all(pool)
                .await?;
        let keys = rows
            .into_iter()
            .filter_map(|(hash, scopes)| {
                let hash: [u8; 32] = hash.try_into().ok()?;
                Some((
                    hash,
                    scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                ))
            })
            .collect();
        self.replace(keys);
        Ok(())
    }

    /// Puts `keys` in place of the current ones. A lock poisoned by a panic elsewhere
    /// still holds a whole map (it is only ever replaced whole), so it is used anyway:
    /// skipping the refresh would stop revocations from applying.
    fn replace(&self, keys: HashMap<[u8; 32], Vec<Scope>>) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
    }

    /// Re-reads the keys every `interval` (so revocations take effect), until the process ends.
    pub fn keep_fresh(&self, pool: PgPool, interval: Duration) {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if let Err(error) = store.refresh(&pool).await {
                    tracing::warn!(%error, "cannot refresh the API keys; keeping the last ones");
                }
            }
        });
    }

    fn check(&self, authorization: Option<&http::HeaderValue>, path: &str) -> Result<(), Status> {
        let key = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("an API key is required: authorization: Bearer <key>")
            })?;
        let scopes = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash(key))
            .cloned()
            .ok_or_else(|| {
                Status::unauthenticated("the API key is not valid (unknown or revoked)")
            })?;
        match required_scope(path) {
            Some(scope) if !scopes.contains(&scope) => Err(Status::permission_denied(format!(
                "this API key lacks the {} scope this call needs",
                scope.as_str()
            ))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: KeyStore,
}

impl AuthLayer {
    pub fn new(keys: KeyStore) -> Self {
        Self { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    keys: KeyStore,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(request));
        }
        match self
            .keys
            .check(request.headers().get(http::header::AUTHORIZATION), path)
        {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::info!(code = ?status.code(), "call refused: {}", status.message());
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_calls_need_read_and_the_rest_ingest() {
        let scope = |m: &str| required_scope(&format!("/krisp.ingest.v1.IngestService/{m}"));
        assert_eq!(scope("GetTimeline"), Some(Scope::Read));
        assert_eq!(scope("ListTimezones"), Some(Scope::Read));
        assert_eq!(scope("StreamSentiments"), Some(Scope::Ingest));
        assert_eq!(scope("DeleteUser"), Some(Scope::Ingest));
        assert_eq!(
            required_scope("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
    }

    #[test]
    fn a_poisoned_key_lock_still_takes_refreshes_and_answers_checks() {
        let store = KeyStore::default();
        let poisoner = store.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.keys.write();
            panic!("poison the lock");
        })
        .join();
        assert!(store.keys.is_poisoned());
        let key = generate();
        store.replace(HashMap::from([(hash(&key), vec![Scope::Read])]));
        let bearer = http::HeaderValue::from_str(&format!("Bearer {key}")).ok();
        let path = "/krisp.ingest.v1.IngestService/GetUser";
        assert!(store.check(bearer.as_ref(), path).is_ok());
        // A revocation (the next refresh without the key) applies too.
        store.replace(HashMap::new());
        assert!(store.check(bearer.as_ref(), path).is_err());
    }

    #[test]
    fn keys_are_long_random_and_hashed() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), 6 + 64);
        assert_ne!(&hash(&a)[..], a.as_bytes());
    }
}
