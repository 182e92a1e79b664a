#!/usr/bin/env node
// Drives the npm `eventsource` package (a WHATWG EventSource for Node) the way an application
// uses it: `new EventSource(url)`, `onmessage`, and a listener for each event name it handles.
//
// Usage: node tests/clients/eventsource.mjs <module> [event-name ...]
//   <module>: eventsource5 or eventsource4 (npm aliases in package.json)
//
// The application listens to `message` (onmessage), to each event name given, and to
// `ssegate.missed`; not to `ssegate.position`, which the library must take its last event id
// from all the same (the reconnect's Last-Event-ID shows it). The library reconnects by
// itself; the driver only wraps `fetch` (the library's documented `fetch` option) to report
// the Last-Event-ID each connection sends. Protocol: protocol.mjs.

import { commands, emit, log } from './protocol.mjs';

const NAME = 'eventsource.mjs';
const [moduleName, ...names] = process.argv.slice(2);
if (moduleName !== 'eventsource5' && moduleName !== 'eventsource4') {
  log(NAME, 'usage: node eventsource.mjs eventsource5|eventsource4 [event-name ...]');
  process.exit(2);
}

let EventSource;
try {
  ({ EventSource } = await import(moduleName));
} catch (err) {
  log(NAME, `cannot load ${moduleName} (${err.message}); run \`npm ci\` in tests/clients`);
  process.exit(1);
}

let es = null;
const report = (e) => emit({ kind: 'event', type: e.type, data: e.data, id: e.lastEventId });

commands(NAME, {
  onConnect(url) {
    if (es) return;
    es = new EventSource(url, {
      fetch: (input, init) => {
        const headers = init?.headers ?? {};
        const id = headers['Last-Event-ID'] ?? headers['last-event-id'] ?? null;
        emit({ kind: 'request', lastEventId: id });
        return globalThis.fetch(input, init);
      },
    });
    es.onopen = () => emit({ kind: 'open' });
    es.onerror = (e) => emit({ kind: 'error', message: `${e.message ?? 'error'} (readyState ${es.readyState})` });
    es.onmessage = report;
    for (const name of new Set([...names, 'ssegate.missed'])) {
      if (name !== 'message') es.addEventListener(name, report);
    }
  },
  onQuit() {
    es?.close();
    process.exit(0);
  },
});

emit({ kind: 'ready' });
