#!/usr/bin/env python3
"""The SSE reader scripts/examples.sh uses to check that each example's events arrived.

Standard library only. Two commands:

  sse_check.py read URL [--header "Name: value"]...
      Opens GET URL (an ssegate /v1/events stream), with those headers (a session cookie for
      an authorizer), and prints one JSON object per line:
        {"open": "<id>"}                          the stream's position (`ssegate.position`,
                                                  the event that opens it) was read
        {"id": ..., "event": ..., "data": ...}    one per other dispatched event
        {"closed": "<reason>"}                    the stream ended (then exit 1)
      Parsed by the WHATWG rules, as a browser's EventSource would.

  sse_check.py expect EVENTS PUBLISHER_OUTPUT USER [--timeout SECONDS]
      Waits (at most --timeout) until EVENTS, the output of `read`, holds the last event id
      that PUBLISHER_OUTPUT (an example's stdout) names in `event_id=...`, then checks that
      the stream received exactly the events every example publishes, with those ids, once
      each and in order. Exit 0 on success, 1 with a one-line reason otherwise.
"""

import argparse
import json
import re
import sys
import time
import urllib.request

# What each example publishes to its user, in order: the greeting (published twice with one
# idempotency key, so delivered once), then the three valid items of the bulk stream.
def expected_events(user):
    return [
        ("greeting", f"hello {user}"),
        ("progress", "1 of 2"),
        ("progress", "2 of 2"),
        ("message", "bulk done\n2 items"),
    ]


def emit(obj):
    print(json.dumps(obj), flush=True)


def read(url, extra_headers=()):
    headers = {"Accept": "text/event-stream"}
    for h in extra_headers:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except OSError as err:
        emit({"closed": f"cannot open {url}: {err}"})
        return 1
    event, data, last_id, opened = "", [], "", False
    pending = b""
    while True:
        try:
            chunk = response.read1(65536)
        except OSError as err:
            emit({"closed": f"read failed: {err}"})
            return 1
        if not chunk:
            emit({"closed": "end of stream"})
            return 1
        pending += chunk
        # Lines end in CRLF, LF or CR. A CR at the very end may be the first half of a CRLF:
        # keep it for the next read.
        cut = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
        *lines, rest = re.split(rb"\r\n|\n|\r", pending[:cut])
        pending = rest + pending[cut:]
        for raw in lines:
            line = raw.decode("utf-8")
            if line == "":
                if event == "ssegate.position" and data:
                    # The server's own event, not a published one: it only tells the position.
                    if not opened:
                        opened = True
                        emit({"open": last_id})
                elif data:
                    emit({"id": last_id, "event": event or "message", "data": "\n".join(data)})
                event, data = "", []
                continue
            if line.startswith(":"):
                continue  # a comment (heartbeat)
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id" and "\0" not in value:
                last_id = value


def received(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expect(events_path, publisher_output, user, timeout):
    with open(publisher_output, encoding="utf-8") as f:
        ids = list(dict.fromkeys(re.findall(r"event_id=(\S+)", f.read())))  # in order, once
    expected = [{"id": i, "event": e, "data": d} for i, (e, d) in zip(ids, expected_events(user))]
    if len(ids) != len(expected_events(user)):
        return f"the publisher printed {len(ids)} distinct event ids, expected {len(expected_events(user))}: {ids}"
    deadline = time.monotonic() + timeout
    while True:
        lines = received(events_path)
        closed = [x["closed"] for x in lines if "closed" in x]
        got = [x for x in lines if "id" in x]
        if any(x["id"] == ids[-1] for x in got) or closed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if got != expected:
        why = f" (stream closed: {closed[0]})" if closed else ""
        return f"user {user} received {json.dumps(got)}, expected {json.dumps(expected)}{why}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("read")
    r.add_argument("url")
    r.add_argument("--header", action="append", default=[])
    e = sub.add_parser("expect")
    e.add_argument("events")
    e.add_argument("publisher_output")
    e.add_argument("user")
    e.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "read":
        return read(args.url, args.header)
    problem = expect(args.events, args.publisher_output, args.user, args.timeout)
    if problem:
        print(f"sse_check.py: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
