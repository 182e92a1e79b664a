// The admin console's page: plain DOM, fetch and a canvas, no framework and no build step (see
// src/http/console/mod.rs for why). Data is only ever put in the page as text (textContent),
// never as HTML. The token lives in this tab's sessionStorage and travels only in the
// Authorization header; it is never shown.

const $ = (id) => document.getElementById(id);
const KEY = 'ssegate.console.token';
let token = sessionStorage.getItem(KEY);

// ------------------------------------------------------------------ API

class Unauthorized extends Error {}

async function api(path, opts = {}) {
  const headers = { ...(opts.headers || {}), authorization: `Bearer ${token}` };
  const r = await fetch(path, { ...opts, headers });
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch { body = { error: text.trim() }; }
  if (r.status === 401) { login(body.error); throw new Unauthorized(body.error); }
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

const post = (path, obj) => api(path, {
  method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(obj),
});

// A Server-Sent Events reader over fetch: EventSource cannot send an Authorization header.
async function sse(path, onEvent, signal) {
  const r = await fetch(path, { headers: { authorization: `Bearer ${token}` }, signal });
  if (r.status === 401) { login('the token was refused'); throw new Unauthorized(); }
  if (!r.ok) {
    const text = await r.text();
    let msg = text;
    try { msg = JSON.parse(text).error; } catch { /* plain text */ }
    throw new Error(msg || `HTTP ${r.status}`);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, '\n');
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) onEvent(name, data.join('\n'));
    }
  }
}

// ------------------------------------------------------------------ small helpers

const fmt = (n) => (n == null ? '–' : Number.isInteger(n) ? n.toLocaleString('en') : n.toFixed(1));
const bytes = (n) => (n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`);
const secs = (s) => (s == null ? '–' : s < 60 ? `${s.toFixed(0)} s` : s < 3600 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`);
const set = (id, text) => { $(id).textContent = text; };

function cell(content, cls) {
  const td = document.createElement('td');
  if (content instanceof Node) td.append(content); else td.textContent = content ?? '';
  if (cls) td.className = cls;
  return td;
}

function addRow(tbody, cells, atTop = false) {
  const tr = document.createElement('tr');
  tr.append(...cells);
  if (atTop) tbody.prepend(tr); else tbody.append(tr);
  return tr;
}

function emptyRow(tbody, cols, text) {
  const td = cell(text, 'muted');
  td.colSpan = cols;
  addRow(tbody, [td]);
}

// ------------------------------------------------------------------ login and tabs

function login(error) {
  stopLive();
  $('login').hidden = false;
  $('forget').hidden = true;
  set('login-error', error || '');
  set('conn', 'not connected');
}

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  token = $('token').value.trim();
  $('token').value = '';
  sessionStorage.setItem(KEY, token);
  start();
});

$('forget').addEventListener('click', () => {
  sessionStorage.removeItem(KEY);
  token = null;
  login('');
});

function showTab(name) {
  for (const b of document.querySelectorAll('.tab')) b.classList.toggle('on', b.dataset.tab === name);
  for (const p of document.querySelectorAll('.page')) p.hidden = p.id !== name;
}

for (const b of document.querySelectorAll('.tab')) {
  b.addEventListener('click', () => { location.hash = b.dataset.tab; });
}
window.addEventListener('hashchange', () => showTab(location.hash.slice(1) || 'overview'));

// ------------------------------------------------------------------ overview

const POINTS = 120;
const series = { streams: [], pub: [], del: [], drops: [] };
let live = null;

function spark(canvas, values, bad) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  if (values.length < 2) return;
  const max = Math.max(1, ...values);
  // The newest point at the right; at least 30 s wide, up to POINTS as they accumulate.
  const span = Math.min(POINTS, Math.max(values.length, 30));
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = w - 1 - (values.length - 1 - i) * ((w - 2) / (span - 1));
    const y = h - 2 - (v / max) * (h - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.strokeStyle = bad ? '#c62828' : '#3559b7';
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

function push(name, v) {
  const s = series[name];
  s.push(v ?? 0);
  if (s.length > POINTS) s.shift();
}

function renderOverview(o) {
  const r = o.replica;
  const c = o.cluster;
  const problems = $('problems');
  problems.replaceChildren();
  for (const p of o.problems) {
    const li = document.createElement('li');
    li.textContent = p;
    problems.append(li);
  }
  if (!o.problems.length) {
    const li = document.createElement('li');
    li.className = 'ok';
    li.textContent = 'No problems';
    problems.append(li);
  }
  set('v-streams', fmt(r.streams));
  set('v-streams-cluster', `cluster: ${fmt(c.streams)} on ${c.replicas} replica(s)${c.partial ? ' (partial)' : ''}`);
  set('v-users', fmt(r.users));
  set('v-users-cluster', `cluster: ${fmt(c.users)} (a user on two replicas counts twice)`);
  set('v-pub', fmt(r.publishes_per_s));
  set('v-published', `${fmt(r.published)} since start`);
  set('v-del', fmt(r.deliveries_per_s));
  set('v-delivered', `${fmt(r.delivered)} since start`);
  set('v-drops', `${fmt(r.slow_consumer_cutoffs)} / ${fmt(r.dropped)}`);
  $('card-drops').classList.toggle('bad', r.slow_consumer_cutoffs > 0 || r.dropped > 0);
  const rp = o.replay;
  set('v-replay', rp.oldest_age_s == null ? 'empty' : `${secs(rp.oldest_age_s)} back`);
  set('v-replay-more', `${fmt(rp.events)} events, ${bytes(rp.bytes)}; oldest ${rp.oldest_id ?? '–'}, newest ${rp.newest_id}`);
  set('v-retained', fmt(o.retained.values));
  set('v-retained-bytes', bytes(o.retained.bytes));
  set('v-broker', `${o.broker.kind}: ${o.broker.up ? 'up' : 'DOWN'}`);
  set('v-broker-more', o.broker.trouble || '');
  $('card-broker').classList.toggle('bad', !o.broker.up);
  set('v-scope', `This replica (up ${secs(r.uptime_s)}); cluster figures from ${c.replicas} replica(s). Updated ${new Date(o.at_ms).toLocaleTimeString()}.`);
  const reps = $('v-replicas');
  reps.replaceChildren();
  for (const p of c.per_replica) {
    addRow(reps, [cell(p.replica), cell(fmt(p.streams)), cell(fmt(p.users)), cell(fmt(p.delivered)),
      cell(fmt(p.dropped), p.dropped > 0 ? 'bad' : '')]);
  }
  push('streams', r.streams);
  push('pub', r.publishes_per_s);
  push('del', r.deliveries_per_s);
  push('drops', r.slow_consumer_cutoffs + r.dropped);
  spark($('c-streams'), series.streams);
  spark($('c-pub'), series.pub);
  spark($('c-del'), series.del);
  spark($('c-drops'), series.drops, true);
}

function startLive() {
  stopLive();
  const ctl = new AbortController();
  live = ctl;
  set('conn', 'connecting…');
  sse('/console/api/live', (name, data) => {
    if (name !== 'message') return;
    set('conn', 'live');
    renderOverview(JSON.parse(data));
  }, ctl.signal).then(() => {
    // The server ends a live stream after a while (or at shutdown): open a new one.
    if (live === ctl) { set('conn', 'reconnecting…'); setTimeout(() => live === ctl && startLive(), 2000); }
  }, (err) => {
    if (err instanceof Unauthorized || ctl.signal.aborted) return;
    set('conn', `live stream failed: ${err.message}; retrying`);
    setTimeout(() => live === ctl && startLive(), 3000);
  });
}

function stopLive() {
  if (live) { const l = live; live = null; l.abort(); }
}

// ------------------------------------------------------------------ inspector

let current = null;

async function lookup(kind, id, event) {
  set('l-error', '');
  const q = new URLSearchParams({ kind, id });
  if (event) q.set('event', event);
  let r;
  try {
    r = await api(`/console/api/lookup?${q}`);
  } catch (err) {
    if (!(err instanceof Unauthorized)) set('l-error', err.message);
    return;
  }
  current = r.subject;
  $('l-result').hidden = false;
  set('l-title', `${r.subject.kind} ${r.subject.id}`);
  const c = r.cluster;
  const per = c.per_replica.map((p) => `${p.replica}: ${p.total}`).join(', ');
  set('l-cluster', `${c.connections} stream(s) on ${c.replicas} replica(s) answering (${per})`
    + `${c.partial ? '; PARTIAL: some replica did not answer, its streams are missing' : ''}.`);
  const reached = $('l-reached');
  reached.replaceChildren();
  if (r.reached) {
    const v = document.createElement('b');
    v.className = r.reached.verdict === 'reached' ? 'good' : r.reached.verdict === 'unknown' ? 'muted' : 'bad';
    v.textContent = `Event ${r.reached.event}: ${r.reached.verdict}`;
    reached.append(v, ` — ${r.reached.reason}${r.reached.target ? ` (sent to ${r.reached.target})` : ''}`);
  }
  const st = $('l-streams');
  st.replaceChildren();
  for (const s of r.streams) {
    addRow(st, [cell(s.replica), cell(String(s.conn)), cell(secs(s.age_s)), cell(s.protocol), cell(s.peer || '–'),
      cell(`${s.queued_frames} (${bytes(s.queued_bytes)})`), cell(s.from_id), cell(s.last_sent_id)]);
  }
  if (!r.streams.length) emptyRow(st, 8, 'No stream open.');
  if (c.connections > r.streams.length) emptyRow(st, 8, `… ${c.connections} in all`);
  const rt = $('l-retained');
  rt.replaceChildren();
  for (const v of r.retained) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = 'clear';
    b.className = 'clear-retained';
    b.addEventListener('click', () => act('clear-retained', { kind: current.kind, id: current.id, name: v.name }));
    addRow(rt, [cell(v.name || '(message)'), cell(v.set_by), cell(v.data, 'data'), cell(b)]);
  }
  if (!r.retained.length) emptyRow(rt, 4, 'No retained value.');
  const rc = $('l-recent');
  rc.replaceChildren();
  for (const e of r.recent.events) addRow(rc, [cell(e.id), cell(secs(e.age_s)), cell(e.name), cell(e.data, 'data')]);
  if (!r.recent.events.length) emptyRow(rc, 4, r.recent.log_evicted ? 'None in the log (it has evicted older events).' : 'None.');
  $('disconnect').hidden = r.subject.kind !== 'user';
}

async function act(action, body) {
  set('a-result', '…');
  try {
    const r = await post(`/console/api/${action}`, body);
    set('a-result', `${action}: ${JSON.stringify(r)}`);
    await lookup(current.kind, current.id, r.id || $('l-event').value.trim());
    if (r.id) $('l-event').value = r.id;
  } catch (err) {
    if (!(err instanceof Unauthorized)) set('a-result', `${action} failed: ${err.message}`);
  }
}

$('lookup-form').addEventListener('submit', (e) => {
  e.preventDefault();
  lookup($('l-kind').value, $('l-id').value.trim(), $('l-event').value.trim());
});

$('publish-form').addEventListener('submit', (e) => {
  e.preventDefault();
  act('publish', { kind: current.kind, id: current.id, name: $('p-name').value.trim(), data: $('p-data').value, retain: $('p-retain').checked });
});

$('disconnect').addEventListener('click', () => act('disconnect', { user: current.id, reason: 'console' }));

// ------------------------------------------------------------------ live tail

const MAX_ROWS = 200;
let tailing = null;

$('tail-form').addEventListener('submit', (e) => {
  e.preventDefault();
  if (tailing) tailing.abort();
  const ctl = new AbortController();
  tailing = ctl;
  const kind = $('t-kind').value;
  const id = $('t-id').value.trim();
  $('t-events').replaceChildren();
  $('t-stop').disabled = false;
  set('t-status', `connecting to ${kind} ${id}…`);
  sse(`/console/api/tail?${new URLSearchParams({ kind, id })}`, (name, data) => {
    const d = JSON.parse(data);
    if (name === 'start') set('t-status', `following ${d.subject}${d.replay_log ? '' : ' (the replay log is off: nothing can be seen)'}`);
    else if (name === 'gap') set('t-status', `gap: ${d.reason}`);
    else if (name === 'end') set('t-status', `ended: ${d.reason}`);
    else if (name === 'event') {
      const tbody = $('t-events');
      addRow(tbody, [cell(new Date().toLocaleTimeString()), cell(d.id), cell(d.name), cell(d.data, 'data'), cell(d.target)], true);
      while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
    }
  }, ctl.signal).then(() => {}, (err) => {
    if (!ctl.signal.aborted && !(err instanceof Unauthorized)) set('t-status', `tail failed: ${err.message}`);
  }).finally(() => {
    if (tailing === ctl) { tailing = null; $('t-stop').disabled = true; }
  });
});

$('t-stop').addEventListener('click', () => {
  if (tailing) { tailing.abort(); tailing = null; }
  $('t-stop').disabled = true;
  set('t-status', 'stopped');
});

// ------------------------------------------------------------------ start

function start() {
  $('login').hidden = true;
  $('forget').hidden = false;
  showTab(location.hash.slice(1) || 'overview');
  startLive();
}

if (token) start(); else login('');
