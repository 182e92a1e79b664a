// Types of ssegate.js, the ssegate browser client (served at GET /v1/client.js).

/** Where a client is: opening a connection, streaming, waiting to retry, or closed for good. */
export type ClientState = 'connecting' | 'open' | 'waiting' | 'closed';

export declare const State: Readonly<{
  CONNECTING: 'connecting';
  OPEN: 'open';
  WAITING: 'waiting';
  CLOSED: 'closed';
}>;

/** The data of `ssegate.missed`: a resume the server could not serve; refetch your state. */
export interface MissedPayload {
  /** `expired`: events after the id were evicted; `unknown`: an id this server never issued;
   * `other_epoch`: an id from an earlier server process (it restarted). */
  reason: 'expired' | 'unknown' | 'other_epoch' | (string & {});
  /** The id the client sent. */
  last_event_id: string;
}

/** The data of `ssegate.disconnect`, the last event of a stream the server closes. */
export interface DisconnectPayload {
  /** Why: the reason given to the Disconnect RPC, or e.g. `token_expired`. Plain-text data
   * becomes `{ reason: data }`. */
  reason: string;
  [key: string]: unknown;
}

/** One event as handlers receive it. */
export interface SsegateEvent<T = unknown> {
  /** Its id (`<epoch>-<seq>`), or the last id seen for events sent without one. */
  id: string;
  /** Its name; `message` for events published without a name. */
  name: string;
  /** The data, line breaks normalised to LF. */
  data: string;
  /** `JSON.parse(data)`; throws on invalid JSON. */
  json(): T;
}

/** Details passed with a state change. */
export interface StateDetail {
  /** Failed connections in a row so far. */
  attempt?: number;
  /** `waiting`: milliseconds until the next attempt. */
  delay?: number;
  /** `waiting` after a failure: the backoff ceiling this delay was drawn under. */
  cap?: number;
  /** `connecting`: the browser is resuming the stream by itself (after `retry:`). */
  resumed?: boolean;
  /** `waiting`: what `getToken()` threw, if that is why. */
  error?: unknown;
  /** `connecting`, in a tab that shares: the holder tab left and the next one takes over. */
  handover?: boolean;
}

/** Where a client stands among the tabs of its browser (see README, "One stream per browser"). */
export type ClientRole = 'alone' | 'joining' | 'holder' | 'follower' | 'paused' | 'closed';

export interface ClientOptions {
  /** Query parameters added to the URL (`user`, `group`, `topic`); arrays repeat the key. */
  query?: Record<string, string | string[]>;
  /** Called before every connection this client opens; the token is sent as `?token=`.
   * Also called when the browser is about to resume a stream: a different token replaces
   * that connection with one carrying it. */
  getToken?: () => string | Promise<string>;
  /** Resume after this id on the first connection (for example a `client.lastEventId` the
   * app stored earlier). */
  lastEventId?: string;
  /** Send cookies cross-origin (EventSource `withCredentials`). */
  withCredentials?: boolean;
  /** Backoff after a failed connection: the first ceiling, in ms (default 1000). */
  minDelay?: number;
  /** Backoff ceiling, in ms (default 30000). */
  maxDelay?: number;
  /** With `getToken`, the delay before replacing a resuming connection with one with a new
   * token, drawn from [retry, 2·retry] ms (default 3000, the server's default `retry:`). */
  retry?: number;
  /** Share one stream with the other tabs of this origin, identity and subscription set
   * (default true); false: one stream for this page. */
  shared?: boolean;
  /** Who the page's user is, where the client cannot tell from a JWT (cookie sessions, opaque
   * tokens): tabs share only with tabs of the same key. */
  shareKey?: string;
  onMissed?: (payload: MissedPayload) => void;
  onDisconnect?: (payload: DisconnectPayload) => void;
  onStateChange?: (state: ClientState, detail: StateDetail) => void;
  /** An EventSource implementation (default: the global one). */
  EventSource?: typeof EventSource;
}

/** Events the server itself sends, with their payload types. */
export interface SsegateEvents {
  'ssegate.missed': MissedPayload;
  'ssegate.disconnect': DisconnectPayload;
  /** The stream's position, sent as a stream opens (after any replayed or retained events):
   * its `id` and its `data` are the id to resume from (not JSON). Always recorded as
   * `lastEventId`; handlers get it only if added for this name. */
  'ssegate.position': never;
}

export declare class SsegateClient {
  constructor(url: string | URL, options?: ClientOptions);
  readonly url: string;
  /** Where to resume from: the id of the last event received or of the last
   * `ssegate.position` (the position a stream opens at), whichever came last; sent as
   * `?last_event_id=` on the client's own reconnects. Store it to resume a later page from
   * here (`lastEventId` option). */
  lastEventId: string;
  readonly state: ClientState;
  /** `holder`: this tab holds the stream and relays it; `follower`: it gets another tab's;
   * `alone`: not sharing. */
  readonly role: ClientRole;
  /** Adds a handler for events named `name`; returns a function removing it. */
  on<K extends keyof SsegateEvents>(name: K, handler: (event: SsegateEvent<SsegateEvents[K]>) => void): () => void;
  on<T = unknown>(name: string, handler: (event: SsegateEvent<T>) => void): () => void;
  /** Closes the stream for good (a holder hands it to the next tab). */
  close(): void;
}

/** `new SsegateClient(url, options)`. */
export declare function connect(url: string | URL, options?: ClientOptions): SsegateClient;
