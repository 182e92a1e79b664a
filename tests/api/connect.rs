//! HTTP/JSON (Connect unary) on the gRPC port: every unary method answers
//! `POST /ssegate.v1.Publisher/<Method>` with proto3 JSON over HTTP/1.1 (raw sockets here) and
//! h2c, publishes reach SSE subscribers, errors are Connect errors with the Connect HTTP status
//! and the same messages a gRPC caller gets, and gRPC keeps working on the same port.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use serde_json::{Value, json};
use ssegate::grpc::pb;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout_at,
};
use tonic::{Code, Request, metadata::MetadataValue, transport::Endpoint};
use tower::ServiceExt;

use crate::helpers::{TestApp, deadline, ev, http_request, spawn_app, spawn_app_with, tls_fixture};

/// One HTTP/1.1 response: status, lower-cased headers, body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts a Connect error: the status, `application/json`, and the code; returns the message.
    fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        assert_eq!(v["code"], code, "{}", self.body);
        v["message"].as_str().expect("a message").to_owned()
    }
}

/// Writes one HTTP/1.1 request with a body on `io` and reads the whole response (the request
/// asks the server to close the connection after it).
async fn exchange(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    io.write_all(&bytes).await.expect("send request");
    let mut raw = Vec::new();
    timeout_at(deadline(), io.read_to_end(&mut raw)).await.expect("response in time").expect("read");
    let (status, headers, body) = crate::helpers::parse_response(&raw);
    Reply { status, headers, body }
}

/// `POST /ssegate.v1.Publisher/{method}` over HTTP/1.1 with a JSON body and extra headers.
async fn post_with(addr: SocketAddr, method: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let tcp = TcpStream::connect(addr).await.expect("connect");
    exchange(tcp, "POST", &format!("/ssegate.v1.Publisher/{method}"), &all, body.as_bytes()).await
}

async fn post(app: &TestApp, method: &str, body: Value) -> Reply {
    post_with(app.grpc, method, &[], &body.to_string()).await
}

/// Posts and asserts a 200 JSON answer; returns the JSON.
async fn ok(app: &TestApp, method: &str, body: Value) -> Value {
    let r = post(app, method, body).await;
    assert_eq!(r.status, 200, "{method}: {}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"), "{method}");
    r.json()
}

#[tokio::test]
async fn every_publish_method_answers_json_and_its_event_reaches_the_subscriber() {
    let app = spawn_app(&[]).await;
    let mut alice = app.subscribe("user=alice&group=admins&topic=prices").await;

    let cases = [
        ("Publish", json!({"userIds": ["alice", "nobody"], "event": {"name": "greeting", "data": "one"}})),
        // The proto field name is accepted as well as the JSON name, as the mapping requires.
        ("PublishGroup", json!({"group": "admins", "event": {"data": "two"}, "idempotency_key": "k-2"})),
        ("PublishTopic", json!({"topic": "prices", "event": {"name": "tick", "data": "three\nlines"}})),
        ("Broadcast", json!({"event": {"data": "four"}, "idempotencyKey": "k-4"})),
    ];
    for (method, body) in cases {
        let v = ok(&app, method, body.clone()).await;
        // proto3 JSON: camelCase names, uint64 as a string.
        assert_eq!(v["recipients"], "1", "{method}: {v}");
        let id = v["eventId"].as_str().unwrap_or_else(|| panic!("{method}: eventId in {v}"));
        let e = alice.next_event().await;
        let name = body["event"]["name"].as_str().filter(|n| !n.is_empty()).unwrap_or("message");
        assert_eq!((e.event_type.as_str(), e.data.as_str()), (name, body["event"]["data"].as_str().unwrap()));
        assert_eq!(e.last_event_id, id, "{method}: the answer's id is the event's id");
        assert_eq!(v["partitionEventIds"], json!([]), "{method}: one partition, one id: {v}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{method}: exactly eventId, recipients, partitionEventIds: {v}");
    }
    // Idempotency keys are the same over JSON: a retry gets the first event's id, nothing is sent.
    let first = ok(&app, "Broadcast", json!({"event": {"data": "five"}, "idempotencyKey": "k-5"})).await;
    let again = ok(&app, "Broadcast", json!({"event": {"data": "five"}, "idempotencyKey": "k-5"})).await;
    assert_eq!(first["eventId"], again["eventId"]);
    assert_eq!(alice.next_event().await.data, "five");
    let v = ok(&app, "Broadcast", json!({"event": {"data": "six"}})).await;
    let e = alice.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("six", v["eventId"].as_str().unwrap()));
}

#[tokio::test]
async fn presence_stats_and_disconnect_answer_in_proto3_json() {
    let app = spawn_app(&[]).await;
    let mut alice = app.subscribe("user=alice&group=admins").await;
    let _bob = app.subscribe("user=bob&topic=prices").await;

    let v = ok(
        &app,
        "Presence",
        json!({"userIds": ["alice", "carol"], "groups": ["admins"], "topics": ["prices"], "listOnline": {"limit": 1}}),
    )
    .await;
    assert_eq!(
        v,
        json!({
            "users": [
                {"userId": "alice", "online": true, "connections": "1"},
                {"userId": "carol", "online": false, "connections": "0"}
            ],
            "groups": [{"name": "admins", "connections": "1"}],
            "topics": [{"name": "prices", "connections": "1"}],
            "onlineUserIds": ["alice"],
            "nextAfter": "alice",
            "partial": false,
            "replicas": 1
        })
    );
    // An empty request is the empty message, with or without a body.
    assert_eq!(ok(&app, "Presence", json!({})).await["users"], json!([]));
    let r = post_with(app.grpc, "Stats", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);

    let v = ok(&app, "Stats", json!({})).await;
    for (field, want) in
        [("connections", "2"), ("users", "2"), ("groups", "1"), ("topics", "1"), ("eventsPublished", "0")]
    {
        assert_eq!(v[field], want, "{field} in {v}");
    }
    assert!(v["uptimeSeconds"].is_string() && v["replayLogBytes"].is_string(), "{v}");
    assert_eq!((v["partial"].clone(), v["replicas"].clone()), (json!(false), json!(1)));
    assert_eq!(v.as_object().unwrap().len(), 19, "every field of StatsResponse: {v}");

    let v = ok(&app, "Disconnect", json!({"userId": "alice", "reason": "bye"})).await;
    assert_eq!(v, json!({"closed": "1", "partial": false, "replicas": 1}));
    let e = alice.next_event().await;
    assert_eq!((e.event_type.as_str(), e.data.as_str()), ("ssegate.disconnect", "bye"));
    assert!(alice.next_event_or_end().await.is_none(), "the stream ends after the disconnect event");
}

#[tokio::test]
async fn bad_requests_are_connect_errors_with_the_messages_grpc_callers_get() {
    let app = spawn_app(&[]).await;

    // Validation runs in the same service: same code, same message.
    let grpc = app
        .client
        .clone()
        .publish(pb::PublishRequest {
            retain: None,
            user_ids: vec![],
            event: Some(ev("", "x")),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(grpc.code(), Code::InvalidArgument);
    let r = post(&app, "Publish", json!({"userIds": [], "event": {"data": "x"}})).await;
    assert_eq!(r.error(400, "invalid_argument"), grpc.message());
    let grpc = app
        .client
        .clone()
        .publish_topic(pb::PublishTopicRequest {
            retain: None,
            topic: "bad\ntopic".into(),
            event: Some(ev("", "x")),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    let r = post(&app, "PublishTopic", json!({"topic": "bad\ntopic", "event": {"data": "x"}})).await;
    assert_eq!(r.error(400, "invalid_argument"), grpc.message());
    let grpc = app
        .client
        .clone()
        .disconnect(pb::DisconnectRequest { user_id: String::new(), reason: String::new() })
        .await
        .unwrap_err();
    let r = post(&app, "Disconnect", json!({"userId": ""})).await;
    assert_eq!(r.error(400, "invalid_argument"), grpc.message());

    // Malformed JSON, a wrong type and an unknown field: invalid_argument, saying what is wrong.
    let r = post_with(app.grpc, "Publish", &[], r#"{"userIds": ["a"], "event": "#).await;
    assert!(r.error(400, "invalid_argument").starts_with("the request body is not valid proto3 JSON"));
    let r = post(&app, "Publish", json!({"userIds": "alice"})).await;
    r.error(400, "invalid_argument");
    let r = post(&app, "Broadcast", json!({"event": {"data": "x"}, "priority": 1})).await;
    assert!(r.error(400, "invalid_argument").contains("unknown field `priority`"), "{}", r.body);

    // Not a JSON (or proto) content type: 415, saying what to send.
    let tcp = TcpStream::connect(app.grpc).await.unwrap();
    let r = exchange(tcp, "POST", "/ssegate.v1.Publisher/Broadcast", &[("Content-Type", "text/plain")], b"{}").await;
    assert!(r.error(415, "unimplemented").contains("application/json"));
    assert_eq!(r.header("accept-post"), Some("application/json, application/proto"));
    let tcp = TcpStream::connect(app.grpc).await.unwrap();
    let r = exchange(tcp, "POST", "/ssegate.v1.Publisher/Broadcast", &[], b"{}").await;
    r.error(415, "unimplemented");

    // The streaming method and unknown methods: unimplemented (501); GET: 405.
    for streaming in ["PublishStream", "WatchPresence"] {
        let r = post(&app, streaming, json!({})).await;
        assert!(r.error(501, "unimplemented").contains("call it over gRPC"), "{streaming}");
    }
    let r = post(&app, "Nope", json!({})).await;
    r.error(501, "unimplemented");
    let (status, headers, _) = http_request(app.grpc, "GET", "/ssegate.v1.Publisher/Stats", &[]).await;
    assert_eq!(status, 405);
    assert!(headers.contains(&("allow".into(), "POST".into())));

    // Connect headers: version 1 accepted, others refused; compression refused; bad timeouts.
    let r = post_with(app.grpc, "Stats", &[("Connect-Protocol-Version", "1")], "{}").await;
    assert_eq!(r.status, 200);
    let r = post_with(app.grpc, "Stats", &[("Connect-Protocol-Version", "2")], "{}").await;
    r.error(400, "invalid_argument");
    let r = post_with(app.grpc, "Stats", &[("Content-Encoding", "gzip")], "{}").await;
    r.error(501, "unimplemented");
    let r = post_with(app.grpc, "Stats", &[("Connect-Timeout-Ms", "soon")], "{}").await;
    r.error(400, "invalid_argument");
    let r = post_with(app.grpc, "Stats", &[("Connect-Timeout-Ms", "5000")], "{}").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_body_over_the_message_limit_is_resource_exhausted() {
    let app = spawn_app(&["--grpc-max-message-bytes", "1024"]).await;
    let mut alice = app.subscribe("user=alice").await;
    let big = "x".repeat(2000);
    let r = post(&app, "Broadcast", json!({"event": {"data": big}})).await;
    assert_eq!(
        r.error(429, "resource_exhausted"),
        "the request body is over the limit of 1024 bytes (--grpc-max-message-bytes)"
    );
    // Without a Content-Length (chunked), the limit holds while reading.
    let mut tcp = TcpStream::connect(app.grpc).await.unwrap();
    let body = json!({"event": {"data": big}}).to_string();
    let req = format!(
        "POST /ssegate.v1.Publisher/Broadcast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    timeout_at(deadline(), tcp.read_to_string(&mut raw)).await.unwrap().unwrap();
    assert!(raw.starts_with("HTTP/1.1 429"), "{raw}");
    assert!(raw.contains(r#""code":"resource_exhausted""#), "{raw}");
    // Just under the limit is fine, and nothing refused was published.
    let v = ok(&app, "Broadcast", json!({"event": {"data": "x".repeat(900)}})).await;
    assert_eq!(v["recipients"], "1");
    assert_eq!(alice.next_event().await.data.len(), 900);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_within_connect_timeout_ms_is_deadline_exceeded() {
    let app = spawn_app(&[]).await;
    let mut tcp = TcpStream::connect(app.grpc).await.unwrap();
    // Announces 100 bytes and sends 2: only the server's deadline can end this call.
    let req = "POST /ssegate.v1.Publisher/Stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
               Content-Type: application/json\r\nConnect-Timeout-Ms: 200\r\nContent-Length: 100\r\n\r\n{}";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = vec![0u8; 4096];
    let n = timeout_at(deadline(), tcp.read(&mut raw)).await.expect("answer in time").unwrap();
    let raw = String::from_utf8_lossy(&raw[..n]);
    assert!(raw.starts_with("HTTP/1.1 504"), "{raw}");
    assert!(raw.contains(r#""code":"deadline_exceeded""#), "{raw}");
}

#[tokio::test]
async fn json_callers_need_the_same_api_key_as_grpc_callers() {
    const KEY: &str = "key-alpha-0123456789abcdef";
    let app = spawn_app_with(&["--insecure-dev-identity", "--publisher-api-keys", KEY]).await;
    let mut alice = app.subscribe("user=alice").await;
    let body = r#"{"event": {"data": "x"}}"#;
    let r = post_with(app.grpc, "Broadcast", &[], body).await;
    assert_eq!(r.error(401, "unauthenticated"), "an API key is required: send `authorization: Bearer <key>`");
    let wrong = [("Authorization", "Bearer key-bravo-0123456789abcdef")];
    let r = post_with(app.grpc, "Broadcast", &wrong, body).await;
    let message = r.error(401, "unauthenticated");
    // The gRPC caller with the same key is told the same.
    let mut req = Request::new(pb::StatsRequest {});
    req.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer key-bravo-0123456789abcdef"));
    let err = app.client.clone().stats(req).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, message.as_str()));
    let r = post_with(app.grpc, "Stats", &[("Authorization", "Basic a2V5LWFscGhh")], "{}").await;
    r.error(401, "unauthenticated");

    let bearer = format!("Bearer {KEY}");
    let r = post_with(app.grpc, "Broadcast", &[("Authorization", &bearer)], body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(alice.next_event().await.data, "x", "only the authorised publish was delivered");
    let r = post_with(app.grpc, "Stats", &[("authorization", &bearer)], "").await;
    assert_eq!((r.status, r.json()["eventsPublished"].clone()), (200, json!("1")));
}

#[tokio::test]
async fn h2c_json_and_proto_calls_share_the_port_with_grpc_and_are_counted_like_it() {
    let app = spawn_app(&[]).await;
    let mut alice = app.subscribe("user=alice").await;
    // A plain HTTP/2 (prior knowledge) client: tonic's channel sending whatever it is given.
    let channel = Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap().connect().await.unwrap();
    let call = |ct: &'static str, method: &str, body: Vec<u8>| {
        let req = http::Request::post(format!("http://{}/ssegate.v1.Publisher/{method}", app.grpc))
            .header("content-type", ct)
            .header("connect-protocol-version", "1")
            .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
            .unwrap();
        let channel = channel.clone();
        async move {
            let resp = timeout_at(deadline(), channel.oneshot(req)).await.expect("answer in time").expect("h2 call");
            let status = resp.status().as_u16();
            let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, ct, body)
        }
    };
    let body = json!({"userIds": ["alice"], "event": {"data": "over h2c"}}).to_string().into_bytes();
    let (status, ct, body) = call("application/json", "Publish", body).await;
    assert_eq!((status, ct.as_deref()), (200, Some("application/json")), "{body:?}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    let e = alice.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("over h2c", v["eventId"].as_str().unwrap()));

    // Connect's binary codec: the protobuf message itself, unframed.
    let req = pb::BroadcastRequest { retain: None, event: Some(ev("", "binary")), idempotency_key: String::new() };
    let (status, ct, body) = call("application/proto", "Broadcast", req.encode_to_vec()).await;
    assert_eq!((status, ct.as_deref()), (200, Some("application/proto")));
    let resp = pb::PublishResponse::decode(body).unwrap();
    assert_eq!((resp.recipients, alice.next_event().await.data), (Some(1), "binary".to_owned()));
    let (status, _, body) = call("application/json", "Publish", br#"{"userIds": []}"#.to_vec()).await;
    assert_eq!(status, 400);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["code"], "invalid_argument");

    // gRPC on the same port, same connection kind, still works.
    let resp = app.publish_users(&["alice"], "", "over grpc").await;
    let e = alice.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id), ("over grpc", resp.event_id));

    // The JSON calls went through the gRPC stack: counted by method and gRPC code.
    let (_, _, metrics) = http_request(app.admin, "GET", "/metrics", &[]).await;
    for (series, want) in [
        (r#"ssegate_grpc_requests_total{method="ssegate.v1.Publisher/Publish",code="OK"}"#, "2"),
        (r#"ssegate_grpc_requests_total{method="ssegate.v1.Publisher/Broadcast",code="OK"}"#, "1"),
        (r#"ssegate_grpc_requests_total{method="ssegate.v1.Publisher/Publish",code="INVALID_ARGUMENT"}"#, "1"),
    ] {
        let line = metrics.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series}"));
        assert_eq!(line.rsplit_once(' ').unwrap().1, want, "{series}");
    }
}

/// A TLS connection to `addr` as `localhost` offering `alpn`, trusting the test CA, with the
/// test client certificate if `client`.
async fn tls_connect(
    addr: SocketAddr,
    alpn: &[&[u8]],
    client: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio_rustls::rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    };
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(tls_fixture("ca.pem")).unwrap()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = if client {
        let chain = CertificateDer::pem_file_iter(tls_fixture("client.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(tls_fixture("client.key")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

#[tokio::test]
async fn over_mutual_tls_json_callers_use_http1_with_their_certificate_and_grpc_still_works() {
    let (cert, key, ca) = (tls_fixture("server-a.pem"), tls_fixture("server-a.key"), tls_fixture("ca.pem"));
    let flags =
        ["--insecure-dev-identity", "--tls-cert-file", &cert, "--tls-key-file", &key, "--grpc-client-ca-file", &ca];
    let app = spawn_app_with(&flags).await;
    let path = "/ssegate.v1.Publisher/Broadcast";
    let json = [("Content-Type", "application/json")];
    let body = br#"{"event": {"data": "over tls"}}"#;
    // A client offering only HTTP/1.1 by ALPN (as Java's HTTP clients do), and one offering none.
    for alpn in [&[b"http/1.1".as_slice()][..], &[]] {
        let tls = tls_connect(app.grpc, alpn, true).await.expect("TLS handshake");
        let r = exchange(tls, "POST", path, &json, body).await;
        assert_eq!((r.status, r.header("content-type")), (200, Some("application/json")), "{}", r.body);
    }
    // Without a client certificate there is no call at all (the handshake or the first read fails).
    if let Ok(mut tls) = tls_connect(app.grpc, &[b"http/1.1"], false).await {
        let _ = tls.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let read = timeout_at(deadline(), tls.read(&mut buf)).await.expect("the server answers in time");
        assert!(matches!(read, Err(_) | Ok(0)), "a call without a client certificate was answered");
    }
    // gRPC (h2 over mutual TLS) on the same port sees the two publishes.
    let stats = app.stats().await;
    assert_eq!(stats.events_published, 2);
}

#[tokio::test]
async fn history_is_served_over_http_json() {
    let app = spawn_app(&[]).await;
    let id = app.publish_users(&["u"], "note", "hello").await.event_id;
    let v = ok(&app, "History", json!({ "userId": "u", "limit": 5 })).await;
    assert_eq!(v["events"], json!([{ "id": id, "name": "note", "data": "hello" }]));
    assert_eq!(v["position"], id.as_str());
    let r = post(&app, "History", json!({ "userId": "u", "before": "yesterday" })).await;
    assert!(r.error(400, "invalid_argument").starts_with("before: "), "{}", r.body);
}
