//! API keys: bearer tokens in the `authorization` metadata, checked on every call except
//! health, against an in-memory copy of the (hashed) keys, so that a refused call never
//! reaches the database. Keys are stored as SHA-256 hashes; a key is shown once, when it
//! is created, and never logged.

use std::{
    collections::HashMap,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::storage::api_keys;
pub use crate::storage::api_keys::KeySummary;
use tonic::Status;
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
    api_keys::insert(pool, name, &hash(&key), &scopes)
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
    Ok(api_keys::revoke(pool, name).await?)
}

/// Names, scopes and state of every key (never the hashes).
pub async fn list_keys(pool: &PgPool) -> anyhow::Result<Vec<KeySummary>> {
    Ok(api_keys::list(pool).await?)
}

/// The live keys, by hash, kept in memory and refreshed from the database.
///
/// Keys are required once any key was ever created: a server started before its first
/// key requires keys from the refresh that sees it on, and revoking every key never
/// opens a server again (it then refuses every call but health).
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    keys: Arc<RwLock<HashMap<[u8; 32], Vec<Scope>>>>,
    required: Arc<AtomicBool>,
}

impl KeyStore {
    /// Loads the keys; [`KeyStore::required`] is false while none was ever created (the
    /// server then runs without authentication, on loopback only unless told otherwise).
    pub async fn load(pool: &PgPool) -> anyhow::Result<Self> {
        let store = Self::default();
        store.refresh(pool).await?;
        Ok(store)
    }

    /// Whether calls need a key.
    pub fn required(&self) -> bool {
        self.required.load(Ordering::Acquire)
    }

    async fn refresh(&self, pool: &PgPool) -> anyhow::Result<()> {
        if !self.required() {
            if !api_keys::any(pool).await? {
                return Ok(());
            }
            tracing::info!("API keys exist: every call but health needs one from now on");
        }
        let keys = api_keys::live(pool)
            .await?
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
        self.required.store(true, Ordering::Release);
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

    pub(crate) fn check(
        &self,
        authorization: Option<&http::HeaderValue>,
        path: &str,
    ) -> Result<(), Status> {
        if !self.required() {
            return Ok(());
        }
        // The scheme is case-insensitive (RFC 7235 section 2.1: `bearer` is `Bearer`).
        let key = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty())
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
        store.required.store(true, Ordering::Release);
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
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let value = http::HeaderValue::from_str(&format!("{scheme} {key}")).ok();
            assert!(store.check(value.as_ref(), path).is_ok(), "{scheme}");
        }
        for wrong in [
            format!("Basic {key}"),
            format!("Bearer{key}"),
            "Bearer ".to_owned(),
        ] {
            let value = http::HeaderValue::from_str(&wrong).ok();
            assert!(store.check(value.as_ref(), path).is_err(), "{wrong}");
        }
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
