//! The volume-loss fault's own check that the cluster works again after the broker came back
//! with an empty store, on every replica: one SSE stream per replica for a probe user (not a
//! chaos client, so the ledger is untouched), one publish to that user retried until
//! acknowledged, and how long each replica's stream took to deliver it. A stream that ends
//! meanwhile is reopened with its `Last-Event-ID`, as a browser would.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ssegate::grpc::pb;
use tokio::{io::AsyncReadExt, time::Instant};

use super::{
    client,
    layout::Pos,
    publisher::{self, Shared},
    sse::{Item, Scanner},
};

const PROBE_USER: &str = "chaos-probe";
const PATH: &str = "/v1/events?user=chaos-probe";
const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Debug, Default)]
pub struct ProbeOutcome {
    /// The probe's event id, and how long after the start it was acknowledged.
    pub acked: Option<(Pos, Duration)>,
    pub attempts: u32,
    pub last_error: String,
    /// Per replica: how long after the acknowledgement its stream delivered the probe.
    pub delivered: Vec<Option<Duration>>,
    /// Per replica: what went wrong with its stream, if anything.
    pub stream_errors: Vec<String>,
}

/// Opens the streams, publishes until acknowledged (by `publish_by`), and waits for every
/// stream to deliver it (until `deliver_within` after the acknowledgement).
pub async fn run(
    shared: Arc<Shared>,
    replicas: Vec<SocketAddr>,
    publish_by: Instant,
    deliver_within: Duration,
) -> ProbeOutcome {
    let start = Instant::now();
    let data = format!("chaos-probe {}", crate::plan::now_ns());
    let mut out = ProbeOutcome {
        delivered: vec![None; replicas.len()],
        stream_errors: vec![String::new(); replicas.len()],
        ..ProbeOutcome::default()
    };
    // Every stream is registered before the publish, so each must get it live or by resuming.
    let mut streams = Vec::new();
    for (i, addr) in replicas.iter().enumerate() {
        let mut opened = client::open(*addr, SOURCE, PATH, None).await;
        while opened.is_err() && Instant::now() < publish_by {
            tokio::time::sleep(Duration::from_millis(200)).await;
            opened = client::open(*addr, SOURCE, PATH, None).await;
        }
        match opened {
            Ok(s) => streams.push(Some(s)),
            Err(e) => {
                out.stream_errors[i] = format!("could not open: {e}");
                streams.push(None);
            }
        }
    }
    let (tx, rx) = tokio::sync::watch::channel(None::<Instant>);
    let mut readers = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let (addr, data, mut rx) = (replicas[i], data.clone(), rx.clone());
        readers.push(tokio::spawn(async move {
            let Some(s) = s else { return Err(String::new()) };
            // The deadline is known once the probe is acknowledged; until then, `publish_by`.
            let until = |rx: &tokio::sync::watch::Receiver<Option<Instant>>| {
                rx.borrow().map_or(publish_by, |acked| acked + deliver_within)
            };
            let mut deadline = until(&rx);
            let read = read_until(addr, s, &data, &mut rx, &mut deadline, until);
            read.await
        }));
    }
    drop(rx);
    while Instant::now() < publish_by {
        out.attempts += 1;
        let mut c = shared.clients[(out.attempts as usize) % shared.clients.len()].clone();
        let req = pb::PublishRequest {
            retain: None,
            user_ids: vec![PROBE_USER.into()],
            event: Some(pb::Event { data: data.clone(), ..Default::default() }),
            idempotency_key: data.replace(' ', "-"),
        };
        match tokio::time::timeout(Duration::from_secs(6), c.publish(req)).await {
            Ok(Ok(r)) => match Pos::parse(&r.get_ref().event_id) {
                Some(id) => {
                    out.acked = Some((id, start.elapsed()));
                    break;
                }
                None => out.last_error = format!("unreadable event id {:?}", r.get_ref().event_id),
            },
            Ok(Err(st)) => out.last_error = format!("{:?}: {}", st.code(), st.message()),
            Err(_) => out.last_error = "no answer within 6 s".into(),
        }
        tokio::time::sleep(publisher::backoff(out.attempts.min(3), u64::from(out.attempts))).await;
    }
    let acked_at = Instant::now();
    if out.acked.is_some() {
        let _ = tx.send(Some(acked_at));
    } else {
        // Nothing to wait for: the readers end when the sender goes.
        drop(tx);
    }
    for (i, r) in readers.into_iter().enumerate() {
        match r.await {
            Ok(Ok(at)) => out.delivered[i] = Some(at.saturating_duration_since(acked_at)),
            Ok(Err(e)) if out.stream_errors[i].is_empty() => out.stream_errors[i] = e,
            Ok(Err(_)) => {}
            Err(e) => out.stream_errors[i] = format!("reader failed: {e}"),
        }
    }
    out
}

/// Reads the stream until an event with `data` arrives (its receipt time), reopening it with
/// its last event id if it ends, until the deadline (which moves once the probe is acked).
async fn read_until(
    addr: SocketAddr,
    opened: (tokio::net::TcpStream, crate::sse::BodyDecoder, Vec<u8>),
    data: &str,
    rx: &mut tokio::sync::watch::Receiver<Option<Instant>>,
    deadline: &mut Instant,
    until: impl Fn(&tokio::sync::watch::Receiver<Option<Instant>>) -> Instant,
) -> Result<Instant, String> {
    let (mut stream, mut body, mut pending) = opened;
    let mut scanner = Scanner::default();
    let mut last_id: Option<String> = None;
    let mut buf = vec![0u8; 4096];
    let mut last_error = String::new();
    loop {
        let mut found = false;
        let ended = body
            .feed(&pending, &mut |b| {
                scanner.feed(b, &mut |item| {
                    if let Item::Event { data: d, .. } = item {
                        found |= d == data.as_bytes();
                    }
                })
            })
            .unwrap_or(true);
        if found {
            return Ok(Instant::now());
        }
        if let Ok(id) = std::str::from_utf8(scanner.last_id())
            && !id.is_empty()
        {
            last_id = Some(id.to_string());
        }
        let read = if ended {
            Ok(0)
        } else {
            tokio::select! {
                r = stream.read(&mut buf) => r.map_err(|e| e.to_string()),
                () = tokio::time::sleep_until(*deadline) => return Err(format!("not delivered in time{last_error}")),
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err("the probe was never acknowledged".into());
                    }
                    *deadline = until(rx);
                    pending.clear();
                    continue;
                }
            }
        };
        match read {
            Ok(n) if n > 0 => pending = buf[..n].to_vec(),
            Ok(_) | Err(_) => {
                // The stream ended: reopen it where it stopped (bounded by the deadline).
                last_error = "; its stream ended at least once".into();
                let reopened = loop {
                    if Instant::now() >= *deadline {
                        return Err(format!("not delivered in time{last_error}"));
                    }
                    match client::open(addr, SOURCE, PATH, last_id.as_deref()).await {
                        Ok(s) => break s,
                        Err(e) => {
                            last_error = format!("; reopening failed: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                (stream, body, pending) = reopened;
                scanner = Scanner::default();
            }
        }
    }
}
