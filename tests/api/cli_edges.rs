//! Rough edges a team moving onto ssegate met (issue 22), over the real binary: `ssegate
//! publish` pointed at a port that is not gRPC or given an address without a scheme, what its
//! help says about idempotency keys, logs written to a file or as JSON, and the default
//! `--max-connections` against the open-files limit.

use std::process::{Output, Stdio};

use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr},
    time::timeout_at,
};

use crate::helpers::{deadline, serve_command, spawn_app, spawn_app_with, tls_fixture};

const BIN: &str = env!("CARGO_BIN_EXE_ssegate");

/// Runs `ssegate <args>` to its end.
async fn run(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(BIN).args(args).stdin(Stdio::null()).kill_on_drop(true).output();
    timeout_at(deadline(), out).await.expect("ssegate exits in time").expect("the ssegate binary runs")
}

/// Runs `ssegate publish <args>` to its end.
async fn publish(args: &[&str]) -> Output {
    run(&[&["publish"], args].concat()).await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `out` failed with exactly one line on stderr, and returns that line.
fn one_error_line(out: &Output) -> String {
    let err = stderr(out);
    assert!(!out.status.success(), "must fail: {:?} {err}", out.status);
    assert_eq!(err.trim_end().lines().count(), 1, "one line on stderr: {err:?}");
    err.trim_end().to_owned()
}

/// The help paragraph of `flag` in `help` (its line and the description lines under it).
fn help_paragraph(help: &str, flag: &str) -> String {
    let mut lines = help.lines().skip_while(|l| !l.trim_start().starts_with(flag));
    let first = lines.next().unwrap_or_else(|| panic!("{flag} is not in the help: {help}"));
    let rest = lines.take_while(|l| !l.trim().is_empty() && !l.trim_start().starts_with('-'));
    std::iter::once(first).chain(rest).map(str::trim).collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn publish_to_a_port_that_is_not_grpc_says_so_and_names_the_grpc_port() {
    let app = spawn_app(&[]).await;
    // The SSE port, with and without a scheme: it answers gRPC requests with HTTP 404.
    for url in [format!("http://{}", app.http), app.http.to_string()] {
        let line = one_error_line(&publish(&["--grpc-url", &url, "--broadcast", "--data", "x"]).await);
        assert!(line.contains(&format!("{} answered HTTP 404", app.http)), "says who answered what: {line}");
        assert!(line.contains("not gRPC") && line.contains("--grpc-addr") && line.contains("50051"), "{line}");
    }
}

#[tokio::test]
async fn publish_takes_an_address_without_a_scheme_as_plaintext() {
    let app = spawn_app(&[]).await;
    let mut sub = app.subscribe("user=bare").await;
    app.wait_connections("bare", 1).await;
    let grpc = app.grpc.to_string();
    // `--grpc-addr`, the server's own name for the port, is taken too.
    for (flag, data) in [("--grpc-url", "no scheme"), ("--grpc-addr", "the server's flag name")] {
        let out = publish(&[flag, &grpc, "--user", "bare", "--data", data]).await;
        assert!(out.status.success(), "{flag} {grpc}: {}", stderr(&out));
        let id = String::from_utf8(out.stdout).unwrap();
        let e = sub.next_event().await;
        assert_eq!((e.data.as_str(), e.last_event_id.as_str()), (data, id.trim()));
    }
}

#[tokio::test]
async fn publish_without_a_scheme_uses_tls_when_tls_options_are_given_and_refuses_mismatches() {
    let (cert, key, ca) = (tls_fixture("server-a.pem"), tls_fixture("server-a.key"), tls_fixture("ca.pem"));
    let app = spawn_app_with(&[
        "--insecure-dev-identity",
        "--insecure-open-publish",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
    ])
    .await;
    let grpc = app.grpc.to_string();
    let out = publish(&["--grpc-url", &grpc, "--tls-ca-file", &ca, "--broadcast", "--data", "x"]).await;
    assert!(out.status.success(), "a bare address with --tls-ca-file is https://: {}", stderr(&out));

    // TLS options with an http:// URL would be ignored: refused, saying what to write.
    let plain = format!("http://{grpc}");
    let line =
        one_error_line(&publish(&["--grpc-url", &plain, "--tls-ca-file", &ca, "--broadcast", "--data", "x"]).await);
    assert!(line.contains(&format!("https://{grpc}")) && line.contains("--tls-ca-file"), "{line}");
    // A scheme gRPC cannot use.
    let line = one_error_line(&publish(&["--grpc-url", &format!("ftp://{grpc}"), "--broadcast", "--data", "x"]).await);
    assert!(line.contains("http://") && line.contains("https://") && line.contains("ftp://"), "{line}");
}

#[tokio::test]
async fn the_idempotency_key_is_documented_and_works_without_nats() {
    let help = run(&["publish", "--help"]).await;
    let help = String::from_utf8(help.stdout).unwrap();
    let para = help_paragraph(&help, "--idempotency-key");
    assert!(!para.contains("NATS backplane)"), "not tied to the NATS backplane: {para}");
    assert!(para.contains("memory") && para.contains("--data-dir"), "names every backplane: {para}");

    // What the help says, with the memory backplane: a retry gets the first id.
    let app = spawn_app(&[]).await;
    let url = format!("http://{}", app.grpc);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = publish(&["--grpc-url", &url, "--broadcast", "--idempotency-key", "k-1", "--data", "x"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(String::from_utf8(out.stdout).unwrap());
    }
    assert_eq!(ids[0], ids[1], "the retry is answered with the first id");
}

/// `ssegate serve` (development modes, ports chosen by the kernel) with its standard error
/// piped, as when it is redirected to a file.
struct Served {
    child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    /// Every line up to and including the `ssegate serving` line.
    startup: Vec<String>,
}

/// Starts `ssegate serve` under `wrapper` (a program and its arguments, the binary after them;
/// none if empty) with `extra` flags and `env`, and reads its logs until it serves.
async fn serve(wrapper: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Served {
    let mut child = serve_command(wrapper)
        .args(["--insecure-dev-identity", "--insecure-open-publish"])
        .args(extra)
        .envs(env.iter().copied())
        .spawn()
        .expect("the ssegate binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut startup = Vec::new();
    loop {
        let line = timeout_at(deadline(), lines.next_line()).await.expect("startup logs in time").unwrap();
        let line = line.unwrap_or_else(|| panic!("exited before serving: {startup:#?}"));
        let serving = line.contains("ssegate serving");
        startup.push(line);
        if serving {
            return Served { child, lines, startup };
        }
    }
}

impl Served {
    /// The startup lines parsed as JSON (the process was started with `--log-format json`).
    fn startup_json(&self) -> Vec<serde_json::Value> {
        self.startup.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect()
    }

    /// Sends SIGTERM and returns every log line written after startup, until the process exits.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let mut rest = Vec::new();
        while let Some(line) = timeout_at(deadline(), self.lines.next_line()).await.expect("logs end in time").unwrap()
        {
            rest.push(line);
        }
        let exit = timeout_at(deadline(), self.child.wait()).await.expect("exits in time").unwrap();
        assert!(exit.success(), "{exit:?}: {rest:#?}");
        rest
    }
}

#[tokio::test]
async fn pretty_logs_to_a_file_or_pipe_carry_no_colour_codes() {
    let served = serve(&[], &["--log-format", "pretty"], &[("NO_COLOR", "")]).await;
    let coloured: Vec<_> = served.startup.iter().filter(|l| l.contains('\x1b')).collect();
    assert!(coloured.is_empty(), "stderr is not a terminal: no ANSI escapes: {coloured:#?}");
    assert!(served.startup.iter().any(|l| l.contains("INSECURE")), "the warnings are there: {:#?}", served.startup);
}

/// A JSON log value that is Rust's `Debug` text of an `Option` rather than a plain value.
fn debug_text(v: &serde_json::Value) -> bool {
    v.as_str().is_some_and(|s| s.starts_with("Some(") || s == "None")
}

#[tokio::test]
async fn json_logs_carry_plain_values_not_debug_text() {
    let served = serve(
        &[],
        &["--log-format", "json", "--shutdown-delay", "100ms", "--shutdown-grace", "2s"],
        // Nothing listens there: traces are exported only if there are spans, and there are none.
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")],
    )
    .await;
    let startup = served.startup_json();
    let otlp = startup.iter().find(|v| v["message"] == "exporting traces over OTLP").expect("the OTLP line");
    assert_eq!(otlp["endpoint"], "http://127.0.0.1:9", "{otlp}");
    let rest = served.stop().await;
    let rest: Vec<serde_json::Value> = rest.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let line = |m: &str| rest.iter().find(|v| v["message"].as_str().is_some_and(|s| s.starts_with(m))).cloned();
    let delay = line("shutting down: not ready").expect("the delay line");
    assert_eq!(delay["delay_ms"], 100, "{delay}");
    let drain = line("shutting down: draining").expect("the drain line");
    assert_eq!(drain["grace_ms"], 2000, "{drain}");
    for v in startup.iter().chain(&rest) {
        let fields = v.as_object().unwrap();
        assert!(!fields.values().any(debug_text), "a Debug value in {v}");
    }
}

/// Runs `ssegate serve` with the open-files limit at 4,096 (so the HTTP port's socket budget is
/// 3,687, far below the old fixed default of 50,000), and returns its JSON startup lines.
async fn startup_at_4096_files(extra: &[&str]) -> Vec<serde_json::Value> {
    let flags = [&["--log-format", "json"], extra].concat();
    let served = serve(&["prlimit", "--nofile=4096:4096", "--"], &flags, &[]).await;
    let lines = served.startup_json();
    served.stop().await;
    lines
}

fn warns_about_max_connections(lines: &[serde_json::Value]) -> Option<&serde_json::Value> {
    lines.iter().find(|v| v["message"].as_str().is_some_and(|m| m.contains("--max-connections is more than")))
}

#[tokio::test]
async fn the_default_max_connections_fits_the_descriptor_limit_and_only_a_given_one_is_warned_about() {
    let lines = startup_at_4096_files(&[]).await;
    assert_eq!(warns_about_max_connections(&lines), None, "a default start does not warn: {lines:#?}");
    let budget = lines.iter().find(|v| v["message"] == "sockets each port may hold").expect("the budget line");
    assert_eq!(budget["http"], 3687, "{budget}");
    assert_eq!(budget["max_connections"], 3687, "the default is the HTTP port's socket budget: {budget}");

    let lines = startup_at_4096_files(&["--max-connections", "100000"]).await;
    let warning =
        warns_about_max_connections(&lines).unwrap_or_else(|| panic!("a given value is warned about: {lines:#?}"));
    assert_eq!((&warning["max_connections"], &warning["http_sockets"]), (&100_000.into(), &3687.into()));
    let lines = startup_at_4096_files(&["--max-connections", "1000"]).await;
    assert_eq!(warns_about_max_connections(&lines), None, "{lines:#?}");

    let help = String::from_utf8(run(&["serve", "--help"]).await.stdout).unwrap();
    let para = help_paragraph(&help, "--max-connections <");
    assert!(para.contains("open-files limit") && para.contains("50000"), "the help says how it is derived: {para}");
}
