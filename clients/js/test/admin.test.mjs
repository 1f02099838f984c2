// The client and the server's admin API (PROTOCOL.md section 10): a user
// disconnected by an operator is closed with 4001 and stays away, while the
// other users of the same server go on.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { ChorusClient, CLOSE_DISCONNECTED_BY_ADMIN } from '../chorus.js';
import { Server, token, until, next, sleep } from './harness.mjs';

let server;
const clients = [];

function client(sub) {
  const c = new ChorusClient({ url: server.wsUrl, token: token(sub), backoff: { initial: 20, max: 100 }, connectTimeout: 1000 });
  clients.push(c);
  return c;
}

before(async () => {
  server = await Server.start(['--admin-listen', '127.0.0.1:0']);
});

after(async () => {
  for (const c of clients) c.close();
  await server.stop();
});

test('a user disconnected by the admin API gets 4001 and does not reconnect', async () => {
  assert.ok(server.adminUrl, 'the admin listener is up');
  const evicted = client('evicted');
  const bystander = client('bystander');
  const [evictedRoom, bystanderRoom] = [evicted.join('admin-room'), bystander.join('admin-room')];
  await Promise.all([evictedRoom.ready, bystanderRoom.ready]);

  const opens = [];
  evicted.on('state', (state) => state === 'open' && opens.push(state));
  const closed = next(evicted, 'close', 5000);
  const answer = await fetch(`${server.adminUrl}/admin/users/evicted/disconnect`, { method: 'POST' });
  assert.equal(answer.status, 200);
  assert.deepEqual(await answer.json(), { sub: 'evicted', closed: 1, banned_until: null });
  assert.equal((await closed).code, CLOSE_DISCONNECTED_BY_ADMIN);

  // Well past the reconnect backoff (at most 100 ms here): no new connection.
  await sleep(500);
  assert.deepEqual(opens, []);
  assert.notEqual(evicted.state, 'open');

  // The other user's connection is untouched and still delivers.
  const got = next(bystanderRoom, 'message', 2000);
  assert.equal((await bystanderRoom.send('still here')).room, 'admin-room');
  assert.equal((await got).body, 'still here');
  await until(() => bystander.state === 'open', 'the bystander stays open', 1000);
});
