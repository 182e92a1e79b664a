//! The per-address connection count (`--max-connections-per-ip`) and the 429 it answers.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Open TCP connections per peer IP address.
#[derive(Default)]
pub(super) struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// Holds one connection's place in `PerIp`; gives it back when dropped.
pub(super) struct IpSlot(Arc<PerIp>, IpAddr);

impl PerIp {
    pub(super) fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

const TOO_MANY_FROM_IP: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\n\
x-content-type-options: nosniff\r\nretry-after: 5\r\nconnection: close\r\ncontent-length: 52\r\n\r\n\
too many connections from this address; retry later\n";

/// Answers 429 to a connection over the per-address limit. In a task: a client that does not
/// read must not stall the accept loop. Then half-closes and drains what it sent, so the close
/// is a FIN the client can read the answer before, not a reset that discards it.
pub(super) async fn refuse(mut stream: tokio::net::TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(TOO_MANY_FROM_IP).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
