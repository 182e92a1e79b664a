#!/usr/bin/env python3
"""Runs third-party SSE client libraries against the real ssegate server, through a restart
and a resume gap. Called by scripts/client-libraries.sh (which installs what it needs);
docs/client-libraries.md is the table these results back.

    python3 tests/clients/run.py --bin target/debug/ssegate --python target/clients/venv/bin/python
                                 [--work target/clients] [--only NAME ...]

For each library, with a server of its own (127.0.0.1 ports chosen by the kernel, --data-dir
in a temporary directory, --retry 2s, --heartbeat-interval 1s):

 1. publish a retained `state` event for user u (id R), then the driver connects: the
    application must get `state` first, without an id, and the stream's `ssegate.position`
    (id R) must reach the library;
 2. SIGTERM the server (it drains: each stream gets `retry:` and ends), restart it on the
    same ports and the same data dir, and publish `gap` (id G, same epoch) as soon as it is
    ready; the server must then have opened no connection yet (so `gap` can only reach the
    client by a resume);
 3. the library reconnects by itself (or by the documented recipe where it has no reconnect
    of its own) with Last-Event-ID R: the server counts one resume served from its log, and
    the application gets `gap` (id G) once, in order, then the live `done` published after it
    (a barrier), and nothing else: no `ssegate.missed`, no `message` (nothing unnamed is
    published, so any is a phantom), no empty data.

Events named `ssegate.*` other than `ssegate.missed` are what the docs tell applications to
ignore; the line printed per library says whether the library hands them to the application.

Drivers speak JSON lines (see protocol.mjs). Every wait has a deadline; servers and drivers
are stopped on exit. Exit status: 0 if every library passed.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
USER = "u"
API_KEY = f"client-libraries-key-{os.getpid()}-0123456789abcdef"
RETRY = "2s"  # drain sends retry: in [2 s, 5 s]: the restart (~0.1 s) and publish fit well before


class Failure(Exception):
    pass


def deadline_wait(predicate, timeout, what, poll=0.02):
    """Polls `predicate` until it returns a true value (returned); Failure after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise Failure(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


# ---------------------------------------------------------------- the server


class Server:
    def __init__(self, binary, data_dir, log_dir, cors_origin=None):
        self.binary = binary
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.cors_origin = cors_origin
        self.proc = None
        self.addrs = None  # {"http": ..., "grpc": ..., "admin": ...} after the first start
        self.starts = 0

    def start(self):
        self.starts += 1
        log_path = os.path.join(self.log_dir, f"server-{self.starts}.log")
        addrs = self.addrs or {"http": "127.0.0.1:0", "grpc": "127.0.0.1:0", "admin": "127.0.0.1:0"}
        cmd = [
            self.binary, "serve",
            "--http-addr", addrs["http"], "--grpc-addr", addrs["grpc"], "--admin-addr", addrs["admin"],
            "--data-dir", self.data_dir,
            "--publisher-api-keys", API_KEY,
            "--insecure-dev-identity",
            "--retry", RETRY,
            "--heartbeat-interval", "1s",
            "--shutdown-grace", "5s",
            "--log-format", "json",
        ]
        if self.cors_origin:
            cmd += ["--cors-allowed-origins", self.cors_origin]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def serving():
            if self.proc.poll() is not None:
                raise Failure(f"the server exited with {self.proc.returncode}:\n{tail(log_path)}")
            with open(log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if '"ssegate serving"' in line:
                        return json.loads(line)
            return None

        line = deadline_wait(serving, 20, "the server's 'ssegate serving' log line")
        self.addrs = {k: line[k] for k in ("http", "grpc", "admin")}

        def ready():
            if self.proc.poll() is not None:
                raise Failure(f"the server exited with {self.proc.returncode}:\n{tail(log_path)}")
            try:
                with urllib.request.urlopen(f"http://{self.addrs['admin']}/readyz", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        deadline_wait(ready, 20, "the server's /readyz")

    def stop(self, timeout=15):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise Failure(f"the server did not exit within {timeout}s of SIGTERM")
        if self.proc.returncode != 0:
            raise Failure(f"the server exited with {self.proc.returncode} after SIGTERM:\n{tail(self.log_path)}")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def publish(self, event, data, retain=False):
        cmd = [self.binary, "publish", "--grpc-url", f"http://{self.addrs['grpc']}",
               "--user", USER, "--event", event, "--data", data]
        if retain:
            cmd.append("--retain")
        env = dict(os.environ, SSEGATE_API_KEY=API_KEY)
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            raise Failure(f"ssegate publish {event} took over 20s")
        if out.returncode != 0:
            raise Failure(f"ssegate publish {event} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def metrics(self):
        with urllib.request.urlopen(f"http://{self.addrs['admin']}/metrics", timeout=5) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            m = re.match(r"^(ssegate_[a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+)$", line)
            if m:
                values[m.group(1)] = float(m.group(2))
        return values


def tail(path, lines=20):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- a driver


class Driver:
    def __init__(self, cmd, log_dir):
        self.cmd = cmd
        self.reports = []
        self.lock = threading.Lock()
        self.stderr_path = os.path.join(log_dir, "driver.stderr")
        self.out_path = os.path.join(log_dir, "driver.out")
        self._stderr = open(self.stderr_path, "wb")
        self._out = open(self.out_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, encoding="utf-8", bufsize=1, cwd=os.path.dirname(os.path.dirname(HERE)),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._out.write(line)
            self._out.flush()
            try:
                report = json.loads(line)
            except ValueError:
                report = {"kind": "garbage", "line": line.rstrip("\n")}
            with self.lock:
                self.reports.append(report)

    def snapshot(self):
        with self.lock:
            return list(self.reports)

    def events(self):
        return [normalise(r) for r in self.snapshot() if r.get("kind") == "event"]

    def alive_check(self):
        code = self.proc.poll()
        if code is not None:
            raise Failure(f"the driver exited with {code}:\n{tail(self.stderr_path)}")

    def wait(self, predicate, timeout, what):
        def check():
            self.alive_check()
            return predicate(self)

        return deadline_wait(check, timeout, what)

    def send(self, line):
        self.alive_check()
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def quit(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()


def normalise(report):
    """The event as the application sees it (name, data, id); a nameless event is a `message`."""
    return {"type": report.get("type") or "message", "data": report.get("data"), "id": report.get("id") or ""}


# ---------------------------------------------------------------- the scenario


def run_client(client, args):
    """Returns the one-line result; raises Failure."""
    log_dir = os.path.join(args.work, "logs", client["slug"])
    shutil.rmtree(log_dir, ignore_errors=True)
    os.makedirs(log_dir)
    data_dir = tempfile.mkdtemp(prefix="ssegate-clients-")
    driver = Driver(client["cmd"], log_dir)
    server = None
    try:
        ready = driver.wait(lambda d: next((r for r in d.snapshot() if r.get("kind") == "ready"), None),
                            90, "the driver to start")
        if ready.get("version"):
            client["version"] = ready["version"]
        server = Server(args.bin, data_dir, log_dir, cors_origin=ready.get("origin"))
        server.start()

        # 1. A retained value, then the client connects.
        r_id = server.publish("state", "s1", retain=True)
        epoch = r_id.rsplit("-", 1)[0]
        driver.send(f"connect http://{server.addrs['http']}/v1/events?user={USER}")
        driver.wait(lambda d: any(e["type"] == "state" for e in d.events()), 20, "the retained `state` event")
        if client["style"] == "every-block":
            driver.wait(lambda d: any(e["type"] == "ssegate.position" and e["id"] == r_id for e in d.events()),
                        10, f"the stream's ssegate.position ({r_id})")
        # (A listener-style library is given no listener for ssegate.position: it has read the
        # position, which follows `state` in the same write, before it sees the stream end.)

        # 2. Restart; publish `gap` before the client is back.
        server.stop()
        server.start()
        g_id = server.publish("gap", "g1")
        if g_id.rsplit("-", 1)[0] != epoch:
            raise Failure(f"the restarted server issued {g_id}, another epoch than {r_id} (--data-dir)")
        opened = server.metrics().get("ssegate_connections_opened_total", -1)
        if opened != 0:
            raise Failure(f"the client reconnected ({opened:g} connection(s)) before `gap` was published: "
                          "the test cannot tell a resume from a live event (raise RETRY in run.py)")

        # 3. The client comes back by itself and gets `gap` from the replay log.
        def got_gap(d):
            events = d.events()
            missed = [e for e in events if e["type"] == "ssegate.missed"]
            if missed:
                raise Failure(f"ssegate.missed instead of a resume: {missed}")
            return any(e["type"] == "gap" for e in events)

        driver.wait(got_gap, 30, "the `gap` event after the restart")
        # A barrier: `done`, published live, comes after anything else the stream had to say.
        d_id = server.publish("done", "d1")
        driver.wait(lambda d: any(e["type"] == "done" for e in d.events()), 10, "the live `done` event")
        metrics = server.metrics()
        reports = driver.snapshot()
        driver.quit()
        server.stop()
        return check(client, reports, metrics, r_id, g_id, d_id)
    except Failure:
        raise
    except Exception as err:  # a bug here is a failure of this library's run, not a crash of all
        raise Failure(f"{type(err).__name__}: {err}")
    finally:
        driver.quit()
        if server:
            server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


def check(client, reports, metrics, r_id, g_id, d_id):
    events = [normalise(r) for r in reports if r.get("kind") == "event"]
    problems = []

    phantoms = [r for r in reports if r.get("kind") == "event"
                and (normalise(r)["type"] == "message" or r.get("data") == "")]
    if phantoms:
        note = ""
        if any(p.get("retry") is not None and not p.get("data") for p in phantoms):
            note = (" (a block with only `retry:` ended by a blank line, e.g. the drain's last"
                    " block: this library hands such a block to the application as an empty message)")
        problems.append(f"phantom/empty events handed to the application{note}: {phantoms}")
    missed = [e for e in events if e["type"] == "ssegate.missed"]
    if missed:
        problems.append(f"ssegate.missed after a resume the server could serve: {missed}")

    app = [e for e in events if not e["type"].startswith("ssegate.")]
    want = [
        {"type": "state", "data": "s1", "id": ""},
        {"type": "gap", "data": "g1", "id": g_id},
        {"type": "done", "data": "d1", "id": d_id},
    ]
    if app != want:
        problems.append(f"the application got {app}, want {want}")
    if events and events[0]["type"] != "state":
        problems.append(f"the first event was {events[0]}, not the retained `state`")

    positions = [e for e in events if e["type"] == "ssegate.position"]
    want_ids = [r_id, g_id] if client["style"] == "every-block" else []
    if [p["id"] for p in positions] != want_ids or any(p["data"] != p["id"] for p in positions):
        problems.append(f"ssegate.position events {positions}, want ids {want_ids} with data = id")

    requests = [r.get("lastEventId") for r in reports if r.get("kind") == "request"]
    if requests:
        if requests[0] is not None:
            problems.append(f"the first connection sent Last-Event-ID {requests[0]!r}")
        later = requests[1:]
        if not later or any(i != r_id for i in later):
            problems.append(f"the reconnects sent Last-Event-ID {later}, want each {r_id!r}")
    elif client["requests_visible"]:
        problems.append("the driver reported no request")

    resumed = metrics.get('ssegate_replay_resumes_total{outcome="resumed"}')
    misses = {k: v for k, v in metrics.items() if k.startswith("ssegate_replay_resumes_total") and "resumed" not in k}
    if resumed != 1 or any(misses.values()):
        problems.append(f"the restarted server counted resumed={resumed} and misses={misses}, want one resume")
    if metrics.get("ssegate_connections_opened_total") != 1:
        problems.append(f"the restarted server opened {metrics.get('ssegate_connections_opened_total')} connections, want 1")

    if problems:
        raise Failure("; ".join(problems))

    shown = len(positions)
    position_note = (
        f"handed to the app as a named event ({shown}x; ignored by the recipe)"
        if client["style"] == "every-block"
        else "never handed to the app (no listener for it), yet its id was resumed from"
    )
    reconnects = len(requests) - 1 if requests else None
    how = client["reconnect"]
    return (
        f"{how} with Last-Event-ID {r_id}"
        + (f" ({reconnects} reconnect attempt(s))" if reconnects is not None else "")
        + f"; retained value first, no id; `gap` once, in order; no ssegate.missed; no phantom message;"
        f" ssegate.position: {position_note}"
    )


def clients(args):
    node = args.node
    names = ["state", "gap", "done"]
    return [
        {"slug": "eventsource-5", "name": "eventsource", "version": "5.1.5", "where": "Node",
         "cmd": [node, os.path.join(HERE, "eventsource.mjs"), "eventsource5", *names],
         "style": "listener", "requests_visible": True, "reconnect": "resumed by itself"},
        {"slug": "eventsource-4", "name": "eventsource", "version": "4.1.1", "where": "Node",
         "cmd": [node, os.path.join(HERE, "eventsource.mjs"), "eventsource4", *names],
         "style": "listener", "requests_visible": True, "reconnect": "resumed by itself"},
        {"slug": "fetch-event-source", "name": "@microsoft/fetch-event-source", "version": "2.0.1",
         "where": "headless Chromium",
         "cmd": [node, os.path.join(HERE, "browser.mjs"), "fetch-event-source", *names],
         "style": "every-block", "requests_visible": True,
         "reconnect": "resumed (recipe: onclose throws, so it retries)"},
        {"slug": "chromium-eventsource", "name": "EventSource (native)", "version": "Chromium",
         "where": "headless Chromium",
         "cmd": [node, os.path.join(HERE, "browser.mjs"), "native", *names],
         "style": "listener", "requests_visible": True, "reconnect": "resumed by itself"},
        {"slug": "httpx-sse", "name": "httpx-sse", "version": "0.4.3", "where": "Python, httpx 0.28.1",
         "cmd": [args.python, os.path.join(HERE, "httpx_sse_driver.py")],
         "style": "every-block", "requests_visible": True,
         "reconnect": "resumed (recipe: the app reconnects with the last sse.id)"},
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=os.environ.get("SSEGATE_BIN", "target/debug/ssegate"))
    parser.add_argument("--python", default=sys.executable, help="the Python that has httpx-sse")
    parser.add_argument("--node", default="node")
    parser.add_argument("--work", default="target/clients", help="logs go to WORK/logs/<library>/")
    parser.add_argument("--only", action="append", default=[], help="run only this slug (repeatable)")
    args = parser.parse_args()
    args.bin = os.path.abspath(args.bin)
    if os.sep in args.python:
        args.python = os.path.abspath(args.python)
    args.work = os.path.abspath(args.work)
    if not os.access(args.bin, os.X_OK):
        print(f"run.py: no server binary at {args.bin}", file=sys.stderr)
        return 2

    selected = [c for c in clients(args) if not args.only or c["slug"] in args.only]
    if not selected:
        print(f"run.py: no library matches {args.only}", file=sys.stderr)
        return 2
    passed = failed = 0
    for client in selected:
        started = time.monotonic()
        label = f"{client['name']} {client['version']} ({client['where']})"
        try:
            summary = run_client(client, args)
            label = f"{client['name']} {client['version']} ({client['where']})"
            print(f"ok    {label}: {summary} [{time.monotonic() - started:.1f}s]", flush=True)
            passed += 1
        except Failure as err:
            label = f"{client['name']} {client['version']} ({client['where']})"
            print(f"FAIL  {label}: {err} [{time.monotonic() - started:.1f}s]", flush=True)
            log_dir = os.path.join(args.work, "logs", client["slug"])
            print(f"      logs: {log_dir}", flush=True)
            for name in ("driver.out", "driver.stderr"):
                text = tail(os.path.join(log_dir, name), 30)
                if text.strip():
                    print(f"      --- {name} (tail)\n" + "".join(f"      {l}\n" for l in text.splitlines()),
                          end="", flush=True)
            failed += 1
    print(f"client-libraries: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
