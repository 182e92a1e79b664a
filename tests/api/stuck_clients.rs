//! Clients that ask and never take the answer (`--send-timeout`): pipelined requests whose
//! responses are never read, HTTP/2 streams granted no flow-control window. Their connections
//! are closed after the send timeout, on every port and during shutdown; admitted event streams
//! are exempt (their bound is the queue's), and a quiet stream is not "stuck".

use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::{Instant, timeout_at},
};

use crate::helpers::{DEADLINE, deadline, http_request, spawn_app, spawn_process};

/// Connects with a 4 KiB receive buffer (set before the handshake, so the window stays small).
/// The server's own send buffer still grows to ~2.5 MB on loopback before its writes block.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// `n` copies of a GET of `path`, to send at once (HTTP/1.1 pipelining).
fn pipelined(addr: SocketAddr, path: &str, n: usize) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(n).into_bytes()
}

/// Whether the server has closed `s`, found without reading (reading would make room, i.e.
/// progress): `probe` (one more pipelined request, which a live server just queues) is written,
/// and a closed socket answers it with a reset, which shows as the socket's error.
fn closed_unread(s: &TcpStream, probe: &[u8]) -> bool {
    if !matches!(s.take_error(), Ok(None)) {
        return true;
    }
    matches!(s.try_write(probe), Err(e) if e.kind() != io::ErrorKind::WouldBlock)
}

/// Watches `s` (on a task of its own) until the server has closed it (see `closed_unread`):
/// the task ends with how long after `since` that was seen, or `None` if still open at `end`.
fn watch_closed(s: TcpStream, probe: Vec<u8>, since: Instant, end: Instant) -> JoinHandle<Option<Duration>> {
    tokio::spawn(async move {
        while Instant::now() < end {
            if closed_unread(&s, &probe) {
                return Some(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    })
}

/// What each `watch_closed` task saw; panics if one was still open at its deadline.
async fn all_closed(watches: Vec<JoinHandle<Option<Duration>>>, what: &str) -> Vec<Duration> {
    let mut closed = Vec::new();
    for w in watches {
        closed.push(w.await.unwrap());
    }
    let open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{what}: {open} of {} sockets still open at the deadline", closed.len());
    closed.into_iter().flatten().collect()
}

/// An h2c connection whose streams get no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0)
/// unless `window`, and the task driving it, which ends when the server closes the connection.
async fn h2_client(
    addr: SocketAddr,
    window: u32,
) -> (h2::client::SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) =
        h2::client::Builder::new().initial_window_size(window).handshake::<_, Bytes>(tcp).await.unwrap();
    (client, tokio::spawn(conn))
}

/// Sends a GET of `path` and waits for the response head (HEADERS need no window), 200.
async fn h2_get(client: &h2::client::SendRequest<Bytes>, addr: SocketAddr, path: &str) -> h2::RecvStream {
    let req = http::Request::get(format!("http://{addr}{path}")).body(()).unwrap();
    let (resp, _) = client.clone().ready().await.unwrap().send_request(req, true).unwrap();
    let resp = timeout_at(deadline(), resp).await.expect("response head in time").unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.into_body()
}

/// An h2c connection with a `/v1/client.js` request it grants no window: stuck from `since`.
async fn stuck_h2(addr: SocketAddr) -> (Instant, JoinHandle<Result<(), h2::Error>>, h2::RecvStream) {
    let since = Instant::now();
    let (client, conn) = h2_client(addr, 0).await;
    let body = h2_get(&client, addr, "/v1/client.js").await;
    (since, conn, body)
}

/// Waits until the server closes the connection `conn` drives; how long after `since`.
async fn h2_closed(since: Instant, conn: JoinHandle<Result<(), h2::Error>>, what: &str) -> Duration {
    let _ = timeout_at(deadline(), conn).await.unwrap_or_else(|_| panic!("{what}: still open at the deadline"));
    since.elapsed()
}

// Multi-threaded: rendering ~23,000 scrapes (debug build) until every socket blocks takes
// seconds of CPU, which the watchers must not wait behind.
#[tokio::test(flavor = "multi_thread")]
async fn admin_sockets_that_pipeline_scrapes_and_never_read_are_closed_after_the_send_timeout() {
    let app = spawn_app(&["--send-timeout", "1s"]).await;
    // The admin port's socket budget in this process (64 with enough descriptors).
    let budget = ssegate::net::Budget::for_process().admin;
    // Answers of ~8 KB: 400 are more than the kernel buffers for a loopback socket that is not
    // read (~2.5 MB), so the server's writes block. (Fewer would all be buffered, and the
    // connection would then be idle, not stuck: the idle timeout's case.)
    let scrapes = pipelined(app.admin, "/metrics", 400);
    // Generous: until every socket's writes block, the server is rendering ~300 answers for
    // each (tens of thousands in a debug build), which takes a loaded 2-core machine a while.
    let end = Instant::now() + 4 * DEADLINE;
    let mut watches = Vec::new();
    for _ in 0..70 {
        let since = Instant::now();
        let mut s = small_window(app.admin).await;
        // Beyond the budget a socket may be closed (or close another) at once: ignore errors.
        let _ = timeout_at(Instant::now() + Duration::from_millis(200), s.write_all(&scrapes)).await;
        watches.push(watch_closed(s, pipelined(app.admin, "/metrics", 1), since, end));
    }
    let closed = all_closed(watches, "stuck scrapers").await;
    // Only those over the budget go at once; every other waits out its send timeout first.
    let early = closed.iter().filter(|d| **d < Duration::from_millis(900)).count();
    assert!(early <= 70usize.saturating_sub(budget), "{early} closed before the send timeout: {closed:?}");
    for path in ["/healthz", "/readyz"] {
        let (status, _, body) = http_request(app.admin, "GET", path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test]
async fn pipelined_requests_never_read_on_the_public_port_are_closed_after_the_send_timeout() {
    let app = spawn_app(&["--send-timeout", "1s"]).await;
    let end = deadline();
    let mut watches = Vec::new();
    for _ in 0..4 {
        let since = Instant::now();
        let mut s = small_window(app.http).await;
        // 1,000 answers of ~9 KB: far more than the kernel buffers (~2.5 MB).
        let _ = timeout_at(
            Instant::now() + Duration::from_millis(500),
            s.write_all(&pipelined(app.http, "/v1/client.js", 1000)),
        )
        .await;
        watches.push(watch_closed(s, pipelined(app.http, "/v1/client.js", 1), since, end));
    }
    for after in all_closed(watches, "stuck readers").await {
        assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the send timeout");
    }
    // A well-behaved client is served meanwhile and after.
    let (status, _, _) = http_request(app.http, "GET", "/v1/client.js", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn h2_requests_granted_no_window_are_closed_after_the_send_timeout_but_event_streams_are_not() {
    let app = spawn_app(&["--send-timeout", "1s", "--heartbeat-interval", "1h", "--max-queue-bytes", "65536"]).await;
    // An event stream on a connection that grants it no window: nothing can be written to it.
    let (sse_client, sse_conn) = h2_client(app.http, 0).await;
    let mut sse = h2_get(&sse_client, app.http, "/v1/events?user=nowindow").await;
    // Connections asking for the script and granting no window: closed after the send timeout,
    // one after another, so the event stream has waited more than twice as long meanwhile.
    for round in 0..2 {
        let mut stuck = Vec::new();
        for _ in 0..3 {
            stuck.push(stuck_h2(app.http).await);
        }
        for (since, conn, _body) in stuck {
            let after = h2_closed(since, conn, "a stuck client.js request").await;
            assert!(after >= Duration::from_millis(900), "round {round}: closed after {after:?}, too early");
        }
    }
    assert!(!sse_conn.is_finished(), "the event stream's connection was closed by the send timeout");
    // Its bound is the queue's: overflowing it resets that stream (and only it).
    let big = "x".repeat(10_000);
    for _ in 0..10 {
        app.publish_users(&["nowindow"], "big", &big).await;
    }
    let reset = timeout_at(deadline(), sse.data()).await.expect("the stalled stream ends in time");
    match reset {
        Some(Err(e)) => assert_eq!(e.reason(), Some(h2::Reason::CANCEL)),
        other => panic!("expected the stream reset as a slow consumer, got {other:?}"),
    }
    assert!(!sse_conn.is_finished(), "the reset took the connection");
}

#[tokio::test]
async fn quiet_event_streams_outlive_the_send_timeout() {
    let app = spawn_app(&["--send-timeout", "1s", "--heartbeat-interval", "1h"]).await;
    // HTTP/1.1 fast path.
    let mut fast = app.subscribe("user=quiet1").await;
    fast.cursor().await;
    // HTTP/2, with a window.
    let (h2c, h2_conn) = h2_client(app.http, 65_535).await;
    let mut over_h2 = h2_get(&h2c, app.http, "/v1/events?user=quiet2").await;
    // HTTP/1.1 served by hyper: a keep-alive connection whose first request was the script.
    let mut keep_alive = TcpStream::connect(app.http).await.unwrap();
    keep_alive.write_all(&pipelined(app.http, "/v1/client.js", 1)).await.unwrap();
    let script = read_until(&mut keep_alive, "return new SsegateClient(url, options);\n}\n").await;
    assert!(script.starts_with("HTTP/1.1 200"), "{script:.200}");
    keep_alive.write_all(&pipelined(app.http, "/v1/events?user=quiet3", 1)).await.unwrap();
    read_until(&mut keep_alive, "text/event-stream").await;
    app.wait_connections("quiet1", 1).await;
    app.wait_connections("quiet2", 1).await;
    app.wait_connections("quiet3", 1).await;
    // The clock: stuck connections closed by the send timeout, twice in a row.
    for _ in 0..2 {
        let (since, conn, _body) = stuck_h2(app.http).await;
        h2_closed(since, conn, "a stuck client.js request").await;
    }
    // All three streams are still open, and deliver.
    app.publish_users(&["quiet1", "quiet2", "quiet3"], "m", "after-two-send-timeouts").await;
    assert_eq!(fast.next_event().await.data, "after-two-send-timeouts");
    let mut text = String::new();
    while !text.contains("after-two-send-timeouts") {
        let chunk = timeout_at(deadline(), over_h2.data()).await.expect("event in time").unwrap().unwrap();
        over_h2.flow_control().release_capacity(chunk.len()).unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    read_until(&mut keep_alive, "after-two-send-timeouts").await;
    assert!(!h2_conn.is_finished());
}

/// Reads from `s` until the text read contains `marker`; returns it all.
async fn read_until(s: &mut TcpStream, marker: &str) -> String {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&raw).contains(marker) {
        let n = timeout_at(deadline(), s.read(&mut buf)).await.expect("read in time").unwrap();
        assert!(n > 0, "closed before {marker:?}: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test]
async fn sigterm_does_not_wait_the_grace_for_clients_that_never_take_their_answers() {
    let mut server = spawn_process(&["--send-timeout", "3s", "--shutdown-grace", "60s"], &[]).await;
    let http = server.http;
    let mut h2_stuck = Vec::new();
    for _ in 0..3 {
        h2_stuck.push(stuck_h2(http).await);
    }
    let mut h1_stuck = small_window(http).await;
    // Far more answers than the kernel buffers: the server's writes block.
    let _ = timeout_at(
        Instant::now() + Duration::from_millis(500),
        h1_stuck.write_all(&pipelined(http, "/v1/client.js", 1000)),
    )
    .await;
    // Still held when the signal comes (the send timeout has not passed).
    assert!(h2_stuck.iter().all(|(_, conn, _)| !conn.is_finished()));
    assert!(!closed_unread(&h1_stuck, &pipelined(http, "/v1/client.js", 1)));

    let signalled = Instant::now();
    let pid = server.child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = timeout_at(deadline(), server.child.wait()).await.expect("exits well before the grace").unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "exited after {:?}", signalled.elapsed());
    let rest = server.rest_of_logs().await;
    assert!(!rest.iter().any(|l| l.contains("grace period over")), "the drain waited out the grace: {rest:#?}");
    drop((h2_stuck, h1_stuck));
}
