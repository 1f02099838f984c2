// chorus.js: the browser (and node) client for a chorus server, protocol 1.1.
//
// Why it exists: the hard half of a real-time app is the client's side of the
// protocol: reconnecting without a thundering herd, resuming each room from
// the last `seq` it saw (and noticing when that is impossible), matching acks
// to sends, refreshing the token before it expires, and noticing a dead
// connection that the browser's WebSocket cannot see. This module does all of
// that with no dependencies and no build step: import it as an ES module.
//
// Wire reference: PROTOCOL.md (sections 1 to 5 and 8).

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = '1.1';

/** The `code` of a `close` event when the client gave up on a handshake. */
export const CLOSE_CONNECT_TIMEOUT = 4900;
/** The `code` of a `close` event when the client found the connection dead. */
export const CLOSE_PING_TIMEOUT = 4901;
/** Close code of the server's admin API (PROTOCOL.md section 10): no reconnect. */
export const CLOSE_DISCONNECTED_BY_ADMIN = 4001;

/**
 * An error answered by the server (`code` is one of PROTOCOL.md section 3's
 * codes) or made by the client: `disconnected` (the connection went away
 * before the answer), `timeout` (no answer in `requestTimeout`), `closed`
 * (the client was closed).
 */
export class ChorusError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'ChorusError';
    /** @type {string} */
    this.code = code;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first): "full
 * jitter", a uniform random delay between 0 and min(max, initial * 2^attempt),
 * so that clients cut at the same moment come back spread out.
 * @param {number} attempt
 * @param {{initial: number, max: number}} backoff milliseconds
 * @param {() => number} [random] a uniform number in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, backoff, random = Math.random) {
  const ceiling = Math.min(backoff.max, backoff.initial * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * The `exp` claim of a JWT, in seconds, or undefined when it cannot be read.
 * The client does not verify the token (the server does); it only needs to
 * know when to refresh it.
 * @param {string} token
 * @returns {number | undefined}
 */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1];
    const base64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
    const text = typeof atob === 'function' ? atob(padded) : Buffer.from(padded, 'base64').toString('binary');
    const exp = JSON.parse(text).exp;
    return typeof exp === 'number' ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** A tiny event emitter: `on` returns a function that unsubscribes. */
class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }

  /**
   * @param {string} event
   * @param {Function} handler
   * @returns {() => void}
   */
  on(event, handler) {
    let set = this._handlers.get(event);
    if (!set) {
      set = new Set();
      this._handlers.set(event, set);
    }
    set.add(handler);
    return () => set.delete(handler);
  }

  /**
   * @param {string} event
   * @param {unknown} value
   */
  _emit(event, value) {
    const set = this._handlers.get(event);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(value);
      } catch (e) {
        // An app handler that throws must not break the client's own state.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

const DEFAULTS = {
  backoff: { initial: 500, max: 30000 },
  idleTimeout: 30000,
  pingTimeout: 10000,
  requestTimeout: 10000,
  connectTimeout: 10000,
  refreshBefore: 60000,
  offline: 'queue',
};

/**
 * A connection to a chorus server that reconnects by itself.
 *
 * Events (`client.on(name, handler)`):
 * - `state`: `'connecting' | 'open' | 'disconnected' | 'closed'`
 * - `error`: a `ChorusError` with no request to reject (a failed rejoin, a
 *   refused refresh, a server `error` without `ref`)
 * - `close`: `{code, reason}` of each closed WebSocket
 */
export class ChorusClient extends Emitter {
  /**
   * @param {object} options
   * @param {string} options.url the server's WebSocket address, `ws://host:port/ws`
   * @param {string} [options.token] a JWT
   * @param {() => (string | Promise<string>)} [options.getToken] called for every
   *   connection attempt and before the token expires (then sent as `refresh`)
   * @param {{initial: number, max: number}} [options.backoff] reconnect delays, ms
   * @param {number} [options.idleTimeout] ms without any frame before the client pings
   * @param {number} [options.pingTimeout] ms to wait for anything after that ping
   * @param {number} [options.requestTimeout] ms to wait for an ack or answer
   * @param {number} [options.connectTimeout] ms a connection attempt may take
   * @param {number} [options.refreshBefore] ms before `exp` to refresh the token
   * @param {'queue' | 'fail'} [options.offline] requests made while disconnected
   *   wait for the connection (`queue`) or fail at once with `disconnected`
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class to use
   * @param {boolean} [options.autoConnect] connect now (default true)
   */
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError('chorus: options.url is required');
    if (!options.token && !options.getToken) throw new TypeError('chorus: give options.token or options.getToken');
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    /** @type {typeof WebSocket} */
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this._WebSocket) throw new TypeError('chorus: no WebSocket class; pass options.WebSocket');
    /** @type {'idle' | 'connecting' | 'open' | 'disconnected' | 'closed'} */
    this.state = 'idle';
    /** @type {Map<string, ChorusRoom>} */
    this.rooms = new Map();
    this._ws = null;
    this._attempt = 0;
    this._refCounter = 0;
    /** @type {Map<string, {kind: string, room?: string, resolve: Function, reject: Function, timer: any}>} */
    this._pending = new Map();
    /** @type {Array<{frame: object, ref: string}>} requests waiting for a connection */
    this._queue = [];
    this._timers = { reconnect: null, liveness: null, refresh: null, connect: null };
    this._lastFrameAt = 0;
    this._pingSentAt = 0;
    this._token = options.token || null;
    this._exp = undefined;
    if (options.autoConnect !== false) this.connect();
  }

  /** Starts connecting (again, after `close()`). */
  connect() {
    if (this.state === 'connecting' || this.state === 'open') return;
    this._closedByApp = false;
    this._open();
  }

  /**
   * Closes the connection for good: no reconnect. Pending requests fail with `closed`.
   */
  close() {
    this._closedByApp = true;
    clearTimeout(this._timers.reconnect);
    clearTimeout(this._timers.connect);
    this._stopTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, 'client closed');
      } catch {
        // already closing
      }
    }
    this._failPending('closed', 'the client was closed');
    this._failQueue('closed', 'the client was closed');
    this._setState('closed');
  }

  /**
   * A room, joined now (or as soon as the client is connected) and rejoined
   * after every reconnect with `since` and `epoch`.
   * @param {string} name
   * @param {{presence?: boolean, since?: number, epoch?: string}} [options]
   * @returns {ChorusRoom}
   */
  join(name, options = {}) {
    let room = this.rooms.get(name);
    if (!room) {
      room = new ChorusRoom(this, name, options);
      this.rooms.set(name, room);
    }
    if (this.state === 'open') this._sendJoin(room);
    return room;
  }

  /**
   * Sends `body` to `room` (joined or not: the token decides).
   * @param {string} room
   * @param {unknown} body any JSON value
   * @returns {Promise<{room: string, seq: number}>} the ack
   */
  send(room, body) {
    return this._request({ type: 'send', room, body }, 'ack');
  }

  /**
   * One page of a room's history, oldest first.
   * @param {string} room
   * @param {{before?: number, limit?: number}} [options]
   * @returns {Promise<Array<ChorusMessage>>}
   */
  history(room, options = {}) {
    const frame = { type: 'history', room };
    if (options.before !== undefined) frame.before = options.before;
    if (options.limit !== undefined) frame.limit = options.limit;
    return this._request(frame, 'history', room).then((reply) => reply.messages);
  }

  /**
   * A one-off presence query (PROTOCOL.md section 8).
   * @param {string} room
   * @returns {Promise<{room: string, count: number, members: Array<{sub: string, conns: number}>, truncated: boolean}>}
   */
  presence(room) {
    return this._request({ type: 'presence', room }, 'presence', room);
  }

  /**
   * An application-level ping; resolves with the round trip in ms.
   * @returns {Promise<number>}
   */
  ping() {
    const started = Date.now();
    return this._request({ type: 'ping' }, 'pong').then(() => Date.now() - started);
  }

  // --- connection ---------------------------------------------------------

  async _open() {
    this._setState('connecting');
    let token;
    try {
      token = this.options.getToken ? await this.options.getToken() : this._token;
    } catch (e) {
      this._emit('error', new ChorusError('token', `getToken failed: ${e && e.message}`));
      this._scheduleReconnect();
      return;
    }
    if (this._closedByApp) return;
    this._token = token;
    this._exp = tokenExpiry(token);
    const separator = this.options.url.includes('?') ? '&' : '?';
    let ws;
    try {
      ws = new this._WebSocket(`${this.options.url}${separator}token=${encodeURIComponent(token)}`);
    } catch (e) {
      this._emit('error', new ChorusError('connect', String(e && e.message)));
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    // An attempt whose handshake never finishes (a peer that accepted and
    // went silent, or a socket closed under a handshake that some WebSocket
    // implementations never report) must not stall reconnecting.
    clearTimeout(this._timers.connect);
    this._timers.connect = setTimeout(() => {
      if (ws !== this._ws || this.state !== 'connecting') return;
      this._ws = null;
      this._detach(ws);
      try {
        ws.close();
      } catch {
        // nothing to close
      }
      this._emit('close', { code: CLOSE_CONNECT_TIMEOUT, reason: 'connect timeout' });
      this._lost();
    }, this.options.connectTimeout);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onFrame(ws, event.data);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    ws.onerror = () => {
      // Always followed by a close event, which does the work.
    };
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    clearTimeout(this._timers.connect);
    this._attempt = 0;
    this._lastFrameAt = Date.now();
    this._pingSentAt = 0;
    this._setState('open');
    this._startLiveness();
    this._scheduleRefresh();
    for (const room of this.rooms.values()) {
      if (!room._left) this._sendJoin(room);
    }
    const queued = this._queue;
    this._queue = [];
    for (const { frame, ref } of queued) {
      const pending = this._pending.get(ref);
      if (pending) pending.sent = true;
      this._write(frame);
    }
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._detach(ws);
    this._emit('close', { code, reason });
    if (code === CLOSE_DISCONNECTED_BY_ADMIN) {
      // An operator cut this user off on purpose; coming straight back
      // would undo that. The app may call connect() again.
      this.close();
      return;
    }
    this._lost();
  }

  /** The connection is gone (closed, or found dead): fail what waited on it, reconnect. */
  _lost() {
    clearTimeout(this._timers.connect);
    this._stopTimers();
    // An in-flight send may or may not have been published: the app learns
    // which from the rejoin's replay; its promise fails with `disconnected`.
    this._failPending('disconnected', 'the connection was lost before the answer');
    for (const room of this.rooms.values()) room._joinedNow = false;
    if (this._closedByApp) return;
    this._setState('disconnected');
    this._scheduleReconnect();
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _scheduleReconnect() {
    if (this._closedByApp) return;
    if (this.state !== 'disconnected') this._setState('disconnected');
    const delay = backoffDelay(this._attempt, this.options.backoff);
    this._attempt += 1;
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => this._open(), delay);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit('state', state);
  }

  _stopTimers() {
    clearInterval(this._timers.liveness);
    clearTimeout(this._timers.refresh);
    this._timers.liveness = this._timers.refresh = null;
  }

  // Browsers cannot see WebSocket pings, so a connection whose peer vanished
  // (a sleeping laptop, a NAT that forgot it) looks open forever. After
  // `idleTimeout` without any frame the client sends a `ping` frame; if
  // nothing at all arrives within `pingTimeout` it drops the socket and
  // reconnects.
  _startLiveness() {
    const { idleTimeout, pingTimeout } = this.options;
    const tick = Math.max(50, Math.min(idleTimeout, pingTimeout) / 4);
    this._timers.liveness = setInterval(() => {
      const now = Date.now();
      if (this._pingSentAt && now - this._pingSentAt > pingTimeout) {
        const ws = this._ws;
        this._ws = null;
        if (ws) {
          this._detach(ws);
          try {
            ws.close(CLOSE_PING_TIMEOUT, 'no answer to ping');
          } catch {
            // nothing to close
          }
        }
        this._emit('close', { code: CLOSE_PING_TIMEOUT, reason: 'no answer to ping' });
        this._lost();
      } else if (!this._pingSentAt && now - this._lastFrameAt > idleTimeout) {
        this._pingSentAt = now;
        this._write({ type: 'ping', ref: this._nextRef() });
      }
    }, tick);
  }

  _scheduleRefresh() {
    clearTimeout(this._timers.refresh);
    if (!this.options.getToken || this._exp === undefined) return;
    const remaining = this._exp * 1000 - Date.now();
    // Refresh `refreshBefore` ahead, but never sooner than half the lifetime
    // left, so a short-lived token is not refreshed in a loop.
    const delay = Math.max(remaining - this.options.refreshBefore, remaining / 2, 0);
    this._timers.refresh = setTimeout(() => this._refresh(), delay);
  }

  async _refresh() {
    let token;
    try {
      token = await this.options.getToken();
    } catch (e) {
      this._emit('error', new ChorusError('token', `getToken failed: ${e && e.message}`));
      return;
    }
    if (this.state !== 'open') return;
    this._token = token;
    this._request({ type: 'refresh', token }, 'refreshed').then(
      (reply) => {
        this._exp = reply.exp;
        this._scheduleRefresh();
      },
      (error) => this._emit('error', error),
    );
  }

  // --- requests -------------------------------------------------------------

  _nextRef() {
    this._refCounter += 1;
    return `c${this._refCounter}`;
  }

  _write(frame) {
    const ws = this._ws;
    if (!ws || this.state !== 'open') return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Sends a request with a `ref`; resolves with the reply of type `kind`.
   * @returns {Promise<any>}
   */
  _request(frame, kind, room) {
    return new Promise((resolve, reject) => {
      const ref = this._nextRef();
      const full = { ...frame, ref };
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        this._queue = this._queue.filter((q) => q.ref !== ref);
        reject(new ChorusError('timeout', `no answer to ${frame.type} in ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      this._pending.set(ref, { kind, room, resolve, reject, timer, sent: false });
      if (this.state === 'open') {
        this._pending.get(ref).sent = true;
        this._write(full);
      } else if (this.options.offline === 'queue' && this.state !== 'closed') {
        this._queue.push({ frame: full, ref });
      } else {
        clearTimeout(timer);
        this._pending.delete(ref);
        reject(new ChorusError(this.state === 'closed' ? 'closed' : 'disconnected', 'not connected'));
      }
    });
  }

  _failPending(code, message) {
    for (const [ref, pending] of this._pending) {
      // Requests still waiting in the offline queue keep waiting.
      if (!pending.sent && code === 'disconnected') continue;
      clearTimeout(pending.timer);
      this._pending.delete(ref);
      pending.reject(new ChorusError(code, message));
    }
  }

  _failQueue(code, message) {
    for (const { ref } of this._queue) {
      const pending = this._pending.get(ref);
      if (!pending) continue;
      clearTimeout(pending.timer);
      this._pending.delete(ref);
      pending.reject(new ChorusError(code, message));
    }
    this._queue = [];
  }

  /** Settles the oldest pending request of `kind` (for `room`), for replies without `ref`. */
  _settleOldest(kind, room, value) {
    for (const [ref, pending] of this._pending) {
      if (pending.kind === kind && pending.sent && (room === undefined || pending.room === room)) {
        clearTimeout(pending.timer);
        this._pending.delete(ref);
        pending.resolve(value);
        return true;
      }
    }
    return false;
  }

  _settleRef(ref, settle, value) {
    const pending = ref !== undefined && this._pending.get(ref);
    if (!pending) return false;
    clearTimeout(pending.timer);
    this._pending.delete(ref);
    pending[settle](value);
    return true;
  }

  _sendJoin(room) {
    const frame = { type: 'join', room: room.name, ref: this._nextRef() };
    if (room.seq !== undefined && room.epoch !== undefined) {
      frame.since = room.seq;
      frame.epoch = room.epoch;
    }
    if (room.options.presence) frame.presence = true;
    room._joinRef = frame.ref;
    room._rejoining = frame.since !== undefined;
    room._replayed = 0;
    this._write(frame);
  }

  // --- frames from the server -----------------------------------------------

  _onFrame(ws, data) {
    if (ws !== this._ws) return;
    this._lastFrameAt = Date.now();
    this._pingSentAt = 0;
    let frame;
    try {
      frame = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    const room = frame.room !== undefined ? this.rooms.get(frame.room) : undefined;
    switch (frame.type) {
      case 'message':
        if (room) room._onMessage(frame);
        break;
      case 'joined':
        if (room) room._onJoined(frame);
        break;
      case 'left':
        if (room) room._onLeft();
        break;
      case 'ack':
        this._settleRef(frame.ref, 'resolve', { room: frame.room, seq: frame.seq });
        break;
      case 'history':
        this._settleOldest('history', frame.room, frame);
        break;
      case 'refreshed':
        this._settleOldest('refreshed', undefined, frame);
        break;
      case 'pong':
        this._settleRef(frame.ref, 'resolve', frame);
        break;
      case 'presence':
        if (!this._settleRef(frame.ref, 'resolve', frame)) this._settleOldest('presence', frame.room, frame);
        break;
      case 'presence_state':
        if (room) room._onPresenceState(frame);
        break;
      case 'presence_diff':
        if (room) room._onPresenceDiff(frame);
        break;
      case 'error':
        this._onError(frame);
        break;
      default:
        break;
    }
  }

  _onError(frame) {
    const error = new ChorusError(frame.code, frame.message);
    for (const room of this.rooms.values()) {
      if (frame.ref !== undefined && room._joinRef === frame.ref) {
        room._joinRef = null;
        room._emit('error', error);
        this._emit('error', error);
        return;
      }
    }
    if (!this._settleRef(frame.ref, 'reject', error)) this._emit('error', error);
  }
}

/**
 * @typedef {object} ChorusMessage
 * @property {string} room
 * @property {number} seq
 * @property {string} from the sender's `sub`
 * @property {number} ts server time, Unix milliseconds
 * @property {unknown} body
 */

/**
 * One joined room: its place in the sequence (`seq`, `epoch`) and, with
 * `presence: true`, its live member list.
 *
 * Events (`room.on(name, handler)`):
 * - `message`: a `ChorusMessage`, each exactly once and in `seq` order, the
 *   ones replayed after a reconnect included
 * - `joined`: `{seq, epoch}` each time the server confirms the join
 * - `recovery`: after a rejoin or an epoch change, `{recovered, epochChanged,
 *   replayed, unsolicited}`; `recovered: false` means messages may be missing:
 *   reload the room (e.g. with `history()`)
 * - `presence`: `{members, count, truncated, joins, leaves}` after each change
 * - `error`: a `ChorusError` refusing the join
 * - `left`
 */
export class ChorusRoom extends Emitter {
  /**
   * @param {ChorusClient} client
   * @param {string} name
   * @param {{presence?: boolean, since?: number, epoch?: string}} options
   */
  constructor(client, name, options) {
    super();
    this.client = client;
    this.name = name;
    this.options = options;
    /** @type {number | undefined} the last seq seen */
    this.seq = options.since;
    /** @type {string | undefined} */
    this.epoch = options.epoch;
    /** @type {Map<string, number>} sub -> connections (from a state; diffs count 1) */
    this.members = new Map();
    /** @type {number} exact number of present users */
    this.presenceCount = 0;
    this.presenceTruncated = false;
    this._joinedNow = false;
    this._left = false;
    this._joinRef = null;
    this._rejoining = false;
    this._replayed = 0;
    /** @type {Promise<{seq: number, epoch: string}>} the first `joined` */
    this.ready = new Promise((resolve) => {
      const off = this.on('joined', (value) => {
        off();
        resolve(value);
      });
    });
  }

  /** Whether the server has confirmed the join on the current connection. */
  get joined() {
    return this._joinedNow;
  }

  /** @param {unknown} body @returns {Promise<{room: string, seq: number}>} */
  send(body) {
    return this.client.send(this.name, body);
  }

  /** @param {{before?: number, limit?: number}} [options] */
  history(options) {
    return this.client.history(this.name, options);
  }

  /** Leaves the room and forgets it. */
  leave() {
    this._left = true;
    this.client.rooms.delete(this.name);
    if (this.client.state === 'open') this.client._write({ type: 'leave', room: this.name, ref: this.client._nextRef() });
  }

  /** The member list as an array of `{sub, conns}`, sorted by `sub`. */
  memberList() {
    return [...this.members.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([sub, conns]) => ({ sub, conns }));
  }

  _onMessage(frame) {
    // A replay and a live delivery never overlap on the server's side, but a
    // client that rejoined with an older seq than it had (or a duplicate
    // delivery after a reconnect race) must still hand each seq over once.
    if (this.seq !== undefined && frame.seq <= this.seq) return;
    this.seq = frame.seq;
    if (this._joinRef) this._replayed += 1;
    this._emit('message', frame);
  }

  _onJoined(frame) {
    const solicited = this._joinRef !== null;
    const previousEpoch = this.epoch;
    this._joinRef = null;
    this._joinedNow = true;
    if (solicited) {
      const rejoin = this._rejoining;
      this._rejoining = false;
      if (rejoin && frame.recovered === true) {
        this.epoch = frame.epoch;
        this._emit('joined', { seq: frame.seq, epoch: frame.epoch });
        this._emit('recovery', { recovered: true, epochChanged: false, replayed: this._replayed, unsolicited: false });
        return;
      }
      this.epoch = frame.epoch;
      // Without a full replay the messages up to `frame.seq` are not coming:
      // start counting from the room's present.
      if (this.seq === undefined || frame.seq > this.seq || previousEpoch !== frame.epoch) this.seq = frame.seq;
      this._emit('joined', { seq: frame.seq, epoch: frame.epoch });
      if (rejoin) {
        this._emit('recovery', {
          recovered: false,
          epochChanged: previousEpoch !== frame.epoch,
          replayed: this._replayed,
          unsolicited: false,
        });
      }
      return;
    }
    // Unsolicited: the room's epoch changed under a live member (section 2).
    this.epoch = frame.epoch;
    this.seq = frame.seq;
    this._emit('joined', { seq: frame.seq, epoch: frame.epoch });
    this._emit('recovery', { recovered: false, epochChanged: previousEpoch !== frame.epoch, replayed: 0, unsolicited: true });
  }

  _onLeft() {
    this._joinedNow = false;
    this._emit('left', undefined);
  }

  _onPresenceState(frame) {
    this.members = new Map(frame.members.map((m) => [m.sub, m.conns]));
    this.presenceCount = frame.count;
    this.presenceTruncated = frame.truncated;
    this._emitPresence([], []);
  }

  _onPresenceDiff(frame) {
    for (const sub of frame.leaves) this.members.delete(sub);
    for (const sub of frame.joins) if (!this.members.has(sub)) this.members.set(sub, 1);
    this.presenceCount = frame.count;
    this._emitPresence(frame.joins, frame.leaves);
  }

  _emitPresence(joins, leaves) {
    this._emit('presence', {
      members: this.memberList(),
      count: this.presenceCount,
      truncated: this.presenceTruncated,
      joins,
      leaves,
    });
  }
}
