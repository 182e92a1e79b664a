#!/usr/bin/env node
// Headless-Chromium driver for ssegate's browser client (clients/js/ssegate.js) as served by
// the server under test at /v1/client.js.
//
// Usage: node tests/browser/client-driver.mjs <server-base-url> <options-json>
//
// <options-json>: {"query": {...}, "names": [...], "tokens": bool, "minDelay": ms,
// "maxDelay": ms, "retry": ms}. `tokens`: the client gets a `getToken` that asks the test.
//
// Serves one page from its own http server on 127.0.0.1 (another origin than the server, so
// both the module import and the stream are cross-origin); the page imports
// <server-base-url>/v1/client.js and opens `<server-base-url>/v1/events` with it. Prints one
// JSON object per line on stdout:
//
//   {"kind":"ready"}                          module imported, client created (after its first state)
//   {"kind":"state","state":S,"detail":{..}}  onStateChange
//   {"kind":"event","name":N,"id":I,"data":D} a `message` event or one of `names`
//   {"kind":"missed","payload":{..}}          onMissed
//   {"kind":"disconnect","payload":{..}}      onDisconnect
//   {"kind":"token_request"}                  getToken() was called; answer with `token`
//   {"kind":"closed"}                         after the `close` command
//
// Commands on stdin, one per line:
//   token <jwt>  resolve the oldest pending getToken() call
//   close        client.close(), then {"kind":"closed"}
//   quit         close the browser and exit 0 (stdin EOF does the same)
//
// Only loopback addresses are ever contacted. SSE_DRIVER_DEBUG=1 copies the page's console.

import http from 'node:http';
import fs from 'node:fs';
import readline from 'node:readline';

const DEBUG = !!process.env.SSE_DRIVER_DEBUG;

function fail(message, code = 1) {
  process.stderr.write(`client-driver.mjs: ${message}\n`);
  process.exit(code);
}

const [baseArg, optionsArg = '{}'] = process.argv.slice(2);
let base;
let options;
try {
  base = new URL(baseArg);
  options = JSON.parse(optionsArg);
} catch (err) {
  fail(`usage: node client-driver.mjs <server-base-url> <options-json> (${err.message})`, 2);
}
if (!/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(base.hostname) && base.hostname !== 'localhost') {
  fail(`refusing non-loopback host ${JSON.stringify(base.hostname)}`, 2);
}
const hosts = [...new Set(['127.0.0.1', 'localhost', base.hostname])];
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-proxy-server',
  `--host-resolver-rules=MAP * ~NOTFOUND, ${hosts.map((h) => `EXCLUDE ${h}`).join(', ')}`,
];

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// Reports carry a sequence number and are printed strictly in page order.
let nextSeq = 0;
const pending = new Map();
function onReport(json) {
  const msg = JSON.parse(json);
  pending.set(msg.seq, msg.report);
  while (pending.has(nextSeq)) {
    emit(pending.get(nextSeq));
    pending.delete(nextSeq);
    nextSeq += 1;
  }
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
const o = config.options;
const tokenWaiters = [];
window.__giveToken = (t) => tokenWaiters.shift()?.(t);
const client = new SsegateClient(config.url, {
  query: o.query ?? {},
  minDelay: o.minDelay,
  maxDelay: o.maxDelay,
  retry: o.retry,
  getToken: o.tokens
    ? () => new Promise((resolve) => { tokenWaiters.push(resolve); report({ kind: 'token_request' }); })
    : undefined,
  onStateChange: (state, detail) => report({ kind: 'state', state, detail: JSON.parse(JSON.stringify(detail)) }),
  onMissed: (payload) => report({ kind: 'missed', payload }),
  onDisconnect: (payload) => report({ kind: 'disconnect', payload }),
});
for (const name of new Set(['message', ...(o.names ?? [])])) {
  client.on(name, (e) => report({ kind: 'event', name: e.name, id: e.id, data: e.data }));
}
window.__close = () => { client.close(); report({ kind: 'closed' }); };
report({ kind: 'ready' });
</script>
</body></html>
`;

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(PAGE);
  } else {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  }
});

let browser = null;
let shuttingDown = false;
async function shutdown(code) {
  if (shuttingDown) return;
  shuttingDown = true;
  setTimeout(() => process.exit(code), 10_000).unref();
  try {
    if (browser) await browser.close();
  } catch {
    // already gone
  }
  server.close();
  server.closeAllConnections?.();
  process.exit(code);
}
process.on('SIGTERM', () => shutdown(143));
process.on('SIGINT', () => shutdown(130));

async function main() {
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (err) {
    fail(`cannot load playwright-core (${err.message}); run \`npm ci\` in tests/browser`);
  }
  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  try {
    fs.accessSync(executablePath, fs.constants.X_OK);
  } catch {
    fail(`Chromium not found at ${executablePath}; run scripts/test.sh or set CHROMIUM_PATH`);
  }
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  browser = await chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS, timeout: 60_000 });
  browser.on('disconnected', () => {
    if (!shuttingDown) {
      process.stderr.write('client-driver.mjs: browser disconnected unexpectedly\n');
      shutdown(1);
    }
  });
  const page = await (await browser.newContext()).newPage();
  page.on('pageerror', (err) => process.stderr.write(`client-driver.mjs: page error: ${err.message}\n`));
  page.on('crash', () => shutdown(1));
  if (DEBUG) page.on('console', (m) => process.stderr.write(`client-driver.mjs: console: ${m.text()}\n`));
  await page.exposeFunction('__report', onReport);
  await page.goto(`http://127.0.0.1:${server.address().port}/`, { waitUntil: 'load', timeout: 30_000 });

  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  let queue = Promise.resolve();
  const enqueue = (fn) => {
    queue = queue.then(fn).catch((err) => {
      process.stderr.write(`client-driver.mjs: command failed: ${err.message}\n`);
      return shutdown(1);
    });
  };
  rl.on('line', (line) => {
    const [cmd, arg] = line.trim().split(/\s+/, 2);
    if (cmd === 'token') enqueue(() => page.evaluate((t) => window.__giveToken(t), arg));
    else if (cmd === 'close') enqueue(() => page.evaluate(() => window.__close()));
    else if (cmd === 'quit') enqueue(() => shutdown(0));
    else if (cmd) process.stderr.write(`client-driver.mjs: unknown command ${JSON.stringify(cmd)}\n`);
  });
  rl.on('close', () => enqueue(() => shutdown(0)));
}

main().catch((err) => {
  process.stderr.write(`client-driver.mjs: ${err.stack || err.message}\n`);
  shutdown(1);
});
