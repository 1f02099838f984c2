// What the client's tests share: a real chorus process they can kill and
// start again on the same port, HS256 tokens, a TCP proxy that can cut or
// silence connections, and small waiting helpers.
//
// The chorus binary comes from CHORUS_BIN (tests/js_client.rs sets it to the
// binary cargo built); CHORUS_TEST_DATABASE_URL, when set, is a database the
// tests may use for durable history.

import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import net from 'node:net';
import { once } from 'node:events';

export const SECRET = `js-client-test-${randomBytes(8).toString('hex')}`;

export const BIN = process.env.CHORUS_BIN;
export const DATABASE_URL = process.env.CHORUS_TEST_DATABASE_URL;

if (!BIN) throw new Error('set CHORUS_BIN to the chorus binary (tests/js_client.rs does)');

const base64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 token signed with SECRET. */
export function token(sub, { ttl = 3600, rooms } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, exp: now + ttl, iat: now };
  if (rooms) claims.rooms = rooms;
  const head = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = base64url(JSON.stringify(claims));
  const signature = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${signature}`;
}

/** A chorus process; `restart` keeps its port. */
export class Server {
  constructor(args = []) {
    this.args = args;
    this.port = 0;
    this.child = null;
    this.stderr = '';
  }

  static async start(args = []) {
    const server = new Server(args);
    await server.start();
    return server;
  }

  async start() {
    const args = ['serve', '--listen', `127.0.0.1:${this.port}`, '--jwt-secret', SECRET, ...this.args];
    const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
    this.child = child;
    child.stderr.on('data', (d) => {
      this.stderr += d;
    });
    let out = '';
    const addr = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`chorus did not start: ${this.stderr}`)), 20000);
      child.stdout.on('data', (d) => {
        out += d;
        // The admin listener's line (with --admin-listen) comes first.
        const match = out.match(/^chorus listening on (\S+)/m);
        if (match) {
          clearTimeout(timer);
          const admin = out.match(/^chorus admin listening on (\S+)/m);
          this.adminPort = admin ? Number(admin[1].split(':').pop()) : null;
          resolve(match[1]);
        }
      });
      child.on('exit', (code) => reject(new Error(`chorus exited with ${code}: ${this.stderr}`)));
    });
    this.port = Number(addr.split(':').pop());
    this.exited = once(child, 'exit');
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The admin listener (`--admin-listen 127.0.0.1:0`), or null without one. */
  get adminUrl() {
    return this.adminPort ? `http://127.0.0.1:${this.adminPort}` : null;
  }

  async stop(signal = 'SIGTERM') {
    if (!this.child) return;
    this.child.kill(signal);
    await this.exited;
    this.child = null;
  }

  async restart(signal = 'SIGTERM') {
    await this.stop(signal);
    await this.start();
  }

  /** Publishes over the HTTP API, as another user would. */
  async publish(room, body, sub = 'http-sender') {
    const response = await fetch(`${this.httpUrl}/rooms/${room}/messages`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token(sub)}`, 'content-type': 'application/json' },
      body: JSON.stringify({ body }),
    });
    if (response.status !== 200) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return (await response.json()).seq;
  }
}

/**
 * A TCP proxy in front of a port: `cut()` closes every connection through it,
 * `refuse()` turns new ones away, `silence()` keeps them open but forwards
 * nothing more (a dead peer).
 */
export class Proxy {
  static async start(targetPort) {
    const proxy = new Proxy();
    proxy.targetPort = targetPort;
    proxy.sockets = new Set();
    proxy.silent = false;
    proxy.refusing = false;
    proxy.server = net.createServer((client) => proxy._accept(client));
    proxy.server.listen(0, '127.0.0.1');
    await once(proxy.server, 'listening');
    proxy.port = proxy.server.address().port;
    return proxy;
  }

  _accept(client) {
    if (this.refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(this.targetPort, '127.0.0.1');
    const pair = [client, upstream];
    for (const s of pair) {
      this.sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        this.sockets.delete(s);
        for (const other of pair) other.destroy();
      });
    }
    client.on('data', (d) => this.silent || upstream.write(d));
    upstream.on('data', (d) => this.silent || client.write(d));
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  cut() {
    for (const s of this.sockets) s.destroy();
  }

  /** While on, new connections are closed at once (a server that is down). */
  refuse(on = true) {
    this.refusing = on;
  }

  silence(on = true) {
    this.silent = on;
  }

  close() {
    this.cut();
    this.server.close();
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until `predicate()` is true, polling; fails after `timeout` ms. */
export async function until(predicate, what, timeout = 10000) {
  const deadline = Date.now() + timeout;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** The next `event` of an emitter (client or room). */
export function next(emitter, event, timeout = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for ${event}`));
    }, timeout);
    const off = emitter.on(event, (value) => {
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** Collects every `message` of a room, as bodies. */
export function collect(room) {
  const messages = [];
  room.on('message', (m) => messages.push(m));
  return messages;
}

export const REDIS_URL = process.env.CHORUS_TEST_REDIS_URL || 'redis://127.0.0.1:6379';

/**
 * Deletes every Redis key under `prefix:` (what a Redis that lost its data
 * looks like to chorus), speaking RESP directly so that no client library
 * or redis-cli is needed. Handles `redis://host:port[/db]` without auth.
 */
export async function wipeRedis(prefix, url = REDIS_URL) {
  const { hostname, port, pathname } = new URL(url);
  const db = pathname && pathname.length > 1 ? pathname.slice(1) : '0';
  const socket = net.connect(Number(port) || 6379, hostname || '127.0.0.1');
  await once(socket, 'connect');
  let buffer = '';
  socket.setEncoding('utf8');
  socket.on('data', (d) => {
    buffer += d;
  });
  const command = (...args) => `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`;
  // One reply at a time: wait until the buffer holds a complete reply.
  const reply = async () => {
    for (;;) {
      const parsed = parse(buffer, 0);
      if (parsed) {
        buffer = buffer.slice(parsed.end);
        return parsed.value;
      }
      await once(socket, 'data');
    }
  };
  socket.write(command('SELECT', db));
  await reply();
  socket.write(command('KEYS', `${prefix}:*`));
  const keys = await reply();
  if (keys.length) {
    socket.write(command('DEL', ...keys));
    await reply();
  }
  socket.end();
  return keys.length;
}

/** A RESP value at `at` of `text`, or null when incomplete (keys are ASCII here). */
function parse(text, at) {
  const eol = text.indexOf('\r\n', at);
  if (eol < 0) return null;
  const kind = text[at];
  const line = text.slice(at + 1, eol);
  if (kind === '+' || kind === ':') return { value: line, end: eol + 2 };
  if (kind === '-') throw new Error(`redis: ${line}`);
  if (kind === '$') {
    const n = Number(line);
    if (n < 0) return { value: null, end: eol + 2 };
    if (text.length < eol + 2 + n + 2) return null;
    return { value: text.slice(eol + 2, eol + 2 + n), end: eol + 2 + n + 2 };
  }
  if (kind === '*') {
    const values = [];
    let end = eol + 2;
    for (let i = 0; i < Number(line); i++) {
      const item = parse(text, end);
      if (!item) return null;
      values.push(item.value);
      end = item.end;
    }
    return { value: values, end };
  }
  throw new Error(`redis: unexpected reply ${JSON.stringify(text.slice(at, at + 20))}`);
}
