//! A real `nats-server -js` for the cluster and backplane tests, on free loopback ports, with
//! its monitoring port: started, killed, restarted, paused (SIGSTOP) and resumed (SIGCONT) by
//! the tests, optionally one of a cluster. `./scripts/test.sh` installs Debian's nats-server.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{
    process::{Child, Command},
    time::Instant,
};

use crate::helpers::{TestApp, deadline, http_request, spawn_app};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nats_binary() -> &'static str {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nats-server is not installed: run ./scripts/test.sh (it installs Debian's nats-server)")
}

/// A `nats-server -js` with its monitoring port, which the test may kill, restart, pause and
/// resume. Optionally one of a cluster (`routes` to the others).
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    monitor: u16,
    dir: PathBuf,
    /// `-cluster` and `-routes` arguments, for a cluster member.
    cluster: Vec<String>,
    paused: bool,
}

impl Broker {
    pub async fn start() -> Broker {
        Broker::start_with(Vec::new(), "").await
    }

    pub async fn start_with(cluster: Vec<String>, name: &str) -> Broker {
        // A free port can be taken by another test's broker between our look and its bind (the
        // tests run in parallel): then this server fails to start and our clients would talk to
        // the other one. So the server proves it is ours (`owned`), or we try other ports.
        for _ in 0..5 {
            let (port, monitor) = (free_port(), free_port());
            let dir = std::env::temp_dir().join(format!("ssegate-faults-{}-{port}{name}", std::process::id()));
            let mut b = Broker { child: None, port, monitor, dir, cluster: cluster.clone(), paused: false };
            if b.start_here().await {
                return b;
            }
            b.kill().await;
        }
        panic!("nats-server could not start on free ports five times");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A JetStream context on a new connection of the test's own.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.url()).await.expect("the test connects to NATS"))
    }

    pub fn pid(&self) -> String {
        self.child.as_ref().and_then(Child::id).expect("nats-server runs").to_string()
    }

    /// Starts the server again on the same ports (and store).
    pub async fn restart(&mut self) {
        assert!(self.start_here().await, "nats-server could not start again on port {}", self.port);
    }

    /// Starts the server on this broker's ports; whether the server listening there is ours.
    async fn start_here(&mut self) -> bool {
        let (port, monitor) = (self.port.to_string(), self.monitor.to_string());
        // A cluster member is named by its `--name` argument; otherwise a name of our own.
        let named = self.cluster.iter().position(|a| a == "--name").and_then(|i| self.cluster.get(i + 1));
        let server_name =
            named.cloned().unwrap_or_else(|| format!("ssegate-test-{}-{}", std::process::id(), self.port));
        let name_args = if named.is_some() { Vec::new() } else { vec!["-n".to_owned(), server_name.clone()] };
        let child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-m", &monitor, "-sd", self.dir.to_str().unwrap()])
            .args(&name_args)
            .args(&self.cluster)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        // Both ports: the monitoring one opens first, the client one once JetStream is up.
        let end = deadline();
        for port in [self.monitor, self.port] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                if self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some())) {
                    return false; // it exited: a port was taken
                }
                assert!(Instant::now() < end, "nats-server did not listen on {port}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.owned(&server_name).await
    }

    /// Whether the server on the client port is the one named `server_name` (its INFO line,
    /// sent on connect, names it).
    async fn owned(&self, server_name: &str) -> bool {
        use tokio::io::AsyncReadExt;
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        let mut info = Vec::new();
        let mut buf = [0u8; 4096];
        while !info.windows(2).any(|w| w == b"\r\n") {
            match tokio::time::timeout_at(deadline(), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => info.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        String::from_utf8_lossy(&info).contains(&format!("\"server_name\":\"{server_name}\""))
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Kills the server and starts it again on the same ports with an empty store directory,
    /// as a server whose volume was lost: every stream and bucket is gone.
    pub async fn restart_empty(&mut self) {
        self.kill().await;
        std::fs::remove_dir_all(&self.dir).expect("the store directory is removed");
        self.restart().await;
    }

    fn signal(&mut self, sig: &str) {
        let status = std::process::Command::new("kill").args([sig, &self.pid()]).status().expect("kill runs");
        assert!(status.success(), "kill {sig}");
        self.paused = sig == "-STOP";
    }

    /// SIGSTOP: the process stops answering; its sockets stay open.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    /// A monitoring endpoint's JSON.
    pub async fn monitor(&self, path: &str) -> serde_json::Value {
        let addr = ([127, 0, 0, 1], self.monitor).into();
        let (status, headers, body) = http_request(addr, "GET", path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked { dechunk(&body) } else { body };
        serde_json::from_str(&body).expect("monitoring JSON")
    }

    /// Client connections the server has now.
    pub async fn connections(&self) -> u64 {
        self.monitor("/connz").await["num_connections"].as_u64().unwrap()
    }
}

/// The body of a chunked response (the monitoring port's JSON is ASCII).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.paused {
            let _ = std::process::Command::new("kill").args(["-CONT", &self.pid()]).status();
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn replica(broker: &Broker, extra: &[&str]) -> TestApp {
    let url = broker.url();
    let mut flags = vec!["--backplane", "nats", "--nats-url", url.as_str()];
    if !extra.contains(&"--nats-publish-timeout") {
        flags.extend_from_slice(&["--nats-publish-timeout", "2s"]);
    }
    flags.extend_from_slice(extra);
    spawn_app(&flags).await
}

/// The value of `ssegate_backplane_up` on the admin port.
pub async fn backplane_up(app: &TestApp) -> f64 {
    let (status, _, body) = http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let line = body.lines().find(|l| l.starts_with("ssegate_backplane_up ")).expect("ssegate_backplane_up exported");
    line.trim_start_matches("ssegate_backplane_up ").parse().expect("a number")
}

pub async fn readyz(app: &TestApp) -> (u16, String) {
    let (status, _, body) = http_request(app.admin, "GET", "/readyz", &[]).await;
    (status, body.trim_end().to_owned())
}

/// Waits until `ssegate_backplane_up` on the admin port is `want`.
pub async fn wait_backplane_up(app: &TestApp, want: f64) {
    let end = deadline();
    while backplane_up(app).await != want {
        assert!(Instant::now() < end, "ssegate_backplane_up never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
