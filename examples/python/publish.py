#!/usr/bin/env python3
"""Publishes events to ssegate over gRPC (ssegate.v1.Publisher), from Python.

Shows: a channel, an interceptor that adds `authorization: Bearer <key>` to every call,
deadlines, a retry that reuses one `idempotency_key`, and `PublishStream` for bulk.

Configuration (environment):
  SSEGATE_API_KEY      publisher API key (without one, calls carry no `authorization`: a
                       server run with --insecure-open-publish)
  SSEGATE_GRPC_URL     http://host:port (plaintext) or https://host:port (TLS);
                       default http://127.0.0.1:50051
  SSEGATE_TLS_CA_FILE  with https://: the CA that signed the server's certificate
                       (default: the system's roots)
  SSEGATE_USER         the user to publish to; default alice

Run `pip install -r requirements.txt` first. The code is generated from the proto at start
(see load_generated_code); in your own project, generate it once at build time instead.
"""

import collections
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import grpc

# Retry only what the proto documents as transient: UNAVAILABLE (the server is draining, or
# the NATS backplane could not store the event; another replica may take it) and
# DEADLINE_EXCEEDED (the answer was lost, the publish may or may not have happened). Both are
# safe to retry only because every attempt carries the same idempotency_key. Never retry
# INVALID_ARGUMENT, RESOURCE_EXHAUSTED (a configured limit: the same request hits it again)
# or UNAUTHENTICATED.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Every call gets a deadline: without one, a call to an unreachable or stuck server waits
# forever. A publish is answered in milliseconds; seconds leave room for a busy server.
CALL_TIMEOUT_SECONDS = 5.0
BULK_TIMEOUT_SECONDS = 30.0

# PublishStreamResponse.code holds a google.rpc.Code number; grpc.StatusCode values are
# (number, text) pairs.
OK = grpc.StatusCode.OK.value[0]
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def load_generated_code():
    """Generates publisher_pb2 / publisher_pb2_grpc into a temporary directory and imports them.

    The generated `ssegate/v1/publisher_pb2_grpc.py` does `from ssegate.v1 import
    publisher_pb2`: a module path relative to the `-I` root. So `-I` must be the directory that
    holds `ssegate/` (here `proto/`), not `proto/ssegate/v1`, and the output directory must be
    on sys.path.
    """
    proto_root = Path(__file__).resolve().parents[2] / "proto"
    with tempfile.TemporaryDirectory(prefix="ssegate-py-") as out:
        # The same command you would run at build time (grpcio-tools is needed only for it).
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}",
             f"--python_out={out}", f"--grpc_python_out={out}",
             str(proto_root / "ssegate" / "v1" / "publisher.proto")],
            check=True,
        )
        sys.path.insert(0, out)
        from ssegate.v1 import publisher_pb2, publisher_pb2_grpc
        sys.path.remove(out)  # imported: the directory can go
    return publisher_pb2, publisher_pb2_grpc


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                            "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call on the channel.

    Why an interceptor and not grpc.access_token_call_credentials: call credentials are only
    sent over a secure channel. On a plaintext channel every call fails, client-side, with
    UNAUTHENTICATED "Established channel does not have a sufficient security level to transfer
    call credential". Metadata keys must be lower case.
    """

    def __init__(self, api_key):
        self._header = ("authorization", f"Bearer {api_key}")

    def _with_auth(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_auth(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_auth(details), request_iterator)


def open_channel(url, api_key, ca_file=None):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        sys.exit(f"publish.py: SSEGATE_GRPC_URL must be http://host:port or https://host:port, not {url!r}")
    target = f"{parts.hostname}:{parts.port}"
    if parts.scheme == "https":
        ca = Path(ca_file).read_bytes() if ca_file else None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
    else:
        channel = grpc.insecure_channel(target)
    return grpc.intercept_channel(channel, BearerAuth(api_key)) if api_key else channel


def call_with_retry(rpc, request, attempts=4):
    """Calls a unary rpc, retrying transient failures with exponential backoff and jitter.

    The caller puts an idempotency_key in `request`, and every attempt sends that same
    request: if an attempt did reach the server, the retry is answered with the first
    attempt's event id and the event is delivered once.
    """
    backoff = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return rpc(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE or attempt == attempts:
                raise
            print(f"attempt {attempt}: {err.code().name}, retrying", file=sys.stderr)
            time.sleep(backoff * random.uniform(0.5, 1.5))
            backoff *= 2


def main():
    api_key = os.environ.get("SSEGATE_API_KEY")
    if not api_key:
        print("publish.py: no SSEGATE_API_KEY: calling without a key (a server run with "
              "--insecure-open-publish)", file=sys.stderr)
    url = os.environ.get("SSEGATE_GRPC_URL", "http://127.0.0.1:50051")
    user = os.environ.get("SSEGATE_USER", "alice")

    pb, pb_grpc = load_generated_code()
    with open_channel(url, api_key, os.environ.get("SSEGATE_TLS_CA_FILE")) as channel:
        stub = pb_grpc.PublisherStub(channel)

        # One event to every connection of one user, made safe to retry by a key that is
        # unique to this logical publish (a UUID, or your own message id).
        request = pb.PublishRequest(
            user_ids=[user],
            event=pb.Event(name="greeting", data=f"hello {user}"),
            idempotency_key=str(uuid.uuid4()),
        )
        first = call_with_retry(stub.Publish, request)
        recipients = first.recipients if first.HasField("recipients") else "unknown"
        print(f"greeting: event_id={first.event_id} recipients={recipients}")

        # What a retry after a lost answer looks like: the same request, the same key. The
        # server recognises the key and answers with the first event id; nothing is re-sent.
        again = call_with_retry(stub.Publish, request)
        if again.event_id != first.event_id:
            sys.exit(f"publish.py: a retry with the same key got a new id {again.event_id}")
        print(f"retried greeting with the same key: event_id={again.event_id} (delivered once)")

        # Bulk: one stream, one answer per item, in order. Item 1 is invalid on purpose
        # (`ssegate.` names are reserved): it gets its own error code and the stream goes on.
        def items():
            to_user = pb.UserTarget(user_ids=[user])
            yield pb.PublishStreamRequest(users=to_user, event=pb.Event(name="progress", data="1 of 2"))
            yield pb.PublishStreamRequest(users=to_user, event=pb.Event(name="ssegate.bogus", data="x"))
            yield pb.PublishStreamRequest(users=to_user, event=pb.Event(name="progress", data="2 of 2"))
            # Empty name: the default `message` event. Newlines are fine in data.
            yield pb.PublishStreamRequest(users=to_user, event=pb.Event(data="bulk done\n2 items"))

        # grpcio pulls from the iterator as the stream has room (flow control), so a long
        # generator never piles up in memory. The deadline covers the whole stream.
        for answer in stub.PublishStream(items(), timeout=BULK_TIMEOUT_SECONDS):
            if answer.code == OK:
                print(f"bulk[{answer.index}]: event_id={answer.event_id} recipients={answer.recipients}")
            else:
                name = STATUS_NAMES.get(answer.code, str(answer.code))
                print(f"bulk[{answer.index}]: rejected {name}: {answer.message}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        sys.exit(f"publish.py: {err.code().name}: {err.details()}")
