#!/usr/bin/env python3
"""An authorizer for ssegate, answering Connect/JSON: standard library only.

ssegate started with

    --authorizer-addr http://127.0.0.1:8081 --authorizer-protocol connect --authorizer-cookie SESSION

asks this server, for every new event stream, whether it may open and as whom:
`POST /ssegate.v1.Authorizer/Authorize` with the browser's cookies, the user, groups and
topics the stream's query asked for, and its address, as JSON (the proto3 JSON form of
proto/ssegate/v1/authorizer.proto). It answers with the session's user, or denies with the
HTTP status and reason the browser gets:

    {"allow": {"userId": "alice", "groups": ["staff"], "topics": [], "expiresAt": "1767225600"}}
    {"deny": {"status": 401, "reason": "not signed in"}}

The session store here is a dict (`SESSIONS`); in your application it is the one your web
framework already uses for the `SESSION` cookie. `expiresAt` is when the session ends: ssegate
closes the stream then (with `ssegate.disconnect`, `token_expired`), the browser reconnects
and is asked about again, resuming with `Last-Event-ID` so it misses nothing. A signed-out
session is then refused.

Configuration (environment):
  AUTHORIZER_ADDR  host:port to listen on; default 127.0.0.1:8081 (port 0: any free port).
                   The bound address is printed as `listening on http://HOST:PORT`.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = "/ssegate.v1.Authorizer/Authorize"

# session id -> (user id, groups). Demo data: "s3cr3t-alice" is alice's session cookie.
SESSIONS = {
    "s3cr3t-alice": ("alice", ["staff"]),
    "s3cr3t-bob": ("bob", []),
}

# How long a granted stream may run before ssegate asks again (the session's remaining life
# in a real application). Short enough that a sign-out ends open streams soon after.
GRANT_SECONDS = 15 * 60


def decide(request):
    """The answer to one AuthorizeRequest (a dict from its JSON)."""
    sessions = [c.get("value", "") for c in request.get("cookies", []) if c.get("name") == "SESSION"]
    if len(sessions) != 1:
        # None, or two (set for two paths or domains): which one is meant is unclear.
        return {"deny": {"status": 401, "reason": "not signed in"}}
    found = SESSIONS.get(sessions[0])
    if found is None:
        return {"deny": {"status": 401, "reason": "not signed in (unknown or expired session)"}}
    user, groups = found
    asked = request.get("user", "")
    if asked and asked != user:
        return {"deny": {"status": 403, "reason": "this session is not that user's"}}
    # proto3 JSON writes int64 as a string; a number is accepted too.
    return {"allow": {"userId": user, "groups": groups, "topics": [], "expiresAt": str(int(time.time()) + GRANT_SECONDS)}}


class Handler(BaseHTTPRequestHandler):
    # ssegate keeps connections open between calls.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        if self.path != PATH:
            return self.reply(404, {"code": "not_found", "message": f"POST {PATH}"})
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self.reply(415, {"code": "invalid_argument", "message": "expected application/json"})
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.reply(400, {"code": "invalid_argument", "message": "the body is not JSON"})
        answer = decide(request)
        verdict = "allow " + answer["allow"]["userId"] if "allow" in answer else "deny"
        print(f"authorize from {request.get('peer', '?')}: {verdict}", file=sys.stderr, flush=True)
        self.reply(200, answer)

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass  # one line per decision instead (above)


def main():
    host, _, port = os.environ.get("AUTHORIZER_ADDR", "127.0.0.1:8081").rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    bound_host, bound_port = server.server_address[:2]
    print(f"listening on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
