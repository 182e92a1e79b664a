#!/usr/bin/env node
// Publishes events to ssegate over gRPC (ssegate.v1.Publisher), from Node.js.
//
// Shows: a channel, an interceptor that adds `authorization: Bearer <key>` to every call,
// deadlines, a retry that reuses one `idempotency_key`, and `PublishStream` for bulk.
//
// Configuration (environment):
//   SSEGATE_API_KEY      publisher API key (without one, calls carry no `authorization`: a
//                        server run with --insecure-open-publish)
//   SSEGATE_GRPC_URL     http://host:port (plaintext) or https://host:port (TLS);
//                        default http://127.0.0.1:50051
//   SSEGATE_TLS_CA_FILE  with https://: the CA that signed the server's certificate
//                        (default: the system's roots)
//   SSEGATE_USER         the user to publish to; default alice
//
// Run `npm ci` first. No code generation: proto-loader reads the .proto at start.

import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

// Retry only what the proto documents as transient: UNAVAILABLE (the server is draining, or
// the NATS backplane could not store the event; another replica may take it) and
// DEADLINE_EXCEEDED (the answer was lost, the publish may or may not have happened). Both are
// safe to retry only because every attempt carries the same idempotency_key. Never retry
// INVALID_ARGUMENT, RESOURCE_EXHAUSTED (a configured limit: the same request hits it again)
// or UNAUTHENTICATED.
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

// Every call gets a deadline: without one, a call to an unreachable or stuck server waits
// forever. A publish is answered in milliseconds; seconds leave room for a busy server.
const CALL_TIMEOUT_MS = 5_000;
const BULK_TIMEOUT_MS = 30_000;

const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../proto');

function loadPublisher() {
  const definition = protoLoader.loadSync('ssegate/v1/publisher.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto (user_ids), not camelCase (userIds)
    longs: String, // uint64 fields (recipients, index) as strings: a JS number loses digits past 2^53
    defaults: true, // absent fields read as their default ('', 0, []) instead of undefined
    oneofs: true, // adds a field naming the member of a oneof that is set (and `_recipients` for `optional`)
  });
  return grpc.loadPackageDefinition(definition).ssegate.v1.Publisher;
}

// Adds `authorization: Bearer <key>` to every call. Why an interceptor and not
// grpc.credentials.createFromMetadataGenerator: call credentials can only be combined with
// TLS channel credentials; on a plaintext channel grpc-js refuses them. Metadata keys must be
// lower case.
function bearerAuth(apiKey) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${apiKey}`);
        next(metadata, listener);
      },
    });
}

function openClient(Publisher, url, apiKey, caFile) {
  const parsed = new URL(url);
  if (!['http:', 'https:'].includes(parsed.protocol) || !parsed.port) {
    throw new Error(`SSEGATE_GRPC_URL must be http://host:port or https://host:port, not ${url}`);
  }
  const credentials =
    parsed.protocol === 'https:'
      ? grpc.credentials.createSsl(caFile ? fs.readFileSync(caFile) : null)
      : grpc.credentials.createInsecure();
  return new Publisher(parsed.host, credentials, { interceptors: apiKey ? [bearerAuth(apiKey)] : [] });
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + CALL_TIMEOUT_MS;
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// Calls a unary rpc, retrying transient failures with exponential backoff and jitter. The
// caller puts an idempotency_key in `request` and every attempt sends that same request: if an
// attempt did reach the server, the retry is answered with the first attempt's event id and
// the event is delivered once.
async function callWithRetry(client, method, request, attempts = 4) {
  let backoffMs = 200;
  for (let attempt = 1; ; attempt++) {
    try {
      return await unary(client, method, request);
    } catch (err) {
      if (!RETRYABLE.has(err.code) || attempt === attempts) throw err;
      console.error(`attempt ${attempt}: ${grpc.status[err.code]}, retrying`);
      await delay(backoffMs * (0.5 + Math.random()));
      backoffMs *= 2;
    }
  }
}

// Sends every item on one PublishStream and hands each answer (one per item, in order) to
// onAnswer. Writing waits for 'drain' when the stream's buffer is full, so a long list never
// piles up in memory. Promise.all: a failure on either side fails the whole call.
async function publishBulk(client, items, onAnswer) {
  const call = client.PublishStream({ deadline: Date.now() + BULK_TIMEOUT_MS });
  const write = async () => {
    for (const item of items) {
      if (!call.write(item)) await once(call, 'drain');
    }
    call.end(); // closing our side ends the stream once every answer is sent
  };
  const read = async () => {
    for await (const answer of call) onAnswer(answer);
  };
  await Promise.all([write(), read()]);
}

async function main() {
  const apiKey = process.env.SSEGATE_API_KEY;
  if (!apiKey) {
    console.error('publish.mjs: no SSEGATE_API_KEY: calling without a key (a server run with --insecure-open-publish)');
  }
  const url = process.env.SSEGATE_GRPC_URL || 'http://127.0.0.1:50051';
  const user = process.env.SSEGATE_USER || 'alice';

  const client = openClient(loadPublisher(), url, apiKey, process.env.SSEGATE_TLS_CA_FILE);
  try {
    // One event to every connection of one user, made safe to retry by a key that is unique
    // to this logical publish (a UUID, or your own message id).
    const request = {
      user_ids: [user],
      event: { name: 'greeting', data: `hello ${user}` },
      idempotency_key: randomUUID(),
    };
    const first = await callWithRetry(client, 'Publish', request);
    // `optional` field: `_recipients` names it when the server set it.
    const recipients = first._recipients ? first.recipients : 'unknown';
    console.log(`greeting: event_id=${first.event_id} recipients=${recipients}`);

    // What a retry after a lost answer looks like: the same request, the same key. The
    // server recognises the key and answers with the first event id; nothing is re-sent.
    const again = await callWithRetry(client, 'Publish', request);
    if (again.event_id !== first.event_id) {
      throw new Error(`a retry with the same key got a new id ${again.event_id}`);
    }
    console.log(`retried greeting with the same key: event_id=${again.event_id} (delivered once)`);

    // Bulk: one stream, one answer per item, in order. Item 1 is invalid on purpose
    // (`ssegate.` names are reserved): it gets its own error code and the stream goes on.
    const toUser = { user_ids: [user] };
    const items = [
      { users: toUser, event: { name: 'progress', data: '1 of 2' } },
      { users: toUser, event: { name: 'ssegate.bogus', data: 'x' } },
      { users: toUser, event: { name: 'progress', data: '2 of 2' } },
      // Empty name: the default `message` event. Newlines are fine in data.
      { users: toUser, event: { data: 'bulk done\n2 items' } },
    ];
    await publishBulk(client, items, (answer) => {
      if (answer.code === grpc.status.OK) {
        console.log(`bulk[${answer.index}]: event_id=${answer.event_id} recipients=${answer.recipients}`);
      } else {
        console.log(`bulk[${answer.index}]: rejected ${grpc.status[answer.code] ?? answer.code}: ${answer.message}`);
      }
    });
  } finally {
    client.close();
  }
}

main().catch((err) => {
  // A gRPC error carries a numeric code; name it, as the other examples do.
  const code = err.code !== undefined && grpc.status[err.code] ? `${grpc.status[err.code]}: ` : '';
  console.error(`publish.mjs: ${code}${err.details ?? err.message}`);
  process.exit(1);
});
