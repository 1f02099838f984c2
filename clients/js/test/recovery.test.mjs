// Recovery: a client cut off, or whose server restarted, rejoins each room
// with `since` and `epoch`, hands the app every missed message once and in
// order, and says when that was not possible.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';

import { ChorusClient } from '../chorus.js';
import { Server, Proxy, DATABASE_URL, REDIS_URL, token, until, next, collect, wipeRedis } from './harness.mjs';

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

async function setup(serverArgs) {
  const server = await Server.start(serverArgs);
  const proxy = await Proxy.start(server.port);
  cleanups.push(() => server.stop());
  cleanups.push(() => proxy.close());
  const bob = new ChorusClient({ url: proxy.wsUrl, token: token('bob'), backoff: { initial: 50, max: 200 }, connectTimeout: 1000 });
  cleanups.push(() => bob.close());
  return { server, proxy, bob };
}

const bodies = (messages) => messages.map((m) => m.body);

test('cut off while the server runs: the rejoin replays what was missed, once, in order', async () => {
  const { server, proxy, bob } = await setup([]);
  const room = bob.join('cut');
  await room.ready;
  const seen = collect(room);
  await server.publish('cut', 'm1');
  await until(() => seen.length === 1, 'm1');
  const closed = next(bob, 'close');
  proxy.refuse(true);
  proxy.cut();
  await closed;
  for (const body of ['m2', 'm3', 'm4']) await server.publish('cut', body);
  const recovery = next(room, 'recovery');
  proxy.refuse(false);
  const result = await recovery;
  assert.deepEqual(result, { recovered: true, epochChanged: false, replayed: 3, unsolicited: false });
  await server.publish('cut', 'm5');
  await until(() => seen.length === 5, 'm5');
  assert.deepEqual(bodies(seen), ['m1', 'm2', 'm3', 'm4', 'm5']);
  assert.deepEqual(
    seen.map((m) => m.seq),
    [1, 2, 3, 4, 5],
  );
});

test('a restart of a server with history in memory only: a new epoch, recovered false, new seqs delivered', async () => {
  const { server, proxy, bob } = await setup([]);
  const room = bob.join('memory');
  await room.ready;
  const seen = collect(room);
  for (const body of ['a', 'b']) await server.publish('memory', body);
  await until(() => seen.length === 2, 'two messages');
  const oldEpoch = room.epoch;
  proxy.refuse(true);
  await server.restart('SIGKILL');
  proxy.targetPort = server.port;
  await server.publish('memory', 'after restart');
  const recovery = next(room, 'recovery');
  proxy.refuse(false);
  const result = await recovery;
  assert.equal(result.recovered, false);
  assert.equal(result.epochChanged, true);
  assert.notEqual(room.epoch, oldEpoch);
  // The new epoch's seqs start again; the client must not drop them as old.
  await server.publish('memory', 'live in the new epoch');
  await until(() => seen.length === 3, 'the new epoch\'s message');
  assert.deepEqual(bodies(seen), ['a', 'b', 'live in the new epoch']);
  assert.equal(seen[2].seq, 2);
});

test(
  'a graceful restart with a database keeps the epoch: every message once, in order',
  { skip: !DATABASE_URL && 'CHORUS_TEST_DATABASE_URL is not set' },
  async () => {
    const { server, proxy, bob } = await setup(['--database-url', DATABASE_URL]);
    const alice = new ChorusClient({ url: server.wsUrl, token: token('alice'), backoff: { initial: 50, max: 200 }, connectTimeout: 1000 });
    cleanups.push(() => alice.close());
    // The database outlives the test run: a room name of this run's own.
    const name = `durable-${Date.now()}`;
    const room = bob.join(name);
    await room.ready;
    const seen = collect(room);
    for (let i = 1; i <= 3; i++) await alice.send(name, i);
    await until(() => seen.length === 3, 'three messages');
    const epoch = room.epoch;
    proxy.refuse(true);
    await server.restart('SIGTERM');
    await until(() => alice.state === 'open', 'alice back');
    for (let i = 4; i <= 6; i++) await alice.send(name, i);
    const recovery = next(room, 'recovery');
    proxy.refuse(false);
    const result = await recovery;
    assert.deepEqual(result, { recovered: true, epochChanged: false, replayed: 3, unsolicited: false });
    assert.equal(room.epoch, epoch);
    await alice.send(name, 7);
    await until(() => seen.length === 7, 'seven messages');
    assert.deepEqual(bodies(seen), [1, 2, 3, 4, 5, 6, 7]);
    const first = seen[0].seq;
    assert.deepEqual(
      seen.map((m) => m.seq - first),
      [0, 1, 2, 3, 4, 5, 6],
    );
  },
);

test('a rejoin whose messages history no longer holds says recovered false and skips ahead', async () => {
  const { server, proxy, bob } = await setup(['--history-size', '2']);
  const room = bob.join('short');
  await room.ready;
  const seen = collect(room);
  await server.publish('short', 'first');
  await until(() => seen.length === 1, 'first');
  const closed = next(bob, 'close');
  proxy.refuse(true);
  proxy.cut();
  await closed;
  for (let i = 0; i < 5; i++) await server.publish('short', `missed ${i}`);
  const recovery = next(room, 'recovery');
  proxy.refuse(false);
  const result = await recovery;
  assert.equal(result.recovered, false);
  assert.equal(result.epochChanged, false);
  assert.equal(room.seq, 6);
  await server.publish('short', 'live');
  await until(() => seen.at(-1).body === 'live', 'the live message');
  assert.equal(seen.at(-1).seq, 7);
});

test('an epoch change under a live member (Redis lost the room) arrives as recovery, and the new seqs flow', async () => {
  const prefix = `chorus-js-${process.pid}-${Date.now()}`;
  const { server, bob } = await setup(['--redis-url', REDIS_URL, '--redis-prefix', prefix]);
  cleanups.push(() => wipeRedis(prefix));
  const room = bob.join('wiped');
  await room.ready;
  const seen = collect(room);
  for (const body of ['x', 'y', 'z']) await server.publish('wiped', body);
  await until(() => seen.length === 3, 'three messages');
  const oldEpoch = room.epoch;
  const recovery = next(room, 'recovery');
  assert.ok((await wipeRedis(prefix)) > 0, 'the room had keys to lose');
  await server.publish('wiped', 'after the loss');
  const result = await recovery;
  assert.deepEqual(result, { recovered: false, epochChanged: true, replayed: 0, unsolicited: true });
  assert.notEqual(room.epoch, oldEpoch);
  await until(() => seen.length === 4, 'the new epoch\'s message');
  assert.equal(seen[3].body, 'after the loss');
  assert.equal(bob.state, 'open', 'no reconnect was needed');
});
