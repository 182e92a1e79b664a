#!/usr/bin/env node
// Drives an SSE client inside headless Chromium (playwright-core, CHROMIUM_PATH or
// /usr/bin/chromium), the way a page uses it.
//
// Usage: node tests/clients/browser.mjs <mode> [event-name ...]
//   fetch-event-source  @microsoft/fetch-event-source (its ESM build, served to the page from
//                       node_modules) with the recipe of docs/client-libraries.md: onclose
//                       throws so that the library retries (it keeps Last-Event-ID itself),
//                       onerror returns nothing (wait the server's `retry:`)
//   native              Chromium's own EventSource: onmessage plus a listener per event name
//                       given and `ssegate.missed` (none for `ssegate.position`)
//
// The page is served from this process's own http server on 127.0.0.1 (another origin than
// the SSE url: run.py allows it with --cors-allowed-origins, as a deployment would); the
// first line printed names that origin. Each request the page makes to /v1/events is reported
// with the Last-Event-ID header it carries. Protocol: protocol.mjs.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromiumArgs } from '../browser/harness.mjs';
import { commands, emit, log } from './protocol.mjs';

const NAME = 'browser.mjs';
const HERE = path.dirname(fileURLToPath(import.meta.url));
const FES_DIR = path.join(HERE, 'node_modules/@microsoft/fetch-event-source/lib/esm');

const [mode, ...names] = process.argv.slice(2);
if (mode !== 'fetch-event-source' && mode !== 'native') {
  log(NAME, 'usage: node browser.mjs fetch-event-source|native [event-name ...]');
  process.exit(2);
}
const listenNames = [...new Set([...names, 'ssegate.missed'])].filter((n) => n !== 'message');

const CLIENTS = {
  'fetch-event-source': `
    import { fetchEventSource } from '/lib/fetch-event-source/index.js';
    class RetriableError extends Error {}
    window.__connect = (url) => {
      fetchEventSource(url, {
        openWhenHidden: true,
        async onopen(response) {
          const type = response.headers.get('content-type') || '';
          if (response.ok && type.startsWith('text/event-stream')) {
            report({ kind: 'open' });
            return;
          }
          throw new RetriableError('HTTP ' + response.status + ' ' + type);
        },
        onmessage(msg) {
          report({ kind: 'event', type: msg.event, data: msg.data, id: msg.id, retry: msg.retry ?? null });
        },
        onclose() {
          // The server ended the stream (a restart, a drain): without this throw the library
          // resolves and never reconnects.
          report({ kind: 'error', message: 'stream ended' });
          throw new RetriableError('stream ended');
        },
        onerror(err) {
          report({ kind: 'error', message: String((err && err.message) || err) });
          // Returning nothing retries after the server's retry: interval.
        },
      });
    };`,
  native: `
    window.__connect = (url) => {
      const es = new EventSource(url);
      window.__es = es;
      const onEvent = (e) => report({ kind: 'event', type: e.type, data: e.data, id: e.lastEventId });
      es.onopen = () => report({ kind: 'open' });
      es.onerror = () => report({ kind: 'error', message: 'error (readyState ' + es.readyState + ')' });
      es.onmessage = onEvent;
      for (const name of config.names) es.addEventListener(name, onEvent);
    };`,
};

const PAGE = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>ssegate client library driver</title></head>
<body>
<script type="module">
  const config = ${JSON.stringify({ names: listenNames }).replace(/</g, '\\u003c')};
  let seq = 0;
  const report = (r) => { window.__report(JSON.stringify({ seq: seq++, report: r })); };
  ${CLIENTS[mode]}
  window.__driverReady = true;
</script>
</body>
</html>`;

// ---------------------------------------------------------------- page server

function servePage(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (req.method === 'GET' && url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(PAGE);
    return;
  }
  const lib = url.pathname.match(/^\/lib\/fetch-event-source\/([A-Za-z0-9_-]+)(\.js)?$/);
  if (req.method === 'GET' && lib) {
    // The ESM build imports './parse' without an extension; the browser asks for it as is.
    const file = path.join(FES_DIR, `${lib[1]}.js`);
    fs.readFile(file, (err, body) => {
      if (err) {
        res.writeHead(404, { 'content-type': 'text/plain' });
        res.end('not found\n');
        return;
      }
      res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8', 'cache-control': 'no-store' });
      res.end(body);
    });
    return;
  }
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found\n');
}

// ---------------------------------------------------------------- main

let browser = null;
let quitting = false;
async function quit(code) {
  if (quitting) return;
  quitting = true;
  setTimeout(() => process.exit(code), 10_000).unref();
  try {
    await browser?.close();
  } catch {
    // already gone
  }
  process.exit(code);
}
process.on('SIGTERM', () => quit(143));
process.on('SIGINT', () => quit(130));

async function main() {
  if (mode === 'fetch-event-source' && !fs.existsSync(path.join(FES_DIR, 'index.js'))) {
    log(NAME, `missing ${FES_DIR}/index.js; run \`npm ci\` in tests/clients`);
    process.exit(1);
  }
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (err) {
    log(NAME, `cannot load playwright-core (${err.message}); run \`npm ci\` in tests/clients`);
    process.exit(1);
  }
  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  try {
    fs.accessSync(executablePath, fs.constants.X_OK);
  } catch {
    log(NAME, `Chromium not found at ${executablePath} (apt-get install chromium, or set CHROMIUM_PATH)`);
    process.exit(1);
  }

  const server = http.createServer(servePage);
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const origin = `http://127.0.0.1:${server.address().port}`;

  browser = await chromium.launch({
    executablePath,
    headless: true,
    timeout: 60_000,
    args: chromiumArgs(['127.0.0.1', 'localhost']),
  });
  browser.on('disconnected', () => {
    if (!quitting) {
      log(NAME, 'browser disconnected unexpectedly');
      process.exit(1);
    }
  });
  const page = await (await browser.newContext()).newPage();
  page.on('pageerror', (err) => log(NAME, `page error: ${err.message}`));
  page.on('crash', () => {
    log(NAME, 'page crashed');
    quit(1);
  });
  if (process.env.SSE_DRIVER_DEBUG) page.on('console', (m) => log(NAME, `console.${m.type()}: ${m.text()}`));
  // allHeaders(): the headers as sent, including the Last-Event-ID that Chromium's EventSource
  // adds below the page (headers() shows only what the page itself set).
  let requests = Promise.resolve();
  page.on('request', (req) => {
    if (req.method() !== 'GET' || new URL(req.url()).pathname !== '/v1/events') return;
    const headers = req.allHeaders().catch(() => req.headers());
    requests = requests.then(async () => {
      emit({ kind: 'request', lastEventId: (await headers)['last-event-id'] ?? null });
    });
  });

  // Reports are printed in page order.
  const pending = new Map();
  let next = 0;
  await page.exposeFunction('__report', (json) => {
    const { seq, report } = JSON.parse(json);
    pending.set(seq, report);
    while (pending.has(next)) {
      emit(pending.get(next));
      pending.delete(next);
      next += 1;
    }
  });
  await page.goto(`${origin}/`, { waitUntil: 'load', timeout: 30_000 });
  await page.waitForFunction(() => window.__driverReady === true, null, { timeout: 30_000 });

  commands(NAME, {
    onConnect: (url) => page.evaluate((u) => window.__connect(u), url),
    onQuit: () => quit(0),
  });
  emit({ kind: 'ready', origin, version: mode === 'native' ? `Chromium ${browser.version()}` : undefined });
}

main().catch((err) => {
  log(NAME, err.stack || err.message);
  quit(1);
});
