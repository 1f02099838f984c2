// TypeScript declarations for chorus.js (protocol 1.1).

export declare const PROTOCOL_VERSION: '1.1';
/** `close` event code when the client gave up on a handshake. */
export declare const CLOSE_CONNECT_TIMEOUT: 4900;
/** `close` event code when the client found the connection dead (no answer to its ping). */
export declare const CLOSE_PING_TIMEOUT: 4901;
/** Close code of the server's admin API: the client does not reconnect. */
export declare const CLOSE_DISCONNECTED_BY_ADMIN: 4001;

export type ErrorCode =
  | 'bad_request'
  | 'forbidden'
  | 'not_joined'
  | 'too_large'
  | 'rate_limited'
  | 'unavailable'
  | 'too_many_rooms'
  | 'internal'
  | 'disconnected'
  | 'timeout'
  | 'closed'
  | 'token'
  | 'connect';

export declare class ChorusError extends Error {
  readonly code: ErrorCode | string;
  constructor(code: string, message: string);
}

export declare function backoffDelay(
  attempt: number,
  backoff: { initial: number; max: number },
  random?: () => number,
): number;

export declare function tokenExpiry(token: string): number | undefined;

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'disconnected' | 'closed';

export interface ChorusOptions {
  /** `ws://host:port/ws` or `wss://...` */
  url: string;
  token?: string;
  /** Called for every connection attempt and before `exp` (sent as `refresh`). */
  getToken?: () => string | Promise<string>;
  /** Reconnect delays in ms (full jitter). Default `{initial: 500, max: 30000}`. */
  backoff?: { initial?: number; max?: number };
  /** ms without any frame before the client pings. Default 30000. */
  idleTimeout?: number;
  /** ms to wait for anything after that ping before reconnecting. Default 10000. */
  pingTimeout?: number;
  /** ms to wait for an ack or answer. Default 10000. */
  requestTimeout?: number;
  /** ms a connection attempt may take. Default 10000. */
  connectTimeout?: number;
  /** ms before `exp` to refresh the token. Default 60000. */
  refreshBefore?: number;
  /** Requests made while disconnected: wait (`queue`, default) or fail at once (`fail`). */
  offline?: 'queue' | 'fail';
  /** The WebSocket class, when there is no global one. */
  WebSocket?: unknown;
  /** Connect in the constructor. Default true. */
  autoConnect?: boolean;
}

export interface ChorusMessage<B = unknown> {
  room: string;
  seq: number;
  from: string;
  ts: number;
  body: B;
}

export interface Ack {
  room: string;
  seq: number;
}

export interface Recovery {
  /** True when every missed message was replayed (and handed over as `message`). */
  recovered: boolean;
  epochChanged: boolean;
  replayed: number;
  /** True for a `joined` the server sent by itself (the room's epoch changed). */
  unsolicited: boolean;
}

export interface PresenceMember {
  sub: string;
  conns: number;
}

export interface PresenceChange {
  members: PresenceMember[];
  count: number;
  truncated: boolean;
  joins: string[];
  leaves: string[];
}

export interface PresenceAnswer {
  room: string;
  count: number;
  members: PresenceMember[];
  truncated: boolean;
}

export interface ClientEvents {
  state: ConnectionState;
  error: ChorusError;
  close: { code: number; reason: string };
}

export interface RoomEvents {
  message: ChorusMessage;
  joined: { seq: number; epoch: string };
  recovery: Recovery;
  presence: PresenceChange;
  error: ChorusError;
  left: undefined;
}

export declare class ChorusClient {
  constructor(options: ChorusOptions);
  readonly state: ConnectionState;
  readonly rooms: Map<string, ChorusRoom>;
  on<K extends keyof ClientEvents>(event: K, handler: (value: ClientEvents[K]) => void): () => void;
  connect(): void;
  close(): void;
  join(room: string, options?: { presence?: boolean; since?: number; epoch?: string }): ChorusRoom;
  send(room: string, body: unknown): Promise<Ack>;
  history(room: string, options?: { before?: number; limit?: number }): Promise<ChorusMessage[]>;
  presence(room: string): Promise<PresenceAnswer>;
  ping(): Promise<number>;
}

export declare class ChorusRoom {
  readonly client: ChorusClient;
  readonly name: string;
  /** The last seq handed over, with the epoch it belongs to. */
  readonly seq: number | undefined;
  readonly epoch: string | undefined;
  readonly joined: boolean;
  readonly ready: Promise<{ seq: number; epoch: string }>;
  readonly members: Map<string, number>;
  readonly presenceCount: number;
  readonly presenceTruncated: boolean;
  on<K extends keyof RoomEvents>(event: K, handler: (value: RoomEvents[K]) => void): () => void;
  send(body: unknown): Promise<Ack>;
  history(options?: { before?: number; limit?: number }): Promise<ChorusMessage[]>;
  leave(): void;
  memberList(): PresenceMember[];
}
