//! A minimal keep-alive HTTP/1.1 client for `POST /pub/<channel>` (Nchan's publisher
//! endpoint and the baseline's): one request at a time on one connection, reconnecting when
//! the server closes it.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::sse::{self, BodyDecoder, Framing};

pub struct HttpPublisher {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

/// The request bytes of one publish.
pub fn request(addr: SocketAddr, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nAccept: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

impl HttpPublisher {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None, buf: Vec::with_capacity(4096) }
    }

    /// Sends one POST and reads the whole response; returns its status.
    pub async fn post(&mut self, path: &str, body: &[u8]) -> Result<u16, String> {
        let r = self.exchange(path, body).await;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(&mut self, path: &str, body: &[u8]) -> Result<u16, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
            let _ = s.set_nodelay(true);
            self.conn = Some(s);
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.write_all(&request(self.addr, path, body)).await.map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        let head = loop {
            if conn.read_buf(&mut self.buf).await.map_err(|e| format!("read: {e}"))? == 0 {
                return Err("publisher connection closed before the response".into());
            }
            if let Some(h) = sse::parse_head(&self.buf)? {
                break h;
            }
        };
        let mut decoder = BodyDecoder::new(head.framing);
        let mut done = head.framing == Framing::Length(0) || decoder.feed(&self.buf[head.len..], &mut |_| {})?;
        let mut chunk = [0u8; 4096];
        while !done {
            let n = conn.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                // Framing until close: the response is complete, the connection is not reusable.
                self.conn = None;
                break;
            }
            done = decoder.feed(&chunk[..n], &mut |_| {})?;
        }
        Ok(head.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_framed_by_length() {
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let r = String::from_utf8(request(addr, "/pub/t0", b"1 2 3")).unwrap();
        assert!(r.starts_with("POST /pub/t0 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n"));
        assert!(r.ends_with("Content-Length: 5\r\n\r\n1 2 3"));
    }
}
