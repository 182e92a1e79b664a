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

import http from 'node:http';
import fs from 'node:fs';
import readline from 'node:readline';

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // Belt and braces for "loopback only": no proxy, and no name resolution at
  // all (Chromium would otherwise look up update/metrics hosts via DNS; see
  // RESOLVER_EXCLUDES below).
  '--no-proxy-server',
];


const DEBUG = !!process.env.SSE_DRIVER_DEBUG;

function fail(message, code = 1) {
  process.stderr.write(`driver.mjs: ${message}\n`);
  process.exit(code);
}

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
function isLoopbackHost(host) {
  return (
    host === 'localhost' ||
    host === '[::1]' ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host)
  );
}
if (!isLoopbackHost(sseUrl.hostname)) {
  fail(`refusing non-loopback SSE host ${JSON.stringify(sseUrl.hostname)}`, 2);
}
// Every hostname but the loopback ones we use resolves to "not found", without
// asking DNS (IP literals go through these rules too, hence the EXCLUDEs).
const RESOLVER_EXCLUDES = [...new Set(['127.0.0.1', 'localhost', sseUrl.hostname])];
CHROMIUM_ARGS.push(
  `--host-resolver-rules=MAP * ~NOTFOUND, ${RESOLVER_EXCLUDES.map((h) => `EXCLUDE ${h}`).join(', ')}`,
);
const eventNames = [...new Set(eventNameArgs.filter((n) => n.length > 0))];

// ---------------------------------------------------------------- output

let stdoutBroken = false;
process.stdout.on('error', (err) => {
  // The reader went away (EPIPE): nothing left to report to.
  stdoutBroken = true;
  process.stderr.write(`driver.mjs: stdout error: ${err.message}\n`);
  shutdown(1);
});

function emit(obj) {
  if (stdoutBroken) return;
  // process.stdout is synchronous for files and pipes on Linux: each line is
  // written out before this returns.
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// Reports from the page carry a sequence number; emit them strictly in order
// even if the binding calls were ever delivered out of order.
let nextSeq = 0;
const pending = new Map();
function onReport(json) {
  let msg;
  try {
    msg = JSON.parse(json);
  } catch (err) {
    process.stderr.write(`driver.mjs: bad report from page: ${err.message}\n`);
    return;
  }
  pending.set(msg.seq, msg.report);
  while (pending.has(nextSeq)) {
    const report = pending.get(nextSeq);
    pending.delete(nextSeq);
    nextSeq += 1;
    emit(report);
  }
}

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

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && (req.url === '/' || req.url.startsWith('/?'))) {
    res.writeHead(200, {
      'content-type': 'text/html; charset=utf-8',
      'cache-control': 'no-store',
    });
    res.end(PAGE);
  } else {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  }
});

// ---------------------------------------------------------------- lifecycle

let browser = null;
let shuttingDown = false;

async function shutdown(code) {
  if (shuttingDown) return;
  shuttingDown = true;
  const hardExit = setTimeout(() => process.exit(code), 10_000);
  hardExit.unref();
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
    fail(
      `cannot load playwright-core (${err.message}); run \`npm ci\` in tests/browser ` +
        '(scripts/test.sh does this)',
    );
  }

  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  try {
    fs.accessSync(executablePath, fs.constants.X_OK);
  } catch {
    fail(
      `Chromium not found or not executable at ${executablePath}; install it ` +
        '(apt-get install -y --no-install-recommends chromium chromium-driver fonts-liberation, ' +
        'scripts/test.sh does this) or set CHROMIUM_PATH',
    );
  }

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  }).catch((err) => fail(`cannot start page server on 127.0.0.1: ${err.message}`));
  const pageUrl = `http://127.0.0.1:${server.address().port}/`;

  try {
    browser = await chromium.launch({
      executablePath,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 60_000,
    });
  } catch (err) {
    fail(`failed to launch Chromium at ${executablePath}: ${err.message}`);
  }
  browser.on('disconnected', () => {
    if (!shuttingDown) {
      process.stderr.write('driver.mjs: browser disconnected unexpectedly\n');
      shutdown(1);
    }
  });

  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (err) => process.stderr.write(`driver.mjs: page error: ${err.message}\n`));
  page.on('crash', () => {
    process.stderr.write('driver.mjs: page crashed\n');
    shutdown(1);
  });
  if (DEBUG) {
    page.on('console', (m) => process.stderr.write(`driver.mjs: console.${m.type()}: ${m.text()}\n`));
  }
  await page.exposeFunction('__sseReport', onReport);

  try {
    await page.goto(pageUrl, { waitUntil: 'load', timeout: 30_000 });
  } catch (err) {
    process.stderr.write(`driver.mjs: failed to load ${pageUrl}: ${err.message}\n`);
    return shutdown(1);
  }

  // Commands are handled one at a time, in order.
  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  let queue = Promise.resolve();
  const enqueue = (fn) => {
    queue = queue.then(fn).catch((err) => {
      process.stderr.write(`driver.mjs: command failed: ${err.message}\n`);
      return shutdown(1);
    });
  };
  rl.on('line', (line) => {
    const cmd = line.trim();
    if (cmd === '') return;
    if (cmd === 'close') {
      enqueue(() => page.evaluate(() => window.__sseClose()));
    } else if (cmd === 'quit') {
      enqueue(() => shutdown(0));
    } else {
      process.stderr.write(`driver.mjs: unknown command ${JSON.stringify(cmd)}\n`);
    }
  });
  rl.on('close', () => enqueue(() => shutdown(0)));
}

main().catch((err) => {
  process.stderr.write(`driver.mjs: ${err.stack || err.message}\n`);
  shutdown(1);
});
