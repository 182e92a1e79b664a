//! TLS on both ports, mutual TLS for publishers, and certificate reload without a restart.
//! Certificates are the TEST-ONLY fixtures in tests/fixtures/tls.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ssegate::grpc::pb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};

use crate::helpers::{deadline, ev, spawn_app_with, tls_client, tls_fixture};

fn der(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(tls_fixture(name)).unwrap()
}

async fn tls_connect(addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    roots.add(der("ca.pem")).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Opens an event stream over TLS and reads until `want` appears in it.
async fn read_until(stream: &mut TlsStream<TcpStream>, want: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = deadline();
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = timeout_at(end, stream.read(&mut buf)).await.expect("data in time").expect("read");
        assert!(n > 0, "stream ended before {want:?}: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn subscribe_tls(addr: SocketAddr, user: &str) -> TlsStream<TcpStream> {
    let mut s = tls_connect(addr).await.expect("TLS handshake");
    let req = format!("GET /v1/events?user={user} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_until(&mut s, "retry:").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

fn tls_flags(cert: &str, key: &str) -> Vec<String> {
    ["--insecure-dev-identity", "--insecure-open-publish", "--tls-cert-file", cert, "--tls-key-file", key]
        .map(str::to_owned)
        .to_vec()
}

#[tokio::test]
async fn both_ports_speak_tls_and_events_flow_end_to_end() {
    let (cert, key) = (tls_fixture("server-a.pem"), tls_fixture("server-a.key"));
    let flags = tls_flags(&cert, &key);
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let mut sub = subscribe_tls(app.http, "alice").await;
    app.publish_users(&["alice"], "", "over tls").await;
    read_until(&mut sub, "data: over tls").await;

    // Plain HTTP to the TLS port gets no answer that a client could take for a stream.
    let mut plain = TcpStream::connect(app.http).await.unwrap();
    plain.write_all(b"GET /v1/events?user=a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = timeout_at(deadline(), plain.read_to_end(&mut buf)).await.expect("the server hangs up");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test]
async fn with_mutual_tls_only_publishers_with_a_certificate_from_the_ca_get_in() {
    let (cert, key, ca) = (tls_fixture("server-a.pem"), tls_fixture("server-a.key"), tls_fixture("ca.pem"));
    let mut flags = tls_flags(&cert, &key);
    flags.retain(|f| f != "--insecure-open-publish");
    flags.extend(["--grpc-client-ca-file".to_owned(), ca]);
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // The default client presents the CA-signed client certificate: no API key needed.
    app.broadcast("with a certificate").await;
    for (who, client) in [("no certificate", None), ("a certificate from another CA", Some("rogue"))] {
        let refused = match tls_client(app.grpc, client).await {
            Err(_) => true,
            Ok(mut c) => {
                c.broadcast(pb::BroadcastRequest { event: Some(ev("", "x")), ..Default::default() }).await.is_err()
            }
        };
        assert!(refused, "a publisher with {who} must be refused");
    }
    assert_eq!(app.stats().await.events_published, 1);
}

/// Copies the fixture `name` (cert and key) over `dir`'s `tls.pem` / `tls.key`, with a fresh
/// modification time, as cert-manager does when it renews.
fn install(dir: &Path, name: &str, mtime: SystemTime) {
    for ext in ["pem", "key"] {
        let to = dir.join(format!("tls.{ext}"));
        std::fs::copy(tls_fixture(&format!("{name}.{ext}")), &to).unwrap();
        std::fs::File::options().write(true).open(&to).unwrap().set_modified(mtime).unwrap();
    }
}

async fn served_certificate(addr: SocketAddr) -> CertificateDer<'static> {
    let s = tls_connect(addr).await.expect("handshake");
    s.get_ref().1.peer_certificates().expect("a certificate")[0].clone().into_owned()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_restart_and_open_streams_stay_up() {
    let dir = std::env::temp_dir().join(format!("ssegate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    install(&dir, "server-a", SystemTime::now());
    let (cert, key) = (dir.join("tls.pem"), dir.join("tls.key"));
    let flags = tls_flags(cert.to_str().unwrap(), key.to_str().unwrap());
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(served_certificate(app.http).await, der("server-a.pem"));
    let mut open = subscribe_tls(app.http, "alice").await;

    install(&dir, "server-b", SystemTime::now() + Duration::from_secs(30));
    let end = deadline();
    while served_certificate(app.http).await != der("server-b.pem") {
        assert!(Instant::now() < end, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_certificate(app.grpc).await, der("server-b.pem"), "the gRPC port too");
    app.publish_users(&["alice"], "", "still here").await;
    read_until(&mut open, "data: still here").await;
    std::fs::remove_dir_all(dir).unwrap();
}
