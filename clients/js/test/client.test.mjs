// The client against a real chorus: sends and acks, history, errors, requests
// while disconnected, token refresh, backoff, and presence.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { ChorusClient, ChorusError, CLOSE_PING_TIMEOUT, backoffDelay, tokenExpiry } from '../chorus.js';
import { Server, Proxy, token, until, next, collect } from './harness.mjs';

let server;
const clients = [];

function client(sub, options = {}) {
  const c = new ChorusClient({ url: server.wsUrl, token: token(sub), backoff: { initial: 50, max: 500 }, connectTimeout: 1000, ...options });
  clients.push(c);
  return c;
}

before(async () => {
  server = await Server.start();
});

after(async () => {
  for (const c of clients) c.close();
  await server.stop();
});

test('a send resolves with its ack, and every member gets the message once, in order', async () => {
  const alice = client('alice');
  const bob = client('bob');
  const aliceRoom = alice.join('basics');
  const bobRoom = bob.join('basics');
  await Promise.all([aliceRoom.ready, bobRoom.ready]);
  const seen = collect(bobRoom);
  const acks = [];
  for (let i = 0; i < 5; i++) acks.push(await aliceRoom.send({ text: `hello ${i}` }));
  assert.deepEqual(
    acks.map((a) => a.seq),
    [1, 2, 3, 4, 5],
  );
  await until(() => seen.length === 5, 'five messages at bob');
  assert.deepEqual(
    seen.map((m) => [m.seq, m.from, m.body.text]),
    [0, 1, 2, 3, 4].map((i) => [i + 1, 'alice', `hello ${i}`]),
  );
  assert.ok(Math.abs(seen[0].ts - Date.now()) < 60000, 'ts is server time in ms');
  assert.equal(aliceRoom.seq, 5);
});

test('history pages backwards, oldest first', async () => {
  const alice = client('alice');
  for (let i = 1; i <= 7; i++) await alice.send('pages', i);
  const last = await alice.history('pages', { limit: 3 });
  assert.deepEqual(
    last.map((m) => m.body),
    [5, 6, 7],
  );
  const before = await alice.history('pages', { before: last[0].seq, limit: 3 });
  assert.deepEqual(
    before.map((m) => m.body),
    [2, 3, 4],
  );
});

test('an error frame rejects the request it answers, and the connection goes on', async () => {
  const limited = client('limited', { token: token('limited', { rooms: ['mine'] }) });
  await assert.rejects(limited.send('theirs', 'x'), (e) => e instanceof ChorusError && e.code === 'forbidden');
  await assert.rejects(limited.history('theirs'), (e) => e.code === 'forbidden');
  await assert.rejects(limited.history('mine', { limit: 1000 }), (e) => e.code === 'bad_request');
  const room = limited.join('theirs');
  const error = await next(room, 'error');
  assert.equal(error.code, 'forbidden');
  const ack = await limited.send('mine', 'still here');
  assert.equal(ack.seq, 1);
  assert.equal(limited.state, 'open');
});

test('requests made while disconnected wait for the connection, or fail, as the app chose', async () => {
  const proxy = await Proxy.start(server.port);
  try {
    const queued = client('q', { url: proxy.wsUrl, backoff: { initial: 300, max: 300 } });
    const failing = client('f', { url: proxy.wsUrl, offline: 'fail', backoff: { initial: 300, max: 300 } });
    await until(() => queued.state === 'open' && failing.state === 'open', 'both open');
    // Closed, and kept out while the requests are made.
    const closed = Promise.all([next(queued, 'close'), next(failing, 'close')]);
    proxy.refuse(true);
    proxy.cut();
    await closed;
    const waiting = queued.send('offline', 'queued while down');
    await assert.rejects(failing.send('offline', 'x'), (e) => e.code === 'disconnected');
    proxy.refuse(false);
    const ack = await waiting;
    assert.equal(ack.room, 'offline');
    const history = await queued.history('offline');
    assert.deepEqual(
      history.map((m) => m.body),
      ['queued while down'],
    );
  } finally {
    proxy.close();
  }
});

test('a dead connection (no frames at all) is noticed by the client and replaced', async () => {
  const proxy = await Proxy.start(server.port);
  try {
    const watcher = client('watcher', { url: proxy.wsUrl, idleTimeout: 300, pingTimeout: 300 });
    const room = watcher.join('dead');
    await room.ready;
    proxy.silence(true);
    const closed = await next(watcher, 'close', 5000);
    assert.equal(closed.code, CLOSE_PING_TIMEOUT);
    proxy.silence(false);
    await until(() => watcher.state === 'open' && room.joined, 'a new connection', 5000);
    assert.equal((await room.send('alive')).room, 'dead');
  } finally {
    proxy.close();
  }
});

test('the token is refreshed before it expires, so the connection outlives it', async () => {
  let calls = 0;
  const refreshing = client('refresher', {
    token: undefined,
    getToken: () => {
      calls += 1;
      return token('refresher', { ttl: 3 });
    },
    refreshBefore: 2000,
  });
  const closes = [];
  refreshing.on('close', (c) => closes.push(c));
  const room = refreshing.join('refresh');
  await room.ready;
  const firstExp = tokenExpiry(refreshing._token);
  await until(() => calls >= 2, 'a refresh', 5000);
  // Past the first token's expiry (the server checks it every second).
  await until(() => Date.now() / 1000 > firstExp + 1.5, 'the first token to expire', 6000);
  assert.deepEqual(closes, [], 'the server did not close the connection');
  assert.ok(refreshing._exp > firstExp, 'refreshed carried a later exp');
  assert.equal((await room.send('after expiry')).room, 'refresh');
});

test('getToken is asked again for every connection attempt', async () => {
  const proxy = await Proxy.start(server.port);
  try {
    let calls = 0;
    const c = client('again', { url: proxy.wsUrl, token: undefined, getToken: async () => (calls++, token('again')) });
    await until(() => c.state === 'open', 'open');
    assert.equal(calls, 1);
    const closed = next(c, 'close');
    proxy.cut();
    await closed;
    await until(() => c.state === 'open', 'open again');
    assert.equal(calls, 2);
  } finally {
    proxy.close();
  }
});

test('reconnect delays use full jitter: bounded, growing, spread', () => {
  const backoff = { initial: 100, max: 5000 };
  for (let attempt = 0; attempt < 20; attempt++) {
    const ceiling = Math.min(5000, 100 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, backoff, () => 0), 0);
    assert.ok(backoffDelay(attempt, backoff, () => 0.999999) <= ceiling);
  }
  assert.equal(backoffDelay(40, backoff, () => 0.5), 2500);
  // Attempt 4: a ceiling of 1600 ms.
  const samples = Array.from({ length: 1000 }, () => backoffDelay(4, backoff));
  const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
  assert.ok(mean > 600 && mean < 1000, `mean ${mean} near half the 1600 ms ceiling`);
  assert.ok(samples.every((s) => s >= 0 && s < 1600));
  const buckets = new Set(samples.map((s) => Math.floor(s / 160)));
  assert.ok(buckets.size >= 9, 'spread over the whole range');
});

test('clients cut at once come back spread out, not in the same millisecond', async () => {
  const proxy = await Proxy.start(server.port);
  try {
    const crowd = Array.from({ length: 20 }, (_, i) => client(`crowd${i}`, { url: proxy.wsUrl, backoff: { initial: 1000, max: 1000 } }));
    await until(() => crowd.every((c) => c.state === 'open'), 'the crowd to connect');
    const reopened = [];
    crowd.forEach((c) => c.on('state', (s) => s === 'open' && reopened.push(Date.now())));
    const cutAt = Date.now();
    proxy.cut();
    await until(() => reopened.length === 20, 'the crowd to reconnect', 5000);
    const delays = reopened.map((t) => t - cutAt).sort((a, b) => a - b);
    assert.ok(delays[19] - delays[0] > 300, `reconnects spread over ${delays[19] - delays[0]} ms`);
    assert.ok(delays[19] < 2500, 'within the backoff ceiling');
  } finally {
    proxy.close();
  }
});

test('presence: one live member list per room, from the state and the diffs', async () => {
  const alice = client('alice');
  const bob = client('bob');
  const aliceRoom = alice.join('presence', { presence: true });
  await next(aliceRoom, 'presence');
  assert.deepEqual(aliceRoom.memberList(), [{ sub: 'alice', conns: 1 }]);
  bob.join('presence', { presence: true });
  await until(() => aliceRoom.members.has('bob'), 'bob in alice\'s list');
  assert.equal(aliceRoom.presenceCount, 2);
  const answer = await alice.presence('presence');
  assert.equal(answer.count, 2);
  bob.close();
  await until(() => !aliceRoom.members.has('bob'), 'bob gone from alice\'s list');
  assert.equal(aliceRoom.presenceCount, 1);
});
