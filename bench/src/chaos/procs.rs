//! The processes a chaos run owns: `nats-server -js`, three `ssegate serve --backplane nats`
//! replicas, the client workers. Each is killed when dropped, and every pid is appended to
//! `<out>/pids` so that `scripts/chaos.sh` can clean up even if this process is killed.
//! Signals go through `kill(1)` (the crate forbids `unsafe`, so no libc).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// One restartable child process, its output appended to a log file.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    pids: PathBuf,
    child: Option<Child>,
    /// Starts so far.
    pub starts: u32,
}

impl Proc {
    pub fn new(name: &str, program: &Path, args: Vec<String>, out: &Path) -> Proc {
        Proc {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            env: Vec::new(),
            log: out.join(format!("{name}.log")),
            pids: out.join("pids"),
            child: None,
            starts: 0,
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Proc {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log).stderr(err);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {} ({}): {e}", self.name, self.program.display()))?;
        record_pid(&self.pids, child.id());
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal by name (`KILL`, `TERM`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) -> Result<(), String> {
        let pid = self.pid().ok_or_else(|| format!("{} is not running", self.name))?;
        signal(pid, sig)
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// Whether it exited on its own (a crash), and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns the exit status, and
    /// whether it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if self.signal("TERM").is_err() {
            return (None, false);
        }
        match self.wait_exit(grace) {
            Some(s) => (Some(s), false),
            None => {
                self.kill();
                (None, true)
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A stopped process dies of SIGKILL too; CONT first lets nothing hang on it.
            let _ = signal(pid, "CONT");
        }
        self.kill();
    }
}

pub fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("kill -{sig} {pid}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("kill -{sig} {pid} failed")) }
}

pub fn record_pid(pids: &Path, pid: u32) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(pids) {
        let _ = writeln!(f, "{pid}");
    }
}

/// A free loopback port (bound and released; nothing else on this box races for it in practice).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Waits until `addr` accepts connections.
pub fn wait_port(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() >= deadline {
            return Err(format!("{addr} did not listen within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `GET path` on an admin port: the status code.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Waits until the admin port's `/readyz` answers 200.
pub fn wait_ready(admin: SocketAddr, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    while http_status(admin, "/readyz") != Some(200) {
        if start.elapsed() >= within {
            return Err(format!("{admin}/readyz not 200 within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(start.elapsed())
}

/// The replica's three addresses.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Ports {
    pub fn pick() -> Result<Ports, String> {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Ok(Ports { http: a(free_port()?), grpc: a(free_port()?), admin: a(free_port()?) })
    }
}

/// The command line of one replica. Every admission limit (connections, per user, per
/// address, pending connections, descriptor budget) stays at its default: the storm fault
/// checks that a crashed replica's clients are admitted elsewhere at the defaults operators
/// run with, so no flag here may raise a limit to make room for them.
pub fn replica_args(ports: &Ports, nats_port: u16) -> Vec<String> {
    [
        "serve",
        "--backplane",
        "nats",
        "--nats-url",
        &format!("nats://127.0.0.1:{nats_port}"),
        "--http-addr",
        &ports.http.to_string(),
        "--grpc-addr",
        &ports.grpc.to_string(),
        "--admin-addr",
        &ports.admin.to_string(),
        "--insecure-dev-identity",
        "--insecure-open-publish",
        "--nats-publish-timeout",
        "2s",
        "--retry",
        "1s",
        "--heartbeat-interval",
        "5s",
        "--header-read-timeout",
        "5s",
        "--shutdown-grace",
        "5s",
    ]
    .map(String::from)
    .to_vec()
}

pub fn nats_args(port: u16, store: &Path) -> Vec<String> {
    ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd", &store.display().to_string()].map(String::from).to_vec()
}

/// `nats-server` on this machine.
pub fn find_nats() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_run_with_every_admission_limit_at_its_default() {
        let ports = Ports::pick().unwrap();
        let args = replica_args(&ports, 4222);
        for flag in
            ["--max-pending-connections", "--max-connections", "--max-connections-per-user", "--max-connections-per-ip"]
        {
            assert!(!args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))), "{flag} in {args:?}");
        }
    }
}
