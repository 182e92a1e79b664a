//! Connect authorization by the backend (`--authorizer-addr`): the real server on port 0 asks a
//! real `ssegate.v1.Authorizer` started here (a tonic server, or a plain HTTP JSON server for
//! `--authorizer-protocol connect`) over real sockets. Each test names what it pins down; every
//! wait has a deadline.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::join_all;
use ssegate::{
    event_stream::parse::Item,
    grpc::pb::{
        self,
        authorize_response::Decision,
        authorizer_server::{Authorizer, AuthorizerServer},
    },
};
use tokio::{net::TcpListener, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::helpers::{SseClient, TestApp, http_request, spawn_app_with, tls_fixture};

type Answer = dyn Fn(&pb::AuthorizeRequest) -> Result<pb::AuthorizeResponse, Status> + Send + Sync;

/// A backend's authorizer: answers with `answer` after `delay`, and counts calls, the calls
/// in flight at once (the most seen), and the requests it got.
struct Backend {
    answer: Box<Answer>,
    delay: Duration,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: Mutex<Vec<pb::AuthorizeRequest>>,
}

#[derive(Clone)]
struct Shared(Arc<Backend>);

#[tonic::async_trait]
impl Authorizer for Shared {
    async fn authorize(&self, req: Request<pb::AuthorizeRequest>) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let b = &self.0;
        b.calls.fetch_add(1, SeqCst);
        let now = b.in_flight.fetch_add(1, SeqCst) + 1;
        b.max_in_flight.fetch_max(now, SeqCst);
        tokio::time::sleep(b.delay).await;
        b.in_flight.fetch_sub(1, SeqCst);
        let req = req.into_inner();
        b.seen.lock().unwrap().push(req.clone());
        (b.answer)(&req).map(Response::new)
    }
}

impl Backend {
    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

/// Starts a gRPC authorizer on 127.0.0.1:0; returns it and its `http://` address.
async fn grpc_backend(
    delay: Duration,
    answer: impl Fn(&pb::AuthorizeRequest) -> Result<pb::AuthorizeResponse, Status> + Send + Sync + 'static,
) -> (Arc<Backend>, String) {
    let backend = Arc::new(Backend {
        answer: Box::new(answer),
        delay,
        calls: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = AuthorizerServer::new(Shared(backend.clone()));
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (backend, format!("http://{addr}"))
}

fn allow(user: &str, groups: &[&str], expires_at: i64) -> pb::AuthorizeResponse {
    pb::AuthorizeResponse {
        decision: Some(Decision::Allow(pb::Allow {
            user_id: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            topics: vec!["news/*".into()],
            expires_at,
        })),
    }
}

fn deny(status: u32, reason: &str) -> pb::AuthorizeResponse {
    pb::AuthorizeResponse { decision: Some(Decision::Deny(pb::Deny { status, reason: reason.into() })) }
}

fn session(req: &pb::AuthorizeRequest) -> Option<&str> {
    req.cookies.iter().find(|c| c.name == "SESSION").map(|c| c.value.as_str())
}

/// The session store of the examples: `s-<user>` is that user's session, anything else is not
/// signed in (401), and no cookie at all is 401 too.
fn sessions(req: &pb::AuthorizeRequest) -> Result<pb::AuthorizeResponse, Status> {
    Ok(match session(req).and_then(|s| s.strip_prefix("s-")) {
        Some(user) => allow(user, &["staff"], 0),
        None => deny(401, "not signed in: log in again"),
    })
}

async fn app(addr: &str, extra: &[&str]) -> TestApp {
    let mut flags = vec!["--authorizer-addr", addr, "--insecure-open-publish"];
    flags.extend_from_slice(extra);
    spawn_app_with(&flags).await
}

async fn open(app: &TestApp, query: &str, cookie: &str) -> SseClient {
    SseClient::connect(app.http, &format!("/v1/events?{query}"), &[("Cookie", cookie)]).await
}

async fn refused(app: &TestApp, query: &str, cookie: &str) -> (u16, Vec<(String, String)>, String) {
    http_request(app.http, "GET", &format!("/v1/events?{query}"), &[("Cookie", cookie)]).await
}

/// The admin port's `/metrics` text.
async fn metrics(app: &TestApp) -> String {
    http_request(app.admin, "GET", "/metrics", &[]).await.2
}

#[tokio::test]
async fn the_backend_allows_a_session_cookie_and_the_stream_gets_that_users_events() {
    let (backend, addr) = grpc_backend(Duration::ZERO, sessions).await;
    let app = app(&addr, &["--authorizer-header", "x-tenant"]).await;
    let mut sse = SseClient::connect(
        app.http,
        "/v1/events?group=staff",
        &[("Cookie", "theme=dark; SESSION=s-alice"), ("X-Tenant", "acme"), ("X-Other", "secret")],
    )
    .await;
    assert_eq!(sse.status, 200, "{:?}", sse.head);
    sse.cursor().await;
    app.wait_connections("alice", 1).await;
    app.publish_users(&["alice"], "note", "for alice").await;
    app.publish_group("staff", "for staff").await;
    assert_eq!(sse.next_data(2).await, ["for alice", "for staff"]);
    // What the backend was told: every cookie, only the configured header, the query, the peer.
    let seen = backend.seen.lock().unwrap()[0].clone();
    let cookies: Vec<_> = seen.cookies.iter().map(|c| (c.name.as_str(), c.value.as_str())).collect();
    assert_eq!(cookies, [("theme", "dark"), ("SESSION", "s-alice")]);
    assert_eq!(seen.headers.len(), 1, "{:?}", seen.headers);
    assert_eq!((seen.headers[0].name.as_str(), seen.headers[0].values.clone()), ("x-tenant", vec!["acme".to_owned()]));
    assert_eq!(seen.groups, ["staff"]);
    assert!(seen.peer.starts_with("127.0.0.1:"), "{}", seen.peer);
    assert!(metrics(&app).await.contains("ssegate_authorizer_calls_total{outcome=\"allow\"} 1"));
}

#[tokio::test]
async fn a_deny_answer_reaches_the_browser_with_its_status_and_reason() {
    let (backend, addr) = grpc_backend(Duration::ZERO, |req| {
        Ok(match session(req) {
            Some("other-tenant") => deny(403, "this account belongs to another tenant"),
            Some("weird") => deny(0, "\x1b[31mred\nalert"),
            _ => deny(401, "not signed in: log in again"),
        })
    })
    .await;
    let app = app(&addr, &[]).await;
    let cases = [
        ("SESSION=expired", 401, "not signed in: log in again\n"),
        ("a=b", 401, "not signed in: log in again\n"),
        ("SESSION=other-tenant", 403, "this account belongs to another tenant\n"),
        ("SESSION=weird", 403, " [31mred alert\n"),
    ];
    for (cookie, status, body) in cases {
        let (got, headers, text) = refused(&app, "", cookie).await;
        assert_eq!((got, text.as_str()), (status, body), "{cookie}");
        assert!(headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/plain")));
    }
    // A deny is cached briefly: the same credential again costs no call, and gets the same.
    assert_eq!(backend.calls(), 4);
    let (status, _, body) = refused(&app, "", "SESSION=expired").await;
    assert_eq!((status, body.as_str()), (401, "not signed in: log in again\n"));
    assert_eq!(backend.calls(), 4);
    // Asking for more than the allow grants is 403, naming what.
    let (_, addr) = grpc_backend(Duration::ZERO, sessions).await;
    let app = self::app(&addr, &[]).await;
    let (status, _, body) = refused(&app, "user=bob", "SESSION=s-alice").await;
    assert_eq!((status, body.as_str()), (403, "`?user=bob` is not allowed for this session\n"));
    let (status, _, body) = refused(&app, "group=admins", "SESSION=s-alice").await;
    assert_eq!((status, body.as_str()), (403, "group `admins` is not allowed for this session\n"));
    let (status, _, body) = refused(&app, "topic=sports", "SESSION=s-alice").await;
    assert_eq!((status, body.as_str()), (403, "topic `sports` is not allowed for this session\n"));
    assert_eq!(app.stats().await.connections, 0);
}

#[tokio::test]
async fn a_slow_or_absent_authorizer_gets_503_with_a_reason_and_admits_nothing() {
    let (backend, addr) = grpc_backend(Duration::from_secs(30), sessions).await;
    let app = app(&addr, &["--authorizer-timeout", "300ms"]).await;
    let started = Instant::now();
    let (status, headers, body) = refused(&app, "", "SESSION=s-alice").await;
    assert_eq!((status, body.as_str()), (503, "authorization is unavailable: the authorizer did not answer in time\n"));
    assert!(started.elapsed() < Duration::from_secs(3), "answered at the timeout");
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
    assert_eq!(backend.calls(), 1);
    let m = metrics(&app).await;
    assert!(m.contains("ssegate_authorizer_calls_total{outcome=\"timeout\"} 1"), "{m}");
    assert!(m.contains("ssegate_connections_rejected_total{reason=\"authorizer_unavailable\"} 1"), "{m}");

    // Nothing listening at the address.
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let app = self::app(&format!("http://127.0.0.1:{port}"), &[]).await;
    let (status, _, body) = refused(&app, "", "SESSION=s-alice").await;
    assert_eq!((status, body.as_str()), (503, "authorization is unavailable: the authorizer cannot be reached\n"));
    assert_eq!(app.stats().await.connections, 0);
}

#[tokio::test]
async fn garbled_answers_are_refused_and_never_admitted() {
    let (backend, addr) = grpc_backend(Duration::ZERO, |req| match session(req) {
        Some("empty") => Ok(pb::AuthorizeResponse { decision: None }),
        Some("bad-user") => Ok(allow("a\nb", &[], 0)),
        Some("bad-status") => Ok(deny(200, "ok?")),
        Some("expired") => Ok(allow("alice", &[], 1_000_000)),
        _ => Err(Status::internal("database down")),
    })
    .await;
    let app = app(&addr, &[]).await;
    for cookie in ["SESSION=empty", "SESSION=bad-user", "SESSION=bad-status", "SESSION=expired"] {
        let (status, _, body) = refused(&app, "", cookie).await;
        assert_eq!(
            (status, body.as_str()),
            (503, "authorization is unavailable: the authorizer's answer is invalid\n")
        );
    }
    let (status, _, body) = refused(&app, "", "SESSION=boom").await;
    assert_eq!((status, body.as_str()), (503, "authorization is unavailable: the authorizer failed\n"));
    assert_eq!(backend.calls(), 5);
    // Five failures in a row open the breaker: a new credential is refused without a call.
    let (status, _, body) = refused(&app, "", "SESSION=s-new").await;
    assert_eq!(status, 503);
    assert!(body.contains("calls are paused"), "{body}");
    assert_eq!(backend.calls(), 5, "no call while the breaker is open");
    assert_eq!(app.stats().await.connections, 0);
    let m = metrics(&app).await;
    assert!(m.contains("ssegate_authorizer_calls_total{outcome=\"invalid\"} 4"), "{m}");
    assert!(m.contains("ssegate_authorizer_calls_total{outcome=\"breaker_open\"} 1"), "{m}");
}

#[tokio::test]
async fn a_reconnect_storm_with_one_cookie_costs_the_backend_one_call() {
    let (backend, addr) = grpc_backend(Duration::from_millis(300), sessions).await;
    let app = app(&addr, &["--max-connections-per-user", "1000"]).await;
    let statuses = join_all((0..500).map(|_| async { open(&app, "", "SESSION=s-storm").await })).await;
    assert!(statuses.iter().all(|c| c.status == 200), "{:?}", statuses.iter().map(|c| c.status).collect::<Vec<_>>());
    app.wait_connections("storm", 500).await;
    assert_eq!(backend.calls(), 1, "500 identical connects share one call, then its cached answer");
    let m = metrics(&app).await;
    assert!(m.contains("ssegate_authorizer_calls_total{outcome=\"allow\"} 1"), "{m}");
}

#[tokio::test]
async fn calls_in_flight_never_exceed_the_bound() {
    let (backend, addr) = grpc_backend(Duration::from_millis(150), sessions).await;
    let app = app(&addr, &["--authorizer-max-in-flight", "4", "--authorizer-timeout", "10s"]).await;
    let clients = join_all((0..24).map(|i| {
        let app = &app;
        async move { open(app, "", &format!("SESSION=s-user{i}")).await }
    }))
    .await;
    assert!(clients.iter().all(|c| c.status == 200));
    assert_eq!(backend.calls(), 24, "distinct credentials: one call each");
    let most = backend.max_in_flight.load(SeqCst);
    assert!(most <= 4, "the backend saw {most} calls at once, over the bound of 4");
    assert!(most >= 2, "the calls ran concurrently up to the bound (saw {most})");
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn at_expiry_the_stream_ends_with_disconnect_and_a_revoked_session_is_refused_on_reconnect() {
    let revoked = Arc::new(AtomicBool::new(false));
    let flag = revoked.clone();
    let (backend, addr) = grpc_backend(Duration::ZERO, move |_| {
        Ok(if flag.load(SeqCst) { deny(401, "session revoked") } else { allow("dana", &[], now() + 2) })
    })
    .await;
    let app = app(&addr, &[]).await;
    let mut sse = open(&app, "", "SESSION=s-dana").await;
    assert_eq!(sse.status, 200);
    sse.cursor().await;
    revoked.store(true, SeqCst);
    // The stream ends by itself (within the 2 s grant and the helper's deadline), its last
    // event saying why, with a retry: before it.
    let items = sse.until_end().await;
    let last = items.iter().rev().find_map(|i| match i {
        Item::Event(e) => Some(e.clone()),
        _ => None,
    });
    let last = last.expect("a last event");
    assert_eq!((last.event_type.as_str(), last.data.as_str()), ("ssegate.disconnect", "token_expired"));
    // The reconnect asks again (the cached allow ended with the grant) and is refused.
    let (status, _, body) = refused(&app, "", "SESSION=s-dana").await;
    assert_eq!((status, body.as_str()), (401, "session revoked\n"));
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn a_jwt_when_present_decides_and_the_backend_decides_the_rest() {
    use jsonwebtoken::{EncodingKey, Header};
    const SECRET: &str = "a-test-only-hs256-secret-of-more-than-32-bytes";
    let dir = std::env::temp_dir().join(format!("ssegate-authorizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let (backend, addr) = grpc_backend(Duration::ZERO, sessions).await;
    let app = app(&addr, &["--jwt-secret-file", secret.to_str().unwrap()]).await;
    let claims = serde_json::json!({ "sub": "erin", "exp": now() + 3600 });
    let token =
        jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let bearer = format!("Bearer {token}");
    let c = SseClient::connect(app.http, "/v1/events", &[("Authorization", &bearer), ("Cookie", "SESSION=s-x")]).await;
    assert_eq!(c.status, 200);
    assert_eq!(backend.calls(), 0, "a JWT decides alone");
    let (status, _, body) =
        http_request(app.http, "GET", "/v1/events", &[("Authorization", "Bearer garbage"), ("Cookie", "SESSION=s-x")])
            .await;
    assert_eq!((status, body.as_str()), (401, "the token is malformed\n"), "a bad JWT is not rescued by the session");
    assert_eq!(backend.calls(), 0);
    let c = open(&app, "", "SESSION=s-frank").await;
    assert_eq!(c.status, 200);
    app.wait_connections("frank", 1).await;
    assert_eq!(backend.calls(), 1);
}

/// A Connect/JSON authorizer, as a Spring `@PostMapping("/ssegate.v1.Authorizer/Authorize")`
/// would be: plain HTTP/1.1, JSON in and out. Returns the requests' JSON bodies as seen.
async fn connect_backend() -> (Arc<Mutex<Vec<serde_json::Value>>>, SocketAddr) {
    let (seen, router) = connect_router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (seen, addr)
}

fn connect_router() -> (Arc<Mutex<Vec<serde_json::Value>>>, axum::Router) {
    use axum::{Router, routing::post};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let route = post(move |headers: http::HeaderMap, body: axum::body::Bytes| {
        let log = log.clone();
        async move {
            assert_eq!(headers.get("content-type").unwrap(), "application/json");
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
            log.lock().unwrap().push(req.clone());
            let cookies = req["cookies"].as_array().cloned().unwrap_or_default();
            let session = cookies.iter().find(|c| c["name"] == "SESSION").and_then(|c| c["value"].as_str());
            let answer = match session.and_then(|s| s.strip_prefix("s-")) {
                // Spring would write a number for a long: accepted.
                Some(user) => serde_json::json!({"allow": {"userId": user, "groups": ["staff"], "expiresAt": 0}}),
                None => serde_json::json!({"deny": {"status": 401, "reason": "no session"}}),
            };
            ([("content-type", "application/json")], answer.to_string())
        }
    });
    (seen, Router::new().route("/ssegate.v1.Authorizer/Authorize", route))
}

#[tokio::test]
async fn a_connect_json_authorizer_allows_and_denies() {
    let (seen, addr) = connect_backend().await;
    let app =
        app(&format!("http://{addr}"), &["--authorizer-protocol", "connect", "--authorizer-cookie", "SESSION"]).await;
    let mut sse = open(&app, "group=staff", "tracking=1; SESSION=s-carol").await;
    assert_eq!(sse.status, 200, "{:?}", sse.head);
    sse.cursor().await;
    app.wait_connections("carol", 1).await;
    app.publish_users(&["carol"], "", "hello carol").await;
    assert_eq!(sse.next_data(1).await, ["hello carol"]);
    let (status, _, body) = refused(&app, "", "SESSION=nope").await;
    assert_eq!((status, body.as_str()), (401, "no session\n"));
    // The request in proto3 JSON: camelCase names, only the configured cookie.
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first["cookies"], serde_json::json!([{"name": "SESSION", "value": "s-carol"}]), "{first}");
    assert_eq!(first["groups"], serde_json::json!(["staff"]));
    assert!(first["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
}

/// The TEST-ONLY server certificate (for `localhost` and 127.0.0.1) and its key, as PEM.
fn server_identity() -> (Vec<u8>, Vec<u8>) {
    (std::fs::read(tls_fixture("server-a.pem")).unwrap(), std::fs::read(tls_fixture("server-a.key")).unwrap())
}

#[tokio::test]
async fn an_https_authorizer_is_called_over_tls_trusting_the_given_ca_on_both_protocols() {
    // gRPC over TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = Arc::new(Backend {
        answer: Box::new(sessions),
        delay: Duration::ZERO,
        calls: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
    });
    let (cert, key) = server_identity();
    let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&cert, &key));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AuthorizerServer::new(Shared(backend.clone())))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let ca = tls_fixture("ca.pem");
    let app = app(&format!("https://localhost:{}", addr.port()), &["--authorizer-tls-ca-file", &ca]).await;
    let c = open(&app, "", "SESSION=s-grace").await;
    assert_eq!(c.status, 200, "{:?}", c.head);
    assert_eq!(backend.calls(), 1);
    // Without the CA the certificate is not trusted: refused, never admitted.
    let app = self::app(&format!("https://localhost:{}", addr.port()), &[]).await;
    let (status, _, body) = refused(&app, "", "SESSION=s-grace").await;
    assert_eq!(status, 503, "{body}");

    // Connect/JSON over TLS (HTTP/1.1 behind rustls).
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let chain = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (seen, router) = connect_router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let app = self::app(
        &format!("https://127.0.0.1:{}", addr.port()),
        &["--authorizer-protocol", "connect", "--authorizer-tls-ca-file", &ca],
    )
    .await;
    let c = open(&app, "", "SESSION=s-heidi").await;
    assert_eq!(c.status, 200, "{:?}", c.head);
    let (status, _, body) = refused(&app, "", "SESSION=nope").await;
    assert_eq!((status, body.as_str()), (401, "no session\n"));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_open_breaker_fails_fast_then_one_probe_after_the_cool_down_closes_it() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let (backend, addr) = grpc_backend(Duration::ZERO, move |req| {
        if flag.load(SeqCst) { sessions(req) } else { Err(Status::unavailable("restarting")) }
    })
    .await;
    let app = app(&addr, &[]).await;
    for i in 0..5 {
        let (status, _, body) = refused(&app, "", &format!("SESSION=s-u{i}")).await;
        assert_eq!((status, body.as_str()), (503, "authorization is unavailable: the authorizer failed\n"));
    }
    assert_eq!(backend.calls(), 5);
    healthy.store(true, SeqCst);
    // Open: refused at once without a call, until the cool-down (5 s) has passed; then the
    // first request is the probe, and it succeeds.
    let end = Instant::now() + Duration::from_secs(15);
    let mut refused_fast = 0;
    loop {
        let c = open(&app, "", "SESSION=s-back").await;
        if c.status == 200 {
            break;
        }
        assert_eq!(c.status, 503);
        refused_fast += 1;
        assert!(Instant::now() < end, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused_fast > 0, "the breaker was open");
    assert_eq!(backend.calls(), 6, "no call while open; one probe after the cool-down");
    // Closed again: other credentials are asked about as usual.
    assert_eq!(open(&app, "", "SESSION=s-other").await.status, 200);
    assert_eq!(backend.calls(), 7);
}
