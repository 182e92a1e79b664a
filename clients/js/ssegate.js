// ssegate browser client: an EventSource that does not give up, shared by the tabs of a browser.
//
// A dependency-free ES module (no build step). See README.md next to this file, and
// ssegate.d.ts for the types. Served by ssegate itself at GET /v1/client.js.
//
// What a bare EventSource does not do, and this does:
// - reconnect after a failed connection (any non-200 answer: 401, 429, 503, …), where
//   EventSource gives up for good, with exponential backoff and full jitter;
// - ask `getToken()` for a fresh token for each connection it opens (`?token=`), and replace a
//   connection the browser would otherwise resume with an old token;
// - keep the last event id across its own reconnects (`?last_event_id=`, as a new EventSource
//   cannot be given the `Last-Event-ID` header), including the stream's position, which the
//   server sends as the event `ssegate.position` when a stream opens (after any replayed or
//   retained events): a page that got only retained events still resumes from there;
// - report `ssegate.missed` and `ssegate.disconnect`, and its state;
// - share one stream among the tabs of one origin, user and subscription set (below).
// Ordinary reconnects (the stream ended, the network dropped) are left to the browser, which
// honours the server's `retry:` and sends `Last-Event-ID` itself, unless the token changed.
//
// Sharing. A browser gives an origin six HTTP/1.1 connections, and each open EventSource holds
// one: the seventh tab hangs. So the clients of one group (same stream URL and query, same
// `withCredentials`, same identity) elect one *holder* with the Web Locks API: the tab holding
// the lock named after the group opens the stream and relays every event, in order, over a
// BroadcastChannel of the same name; the other tabs (*followers*) queue for the lock. The
// browser releases the lock when the holder closes or crashes; a holder about to be frozen
// (the page lifecycle `freeze` event) or put in the back/forward cache gives it up; a visible
// follower whose pings the holder stops answering takes it (`steal`). The next holder resumes
// from the last event id relayed to it, and the server replays from there.
// Why not a SharedWorker: a shared worker's script must have the page's origin, and this module
// is usually imported from the push server's; `getToken` lives in the pages anyway; and it
// has been missing from browsers for years at a time (Safari 7 to 15, Chrome for Android).
//
// Exactly once, in order, in every tab. Relays carry the holder's *term* (a number that grows
// with each holder, so a stale holder's late relays are recognised) and a counter within it. A
// follower delivers relay n of its term only after n-1. Where it cannot be sure it has
// everything (it just joined, a relay is missing, a new holder is ahead of it, it was frozen),
// it *catches up*: it opens its own stream from its own last event id (or afresh: the retained
// values), delivers it up to `ssegate.position`, closes it, and goes on with the relays that
// follow that position. That also makes the server check each tab's own token before the tab
// sees anything. A new holder that is behind a follower is skipped by id until it passes it.
// Which identity: a JWT from `getToken` (its claims, less those that change on refresh), and
// `shareKey` if given. Without a token a page shares only if no cookie can carry an identity
// (the stream is on another origin and `withCredentials` is off), or with a `shareKey`:
// otherwise tabs that logged in again as someone else could join a stream opened before.

const MISSED = 'ssegate.missed';
const DISCONNECT = 'ssegate.disconnect';
// The stream's position: its id (and data) is where a reconnect resumes from. Recorded as
// `lastEventId`; handed to `on()` handlers only if the page listens for it by name.
const POSITION = 'ssegate.position';

/** Connection states, in the order a connection usually goes through them. */
export const State = Object.freeze({
  CONNECTING: 'connecting',
  OPEN: 'open',
  WAITING: 'waiting',
  CLOSED: 'closed',
});

const DEFAULTS = {
  query: {},
  getToken: null,
  lastEventId: '',
  withCredentials: false,
  minDelay: 1000,
  maxDelay: 30000,
  retry: 3000,
  shared: true,
  shareKey: undefined,
  onMissed: null,
  onDisconnect: null,
  onStateChange: null,
  EventSource: globalThis.EventSource,
};

// Sharing: a visible follower pings the holder this often, and takes the lock after this many
// pings in a row go unanswered (a holder whose page is frozen or hung answers nothing).
const PING_MS = 3000;
const PING_MISSES = 2;
// Relays a follower keeps while it catches up; beyond, it drops them and catches up again.
const MAX_BUFFER = 10000;
const SHARE_PREFIX = 'ssegate.share ';

/** The payload of `ssegate.disconnect`: JSON `{reason, …}`, or the reason as plain text. */
function disconnectPayload(data) {
  try {
    const v = JSON.parse(data);
    if (v && typeof v === 'object' && typeof v.reason === 'string') return v;
  } catch {
    // plain text
  }
  return { reason: data };
}

function eventOf(name, id, data) {
  return {
    id,
    name,
    data,
    json() {
      return JSON.parse(this.data);
    },
  };
}

/** `<epoch>-<seq>` ordered against another id: -1, 0, 1, or null (another epoch, or not ours). */
function compareIds(a, b) {
  const x = /^([0-9a-f]+)-(\d+)$/.exec(a);
  const y = /^([0-9a-f]+)-(\d+)$/.exec(b);
  if (!x || !y || x[1] !== y[1]) return null;
  const [p, q] = [BigInt(x[2]), BigInt(y[2])];
  return p < q ? -1 : p > q ? 1 : 0;
}

/** Terms are `<count>.<random>`: later holders count higher; the random part breaks ties. */
function termAfter(a, b) {
  if (!b) return !!a;
  const [x, y] = [a.split('.'), b.split('.')];
  const d = Number(x[0]) - Number(y[0]);
  return d > 0 || (d === 0 && x[1] > y[1]);
}

/** Objects with their keys sorted, so that equal claims give equal strings. */
function canonical(v) {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === 'object') {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]));
  }
  return v;
}

/** Whom a JWT is for: its claims less those that change when it is renewed; null if not a JWT. */
function tokenIdentity(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, '=')), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    if (!claims || typeof claims !== 'object' || Array.isArray(claims)) return null;
    for (const k of ['exp', 'iat', 'nbf', 'jti']) delete claims[k];
    return JSON.stringify(canonical(claims));
  } catch {
    return null;
  }
}

/** Runs a page's callback; what it throws is reported, and does not stop the others. */
function guard(fn) {
  try {
    fn();
  } catch (err) {
    if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
    else setTimeout(() => {
      throw err;
    });
  }
}

function sharingSupported() {
  return (
    typeof BroadcastChannel === 'function' &&
    typeof globalThis.navigator?.locks?.request === 'function' &&
    typeof globalThis.document?.addEventListener === 'function'
  );
}

export class SsegateClient {
  /**
   * Opens a stream at `url` (for example `https://push.example.com/v1/events`) at once, or
   * joins the one another tab holds for the same group.
   * @param {string | URL} url
   * @param {object} [options] see ssegate.d.ts
   */
  constructor(url, options = {}) {
    this.url = String(url);
    this.options = { ...DEFAULTS, ...options };
    if (typeof this.options.EventSource !== 'function') {
      throw new TypeError('ssegate: no EventSource in this environment; pass options.EventSource');
    }
    /**
     * Where to resume from (sent back on reconnect): the id of the last event received, or of
     * the last `ssegate.position` (the position a stream opens at), whichever came last.
     */
    this.lastEventId = this.options.lastEventId || '';
    this._streamUrl(undefined); // a bad URL throws here, not in a later reconnect
    /** @type {'connecting'|'open'|'waiting'|'closed'} */
    this.state = State.CONNECTING;
    /** @type {'alone'|'joining'|'holder'|'follower'|'closed'} */
    this.role = 'alone';
    this._handlers = new Map(); // event name -> Set of handlers
    this._listened = new Set(); // names with a listener on the current EventSource
    this._es = null;
    this._token = undefined; // the token in the current EventSource's URL
    this._timer = null;
    this._attempt = 0; // failed connections in a row
    this._gen = 0; // bumped by every connect and by close(): stale callbacks check it
    this._reconnectNow = false; // the server said why it closed: a fresh token is the cure
    this._share = null; // the group's state while sharing (see _join)
    if (this.options.shared !== false && sharingSupported()) this._join();
    else this._connect();
  }

  /**
   * Calls `handler({id, name, data, json()})` for each event named `name` (`message` for
   * events without a name). Returns a function that removes the handler.
   */
  on(name, handler) {
    let set = this._handlers.get(name);
    if (!set) this._handlers.set(name, (set = new Set()));
    set.add(handler);
    if (this._es) this._listen(this._es, name);
    const sh = this._share;
    if (sh?.catchEs) this._listenCatchUp(sh.catchEs, name);
    if (sh && !sh.names.has(name)) {
      sh.names.add(name);
      this._post({ t: 'names', names: [name] });
    }
    return () => set.delete(handler);
  }

  /** Closes the stream for good: no reconnect, no more callbacks. A holder hands over. */
  close() {
    this._halt();
    this._leaveGroup();
    this.role = 'closed';
    this._setState(State.CLOSED, {});
  }

  _setState(state, detail) {
    if (this.state === State.CLOSED) return;
    this.state = state;
    if (this.role === 'holder') {
      this._post({ t: 'state', term: this._share.term, state, detail: JSON.parse(JSON.stringify(detail)) });
    }
    this.options.onStateChange?.(state, detail);
  }

  /** Stops this client's connection and whatever it was waiting for (stale callbacks see the
   * new generation and do nothing). */
  _halt() {
    this._gen += 1;
    clearTimeout(this._timer);
    this._timer = null;
    this._drop();
  }

  _drop() {
    if (this._es) {
      this._es.close();
      this._es = null;
    }
    this._listened.clear();
  }

  /** The stream URL: the caller's URL and query, plus token and resume id. */
  _streamUrl(token, lastEventId = this.lastEventId) {
    const base = globalThis.location ? globalThis.location.href : undefined;
    const url = new URL(this.url, base);
    for (const [key, value] of Object.entries(this.options.query)) {
      url.searchParams.delete(key);
      for (const v of [].concat(value)) url.searchParams.append(key, String(v));
    }
    if (token) url.searchParams.set('token', token);
    else url.searchParams.delete('token');
    if (lastEventId) url.searchParams.set('last_event_id', lastEventId);
    else url.searchParams.delete('last_event_id');
    return url.href;
  }

  /** What comes after a wait: a connection, or for a tab that shares, its next step. */
  _retry(token) {
    if (this.role === 'joining') this._join();
    else if (this.role === 'follower') this._catchUp();
    else this._connect(token);
  }

  /**
   * The token for a new connection: `token` if given, else one from `getToken()` (none without
   * it), as `{token}`; null if the provider failed (then a backoff is under way) or this
   * attempt was superseded meanwhile (`gen`).
   */
  async _tokenFor(gen, token) {
    if (token !== undefined || !this.options.getToken) return { token };
    try {
      token = await this.options.getToken();
    } catch (error) {
      if (gen === this._gen) this._backoff({ error });
      return null;
    }
    return gen === this._gen ? { token } : null;
  }

  /** Opens a new EventSource, asking for a token first unless `token` is given. */
  async _connect(token) {
    const gen = ++this._gen;
    this._timer = null;
    this._setState(State.CONNECTING, { attempt: this._attempt });
    const asked = token === undefined;
    const got = await this._tokenFor(gen, token);
    if (!got) return;
    token = got.token;
    if (asked && this._identityChanged(token)) return;
    this._token = token;
    const ES = this.options.EventSource;
    const es = new ES(this._streamUrl(token), { withCredentials: this.options.withCredentials });
    this._es = es;
    this._listened.clear();
    const names = ['message', MISSED, DISCONNECT, POSITION, ...this._handlers.keys(), ...(this._share?.names ?? [])];
    for (const name of new Set(names)) this._listen(es, name);
    es.addEventListener('open', () => {
      if (es !== this._es) return;
      this._attempt = 0;
      this._reconnectNow = false;
      this._setState(State.OPEN, {});
    });
    es.addEventListener('error', () => {
      if (es !== this._es) return;
      if (es.readyState === ES.CLOSED) {
        // A failed connection (a non-200 answer, a wrong content type): EventSource is done.
        this._drop();
        this._backoff({});
      } else {
        // The stream ended or the network dropped: the browser reconnects after `retry:`.
        this._setState(State.CONNECTING, { attempt: this._attempt, resumed: true });
        if (this.options.getToken) this._checkToken(es, gen);
      }
    });
  }

  _listen(es, name) {
    if (this._listened.has(name)) return;
    this._listened.add(name);
    es.addEventListener(name, (e) => {
      if (es !== this._es) return;
      // The position's data is its id too, for an EventSource implementation that does not
      // fill `lastEventId`.
      const id = e.lastEventId || (name === POSITION ? e.data : '');
      if (this.role === 'holder') {
        // `own`: the id is this event's, not the last one seen (an event sent without an id
        // keeps the stream's last id: followers must not take it for a repeat of that one).
        const own = id !== '' && id !== this.lastEventId;
        const sh = this._share;
        this._post({ t: 'ev', term: sh.term, n: sh.n++, name, id, own, data: e.data });
      }
      this._deliver(name, id, e.data);
    });
  }

  /** Hands one event to this page: records its id, runs the callbacks and the handlers. */
  _deliver(name, id, data) {
    if (id) this.lastEventId = id;
    if (name === MISSED) {
      let payload;
      try {
        payload = JSON.parse(data);
      } catch {
        payload = { reason: 'unknown', last_event_id: '' };
      }
      guard(() => this.options.onMissed?.(payload));
    } else if (name === DISCONNECT) {
      const payload = disconnectPayload(data);
      if (payload.reason === 'token_expired') this._reconnectNow = true;
      guard(() => this.options.onDisconnect?.(payload));
    }
    const handlers = this._handlers.get(name);
    if (!handlers) return;
    const ev = eventOf(name, id, data);
    for (const h of [...handlers]) guard(() => h(ev));
  }

  /**
   * The browser is about to reconnect with the token of the old URL. Keep that if the provider
   * still gives the same token; otherwise replace the connection with one carrying the new one.
   */
  async _checkToken(es, gen) {
    let token;
    try {
      token = await this.options.getToken();
    } catch {
      return; // the browser's own attempt goes on; a refusal then lands in _backoff
    }
    if (gen !== this._gen || es !== this._es || es.readyState !== this.options.EventSource.CONNECTING) return;
    if (token === this._token) return;
    if (this._identityChanged(token)) return;
    this._drop();
    // The server said the token expired: no point in waiting. Otherwise keep to about the
    // pace of `retry:`, with jitter, as the browser would have.
    const { retry } = this.options;
    const delay = this._reconnectNow ? 0 : retry + Math.random() * retry;
    this._wait(delay, { attempt: this._attempt }, token);
  }

  /** Exponential backoff with full jitter: a delay drawn from [0, min(max, min·2^attempt)]. */
  _backoff(detail) {
    const { minDelay, maxDelay } = this.options;
    const cap = Math.min(maxDelay, minDelay * 2 ** this._attempt);
    this._attempt += 1;
    this._wait(Math.random() * cap, { ...detail, attempt: this._attempt, cap });
  }

  _wait(delay, detail, token) {
    const gen = ++this._gen;
    this._setState(State.WAITING, { ...detail, delay: Math.round(delay) });
    this._timer = setTimeout(() => {
      if (gen === this._gen) this._retry(token);
    }, delay);
  }

  // ----------------------------------------------------------------------------- sharing

  /** Whom this page's streams are for (see the top of the file); null: unknown, do not share. */
  _identityOf(token) {
    const { shareKey, withCredentials } = this.options;
    const key = shareKey === undefined || shareKey === null ? null : String(shareKey);
    if (token !== undefined && token !== null && token !== '') {
      const claims = tokenIdentity(token);
      if (claims === null && key === null) return null; // an opaque token: whose, we cannot say
      return JSON.stringify(['token', claims, key]);
    }
    if (key !== null) return JSON.stringify(['key', key]);
    const target = new URL(this.url, globalThis.location?.href);
    const cookies = withCredentials || target.origin === globalThis.location?.origin;
    return cookies ? null : JSON.stringify(['anonymous']);
  }

  /**
   * A token for someone else than the group's identity (a logout and login in some tab): this
   * tab leaves its group for the new one. Returns whether it did.
   */
  _identityChanged(token) {
    const sh = this._share;
    if (!sh || this._identityOf(token) === sh.identity) return false;
    this._drop();
    this._leaveGroup();
    this._join(token);
    return true;
  }

  /** Finds this page's group (asking for a token first) and joins it as holder or follower. */
  async _join(token) {
    const gen = ++this._gen;
    this._timer = null;
    this.role = 'joining';
    this._setState(State.CONNECTING, { attempt: this._attempt });
    const got = await this._tokenFor(gen, token);
    if (!got) return;
    token = got.token;
    const identity = this._identityOf(token);
    if (identity === null) {
      this._alone(token); // nobody can tell whom the stream is for: one stream per tab
      return;
    }
    const where = new URL(this._streamUrl(undefined, ''));
    where.searchParams.sort();
    const name = SHARE_PREFIX + JSON.stringify([where.href, !!this.options.withCredentials, identity]);
    let channel;
    try {
      channel = new BroadcastChannel(name);
    } catch {
      this._alone(token); // an opaque origin (a sandboxed frame): nobody to share with
      return;
    }
    const sh = {
      name,
      identity,
      channel,
      names: new Set(['message', ...this._handlers.keys()]),
      term: '', // the current holder's term ('' until known)
      knownTerm: '', // the latest term seen at all
      n: 0, // holder: the next relay's number; follower: the one expected
      release: null, // holder: releases the lock
      held: null, // the lock request that holds the lock
      waiting: null, // follower: aborts the queued lock request
      catching: false, // follower: a catch-up stream is open
      catchEs: null,
      buffer: [],
      overflow: false,
      skipUntil: '', // follower: relays with ids up to this one are repeats
      holderState: null, // follower: the holder's last state and detail
      pings: 0, // follower: pings not answered
      timer: null,
      lifecycle: [],
    };
    this._share = sh;
    sh.channel.onmessage = (m) => {
      if (this._share === sh) this._onShared(m.data);
    };
    const on = (target, type, fn) => {
      target.addEventListener(type, fn);
      sh.lifecycle.push(() => target.removeEventListener(type, fn));
    };
    on(document, 'freeze', () => this._pause());
    on(document, 'resume', () => this._unpause());
    on(globalThis, 'pagehide', (e) => e.persisted && this._pause());
    on(globalThis, 'pageshow', (e) => e.persisted && this._unpause());
    sh.timer = setInterval(() => this._ping(), PING_MS);
    // The first tab takes the lock at once and needs no catch-up; the others follow.
    this._lock({ ifAvailable: true }, token);
  }

  /** One stream for this page alone (sharing is off, or impossible here). */
  _alone(token) {
    this._leaveGroup();
    this.role = 'alone';
    this._connect(token);
  }

  /** Asks for the group's lock: granted, this tab holds the stream until it lets go. */
  _lock(options, token) {
    const sh = this._share;
    const request = {};
    navigator.locks
      .request(sh.name, options, (lock) => {
        if (this._share !== sh) return undefined;
        if (!lock) {
          this._follow(token);
          return undefined;
        }
        sh.held = request;
        return new Promise((release) => this._hold(release, token));
      })
      .catch((err) => {
        if (this._share !== sh) return;
        // Taken from this holder by a tab that found it unresponsive.
        if (this.role === 'holder' && sh.held === request) this._stolen();
        // Locks refused here (a SecurityError: an opaque origin): share nothing.
        else if (err?.name !== 'AbortError' && this.role === 'joining') this._alone(token);
        // Otherwise aborted while queued: this tab left, or is taking the lock by force.
      });
  }

  /** Holds the lock: opens the stream from this tab's last event id and relays it. */
  _hold(release, token) {
    const sh = this._share;
    sh.release = release;
    sh.waiting?.abort();
    sh.waiting = null;
    this._stopCatchUp();
    sh.term = `${Number((sh.knownTerm || '0').split('.')[0]) + 1}.${Math.random().toString(36).slice(2, 10)}`;
    sh.knownTerm = sh.term;
    sh.n = 0;
    sh.skipUntil = '';
    this.role = 'holder';
    this._post({ t: 'term', term: sh.term, from: this.lastEventId });
    this._connect(token);
  }

  /** Another tab holds the stream: catch up from the server, then take the relays. */
  _follow(token) {
    const sh = this._share;
    this.role = 'follower';
    sh.held = null;
    this._post({ t: 'hello', names: [...sh.names] });
    const abort = new AbortController();
    sh.waiting = abort;
    this._lock({ signal: abort.signal });
    this._catchUp(undefined, token);
  }

  /** Lets go of the group: a holder hands the stream over, a follower stops queueing. */
  _leaveGroup() {
    const sh = this._share;
    if (!sh) return;
    this._share = null;
    if (this.role === 'holder') sh.channel.postMessage({ t: 'leave', term: sh.term });
    sh.release?.();
    sh.waiting?.abort();
    this._stopCatchUp(sh);
    clearInterval(sh.timer);
    for (const off of sh.lifecycle) off();
    sh.channel.close();
  }

  _post(msg) {
    try {
      this._share?.channel.postMessage(msg);
    } catch {
      // closed meanwhile
    }
  }

  /** The page is being frozen (or cached): a holder hands over, as it will relay nothing. */
  _pause() {
    const sh = this._share;
    if (!sh || this.role !== 'holder') return;
    this._halt();
    this._post({ t: 'leave', term: sh.term });
    sh.release?.();
    sh.release = null;
    this.role = 'paused';
  }

  /** Back from a freeze: a former holder follows; a follower checks it has everything. */
  _unpause() {
    const sh = this._share;
    if (!sh) return;
    if (this.role === 'paused') this._follow();
    else if (this.role === 'follower' && !sh.catching) this._post({ t: 'hello', names: [...sh.names] });
  }

  /** The lock was taken from this holder (it looked dead): stop relaying, and follow. */
  _stolen() {
    this._halt();
    this._share.release = null;
    this._follow();
  }

  /** A visible follower checks the holder is alive; after PING_MISSES silences, takes over. */
  _ping() {
    const sh = this._share;
    if (!sh || this.role !== 'follower' || sh.catching) return;
    if (document.visibilityState !== 'visible') return;
    if (sh.pings >= PING_MISSES) {
      sh.pings = 0;
      sh.waiting?.abort();
      sh.waiting = null;
      this._lock({ steal: true });
      return;
    }
    sh.pings += 1;
    this._post({ t: 'hello', names: [...sh.names] });
  }

  _onShared(m) {
    const sh = this._share;
    if (!m || typeof m !== 'object') return;
    if (m.term && termAfter(m.term, sh.knownTerm)) sh.knownTerm = m.term;
    if (m.t === 'names' || m.t === 'hello') {
      for (const name of m.names ?? []) {
        sh.names.add(name);
        if (this.role === 'holder' && this._es) this._listen(this._es, name);
      }
      if (m.t === 'hello' && this.role === 'holder') {
        this._post({ t: 'sync', term: sh.term, n: sh.n, state: this.state });
      }
      return;
    }
    if (this.role === 'holder') {
      // A newer holder: this tab lost the lock without being told yet. Stop relaying now.
      if (m.term && m.term !== sh.term && termAfter(m.term, sh.term)) this._stolen();
      return;
    }
    if (this.role !== 'follower') return;
    if (sh.catching) {
      if (m.t === 'state' || m.t === 'sync') sh.holderState = m;
      if (m.t !== 'ev' && m.t !== 'term') return;
      if (sh.buffer.length >= MAX_BUFFER) {
        sh.buffer = [];
        sh.overflow = true;
      }
      sh.buffer.push(m);
      return;
    }
    this._follower(m);
  }

  /** A follower's handling of the holder's messages (not while catching up). */
  _follower(m) {
    const sh = this._share;
    switch (m.t) {
      case 'term':
        if (!termAfter(m.term, sh.term)) return;
        sh.term = m.term;
        sh.n = 0;
        sh.skipUntil = '';
        sh.holderState = null;
        if (m.from === this.lastEventId) return;
        // Behind this tab: what it relays first, this tab has. Ahead, or not comparable: what
        // lies between, this tab may have missed.
        if (compareIds(m.from, this.lastEventId) === -1) sh.skipUntil = this.lastEventId;
        else this._catchUp();
        return;
      case 'ev':
        if (!sh.term) {
          // Just caught up, with no relay since: this is the first after the position.
          sh.term = m.term;
          sh.n = m.n;
        }
        if (m.term !== sh.term) {
          if (termAfter(m.term, sh.term)) this._catchUp(m); // its start was missed
          return;
        }
        if (m.n < sh.n) return;
        if (m.n > sh.n) {
          this._catchUp(m); // a relay was missed
          return;
        }
        sh.n += 1;
        if (sh.skipUntil && m.own) {
          const c = compareIds(m.id, sh.skipUntil);
          if (c === -1 || c === 0) return;
          sh.skipUntil = '';
        }
        this._deliver(m.name, m.id, m.data);
        return;
      case 'state':
        if (sh.term && m.term !== sh.term) return;
        sh.holderState = m;
        this._mirror();
        if (m.state === State.CONNECTING && this.options.getToken) this._recheckIdentity();
        return;
      case 'sync':
        sh.pings = 0;
        if (!sh.term) {
          sh.term = m.term; // caught up, and nothing relayed since
          sh.n = m.n;
        }
        if (termAfter(m.term, sh.term) || (m.term === sh.term && m.n > sh.n)) {
          this._catchUp(); // this tab missed relays (it was frozen, or joined mid-term)
          return;
        }
        if (m.term === sh.term) {
          sh.holderState = m;
          this._mirror();
        }
        return;
      case 'leave':
        if (m.term === sh.term) this._setState(State.CONNECTING, { handover: true });
        return;
      default:
    }
  }

  /** A follower shows the holder's state (it has no connection of its own). */
  _mirror() {
    const h = this._share?.holderState;
    if (!h) return;
    if (h.state !== this.state || h.t === 'state') this._setState(h.state, h.detail ?? {});
  }

  /** The holder reconnects: is this tab's identity still the group's? */
  async _recheckIdentity() {
    const sh = this._share;
    let token;
    try {
      token = await this.options.getToken();
    } catch {
      return;
    }
    if (this._share === sh && this.role === 'follower') this._identityChanged(token);
  }

  /**
   * Opens this tab's own stream from its last event id, delivers it up to the position, closes
   * it, then delivers the relays that came meanwhile and follow that position. `first` is a
   * relay that showed the need (kept for after).
   */
  async _catchUp(first, token) {
    const sh = this._share;
    if (!sh || this.role !== 'follower') return;
    if (!sh.catching) {
      sh.catching = true;
      sh.buffer = first ? [first] : [];
      sh.overflow = false;
    }
    const gen = ++this._gen;
    this._timer = null;
    const got = await this._tokenFor(gen, token);
    if (!got || this._share !== sh || !sh.catching || this._identityChanged(got.token)) return;
    token = got.token;
    const ES = this.options.EventSource;
    const es = new ES(this._streamUrl(token), { withCredentials: this.options.withCredentials });
    sh.catchEs = es;
    sh.catchListened = new Set();
    for (const name of new Set(['message', MISSED, DISCONNECT, POSITION, ...this._handlers.keys()])) {
      this._listenCatchUp(es, name);
    }
    es.addEventListener('error', () => {
      if (sh.catchEs !== es || es.readyState !== ES.CLOSED) return; // resumed by the browser
      es.close();
      sh.catchEs = null;
      this._backoff({});
    });
  }

  _listenCatchUp(es, name) {
    const sh = this._share;
    if (sh.catchListened.has(name)) return;
    sh.catchListened.add(name);
    es.addEventListener(name, (e) => {
      if (sh.catchEs !== es) return;
      const id = e.lastEventId || (name === POSITION ? e.data : '');
      this._deliver(name, id, e.data);
      if (name === POSITION && this._share === sh) this._caughtUp(sh);
    });
  }

  _stopCatchUp(sh = this._share) {
    if (!sh) return;
    sh.catchEs?.close();
    sh.catchEs = null;
    sh.catching = false;
    sh.buffer = [];
  }

  /** The own stream reached its position: go on with the relays after it. */
  _caughtUp(sh) {
    const { buffer, overflow } = sh;
    this._stopCatchUp(sh);
    this._attempt = 0;
    if (overflow) {
      this._catchUp();
      return;
    }
    // Relays up to the last one this stream already covered (an id at or before the position)
    // are repeats. The first after them sets the holder's term and numbering; ids up to the
    // position are skipped until one passes it (a holder that lags behind this stream).
    let start = 0;
    buffer.forEach((m, i) => {
      const c = m.t === 'ev' && m.own ? compareIds(m.id, this.lastEventId) : null;
      if (c === -1 || c === 0) start = i + 1;
    });
    sh.term = '';
    sh.skipUntil = this.lastEventId;
    if (sh.holderState) {
      this._setState(sh.holderState.state, sh.holderState.detail ?? {});
    } else {
      this._setState(State.CONNECTING, {});
      this._post({ t: 'hello', names: [...sh.names] });
    }
    const rest = buffer.slice(start);
    for (const m of rest) {
      if (this._share !== sh || this.role !== 'follower' || sh.catching) break;
      this._follower(m);
    }
  }
}

/** Shorthand for `new SsegateClient(url, options)`. */
export function connect(url, options) {
  return new SsegateClient(url, options);
}
