// ssegate browser client: an EventSource that does not give up.
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
// - report `ssegate.missed` and `ssegate.disconnect`, and its state.
// Ordinary reconnects (the stream ended, the network dropped) are left to the browser, which
// honours the server's `retry:` and sends `Last-Event-ID` itself, unless the token changed.

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
  onMissed: null,
  onDisconnect: null,
  onStateChange: null,
  EventSource: globalThis.EventSource,
};

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

function eventOf(e) {
  return {
    id: e.lastEventId,
    name: e.type,
    data: e.data,
    json() {
      return JSON.parse(this.data);
    },
  };
}

export class SsegateClient {
  /**
   * Opens a stream at `url` (for example `https://push.example.com/v1/events`) at once.
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
    this._handlers = new Map(); // event name -> Set of handlers
    this._listened = new Set(); // names with a listener on the current EventSource
    this._es = null;
    this._token = undefined; // the token in the current EventSource's URL
    this._timer = null;
    this._attempt = 0; // failed connections in a row
    this._gen = 0; // bumped by every connect and by close(): stale callbacks check it
    this._reconnectNow = false; // the server said why it closed: a fresh token is the cure
    this._connect();
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
    return () => set.delete(handler);
  }

  /** Closes the stream for good: no reconnect, no more callbacks. */
  close() {
    this._gen += 1;
    clearTimeout(this._timer);
    this._timer = null;
    this._drop();
    this._setState(State.CLOSED, {});
  }

  _setState(state, detail) {
    if (this.state === State.CLOSED) return;
    this.state = state;
    this.options.onStateChange?.(state, detail);
  }

  _drop() {
    if (this._es) {
      this._es.close();
      this._es = null;
    }
    this._listened.clear();
  }

  /** The stream URL: the caller's URL and query, plus token and resume id. */
  _streamUrl(token) {
    const base = globalThis.location ? globalThis.location.href : undefined;
    const url = new URL(this.url, base);
    for (const [key, value] of Object.entries(this.options.query)) {
      url.searchParams.delete(key);
      for (const v of [].concat(value)) url.searchParams.append(key, String(v));
    }
    if (token) url.searchParams.set('token', token);
    else url.searchParams.delete('token');
    if (this.lastEventId) url.searchParams.set('last_event_id', this.lastEventId);
    else url.searchParams.delete('last_event_id');
    return url.href;
  }

  /** Opens a new EventSource, asking for a token first unless `token` is given. */
  async _connect(token) {
    const gen = ++this._gen;
    this._timer = null;
    this._setState(State.CONNECTING, { attempt: this._attempt });
    if (token === undefined && this.options.getToken) {
      try {
        token = await this.options.getToken();
      } catch (error) {
        if (gen === this._gen) this._backoff({ error });
        return;
      }
      if (gen !== this._gen) return; // closed meanwhile
    }
    this._token = token;
    const ES = this.options.EventSource;
    const es = new ES(this._streamUrl(token), { withCredentials: this.options.withCredentials });
    this._es = es;
    this._listened.clear();
    for (const name of new Set(['message', MISSED, DISCONNECT, POSITION, ...this._handlers.keys()])) {
      this._listen(es, name);
    }
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
      if (id) this.lastEventId = id;
      if (name === MISSED) {
        let payload;
        try {
          payload = JSON.parse(e.data);
        } catch {
          payload = { reason: 'unknown', last_event_id: '' };
        }
        this.options.onMissed?.(payload);
      } else if (name === DISCONNECT) {
        const payload = disconnectPayload(e.data);
        if (payload.reason === 'token_expired') this._reconnectNow = true;
        this.options.onDisconnect?.(payload);
      }
      const ev = eventOf(e);
      for (const h of [...(this._handlers.get(name) ?? [])]) h(ev);
    });
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
      if (gen === this._gen) this._connect(token);
    }, delay);
  }
}

/** Shorthand for `new SsegateClient(url, options)`. */
export function connect(url, options) {
  return new SsegateClient(url, options);
}
