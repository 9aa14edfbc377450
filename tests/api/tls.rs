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
    let db = fresh_database().await;
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
