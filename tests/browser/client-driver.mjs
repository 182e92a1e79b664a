#!/usr/bin/env node
// Headless-Chromium driver for ssegate's browser client (clients/js/ssegate.js) as served by
// the server under test at /v1/client.js.
//
// Usage: node tests/browser/client-driver.mjs <server-base-url> <options-json>
//
// <options-json>: {"query": {...}, "names": [...], "tokens": bool, "minDelay": ms,
// "maxDelay": ms, "retry": ms, "lastEventId": id}. `tokens`: the client gets a `getToken` that
// asks the test. `names`: the event names the page adds `on()` handlers for, besides `message`.
//
// Serves one page from its own http server on 127.0.0.1 (another origin than the server, so
// both the module import and the stream are cross-origin); the page imports
// <server-base-url>/v1/client.js and opens `<server-base-url>/v1/events` with it. Prints one
// JSON object per line on stdout:
//
//   {"kind":"ready"}                          module imported, client created (after its first state)
//   {"kind":"state","state":S,"detail":{..}}  onStateChange
//   {"kind":"event","name":N,"id":I,"data":D,"lastEventId":L}
//                                             a `message` event or one of `names`; L is the
//                                             client's `lastEventId` as the handler runs
//   {"kind":"missed","payload":{..},"lastEventId":L}      onMissed
//   {"kind":"disconnect","payload":{..},"lastEventId":L}  onDisconnect
//   {"kind":"token_request"}                  getToken() was called; answer with `token`
//   {"kind":"closed"}                         after the `close` command
//   {"kind":"reopened","lastEventId":L}       after the `reopen` command
//   {"kind":"last_id","lastEventId":L}        after the `wait_last_id` command
//
// Commands on stdin, one per line:
//   token <jwt>        resolve the oldest pending getToken() call
//   close              client.close(), then {"kind":"closed"}
//   reopen [<json>]    what a page does that stored the position and comes back:
//                      client.close(), then a new client with the same options, `lastEventId`
//                      set to the old client's `lastEventId` (L), and <json> (no spaces)
//                      merged over them; then {"kind":"reopened","lastEventId":L}
//   wait_last_id <ms>  wait until the client's `lastEventId` is not empty, at most <ms>
//                      milliseconds (checking every 10 ms), then {"kind":"last_id",...} with
//                      it (still empty if the deadline passed)
//   quit               close the browser and exit 0 (stdin EOF does the same)
//
// Only loopback addresses are ever contacted. SSE_DRIVER_DEBUG=1 copies the page's console.

import { Harness, isLoopbackHost } from './harness.mjs';

const h = new Harness('client-driver.mjs');
const fail = (message, code) => h.fail(message, code);

const [baseArg, optionsArg = '{}'] = process.argv.slice(2);
let base;
let options;
try {
  base = new URL(baseArg);
  options = JSON.parse(optionsArg);
} catch (err) {
  fail(`usage: node client-driver.mjs <server-base-url> <options-json> (${err.message})`, 2);
}
if (!isLoopbackHost(base.hostname)) {
  fail(`refusing non-loopback host ${JSON.stringify(base.hostname)}`, 2);
}
const config = {
  module: new URL('/v1/client.js', base).href,
  url: new URL('/v1/events', base).href,
  options,
};
const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>ssegate client driver</title></head>
<body>
<script type="module">
const config = ${JSON.stringify(config).replace(/</g, '\\u003c')};
let seq = 0;
const report = (r) => window.__report(JSON.stringify({ seq: seq++, report: r }));
const { SsegateClient } = await import(config.module);
const tokenWaiters = [];
window.__giveToken = (t) => tokenWaiters.shift()?.(t);
let client;
function open(o) {
  const c = new SsegateClient(config.url, {
    query: o.query ?? {},
    lastEventId: o.lastEventId,
    minDelay: o.minDelay,
    maxDelay: o.maxDelay,
    retry: o.retry,
    getToken: o.tokens
      ? () => new Promise((resolve) => { tokenWaiters.push(resolve); report({ kind: 'token_request' }); })
      : undefined,
    onStateChange: (state, detail) => report({ kind: 'state', state, detail: JSON.parse(JSON.stringify(detail)) }),
    onMissed: (payload) => report({ kind: 'missed', payload, lastEventId: c.lastEventId }),
    onDisconnect: (payload) => report({ kind: 'disconnect', payload, lastEventId: c.lastEventId }),
  });
  for (const name of new Set(['message', ...(o.names ?? [])])) {
    c.on(name, (e) => report({ kind: 'event', name: e.name, id: e.id, data: e.data, lastEventId: c.lastEventId }));
  }
  return c;
}
client = open(config.options);
window.__close = () => { client.close(); report({ kind: 'closed' }); };
window.__reopen = (extra) => {
  const last = client.lastEventId;
  client.close();
  client = open({ ...config.options, lastEventId: last, ...extra });
  report({ kind: 'reopened', lastEventId: last });
};
window.__waitLastId = (ms) => new Promise((resolve) => {
  const end = Date.now() + ms;
  const check = () => {
    if (!client.lastEventId && Date.now() < end) return void setTimeout(check, 10);
    report({ kind: 'last_id', lastEventId: client.lastEventId });
    resolve();
  };
  check();
});
report({ kind: 'ready' });
</script>
</body></html>
`;

h.run(async () => {
  const page = await h.open({ html: PAGE, hosts: ['127.0.0.1', 'localhost', base.hostname], binding: '__report' });
  h.commands((cmd, arg) => {
    if (cmd === 'token') return () => page.evaluate((t) => window.__giveToken(t), arg);
    if (cmd === 'close') return () => page.evaluate(() => window.__close());
    if (cmd === 'reopen') return () => page.evaluate((extra) => window.__reopen(extra), JSON.parse(arg ?? '{}'));
    if (cmd === 'wait_last_id') return () => page.evaluate((ms) => window.__waitLastId(ms), Number(arg));
    return null;
  });
});
