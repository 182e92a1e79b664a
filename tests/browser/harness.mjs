// What the browser drivers (driver.mjs, client-driver.mjs) share: a page served on loopback,
// opened in headless Chromium (playwright-core, the Debian `chromium`) that resolves no name
// but the loopback ones; page reports printed as JSON lines in page order; commands read from
// stdin one at a time; a clean shutdown on quit, EOF or a signal.

import http from 'node:http';
import fs from 'node:fs';
import readline from 'node:readline';

export function isLoopbackHost(host) {
  return host === 'localhost' || host === '[::1]' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

// Headless Chromium's flags: loopback only: no proxy, and every name but `hosts` resolves to
// "not found" without asking DNS (IP literals go through these rules too, hence EXCLUDE).
// Also used by tests/clients/browser.mjs.
export function chromiumArgs(hosts) {
  return [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-proxy-server',
    `--host-resolver-rules=MAP * ~NOTFOUND, ${[...new Set(hosts)].map((h) => `EXCLUDE ${h}`).join(', ')}`,
  ];
}

export class Harness {
  constructor(name) {
    this.name = name;
    this.debug = !!process.env.SSE_DRIVER_DEBUG;
    this.browser = null;
    this.server = null;
    this.shuttingDown = false;
    this.stdoutBroken = false;
    this.nextSeq = 0;
    this.pending = new Map();
    process.stdout.on('error', (err) => {
      // The reader went away (EPIPE): nothing left to report to.
      this.stdoutBroken = true;
      this.log(`stdout error: ${err.message}`);
      this.shutdown(1);
    });
    process.on('SIGTERM', () => this.shutdown(143));
    process.on('SIGINT', () => this.shutdown(130));
  }

  log(message) {
    process.stderr.write(`${this.name}: ${message}\n`);
  }

  fail(message, code = 1) {
    this.log(message);
    process.exit(code);
  }

  emit(obj) {
    if (this.stdoutBroken) return;
    // process.stdout is synchronous for files and pipes on Linux.
    process.stdout.write(JSON.stringify(obj) + '\n');
  }

  // Reports from the page carry a sequence number; they are printed strictly in page order.
  onReport(json) {
    let msg;
    try {
      msg = JSON.parse(json);
    } catch (err) {
      this.log(`bad report from page: ${err.message}`);
      return;
    }
    this.pending.set(msg.seq, msg.report);
    while (this.pending.has(this.nextSeq)) {
      const report = this.pending.get(this.nextSeq);
      this.pending.delete(this.nextSeq);
      this.nextSeq += 1;
      this.emit(report);
    }
  }

  async shutdown(code) {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    setTimeout(() => process.exit(code), 10_000).unref();
    try {
      if (this.browser) await this.browser.close();
    } catch {
      // already gone
    }
    this.server?.close();
    this.server?.closeAllConnections?.();
    process.exit(code);
  }

  // Serves `html` at / on 127.0.0.1 and opens it in Chromium, which resolves only `hosts`;
  // `binding` is the page's report function (window[binding](json)). Returns the page.
  async open({ html, hosts, binding }) {
    const { context, url } = await this.launch({ html, hosts });
    return this.newPage(context, url, binding, (json) => this.onReport(json));
  }

  // Serves `html` at / on 127.0.0.1 and starts Chromium, which resolves only `hosts`. Returns
  // a browser context (one profile: its pages are tabs of one browser) and the page's URL.
  async launch({ html, hosts }) {
    let chromium;
    try {
      ({ chromium } = await import('playwright-core'));
    } catch (err) {
      this.fail(`cannot load playwright-core (${err.message}); run \`npm ci\` in tests/browser (scripts/test.sh does this)`);
    }
    const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
    try {
      fs.accessSync(executablePath, fs.constants.X_OK);
    } catch {
      this.fail(
        `Chromium not found or not executable at ${executablePath}; install it ` +
          '(apt-get install -y --no-install-recommends chromium chromium-driver fonts-liberation, ' +
          'scripts/test.sh does this) or set CHROMIUM_PATH',
      );
    }
    this.server = http.createServer((req, res) => {
      if (req.method === 'GET' && (req.url === '/' || req.url.startsWith('/?'))) {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
        res.end(html);
      } else {
        res.writeHead(404, { 'content-type': 'text/plain' });
        res.end('not found\n');
      }
    });
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(0, '127.0.0.1', resolve);
    }).catch((err) => this.fail(`cannot start page server on 127.0.0.1: ${err.message}`));
    const args = chromiumArgs(hosts);
    try {
      this.browser = await chromium.launch({ executablePath, headless: true, args, timeout: 60_000 });
    } catch (err) {
      this.fail(`failed to launch Chromium at ${executablePath}: ${err.message}`);
    }
    this.browser.on('disconnected', () => {
      if (!this.shuttingDown) {
        this.log('browser disconnected unexpectedly');
        this.shutdown(1);
      }
    });
    const context = await this.browser.newContext();
    return { context, url: `http://127.0.0.1:${this.server.address().port}/` };
  }

  // A new page (tab) of `context` at `url`, whose window[binding](json) calls `onReport`.
  async newPage(context, url, binding, onReport, { label = 'page' } = {}) {
    const page = await context.newPage();
    page.on('pageerror', (err) => this.log(`${label} error: ${err.message}`));
    page.on('crash', () => {
      this.log(`${label} crashed`);
      this.shutdown(1);
    });
    if (this.debug) page.on('console', (m) => this.log(`${label} console.${m.type()}: ${m.text()}`));
    await page.exposeFunction(binding, onReport);
    try {
      await page.goto(url, { waitUntil: 'load', timeout: 30_000 });
    } catch (err) {
      this.log(`failed to load ${url}: ${err.message}`);
      await this.shutdown(1);
    }
    return page;
  }

  // For each stdin line, `handle(cmd, arg, args)` (arg: the first word after the command,
  // args: all of them) returns the work to do (an async function, run one
  // at a time and in order) or null for an unknown command; `quit` and EOF shut down cleanly.
  commands(handle) {
    const rl = readline.createInterface({ input: process.stdin, terminal: false });
    let queue = Promise.resolve();
    const enqueue = (fn) => {
      queue = queue.then(fn).catch((err) => {
        this.log(`command failed: ${err.message}`);
        return this.shutdown(1);
      });
    };
    rl.on('line', (line) => {
      const parts = line.trim().split(/\s+/);
      const [cmd, arg] = parts;
      if (!cmd) return;
      if (cmd === 'quit') return enqueue(() => this.shutdown(0));
      const work = handle(cmd, arg, parts.slice(1));
      if (work) enqueue(work);
      else this.log(`unknown command ${JSON.stringify(cmd)}`);
    });
    rl.on('close', () => enqueue(() => this.shutdown(0)));
  }

  run(main) {
    main().catch((err) => {
      this.log(err.stack || err.message);
      this.shutdown(1);
    });
  }
}
