#!/usr/bin/env node
// The tabs benchmark (run by scripts/bench-tabs.sh, which starts the servers): N tabs of one
// browser subscribe to one user's events; how many streams does the server hold, and when the
// tab holding the shared stream closes, how long do the other tabs go without events, and do
// they lose or repeat any?
//
// Usage: node tests/browser/tabs-bench.mjs <json>
//   {"target": "ssegate"|"nchan", "label": L, "http": "127.0.0.1:18080",
//    "publish": "http://127.0.0.1:15051" (ssegate's gRPC port, Connect/JSON) or unused,
//    "shared": bool, "tabs": 10, "handovers": 5, "rate_ms": 10}
//
// ssegate: each tab imports /v1/client.js and opens `new SsegateClient(.../v1/events?user=bench,
// {shared})`. nchan: each tab runs Nchan's own browser client, NchanSubscriber (npm `nchan`),
// on /sub/bench with `{subscriber: 'eventsource', shared}`: its shared mode elects a master tab
// through localStorage.
//
// Tabs receiving: how many tabs got any event within 15 s of opening (with one stream per tab
// over HTTP/1.1, the browser holds tabs past six per origin without a connection).
// Per hand-over: events are published every `rate_ms` ms (numbered); 500 ms in, the oldest tab
// still open (the holder, for a client that hands the stream to the next tab in line) is
// closed; publishing goes on for 5 s more, then 2 s to drain. For each remaining tab: the
// longest time between two deliveries from the close on (or from its last delivery to the end
// of publishing, if it stopped receiving), and events lost or repeated. Streams:
// established TCP connections on the server's port (`ss`), at a quiet moment (the publisher
// uses one connection per request to nchan, none to ssegate's HTTP port).
//
// Prints one JSON line. Only loopback addresses are contacted.

import fs from 'node:fs';
import http from 'node:http';
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { Harness, isLoopbackHost } from './harness.mjs';

const h = new Harness('tabs-bench.mjs');
const cfg = { tabs: 10, handovers: 5, rate_ms: 10, shared: true, ...JSON.parse(process.argv[2] ?? '{}') };
const [host, port] = cfg.http.split(':');
if (!isLoopbackHost(host)) h.fail(`refusing non-loopback host ${host}`, 2);
const base = `http://${cfg.http}`;

let setup;
if (cfg.target === 'ssegate') {
  setup = `
const { SsegateClient } = await import(${JSON.stringify(`${base}/v1/client.js`)});
window.__start = (shared) => {
  const c = new SsegateClient(${JSON.stringify(`${base}/v1/events`)}, { query: { user: 'bench' }, shared });
  c.on('message', (e) => window.__report(e.data));
};`;
} else if (cfg.target === 'nchan') {
  const file = createRequire(import.meta.url).resolve('nchan/NchanSubscriber.js');
  const lib = fs.readFileSync(file, 'utf8').replace(/<\/script/gi, '<\\/script');
  setup = `
${lib}
window.__start = (shared) => {
  const sub = new NchanSubscriber(${JSON.stringify(`${base}/sub/bench`)}, { subscriber: 'eventsource', shared: shared || undefined });
  sub.on('message', (m) => window.__report(m));
  sub.start();
};`;
} else {
  h.fail(`unknown target ${cfg.target}`, 2);
}
const PAGE = `<!doctype html><html><head><meta charset="utf-8"></head><body>
<script type="${cfg.target === 'ssegate' ? 'module' : 'text/javascript'}">${setup}</script></body></html>`;

function publish(data) {
  const [path, body, headers] =
    cfg.target === 'ssegate'
      ? [
          '/ssegate.v1.Publisher/Publish',
          JSON.stringify({ userIds: ['bench'], event: { data } }),
          { 'content-type': 'application/json' },
        ]
      : ['/pub/bench', data, { 'content-type': 'text/plain' }];
  const url = new URL(path, cfg.target === 'ssegate' ? cfg.publish : base);
  if (!isLoopbackHost(url.hostname)) throw new Error('loopback only');
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: 'POST', headers, agent: false }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode < 300 ? resolve() : reject(new Error(`publish: HTTP ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function streams() {
  const out = execFileSync('ss', ['-Htn', 'state', 'established', `( sport = :${port} )`], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.trim()).length;
}

h.run(async () => {
  const { context, url } = await h.launch({ html: PAGE, hosts: ['127.0.0.1', 'localhost', host] });
  const got = []; // per tab: [{data, t}]
  const open = []; // tabs still open, oldest first: {i, page}
  for (let i = 0; i < cfg.tabs; i += 1) {
    got.push([]);
    const page = await h.newPage(context, url, '__report', (data) => got[i].push({ data, t: Date.now() }), {
      label: `tab ${i}`,
    });
    await page.waitForFunction(() => typeof window.__start === 'function', null, { timeout: 30_000 });
    await page.evaluate((shared) => window.__start(shared), cfg.shared);
    open.push({ i, page });
  }
  // Warm up: publish until every tab has had an event, for at most 15 s. With one stream per
  // tab over HTTP/1.1, tabs past the browser's six connections per origin never get one.
  const warmEnd = Date.now() + 15_000;
  for (let k = 0; open.some(({ i }) => got[i].length === 0) && Date.now() < warmEnd; k += 1) {
    await publish(`warm-${k}`);
    await sleep(100);
  }
  const receiving = open.filter(({ i }) => got[i].length > 0).length;
  await sleep(1500);
  const streamsOpen = streams();

  const handovers = [];
  for (let round = 0; round < cfg.handovers && open.length > 1; round += 1) {
    const sent = [];
    let closeAt = 0;
    const victim = open.shift();
    const start = Date.now();
    let closing = null;
    for (let n = 0; Date.now() - start < 5500; n += 1) {
      if (!closing && Date.now() - start >= 500) {
        closeAt = Date.now();
        closing = victim.page.close({ runBeforeUnload: false });
      }
      const data = `r${round}-${n}`;
      await publish(data);
      sent.push(data);
      await sleep(cfg.rate_ms);
    }
    const pubEnd = Date.now();
    await closing;
    await sleep(2000);
    let worstGap = 0;
    let lost = 0;
    let repeated = 0;
    for (const { i } of open) {
      const mine = got[i].filter((r) => r.data.startsWith(`r${round}-`));
      const seen = new Set(mine.map((r) => r.data));
      lost += sent.filter((d) => !seen.has(d)).length;
      repeated += mine.length - seen.size;
      let last = closeAt;
      for (const r of mine) {
        if (r.t < closeAt) continue;
        worstGap = Math.max(worstGap, r.t - last);
        last = r.t;
      }
      // A tab that stopped receiving: silent from its last delivery to the end of publishing.
      worstGap = Math.max(worstGap, pubEnd - last);
    }
    handovers.push({ worst_gap_ms: worstGap, lost, repeated, tabs: open.length, sent: sent.length });
  }
  await sleep(1000);
  const gaps = handovers.map((x) => x.worst_gap_ms).sort((a, b) => a - b);
  h.emit({
    label: cfg.label,
    target: cfg.target,
    shared: cfg.shared,
    tabs: cfg.tabs,
    tabs_receiving_events: receiving,
    streams_with_all_tabs_open: streamsOpen,
    streams_at_end: streams(),
    tabs_at_end: open.length,
    handover_worst_gap_ms_median: gaps[Math.floor(gaps.length / 2)] ?? null,
    handover_worst_gap_ms_max: gaps[gaps.length - 1] ?? null,
    lost: handovers.reduce((s, x) => s + x.lost, 0),
    repeated: handovers.reduce((s, x) => s + x.repeated, 0),
    handovers,
  });
  await h.shutdown(0);
});
