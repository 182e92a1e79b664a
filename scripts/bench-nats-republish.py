#!/usr/bin/env python3
"""The broker's side of interest-based delivery (issue 26, goal 2), on the nats-server at hand.

Speaks the NATS text protocol over plain sockets (no client library), so what is measured is
the broker: its CPU (user and system, from /proc/<pid>/stat) per event for

  store        JetStream publishes (a file-storage stream, acknowledged, pipelined), nobody
               reading: the cost every design pays;
  store+rp     the same stream with `republish` (`<s>.to.>` -> `<s>.live.>`) and one core
               subscription on one target's live subject, publishing to other targets: an
               event that no replica subscribed to (what interest-based delivery adds for it);
  store+rp+1   the same, publishing to the subscribed target: each event republished and
               delivered to one replica;
  store+rp+4   four replicas subscribed to the target (four sockets).

It also checks what the design relies on: the republished copy carries Nats-Sequence and
Nats-Last-Sequence, the latter per subject; and direct get by subject (`next_by_subj`) lists one
target's events after a sequence without a consumer. Loopback only.

    python3 scripts/bench-nats-republish.py --nats-pid PID [--port 14222] [--events 100000]
"""
import argparse
import json
import os
import socket
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime (fields 14 and 15)


class Conn:
    def __init__(self, port, name):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        self.read_line()  # INFO
        self.send(f'CONNECT {{"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"name":"{name}"}}\r\nPING\r\n')
        self.expect(b"PONG")

    def send(self, data):
        self.s.sendall(data.encode() if isinstance(data, str) else data)

    def fill(self):
        chunk = self.s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        self.buf += chunk

    def read_line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_bytes(self, n):
        while len(self.buf) < n + 2:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def expect(self, what):
        while True:
            line = self.read_line()
            if line == b"PING":
                self.send("PONG\r\n")
                continue
            if line.startswith(what):
                return line
            if line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())

    def next_msg(self):
        """(subject, headers bytes, payload) of the next MSG/HMSG."""
        while True:
            line = self.read_line()
            if line == b"PING":
                self.send("PONG\r\n")
                continue
            parts = line.split()
            if parts[0] == b"MSG":
                n = int(parts[-1])
                return parts[1].decode(), b"", self.read_bytes(n)
            if parts[0] == b"HMSG":
                hdr, total = int(parts[-2]), int(parts[-1])
                data = self.read_bytes(total)
                return parts[1].decode(), data[:hdr], data[hdr:]
            if parts[0] in (b"+OK", b"PONG"):
                continue
            raise RuntimeError(f"unexpected: {line!r}")

    def request(self, subject, body):
        inbox = f"_INBOX.req{time.monotonic_ns()}"
        self.send(f"SUB {inbox} 999\r\nPUB {subject} {inbox} {len(body)}\r\n{body}\r\n")
        _, _, payload = self.next_msg()
        self.send("UNSUB 999\r\n")
        return json.loads(payload)


def headers(raw):
    out = {}
    for line in raw.decode().split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def make_stream(c, name, subject, republish):
    c.request(f"$JS.API.STREAM.DELETE.{name}", "")
    config = {"name": name, "subjects": [f"{subject}.to.>"], "storage": "file", "duplicate_window": 120_000_000_000,
              "num_replicas": 1}
    if republish:
        config["republish"] = {"src": f"{subject}.to.>", "dest": f"{subject}.live.>"}
    answer = c.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config))
    if "error" in answer:
        raise RuntimeError(f"stream create refused: {answer['error']}")
    return answer


def publish(c, subject, n, window=1024, payload=b"x" * 100):
    """n JetStream publishes, `window` awaiting their acknowledgement at once."""
    c.send("SUB _INBOX.acks.* 1000\r\n")
    sent = acked = 0
    while acked < n:
        burst = []
        while sent < n and sent - acked < window:
            burst.append(b"PUB %s _INBOX.acks.%d %d\r\n%s\r\n" % (subject.encode(), sent, len(payload), payload))
            sent += 1
        if burst:
            c.send(b"".join(burst))
        _, _, body = c.next_msg()
        if b'"error"' in body:
            raise RuntimeError(body.decode())
        acked += 1
    c.send("UNSUB 1000\r\n")


def drain(subs, want, deadline_s=120):
    """Starts a reader per subscriber socket (as replicas read while events are published, so
    the broker never counts them as slow consumers); join them to wait for `want` copies each."""
    end = time.monotonic() + deadline_s
    errors = []

    def read(c):
        try:
            for _ in range(want):
                if time.monotonic() > end:
                    raise TimeoutError("copies missing at the deadline")
                c.next_msg()
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=read, args=(c,)) for c in subs]
    for t in threads:
        t.start()

    def join():
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"a subscriber failed: {errors[0]}")

    return join


def run(args, label, republish, subscribers, to_subscribed):
    c = Conn(args.port, "pub")
    make_stream(c, "RPBENCH", "rp", republish)
    subs = []
    for i in range(subscribers):
        s = Conn(args.port, f"replica{i}")
        s.send("SUB rp.live.u.alice 1\r\nPING\r\n")
        s.expect(b"PONG")
        subs.append(s)
    subject = "rp.to.u.alice" if to_subscribed else "rp.to.u.bob"
    u0, s0 = cpu(args.nats_pid)
    start = time.monotonic()
    join = drain(subs, args.events if to_subscribed else 0)
    publish(c, subject, args.events)
    join()
    elapsed = time.monotonic() - start
    u1, s1 = cpu(args.nats_pid)
    user_us = (u1 - u0) * 1e6 / TICK
    sys_us = (s1 - s0) * 1e6 / TICK
    line = {"scenario": "nats-republish", "run": label, "events": args.events, "subscribers": subscribers,
            "events_per_s": round(args.events / elapsed), "broker_user_us_per_event": round(user_us / args.events, 2),
            "broker_system_us_per_event": round(sys_us / args.events, 2),
            "broker_us_per_event": round((user_us + sys_us) / args.events, 2)}
    print(json.dumps(line), flush=True)
    for s in subs:
        s.s.close()
    c.request("$JS.API.STREAM.DELETE.RPBENCH", "")
    c.s.close()


def check_headers(args):
    """The copy carries the stream sequence and the previous sequence of the same subject."""
    c = Conn(args.port, "check")
    make_stream(c, "RPCHECK", "rpc", True)
    s = Conn(args.port, "watch")
    s.send("SUB rpc.live.> 1\r\nPING\r\n")
    s.expect(b"PONG")
    for target in ["u.alice", "u.bob", "u.alice"]:
        publish(c, f"rpc.to.{target}", 1)
    seen = []
    for _ in range(3):
        subject, hdr, _ = s.next_msg()
        h = headers(hdr)
        seen.append((subject, h.get("Nats-Sequence"), h.get("Nats-Last-Sequence")))
    want = [("rpc.live.u.alice", "1", "0"), ("rpc.live.u.bob", "2", "0"), ("rpc.live.u.alice", "3", "1")]
    print(json.dumps({"scenario": "nats-republish", "run": "headers", "copies": seen, "as_expected": seen == want}))
    c.request("$JS.API.STREAM.DELETE.RPCHECK", "")
    if seen != want:
        raise SystemExit(f"republished copies differ from what the design relies on: {seen}")


def check_direct_get(args):
    """A user's events after a sequence, by subject, without a consumer: direct get with
    `next_by_subj` (the stream's `allow_direct`), as a resume for a user a replica did not follow
    would read them."""
    c = Conn(args.port, "direct")
    c.request("$JS.API.STREAM.DELETE.RPDIRECT", "")
    config = {"name": "RPDIRECT", "subjects": ["rpd.to.>"], "storage": "file", "num_replicas": 1,
              "allow_direct": True}
    answer = c.request("$JS.API.STREAM.CREATE.RPDIRECT", json.dumps(config))
    if "error" in answer:
        raise SystemExit(f"stream with allow_direct refused: {answer['error']}")
    for target in ["u.a", "u.b", "u.a", "u.b", "u.a"]:
        publish(c, f"rpd.to.{target}", 1)
    c.send("SUB _INBOX.direct 77\r\n")
    seq, got = 2, []
    while len(got) < 10:
        body = json.dumps({"seq": seq, "next_by_subj": "rpd.to.u.a"})
        c.send(f"PUB $JS.API.DIRECT.GET.RPDIRECT _INBOX.direct {len(body)}\r\n{body}\r\n")
        _, hdr, _ = c.next_msg()
        found = headers(hdr).get("Nats-Sequence")
        if found is None:  # 404: nothing more on that subject
            break
        got.append(int(found))
        seq = int(found) + 1
    print(json.dumps({"scenario": "nats-republish", "run": "direct-get", "after": 1, "subject": "u.a",
                      "sequences": got, "as_expected": got == [3, 5]}))
    c.request("$JS.API.STREAM.DELETE.RPDIRECT", "")
    if got != [3, 5]:
        raise SystemExit(f"direct get by subject returned {got}, not [3, 5]")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats-pid", type=int, required=True)
    p.add_argument("--port", type=int, default=14222)
    p.add_argument("--events", type=int, default=100_000)
    args = p.parse_args()
    check_headers(args)
    check_direct_get(args)
    run(args, "store", republish=False, subscribers=0, to_subscribed=False)
    run(args, "store+rp (no interest)", republish=True, subscribers=1, to_subscribed=False)
    run(args, "store+rp+1", republish=True, subscribers=1, to_subscribed=True)
    run(args, "store+rp+4", republish=True, subscribers=4, to_subscribed=True)


if __name__ == "__main__":
    main()
