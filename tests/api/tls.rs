//! TLS and mutual TLS on the gRPC listener, with certificates made for the test.

use krisp_ingest::{
    app::Tls,
    proto::{self, ingest_service_client::IngestServiceClient},
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::helpers::fresh_database;

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        server: leaf(vec!["localhost".into()]),
        client: leaf(vec!["voice-service".into()]),
        ca: ca.pem(),
    }
}

async fn tls_channel(
    address: std::net::SocketAddr,
    pki: &Pki,
    client_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    }
    Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn list(channel: Channel) -> Result<(), tonic::Status> {
    IngestServiceClient::new(channel)
        .list_timezones(proto::ListTimezonesRequest {})
        .await
        .map(|_| ())
}

fn server_tls(pki: &Pki, mutual: bool) -> Tls {
    Tls {
        certificate_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: mutual.then(|| pki.ca.clone().into_bytes()),
    }
}

/// Starts a TLS server; the helpers' own plaintext client is not usable on it.
async fn tls_app(tls: Tls) -> std::net::SocketAddr {
    tls_app_on(fresh_database().await, tls).await
}

async fn tls_app_on(db: sqlx::PgPool, tls: Tls) -> std::net::SocketAddr {
    let settings = krisp_ingest::app::Settings {
        tls: Some(tls),
        ..Default::default()
    };
    let application = krisp_ingest::app::Application::build(settings, db)
        .await
        .unwrap();
    let address = application.local_addr();
    tokio::spawn(application.run_until_stopped(std::future::pending()));
    address
}

#[tokio::test]
async fn tls_calls_work_and_plaintext_ones_are_refused() {
    let pki = pki();
    let address = tls_app(server_tls(&pki, false)).await;
    list(tls_channel(address, &pki, false).await.unwrap())
        .await
        .unwrap();

    // Plaintext HTTP/2 against the TLS listener gets nowhere.
    let plaintext = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => list(channel).await.is_err(),
    };
    assert!(
        refused,
        "a plaintext call succeeded against the TLS listener"
    );
    // And a client that does not trust the server's CA refuses the server.
    let other_ca = self::pki().ca;
    let untrusting = Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(other_ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await;
    let refused = match untrusting {
        Err(_) => true,
        Ok(channel) => list(channel).await.is_err(),
    };
    assert!(refused);
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = pki();
    let address = tls_app(server_tls(&pki, true)).await;
    list(tls_channel(address, &pki, true).await.unwrap())
        .await
        .unwrap();
    let without = match tls_channel(address, &pki, false).await {
        Err(_) => true,
        Ok(channel) => list(channel).await.is_err(),
    };
    assert!(without, "a client without a certificate got in");
}

#[tokio::test]
async fn the_demo_and_feed_commands_call_over_mutual_tls_with_an_api_key() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca = file("ca.pem", &pki.ca);
    let cert = file("client.pem", &pki.client.0);
    let key = file("client.key", &pki.client.1);
    let db = fresh_database().await;
    let api_key = krisp_ingest::auth::create_key(
        &db,
        "cli",
        &[
            krisp_ingest::auth::Scope::Ingest,
            krisp_ingest::auth::Scope::Read,
        ],
    )
    .await
    .unwrap();
    let address = tls_app_on(db.clone(), server_tls(&pki, true)).await;
    // The server's certificate names localhost; an http:// URL is called over https://.
    let server = format!("http://localhost:{}", address.port());
    // Run without blocking: the server serves on this test's runtime.
    let client = |command: &[&str], tls: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_krisp-ingest"))
            .args(command)
            .args(["--server", &server, "--api-key", &api_key])
            .args(tls)
            .env_remove("DATABASE_URL")
            .output()
    };
    let mutual = ["--ca-file", &ca, "--cert-file", &cert, "--key-file", &key];
    let demo = client(&["demo"], &mutual).await.unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let feed = client(&["feed", "--count", "300", "--batch-size", "100"], &mutual)
        .await
        .unwrap();
    assert!(
        feed.status.success(),
        "{}",
        String::from_utf8_lossy(&feed.stderr)
    );
    let live = client(
        &["feed", "--live", "--count", "300", "--batch-size", "25"],
        &mutual,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&live.stdout);
    assert!(
        live.status.success() && out.contains("closed: 300 sentiments"),
        "{out}{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let sentiments: i64 = sqlx::query_scalar("SELECT count(*) FROM sentiments")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(sentiments >= 600, "{sentiments} sentiments stored");
    // Without the client certificate the server refuses the connection: the users
    // are those of the demo, the feed and the live feed.
    let refused = client(&["demo"], &["--ca-file", &ca]).await.unwrap();
    assert!(!refused.status.success());
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users")
            .fetch_one(&db)
            .await
            .unwrap(),
        3
    );
}
