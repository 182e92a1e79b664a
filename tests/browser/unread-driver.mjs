#!/usr/bin/env node
// Headless-Chromium page with an unread counter, for the retained-events test ("State on page
// load" in the README): a plain `EventSource` whose `unread` listener sets a badge's text. The
// page fetches nothing: the count it shows on load comes from the stream alone.
//
// Usage: node tests/browser/unread-driver.mjs <sse-url>
//
// Serves the page on 127.0.0.1 (another origin than the SSE url) and opens it in headless
// Chromium (playwright-core, CHROMIUM_PATH or /usr/bin/chromium). Prints one JSON object per
// line on stdout, in page order across reloads:
//
//   {"kind":"ready","badge":B}                        the page's script ran (B: the badge text)
//   {"kind":"unread","badge":B,"lastEventId":I}       an `unread` event set the badge to B
//   {"kind":"requests","list":[{"type":T,"url":U}]}   after the `requests` command
//
// Commands on stdin, one per line:
//   load       open the page (the badge and its EventSource); always the first command
//   reload     reload the page (a new EventSource, as on a real reload)
//   requests   print the requests the page made since the last load or reload
//   quit       close the browser and exit 0 (stdin EOF does the same)
//
// Only loopback addresses are ever contacted. SSE_DRIVER_DEBUG=1 copies the page's console.

import { Harness, isLoopbackHost } from './harness.mjs';

const h = new Harness('unread-driver.mjs');
const fail = (message, code) => h.fail(message, code);

const [sseUrlArg] = process.argv.slice(2);
let sseUrl;
try {
  sseUrl = new URL(sseUrlArg);
} catch {
  fail('usage: node tests/browser/unread-driver.mjs <sse-url>', 2);
}
if (!isLoopbackHost(sseUrl.hostname)) {
  fail(`refusing non-loopback SSE host ${JSON.stringify(sseUrl.hostname)}`, 2);
}

// The harness opens `/` first; the app runs only at `/?app`, which `load` navigates to once
// the request log is listening, so the log covers the whole first load. Reports are numbered
// in sessionStorage, so the numbering goes on across reloads (the harness prints in order).
const PAGE = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>inbox</title><link rel="icon" href="data:,"></head>
<body>
<p>Unread: <span id="unread">–</span></p>
<script>
if (location.search === '?app') {
  const url = ${JSON.stringify(sseUrl.href).replace(/</g, '\\u003c')};
  const badge = document.getElementById('unread');
  const report = (r) => {
    const seq = Number(sessionStorage.getItem('seq') || '0');
    sessionStorage.setItem('seq', String(seq + 1));
    window.__report(JSON.stringify({ seq, report: r }));
  };
  report({ kind: 'ready', badge: badge.textContent });
  // The whole client side of an unread counter: the server sends the count itself.
  const es = new EventSource(url);
  es.addEventListener('unread', (e) => {
    badge.textContent = e.data;
    report({ kind: 'unread', badge: badge.textContent, lastEventId: e.lastEventId });
  });
}
</script>
</body>
</html>
`;

h.run(async () => {
  const page = await h.open({ html: PAGE, hosts: ['127.0.0.1', 'localhost', sseUrl.hostname], binding: '__report' });
  let requests = [];
  page.on('request', (r) => requests.push({ type: r.resourceType(), url: r.url() }));
  const navigate = (go) => async () => {
    requests = [];
    await go();
  };
  const appUrl = new URL('/?app', page.url()).href;
  h.commands((cmd) => {
    if (cmd === 'load') return navigate(() => page.goto(appUrl, { waitUntil: 'load', timeout: 30_000 }));
    if (cmd === 'reload') return navigate(() => page.reload({ waitUntil: 'load', timeout: 30_000 }));
    if (cmd === 'requests') return async () => h.emit({ kind: 'requests', list: requests });
    return null;
  });
});
