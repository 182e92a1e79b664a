#!/usr/bin/env python3
"""Idle memory per SSE connection by protocol: plaintext HTTP/1.1, TLS (HTTP/1.1 over rustls)
and HTTP/2 (h2c prior knowledge, one stream per connection), against a running ssegate.

    scripts/bench-idle-protocols.py --pid PID --addr 127.0.0.1:18080 --proto tls --connections 2000

Opens the connections (users u0..uN), waits until every one has its response head, holds them
for --hold seconds (answering HTTP/2 pings and settings), and prints one JSON line with the
server's RSS before, while holding, and per connection (VmRSS of --pid, as ssegate-bench
reads it). Loopback only. Needs `pip install h2` for --proto h2.
"""
import argparse
import asyncio
import json
import ssl
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def request(i):
    return (f"GET /v1/events?user=u{i} HTTP/1.1\r\nHost: localhost\r\n"
            "Accept: text/event-stream\r\n\r\n").encode()


async def http1(host, port, i, ctx, hold):
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                   server_hostname="localhost" if ctx else None)
    writer.write(request(i))
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"connection {i}: {status!r}")
    OPENED.add(i)
    await hold.wait()
    writer.close()


async def http2(host, port, i, hold):
    import h2.config
    import h2.connection
    import h2.events
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", f"/v1/events?user=u{i}"), (":scheme", "http"),
                          (":authority", "localhost"), ("accept", "text/event-stream")])
    writer.write(conn.data_to_send())
    opened = False
    while not hold.is_set():
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=0.5)
        except asyncio.TimeoutError:
            continue
        if not data:
            raise RuntimeError(f"connection {i} closed")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(b":status")
                if status != b"200":
                    raise RuntimeError(f"connection {i}: status {status!r}")
                opened = True
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        writer.write(conn.data_to_send())
        if opened and not hold.is_set():
            OPENED.add(i)
    writer.close()


OPENED = set()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--addr", default="127.0.0.1:18080")
    ap.add_argument("--proto", choices=["http1", "tls", "h2"], required=True)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--ca", default="tests/fixtures/tls/ca.pem")
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    if not host.startswith("127.") and host != "::1":
        raise SystemExit("loopback only")
    ctx = None
    if a.proto == "tls":
        ctx = ssl.create_default_context(cafile=a.ca)
        ctx.set_alpn_protocols(["http/1.1"])
    before = rss_kib(a.pid)
    hold = asyncio.Event()
    tasks = []
    started = time.monotonic()
    for i in range(a.connections):
        if a.proto == "h2":
            tasks.append(asyncio.create_task(http2(host, int(port), i, hold)))
        else:
            tasks.append(asyncio.create_task(http1(host, int(port), i, ctx, hold)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while len(OPENED) < a.connections:
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(OPENED)} of {a.connections} connections opened in time")
        await asyncio.sleep(0.2)
    opened_s = time.monotonic() - started
    await asyncio.sleep(a.hold)
    peak = rss_kib(a.pid)
    hold.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"proto": a.proto, "connections": a.connections, "open_s": round(opened_s, 2),
                      "server_rss_before_kib": before, "server_rss_held_kib": peak,
                      "server_rss_per_conn_kib": round((peak - before) / a.connections, 3)}))


if __name__ == "__main__":
    asyncio.run(main())
