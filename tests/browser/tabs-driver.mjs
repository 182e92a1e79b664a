#!/usr/bin/env node
// Headless-Chromium driver for the browser client's shared stream (clients/js/ssegate.js as
// served at /v1/client.js): several tabs of one browser (pages of one context: one profile, so
// they share Web Locks and BroadcastChannel), each running a client.
//
// Usage: node tests/browser/tabs-driver.mjs <server-base-url>
//
// Every tab is a page of the same origin (served on 127.0.0.1 by this driver, another origin
// than the server). Prints one JSON object per line on stdout, each with the tab's name `tab`
// and the page's clock `t` (ms since the epoch), in each tab's order:
//
//   {"kind":"ready"}                           the client was created
//   {"kind":"state","state":S,"detail":{..},"role":R}   onStateChange (R: the client's role)
//   {"kind":"event","name":N,"id":I,"data":D,"lastEventId":L}   a `message` event or one of `names`
//   {"kind":"missed","payload":{..}}           onMissed
//   {"kind":"disconnect","payload":{..}}       onDisconnect
//   {"kind":"role","role":R,"lastEventId":L}   after the `role` command
//   {"kind":"closing"} then {"kind":"closed"}  as `close` starts, and once the page is gone
//   {"kind":"frozen"} / {"kind":"resumed"}     after `freeze` or `hang` / `unfreeze`
//
// Commands on stdin, one per line (<tab> is any name without spaces):
//   open <tab> <json>   a new tab whose client gets these options: {"query":{..}, "names":[..],
//                       "token":"<jwt>" (getToken answers it), "shared":bool, "shareKey":S,
//                       "minDelay":ms, "maxDelay":ms}; then {"kind":"ready"} from that tab
//   close <tab>         close the tab (as a user does: the page unloads; no client.close())
//   freeze <tab>        freeze the page as a browser freezes a background tab: the `freeze`
//                       event, then its scripts stop (with the debugger, see below)
//   hang <tab>          stop its scripts without the event (a hung page)
//   unfreeze <tab>      let its scripts run again (and send `resume` after `freeze`)
//   role <tab>          report the tab's client role
//   settoken <tab> <jwt>  what the tab's getToken answers from now on (a login as someone else);
//                       then {"kind":"token_set"}
//   quit                close the browser and exit 0 (stdin EOF does the same)
//
// Only loopback addresses are ever contacted. SSE_DRIVER_DEBUG=1 copies the pages' consoles.

import { Harness, isLoopbackHost } from './harness.mjs';

const h = new Harness('tabs-driver.mjs');

const [baseArg] = process.argv.slice(2);
let base;
try {
  base = new URL(baseArg);
} catch (err) {
  h.fail(`usage: node tabs-driver.mjs <server-base-url> (${err.message})`, 2);
}
if (!isLoopbackHost(base.hostname)) h.fail(`refusing non-loopback host ${JSON.stringify(base.hostname)}`, 2);

const config = { module: new URL('/v1/client.js', base).href, url: new URL('/v1/events', base).href };
const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>ssegate tabs driver</title></head>
<body>
<script type="module">
const config = ${JSON.stringify(config).replace(/</g, '\\u003c')};
let seq = 0;
let client;
const report = (r) => window.__report(JSON.stringify({ seq: seq++, report: { ...r, t: Date.now() } }));
const { SsegateClient } = await import(config.module);
let token;
window.__setToken = (t) => { token = t; report({ kind: 'token_set' }); };
window.__start = (o) => {
  token = o.token;
  client = new SsegateClient(config.url, {
    query: o.query ?? {},
    shared: o.shared,
    shareKey: o.shareKey,
    minDelay: o.minDelay,
    maxDelay: o.maxDelay,
    getToken: o.token ? () => token : undefined,
    onStateChange: (state, detail) =>
      report({ kind: 'state', state, detail: JSON.parse(JSON.stringify(detail)), role: client?.role }),
    onMissed: (payload) => report({ kind: 'missed', payload }),
    onDisconnect: (payload) => report({ kind: 'disconnect', payload }),
  });
  for (const name of new Set(['message', ...(o.names ?? [])])) {
    client.on(name, (e) => report({ kind: 'event', name: e.name, id: e.id, data: e.data, lastEventId: client.lastEventId }));
  }
  report({ kind: 'ready' });
};
window.__role = () => report({ kind: 'role', role: client.role, lastEventId: client.lastEventId });
</script>
</body></html>
`;

h.run(async () => {
  const { context, url } = await h.launch({ html: PAGE, hosts: ['127.0.0.1', 'localhost', base.hostname] });
  const tabs = new Map(); // name -> {page, next, pending, cdp}
  const emit = (tab, report) => h.emit({ tab, ...report });
  const tabOf = (name) => {
    const tab = tabs.get(name);
    if (!tab) throw new Error(`no tab ${JSON.stringify(name)}`);
    return tab;
  };
  h.commands((cmd, arg, args) => {
    if (cmd === 'open') {
      return async () => {
        if (tabs.has(arg)) throw new Error(`tab ${arg} is already open`);
        const options = JSON.parse(args.slice(1).join(' ') || '{}');
        const tab = { next: 0, pending: new Map(), page: null, cdp: null };
        tabs.set(arg, tab);
        // Each tab's reports are printed in the order the page made them.
        const onReport = (json) => {
          const msg = JSON.parse(json);
          tab.pending.set(msg.seq, msg.report);
          while (tab.pending.has(tab.next)) {
            emit(arg, tab.pending.get(tab.next));
            tab.pending.delete(tab.next);
            tab.next += 1;
          }
        };
        tab.page = await h.newPage(context, url, '__report', onReport, { label: `tab ${arg}` });
        await tab.page.waitForFunction(() => typeof window.__start === 'function', null, { timeout: 30_000 });
        await tab.page.evaluate((o) => window.__start(o), options);
      };
    }
    if (cmd === 'close') {
      return async () => {
        const tab = tabOf(arg);
        tabs.delete(arg);
        emit(arg, { kind: 'closing', t: Date.now() });
        await tab.page.close({ runBeforeUnload: false });
        emit(arg, { kind: 'closed', t: Date.now() });
      };
    }
    if (cmd === 'freeze' || cmd === 'hang') {
      return async () => {
        const tab = tabOf(arg);
        // What a browser does to a background tab it freezes: the page lifecycle `freeze` event,
        // then no more tasks. CDP's Page.setWebLifecycleState('frozen') does nothing to a
        // visible page (measured: no event, timers keep running), so the tasks are stopped with
        // the debugger: the page's next script pauses, and everything queued after it waits.
        // `hang` stops the tasks without the event: a page stuck in a long task, or frozen by
        // a browser that does not say so.
        if (cmd === 'freeze') await tab.page.evaluate(() => document.dispatchEvent(new Event('freeze')));
        tab.cdp ??= await context.newCDPSession(tab.page);
        tab.paused = false;
        tab.cdp.on('Debugger.paused', () => {
          tab.paused = true;
        });
        await tab.cdp.send('Debugger.enable');
        await tab.cdp.send('Debugger.pause');
        tab.frozen = cmd === 'freeze';
        emit(arg, { kind: 'frozen', t: Date.now() });
      };
    }
    if (cmd === 'unfreeze') {
      return async () => {
        const tab = tabOf(arg);
        if (!tab.cdp) throw new Error(`tab ${arg} is not frozen`);
        // A pause never reached (no script ran meanwhile) is cancelled by disabling.
        if (tab.paused) await tab.cdp.send('Debugger.resume');
        await tab.cdp.send('Debugger.disable');
        tab.cdp.removeAllListeners('Debugger.paused');
        if (tab.frozen) await tab.page.evaluate(() => document.dispatchEvent(new Event('resume')));
        emit(arg, { kind: 'resumed', t: Date.now() });
      };
    }
    if (cmd === 'role') return () => tabOf(arg).page.evaluate(() => window.__role());
    if (cmd === 'settoken') return () => tabOf(arg).page.evaluate((t) => window.__setToken(t), args[1]);
    return null;
  });
});
