//! Clients that hold sockets without using them, and HTTP/2 streams that stop reading: what
//! each port does about them.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

use crate::helpers::{deadline, http_request, spawn_app};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the server closes the connection; panics if it is still open at the deadline.
async fn closed_by_server(mut s: TcpStream, what: &str) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match timeout_at(deadline(), s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open at the deadline"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

async fn connect(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

#[tokio::test]
async fn silent_sockets_and_bare_h2_prefaces_are_closed_on_every_port() {
    let app = spawn_app(&["--header-read-timeout", "1s"]).await;
    let cases = [
        ("HTTP, nothing sent", app.http, &b""[..]),
        ("HTTP, half a head", app.http, &b"GET /v1/events?user=a HTTP/1.1\r\n"[..]),
        ("HTTP, h2 preface only", app.http, H2_PREFACE),
        ("gRPC, nothing sent", app.grpc, &b""[..]),
        ("gRPC, h2 preface only", app.grpc, H2_PREFACE),
        ("admin, nothing sent", app.admin, &b""[..]),
        ("admin, half a head", app.admin, &b"GET /metrics HTTP/1.1\r\n"[..]),
    ];
    let mut waits = Vec::new();
    for (what, addr, first) in cases {
        let s = connect(addr, first).await;
        waits.push(tokio::spawn(async move { (what, closed_by_server(s, what).await) }));
    }
    for w in waits {
        let (what, after) = w.await.unwrap();
        assert!(after >= Duration::from_millis(900), "{what}: closed after {after:?}, before its deadline");
    }
    // Everyone else is still served.
    let (status, _, _) = http_request(app.admin, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200);
    app.publish_users(&["a"], "m", "still publishing").await;
}

/// An h2c client connection to `addr` (a window of 64 KiB per stream, 16 MiB for the
/// connection), and the task driving it, which ends when the server closes the connection.
async fn h2_client(
    addr: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    (client, tokio::spawn(conn))
}

async fn h2_get(client: &mut h2::client::SendRequest<Bytes>, addr: SocketAddr, path: &str) -> h2::RecvStream {
    let req = http::Request::get(format!("http://{addr}{path}")).body(()).unwrap();
    let (resp, _) = client.clone().ready().await.unwrap().send_request(req, true).unwrap();
    let resp = timeout_at(deadline(), resp).await.expect("response in time").unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.into_body()
}

#[tokio::test]
async fn an_idle_h2_connection_with_no_open_stream_is_closed_and_one_with_a_stream_is_not() {
    // The first-request deadline (30 s) is far beyond the test's: closing in time takes the
    // idle timeout counting from the end of the request.
    let app = spawn_app(&["--idle-timeout", "1s", "--header-read-timeout", "30s", "--heartbeat-interval", "1h"]).await;
    // One request, answered, then nothing: closed after the idle timeout.
    let (idle, idle_conn) = h2_client(app.http).await;
    let req = http::Request::get(format!("http://{}/nowhere", app.http)).body(()).unwrap();
    let (resp, _) = idle.clone().ready().await.unwrap().send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 404);
    // A connection holding an event stream stays, however long it is quiet.
    let (mut busy, busy_conn) = h2_client(app.http).await;
    let mut stream = h2_get(&mut busy, app.http, "/v1/events?user=quiet").await;
    timeout_at(deadline(), idle_conn).await.expect("idle h2 connection closed in time").unwrap().ok();
    assert!(!busy_conn.is_finished(), "a connection with an open stream was closed as idle");
    app.publish_users(&["quiet"], "m", "after-the-idle-timeout").await;
    let mut text = String::new();
    while !text.contains("after-the-idle-timeout") {
        let chunk = timeout_at(deadline(), stream.data()).await.expect("event in time").unwrap().unwrap();
        stream.flow_control().release_capacity(chunk.len()).unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn a_stalled_h2_stream_is_reset_alone_while_its_neighbours_get_every_event() {
    let app = spawn_app(&["--heartbeat-interval", "1h"]).await;
    let (mut client, conn) = h2_client(app.http).await;
    let mut slow = h2_get(&mut client, app.http, "/v1/events?user=slow").await;
    let mut healthy = [
        h2_get(&mut client, app.http, "/v1/events?user=ok1").await,
        h2_get(&mut client, app.http, "/v1/events?user=ok2").await,
    ];
    // The slow stream never gives back flow-control capacity: after 64 KiB the server can send
    // it nothing more, and 40 events of 60 KB overflow its queue.
    let big = "x".repeat(60_000);
    for _ in 0..40 {
        app.publish_users(&["slow"], "big", &big).await;
    }
    for i in 0..20 {
        app.publish_users(&["ok1", "ok2"], "small", &format!("n{i}")).await;
    }
    for (k, stream) in healthy.iter_mut().enumerate() {
        let mut text = String::new();
        while !text.contains("data: n19\n") {
            let chunk = timeout_at(deadline(), stream.data())
                .await
                .unwrap_or_else(|_| panic!("healthy stream {k}: events in time"))
                .unwrap_or_else(|| panic!("healthy stream {k} ended"))
                .unwrap_or_else(|e| panic!("healthy stream {k} failed: {e}"));
            stream.flow_control().release_capacity(chunk.len()).unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        for i in 0..20 {
            assert!(text.contains(&format!("data: n{i}\n")), "stream {k} missed n{i}");
        }
    }
    // The slow stream was reset (after what it had buffered), the connection was not.
    let reason = loop {
        match timeout_at(deadline(), slow.data()).await.expect("the slow stream ends in time") {
            Some(Ok(_)) => {}
            Some(Err(e)) => break e.reason(),
            None => panic!("the slow stream ended cleanly instead of being reset"),
        }
    };
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    assert!(!conn.is_finished(), "the whole connection was closed");
    let _fourth = h2_get(&mut client, app.http, "/v1/events?user=ok3").await;
}

#[tokio::test]
async fn when_too_many_connections_are_pending_a_new_one_waits_until_the_one_silent_longest_can_be_evicted() {
    let app = spawn_app(&["--max-pending-connections", "4", "--header-read-timeout", "30s"]).await;
    // Four silent sockets fill the pending places (accepted in the order they connected).
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push((connect(app.http, b"").await, Instant::now()));
    }
    // A client that sends its request at once still gets in: it waits in the kernel's backlog
    // until the oldest silent socket has been silent long enough (2 s), which is then closed.
    let mut served = Vec::new();
    for k in 0..2 {
        let c = crate::helpers::SseClient::connect(app.http, &format!("/v1/events?user=u{k}"), &[]).await;
        assert_eq!(c.status, 200, "client {k} was refused");
        let admitted = Instant::now();
        served.push(c);
        let (oldest, since) = silent.remove(0);
        closed_by_server(oldest, "the oldest silent socket").await;
        assert!(admitted - since >= Duration::from_millis(1500), "a socket silent for less than 2 s is not evicted");
        let mut b = [0u8; 1];
        let early = timeout_at(Instant::now() + Duration::from_millis(100), silent[0].0.read(&mut b)).await;
        assert!(early.is_err(), "only the oldest is evicted");
        // The flood goes on: the pending places are full again.
        silent.push((connect(app.http, b"").await, Instant::now()));
    }
    let metrics = http_request(app.admin, "GET", "/metrics", &[]).await.2;
    assert!(
        metrics.lines().any(|l| l.contains("reason=\"pending_connections\"") && l.ends_with(" 2.0")),
        "each eviction is counted: {metrics}"
    );
}

#[tokio::test]
async fn health_watchers_and_silent_sockets_cannot_lock_publishers_out_of_the_grpc_port() {
    use ssegate::grpc::pb::{PublishRequest, publisher_client::PublisherClient};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    // 512 descriptors: the gRPC port may hold 64 sockets, 32 of them strangers'.
    let (_child, [_, grpc, _]) = spawn_with_nofile(512, &["--header-read-timeout", "60s"]).await;
    let url = format!("http://{grpc}");
    let publish = |mut client: PublisherClient<tonic::transport::Channel>| async move {
        let req = PublishRequest {
            user_ids: vec!["a".into()],
            event: Some(crate::helpers::ev("m", "x")),
            ..Default::default()
        };
        timeout_at(deadline(), client.publish(req)).await.expect("publish in time").expect("publish succeeds");
        client
    };
    // A publisher connected before the flood: authenticated, so never evicted.
    let before = publish(PublisherClient::connect(url.clone()).await.expect("connects")).await;
    // 36 health watches (no credential needed), each on its own connection, and 40 silent sockets.
    let mut watches = Vec::new();
    for _ in 0..36 {
        let Ok(Ok(channel)) = timeout_at(
            Instant::now() + Duration::from_secs(1),
            tonic::transport::Endpoint::from(url.parse::<http::Uri>().unwrap()).connect(),
        )
        .await
        else {
            continue; // the port is busy with strangers: this one waits in the backlog
        };
        let mut health = HealthClient::new(channel);
        if let Ok(Ok(stream)) = timeout_at(
            Instant::now() + Duration::from_secs(1),
            health.watch(HealthCheckRequest { service: String::new() }),
        )
        .await
        {
            watches.push((health, stream.into_inner()));
        }
    }
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(grpc).await.unwrap());
    }
    assert!(watches.len() >= 32, "the strangers' share was filled: {} watches", watches.len());
    // Both the old publisher and a new one publish.
    publish(before).await;
    let fresh = timeout_at(deadline(), PublisherClient::connect(url.clone()))
        .await
        .expect("in time")
        .expect("a new publisher connects");
    publish(fresh).await;
    drop((watches, silent));
}

#[tokio::test]
async fn sockets_that_never_read_their_answers_cannot_take_the_probes_down() {
    // 512 descriptors: the admin port may hold 16 sockets.
    let (_child, [_, _, admin]) = spawn_with_nofile(512, &[]).await;
    let mut stuck = Vec::new();
    for _ in 0..40 {
        // Pipelined scrapes, never read: each socket keeps a response in flight.
        let mut s = TcpStream::connect(admin).await.unwrap();
        let mut reqs = Vec::new();
        for _ in 0..64 {
            reqs.extend_from_slice(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
        }
        let _ = timeout_at(Instant::now() + Duration::from_millis(200), s.write_all(&reqs)).await;
        stuck.push(s);
    }
    for path in ["/healthz", "/readyz"] {
        let (status, _, body) =
            timeout_at(deadline(), http_request(admin, "GET", path, &[])).await.expect("a probe is answered in time");
        assert_eq!(status, 200, "{path}: {body}");
    }
    drop(stuck);
}

/// The real binary with at most `nofile` descriptors, and its HTTP, gRPC and admin ports.
async fn spawn_with_nofile(nofile: u32, extra: &[&str]) -> (tokio::process::Child, [SocketAddr; 3]) {
    use tokio::io::AsyncBufReadExt;
    let script = format!("ulimit -n {nofile} && exec \"$0\" \"$@\"");
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_ssegate")])
        .args(["serve", "--insecure-dev-identity", "--insecure-open-publish", "--log-format", "json"])
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addrs = loop {
        let line = timeout_at(deadline(), lines.next_line()).await.expect("startup").unwrap().expect("a log line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "ssegate serving" {
            let a = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
            break [a("http"), a("grpc"), a("admin")];
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addrs)
}

#[tokio::test]
async fn a_flood_of_silent_sockets_on_the_http_port_cannot_starve_publishing_or_probes() {
    // 512 descriptors: the HTTP port may hold 384 sockets, more than the flood can ever reach.
    let (_child, [http, grpc, admin]) =
        spawn_with_nofile(512, &["--header-read-timeout", "60s", "--max-pending-connections", "10000"]).await;
    let mut flood = Vec::new();
    for _ in 0..600 {
        flood.push(TcpStream::connect(http).await.unwrap());
    }
    // Wait until the server has accepted what it will: its last ones are closed at once.
    let mut probe = connect(http, b"").await;
    let mut buf = [0u8; 8];
    let end = deadline();
    loop {
        match timeout_at(Instant::now() + Duration::from_millis(300), probe.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            _ => {
                assert!(Instant::now() < end, "the HTTP port never hit its descriptor budget");
                probe = connect(http, b"").await;
            }
        }
    }
    let (status, _, body) = http_request(admin, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let mut client = ssegate::grpc::pb::publisher_client::PublisherClient::connect(format!("http://{grpc}"))
        .await
        .expect("the gRPC port accepts");
    let req = ssegate::grpc::pb::PublishRequest {
        user_ids: vec!["a".into()],
        event: Some(crate::helpers::ev("m", "x")),
        ..Default::default()
    };
    timeout_at(deadline(), client.publish(req)).await.expect("publish in time").expect("publish succeeds");
    drop(flood);
}
