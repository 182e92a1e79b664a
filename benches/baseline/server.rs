//! The baseline peer for `ssegate-bench`: the smallest reasonable axum SSE server, one
//! `tokio::sync::broadcast` channel per channel name, nothing else. What ssegate's routing,
//! bounded mailboxes, ids and replay log cost is the difference between the two.
//!
//! `GET /sub/<channel>` (SSE, axum's `Sse` with a keep-alive comment) and
//! `POST /pub/<channel>` (the body is the event data). Same paths as Nchan's, so the bench
//! client talks to both the same way. A subscriber that lags past `--capacity` skips events
//! (tokio's broadcast semantics); the bench counts those as lost.
//!
//! With `--bare` it is the floor instead: a tokio task per socket that answers any request
//! with an SSE head and then only waits for the client to leave (no HTTP library, no state),
//! the reference for idle memory per connection.
//!
//! Run: `cargo run --release --example bench-baseline -- --addr 127.0.0.1:8091`

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::sse::{Event, KeepAlive, Sse},
    routing::{get, post},
};
use clap::Parser;
use futures_util::Stream;
use tokio::sync::broadcast;

#[derive(Parser, Debug)]
struct Args {
    /// Address to serve on; loopback only (this is a benchmark peer, not a service).
    #[arg(long, default_value = "127.0.0.1:8091")]
    addr: SocketAddr,
    /// Events a subscriber may fall behind before it skips (broadcast channel capacity; the
    /// same default as ssegate's `--queue-capacity`).
    #[arg(long, default_value_t = 256)]
    capacity: usize,
    /// Keep-alive comment interval on idle streams.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Serve every connection with a bare task (idle reference; publishing is not supported).
    #[arg(long)]
    bare: bool,
}

/// The bare floor: one task per socket that reads the request, answers with an SSE head and a
/// comment, then waits (reading 16 bytes at a time) until the client leaves.
async fn serve_bare(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n:\n\n";
    loop {
        let (mut socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut probe = [0u8; 16];
            // The request head: anything up to the first read is enough for the bench client.
            if socket.read(&mut probe).await.unwrap_or(0) == 0 || socket.write_all(HEAD).await.is_err() {
                return;
            }
            while socket.read(&mut probe).await.unwrap_or(0) > 0 {}
        });
    }
}

#[derive(Clone)]
struct Channels {
    map: Arc<Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>>,
    capacity: usize,
    heartbeat: Duration,
}

impl Channels {
    fn sender(&self, name: String) -> broadcast::Sender<Arc<str>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name).or_insert_with(|| broadcast::channel(self.capacity).0).clone()
    }
}

async fn subscribe(
    State(ch): State<Channels>,
    Path(name): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = ch.sender(name).subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(data) => return Some((Ok(Event::default().data(&*data)), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(ch.heartbeat).text(""))
}

async fn publish(State(ch): State<Channels>, Path(name): Path<String>, body: Bytes) -> (StatusCode, String) {
    let Ok(data) = String::from_utf8(body.to_vec()) else {
        return (StatusCode::BAD_REQUEST, "body must be UTF-8\n".into());
    };
    // No subscriber is not an error: the event just reaches nobody.
    let receivers = ch.sender(name).send(Arc::from(data)).unwrap_or(0);
    (StatusCode::OK, format!("{receivers}\n"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", args.addr).into());
    }
    let channels = Channels { map: Arc::default(), capacity: args.capacity, heartbeat: args.heartbeat };
    let app =
        Router::new().route("/sub/{name}", get(subscribe)).route("/pub/{name}", post(publish)).with_state(channels);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    eprintln!("bench-baseline listening on {}", listener.local_addr()?);
    if args.bare {
        serve_bare(listener).await?;
        return Ok(());
    }
    axum::serve(listener, app).await?;
    Ok(())
}
