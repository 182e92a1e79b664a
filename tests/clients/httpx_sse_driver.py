#!/usr/bin/env python3
"""Drives httpx-sse (with httpx) the way docs/client-libraries.md tells an application to.

Usage: python tests/clients/httpx_sse_driver.py   (commands on stdin, see protocol.mjs)

httpx-sse parses a response; it does not reconnect. The recipe, which this driver is:
keep the id of the last event that carried one (`sse.id`, including the `ssegate.position`
event that opens every stream), and when the stream ends or fails, wait the server's `retry`
and open a new one with `Last-Event-ID` set to it. Every event the library yields is reported
to run.py (which applies the rest of the recipe: ignore `ssegate.*` events you do not handle).
"""

import json
import os
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
from httpx_sse import SSEError, connect_sse

NAME = "httpx_sse_driver.py"
MAX_ATTEMPTS = 100  # connections opened before giving up (run.py stops the driver long before)
_out_lock = threading.Lock()


def emit(obj):
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def log(message):
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def is_loopback(url):
    parts = urlsplit(url)
    host = parts.hostname or ""
    return parts.scheme in ("http", "https") and (
        host in ("localhost", "::1") or host.startswith("127.")
    )


def follow(url):
    last_id = None  # the resume point: the id of the last event that had one
    retry_ms = 3000  # until the server sends `retry:`
    # A read timeout of a few heartbeat intervals notices a dead connection.
    timeout = httpx.Timeout(10.0, read=30.0)
    with httpx.Client(timeout=timeout) as client:
        for _ in range(MAX_ATTEMPTS):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            emit({"kind": "request", "lastEventId": last_id})
            try:
                with connect_sse(client, "GET", url, headers=headers) as source:
                    status = source.response.status_code
                    if status != 200:
                        # 429/503 (limits, drain): retry later; a real app stops on 400/401/403.
                        raise SSEError(f"HTTP {status}")
                    for sse in source.iter_sse():
                        if sse.retry is not None:
                            retry_ms = sse.retry
                        if sse.id:
                            last_id = sse.id
                        emit({"kind": "event", "type": sse.event, "data": sse.data, "id": sse.id,
                              "retry": sse.retry})
                emit({"kind": "error", "message": "stream ended"})
            except (httpx.HTTPError, SSEError) as err:
                emit({"kind": "error", "message": f"{type(err).__name__}: {err}"})
            time.sleep(retry_ms / 1000.0)
    log(f"gave up after {MAX_ATTEMPTS} connections")


def main():
    started = threading.Event()

    def read_commands():
        for line in sys.stdin:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "connect" and len(parts) == 2 and not started.is_set():
                if not is_loopback(parts[1]):
                    log(f"refusing non-loopback url {parts[1]!r}")
                    os._exit(2)
                started.url = parts[1]
                started.set()
            elif parts[0] == "quit":
                break
            else:
                log(f"unknown command {line.strip()!r}")
        sys.stdout.flush()
        os._exit(0)

    threading.Thread(target=read_commands, daemon=True).start()
    emit({"kind": "ready"})
    started.wait()
    follow(started.url)
    return 1


if __name__ == "__main__":
    sys.exit(main())
