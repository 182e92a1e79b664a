//! Test harness: the real server on port 0, a tonic client, and a raw HTTP/1.1 SSE client
//! that decodes chunked transfer encoding itself and parses events as a browser would.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use ssegate::{
    config::{Cli, Command},
    event_stream::{
        POSITION,
        parse::{Item, ParsedEvent, Parser as SseParser},
    },
    grpc::pb::{self, publisher_client::PublisherClient},
    startup::Application,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
    time::{Instant, timeout_at},
};
use tonic::transport::Channel;

/// How long any single expectation may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

pub struct TestApp {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub client: PublisherClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Starts the real server on 127.0.0.1 with ephemeral ports, in the development identity
/// mode (`?user=` believed, open publishing); `extra` are more `serve` flags.
pub async fn spawn_app(extra: &[&str]) -> TestApp {
    let mut flags = vec!["--insecure-dev-identity", "--insecure-open-publish"];
    flags.extend_from_slice(extra);
    spawn_app_with(&flags).await
}

/// Starts the real server with only these flags besides the addresses (no insecure modes).
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = ssegate::telemetry::init(ssegate::config::LogFormat::Pretty);
    }
    let mut argv = vec![
        "ssegate",
        "serve",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("valid flags").command else { unreachable!() };
    let app = Application::build(*args).await.expect("server builds");
    let http = app.http_addr().unwrap();
    let grpc = app.grpc_addr().unwrap();
    let admin = app.admin_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    let client = if extra.contains(&"--tls-cert-file") {
        // TLS on: trust the test CA, and present the test client certificate if asked for.
        let mtls = extra.contains(&"--grpc-client-ca-file");
        tls_client(grpc, mtls.then_some("client")).await.expect("grpc connects over TLS")
    } else {
        PublisherClient::connect(format!("http://{grpc}")).await.expect("grpc connects")
    };
    TestApp { http, grpc, admin, client, stop: Some(tx), handle: Some(handle) }
}

impl TestApp {
    /// Opens `GET /v1/events?{query}` and asserts a 200 event stream.
    pub async fn subscribe(&self, query: &str) -> SseClient {
        let c = SseClient::connect(self.http, &format!("/v1/events?{query}"), &[]).await;
        assert_eq!(c.status, 200, "subscribe {query}: {:?}", c.head);
        c
    }

    /// Opens `GET /v1/events?{query}` with a `Last-Event-ID` header and asserts a 200 stream.
    pub async fn resume(&self, query: &str, last_event_id: &str) -> SseClient {
        let c =
            SseClient::connect(self.http, &format!("/v1/events?{query}"), &[("Last-Event-ID", last_event_id)]).await;
        assert_eq!(c.status, 200, "resume {query}: {:?}", c.head);
        c
    }

    /// Waits until `user` has exactly `n` open connections.
    pub async fn wait_connections(&self, user: &str, n: u64) {
        let end = deadline();
        loop {
            let req = pb::PresenceRequest { user_ids: vec![user.into()], ..Default::default() };
            let got = self.client.clone().presence(req).await.expect("presence").into_inner().users[0].connections;
            if got == n {
                return;
            }
            assert!(Instant::now() < end, "timed out waiting for {user} to have {n} connections (has {got})");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts stopping the server, as SIGTERM would, without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server (as SIGTERM would) and waits for it to finish.
    pub async fn stop(&mut self) {
        self.begin_stop();
        if let Some(h) = self.handle.take() {
            timeout_at(deadline(), h).await.expect("server stops in time").expect("server task");
        }
    }

    pub async fn publish_users(&self, users: &[&str], name: &str, data: &str) -> pb::PublishResponse {
        let req = pb::PublishRequest {
            user_ids: users.iter().map(|s| s.to_string()).collect(),
            event: Some(ev(name, data)),
            ..Default::default()
        };
        self.client.clone().publish(req).await.expect("publish").into_inner()
    }

    pub async fn publish_group(&self, group: &str, data: &str) -> pb::PublishResponse {
        let req = pb::PublishGroupRequest { group: group.into(), event: Some(ev("", data)), ..Default::default() };
        self.client.clone().publish_group(req).await.expect("publish_group").into_inner()
    }

    pub async fn publish_topic(&self, topic: &str, data: &str) -> pb::PublishResponse {
        let req = pb::PublishTopicRequest { topic: topic.into(), event: Some(ev("", data)), ..Default::default() };
        self.client.clone().publish_topic(req).await.expect("publish_topic").into_inner()
    }

    pub async fn broadcast(&self, data: &str) -> pb::PublishResponse {
        let req = pb::BroadcastRequest { event: Some(ev("", data)), ..Default::default() };
        self.client.clone().broadcast(req).await.expect("broadcast").into_inner()
    }

    pub async fn stats(&self) -> pb::StatsResponse {
        self.client.clone().stats(pb::StatsRequest {}).await.expect("stats").into_inner()
    }

    /// Polls Stats until `cond` holds, failing at the deadline.
    pub async fn wait_stats(&self, what: &str, cond: impl Fn(&pb::StatsResponse) -> bool) -> pb::StatsResponse {
        let end = deadline();
        loop {
            let s = self.stats().await;
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}; last stats: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The path of a TEST-ONLY TLS fixture.
pub fn tls_fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A gRPC client over TLS to `addr` (as `localhost`), trusting the test CA, presenting the
/// client certificate `client` (a fixture name without extension) if given.
pub async fn tls_client(
    addr: SocketAddr,
    client: Option<&str>,
) -> Result<PublisherClient<Channel>, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let ca = std::fs::read(tls_fixture("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(name) = client {
        let cert = std::fs::read(tls_fixture(&format!("{name}.pem"))).unwrap();
        let key = std::fs::read(tls_fixture(&format!("{name}.key"))).unwrap();
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls)?.connect().await?;
    Ok(PublisherClient::new(channel))
}

pub fn ev(name: &str, data: &str) -> pb::Event {
    pb::Event { name: name.into(), data: data.into() }
}

/// A raw HTTP/1.1 client reading an event stream.
pub struct SseClient {
    pub status: u16,
    /// The status line and headers, lower-cased names.
    pub head: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    chunked: bool,
    parser: SseParser,
    items: std::collections::VecDeque<Item>,
    /// The body ended (terminating chunk or EOF).
    pub ended: bool,
    /// The id of the last event `next_item` returned.
    taken_id: String,
    /// The id of the last `ssegate.position` event read (the cursor that opens every stream),
    /// which is kept here rather than among the items, as a client does that handles it.
    pub position: Option<String>,
}

impl SseClient {
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let stream = send_request(addr, "GET", path, &all).await;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        timeout_at(deadline(), reader.read_line(&mut line)).await.expect("status line in time").expect("read");
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut head = Vec::new();
        loop {
            line.clear();
            timeout_at(deadline(), reader.read_line(&mut line)).await.expect("headers in time").expect("read");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header line");
            head.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let chunked = head.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        SseClient {
            status,
            head,
            reader,
            chunked,
            parser: SseParser::new(),
            items: Default::default(),
            ended: false,
            taken_id: String::new(),
            position: None,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Reads the next piece of body (one chunk) and feeds the parser; false at the end.
    async fn read_more(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let mut data = Vec::new();
        if self.chunked {
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line).await.unwrap_or(0) == 0 {
                self.ended = true;
                return false;
            }
            let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size");
            if size == 0 {
                self.ended = true;
                return false;
            }
            data.resize(size + 2, 0);
            if self.reader.read_exact(&mut data).await.is_err() {
                self.ended = true;
                return false;
            }
            assert_eq!(&data[size..], b"\r\n", "chunk ends with CRLF");
            data.truncate(size);
        } else {
            let mut buf = [0u8; 8192];
            match self.reader.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    self.ended = true;
                    return false;
                }
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let mut out = Vec::new();
        self.parser.feed(&data, &mut out);
        for item in out {
            match item {
                Item::Event(e) if e.event_type == POSITION => {
                    assert_eq!(e.data, e.last_event_id, "the position's data is its id");
                    self.position = Some(e.last_event_id);
                }
                item => self.items.push_back(item),
            }
        }
        true
    }

    /// What a browser that handled every event returned so far would send as `Last-Event-ID`:
    /// the id of the last event taken, or the stream's id if nothing parsed is left unread.
    pub fn last_event_id(&self) -> String {
        if self.items.is_empty() { self.parser.last_event_id().to_owned() } else { self.taken_id.clone() }
    }

    /// Reads until the stream has told its position (the `ssegate.position` event that opens
    /// every stream, after its replayed, missed or retained events), keeping the other items
    /// read on the way; returns its id (the last one, if more than one arrived).
    pub async fn cursor(&mut self) -> String {
        let end = deadline();
        while self.position.is_none() {
            let more = timeout_at(end, self.read_more()).await.expect("cursor within the deadline");
            assert!(more, "stream ended before its opening position");
        }
        self.position.clone().unwrap_or_default()
    }

    /// The next item (event, retry or comment), or `None` if the stream ended first.
    pub async fn next_item(&mut self) -> Option<Item> {
        let end = deadline();
        loop {
            if let Some(item) = self.items.pop_front() {
                if let Item::Event(e) = &item {
                    self.taken_id.clone_from(&e.last_event_id);
                }
                return Some(item);
            }
            let more = timeout_at(end, self.read_more()).await.expect("stream item within the deadline");
            if !more {
                return None;
            }
        }
    }

    /// The next event, skipping comments and `retry:` fields; panics if the stream ends.
    pub async fn next_event(&mut self) -> ParsedEvent {
        self.next_event_or_end().await.expect("stream ended while an event was expected")
    }

    /// The next event, skipping comments and `retry:` fields; `None` if the stream ends.
    pub async fn next_event_or_end(&mut self) -> Option<ParsedEvent> {
        loop {
            match self.next_item().await? {
                Item::Event(e) => return Some(e),
                _ => continue,
            }
        }
    }

    /// The data of the next `n` events.
    pub async fn next_data(&mut self, n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.next_event().await.data);
        }
        v
    }

    /// Reads until the stream ends, returning every item seen on the way.
    pub async fn until_end(&mut self) -> Vec<Item> {
        let mut seen = Vec::new();
        while let Some(item) = self.next_item().await {
            seen.push(item);
        }
        seen
    }
}

/// Sends one raw HTTP/1.1 request and returns (status, lower-cased headers, body text).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut all = vec![("Connection", "close")];
    all.extend_from_slice(headers);
    let mut stream = send_request(addr, method, path, &all).await;
    let mut raw = Vec::new();
    timeout_at(deadline(), stream.read_to_end(&mut raw)).await.expect("response in time").expect("read");
    parse_response(&raw)
}

/// Sends one HTTP/1.1 request with a body (`Content-Length` set) and reads the whole answer:
/// (status, lower-cased headers, body). Fails if the server closes without answering.
pub async fn http_request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    timeout_at(deadline(), tcp.read_to_end(&mut raw)).await.expect("answer in time").expect("read");
    assert!(!raw.is_empty(), "{method} {path}: the server closed the connection without an answer");
    parse_response(&raw)
}

/// A whole HTTP/1.1 response read to its end: status, lower-cased headers, body as text.
pub fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("incomplete response: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// Connects and writes one HTTP/1.1 request head.
async fn send_request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("send request");
    stream
}

/// The real `ssegate` binary serving on 127.0.0.1 ephemeral ports, with JSON logs.
pub struct Process {
    pub child: tokio::process::Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// Log lines after the startup line, until the process exits.
    logs: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// `ssegate serve` on loopback port 0 (all three ports), run by `wrapper` (a program and its
/// arguments, given the binary and its arguments after them; none if empty), stdin and stdout
/// closed, stderr piped, killed when dropped: add the identity, log and other flags.
pub fn serve_command(wrapper: &[&str]) -> tokio::process::Command {
    let binary = env!("CARGO_BIN_EXE_ssegate");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(rest).arg(binary);
            c
        }
        None => tokio::process::Command::new(binary),
    };
    command
        .args(["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Starts `ssegate serve` (development identity and open publishing) with `extra` flags and
/// environment variables, and waits for its "serving" line to learn its ports.
pub async fn spawn_process(extra: &[&str], env: &[(&str, &str)]) -> Process {
    spawn_process_under(&[], extra, env).await
}

/// `spawn_process`, run by `wrapper` (a program and its arguments, given the ssegate binary
/// and its arguments after them: e.g. `prlimit --fsize=N --`); directly if it is empty.
pub async fn spawn_process_under(wrapper: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Process {
    let mut child = serve_command(wrapper)
        .args(["--insecure-dev-identity", "--insecure-open-publish", "--log-format", "json"])
        .args(extra)
        .envs(env.iter().copied())
        .spawn()
        .expect("the ssegate binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (http, grpc, admin) = loop {
        let line = timeout_at(deadline(), lines.next_line()).await.expect("startup log").unwrap().expect("a log line");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { panic!("not a JSON log line: {line}") };
        if v["message"] == "ssegate serving" {
            let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
            break (addr("http"), addr("grpc"), addr("admin"));
        }
    };
    let (tx, logs) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    Process { child, http, grpc, admin, logs }
}

impl Process {
    /// Every log line written after startup, once the process has exited.
    pub async fn rest_of_logs(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(line) = self.logs.recv().await {
            all.push(line);
        }
        all
    }
}

/// The delay of the `ssegate.shutdown` event that must end a drained stream (its `retry:`
/// field, the item just before it, and its data say the same).
pub fn shutdown_retry(items: &[Item]) -> u64 {
    match items {
        [.., Item::Retry(ms), Item::Event(e)] if e.event_type == "ssegate.shutdown" => {
            assert_eq!(e.data, format!("{{\"retry_ms\":{ms}}}"), "its data carries the same delay");
            *ms
        }
        other => panic!("the stream must end with an ssegate.shutdown event carrying retry: {:?}", other.last()),
    }
}
