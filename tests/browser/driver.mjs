#!/usr/bin/env node
// Headless-Chromium EventSource driver for ssegate's integration tests.
//
// Usage: node tests/browser/driver.mjs <sse-url> [event-name ...]
//
// Serves one HTML page from its own http server on 127.0.0.1 (a different
// origin from the SSE url, so the EventSource request is cross-origin), opens
// it in headless Chromium (playwright-core, CHROMIUM_PATH or /usr/bin/chromium)
// and reports what the page's `new EventSource(sseUrl)` sees, one JSON object
// per line on stdout:
//
//   {"kind":"ready"}                      page loaded, EventSource created (always first)
//   {"kind":"open"}                       'open' fired
//   {"kind":"event","type":T,"data":D,"lastEventId":I}
//                                          a 'message' event or one of the named events
//   {"kind":"error","readyState":N}       'error' fired (N: 0 connecting, 2 closed)
//   {"kind":"closed"}                     after the `close` command
//
// Commands on stdin, one per line:
//   close   page calls es.close(), then {"kind":"closed"} is printed
//   quit    close the browser and exit 0 (stdin EOF does the same)
//
// Launch or page failures go to stderr and the process exits non-zero.
// Set SSE_DRIVER_DEBUG=1 to copy the page's console messages to stderr.
// Only loopback addresses are ever contacted.

import { Harness, isLoopbackHost } from './harness.mjs';

const h = new Harness('driver.mjs');
const fail = (message, code) => h.fail(message, code);

// ---------------------------------------------------------------- arguments

const [sseUrlArg, ...eventNameArgs] = process.argv.slice(2);
if (!sseUrlArg) {
  fail('usage: node tests/browser/driver.mjs <sse-url> [event-name ...]', 2);
}
let sseUrl;
try {
  sseUrl = new URL(sseUrlArg);
} catch {
  fail(`not a valid URL: ${sseUrlArg}`, 2);
}
if (sseUrl.protocol !== 'http:' && sseUrl.protocol !== 'https:') {
  fail(`SSE url must be http(s): ${sseUrlArg}`, 2);
}
if (!isLoopbackHost(sseUrl.hostname)) {
  fail(`refusing non-loopback SSE host ${JSON.stringify(sseUrl.hostname)}`, 2);
}
const eventNames = [...new Set(eventNameArgs.filter((n) => n.length > 0))];

// ---------------------------------------------------------------- page

function scriptJson(value) {
  // JSON that is safe inside an inline <script>.
  return JSON.stringify(value)
    .replace(/</g, '\\u003c')
    .replace(/\u2028/g, '\\u2028')
    .replace(/\u2029/g, '\\u2029');
}

const PAGE = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>ssegate EventSource driver</title></head>
<body>
<script>
(() => {
  const config = ${scriptJson({ url: sseUrl.href, eventNames })};
  let seq = 0;
  const report = (r) => { window.__sseReport(JSON.stringify({ seq: seq++, report: r })); };
  const es = new EventSource(config.url);
  window.__sse = es;
  window.__sseClose = () => { es.close(); report({ kind: 'closed' }); };
  const onAny = (e) => {
    if (e instanceof MessageEvent) {
      report({ kind: 'event', type: e.type, data: e.data, lastEventId: e.lastEventId });
    } else if (e.type === 'open') {
      report({ kind: 'open' });
    } else if (e.type === 'error') {
      report({ kind: 'error', readyState: es.readyState });
    }
  };
  for (const t of new Set(['open', 'error', 'message', ...config.eventNames])) {
    es.addEventListener(t, onAny);
  }
  // Reported synchronously, so it precedes every EventSource event.
  report({ kind: 'ready' });
})();
</script>
</body>
</html>
`;

// ---------------------------------------------------------------- main

h.run(async () => {
  const page = await h.open({
    html: PAGE,
    hosts: ['127.0.0.1', 'localhost', sseUrl.hostname],
    binding: '__sseReport',
  });
  h.commands((cmd) => (cmd === 'close' ? () => page.evaluate(() => window.__sseClose()) : null));
});
