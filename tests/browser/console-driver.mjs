#!/usr/bin/env node
// Headless-Chromium driver of the admin console page (/console/ on the admin port) for
// ssegate's integration tests (tests/api/console_ui.rs).
//
// Usage: node tests/browser/console-driver.mjs <console-url>
//
// Opens the console page itself (served by ssegate) and reports, one JSON object per line:
//   {"kind":"ready"}                       page loaded (always first)
//   {"kind":"console-error","text":T}      the page logged an error or threw (a test failure)
//   {"kind":"ok","cmd":C,"text":T}         a command finished (T: the text read, if any)
//   {"kind":"timeout","cmd":C,"text":T}    `wait` did not see its text in time (T: last seen)
//
// Commands on stdin, one per line (the value is the rest of the line):
//   fill <selector> <value>      set an input's value
//   check <selector>             tick a checkbox
//   select <selector> <value>    choose an option
//   click <selector>             click an element
//   tab <name>                   show a tab (overview, inspector, tail)
//   wait <selector> <regex>      wait (up to 10 s) until the element's text matches
//   text <selector>              read an element's text
//   screenshot <path>            a full-page PNG at path
//   quit                         close the browser and exit 0 (stdin EOF does the same)
// Only loopback addresses are ever contacted.

import { Harness, isLoopbackHost } from './harness.mjs';

const h = new Harness('console-driver.mjs');
const [urlArg] = process.argv.slice(2);
let url;
try {
  url = new URL(urlArg);
} catch {
  h.fail(`usage: node tests/browser/console-driver.mjs <console-url> (got ${JSON.stringify(urlArg)})`, 2);
}
if (!isLoopbackHost(url.hostname)) h.fail(`refusing non-loopback host ${JSON.stringify(url.hostname)}`, 2);

const WAIT_MS = 10_000;

h.run(async () => {
  const { context } = await h.launch({ html: '', hosts: ['127.0.0.1', 'localhost', url.hostname] });
  const page = await context.newPage();
  await page.setViewportSize({ width: 1280, height: 800 });
  page.on('console', (m) => {
    if (m.type() === 'error') h.emit({ kind: 'console-error', text: m.text() });
  });
  page.on('pageerror', (err) => h.emit({ kind: 'console-error', text: err.message }));
  page.on('crash', () => h.shutdown(1));
  await page.goto(url.href, { waitUntil: 'load', timeout: 30_000 });
  h.emit({ kind: 'ready' });
  const text = (sel) => page.locator(sel).first().textContent({ timeout: WAIT_MS });
  h.commands((cmd, arg, args) => {
    const rest = args.slice(1).join(' ');
    const ok = (t) => h.emit({ kind: 'ok', cmd, text: t ?? null });
    switch (cmd) {
      case 'fill': return async () => { await page.locator(arg).fill(rest); ok(); };
      case 'check': return async () => { await page.locator(arg).check(); ok(); };
      case 'select': return async () => { await page.locator(arg).selectOption(rest); ok(); };
      case 'click': return async () => { await page.locator(arg).first().click(); ok(); };
      case 'tab': return async () => { await page.locator(`button[data-tab="${arg}"]`).click(); ok(); };
      case 'text': return async () => ok(await text(arg));
      case 'screenshot': return async () => { await page.screenshot({ path: arg, fullPage: true }); ok(arg); };
      case 'wait': return async () => {
        const re = new RegExp(rest);
        const end = Date.now() + WAIT_MS;
        let last = null;
        for (;;) {
          last = await page.locator(arg).first().textContent({ timeout: WAIT_MS }).catch(() => null);
          if (last !== null && re.test(last)) return ok(last);
          if (Date.now() > end) return h.emit({ kind: 'timeout', cmd, text: last });
          await new Promise((r) => setTimeout(r, 50));
        }
      };
      default: return null;
    }
  });
});
