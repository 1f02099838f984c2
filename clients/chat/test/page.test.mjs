// The chat page in a real headless Chromium (Debian's /usr/bin/chromium, or
// CHORUS_TEST_CHROMIUM), driven over the DevTools protocol with node's own
// WebSocket: no automation library, no browser download.
//
// Two pages chat; the server (with a database and --durable-acks) is
// killed, a message is typed while it is down, and it is started again:
// both pages show every message once, in order. With CHORUS_SCREENSHOT set, a screenshot of a page
// is written there (docs/chat-page.png).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Server, DATABASE_URL, until, sleep } from '../../js/test/harness.mjs';

const CHROMIUM = process.env.CHORUS_TEST_CHROMIUM || '/usr/bin/chromium';

let server;
let browser;
let profile;
let devtools;
let nextId = 1;
const pending = new Map();

function call(method, params = {}, sessionId = undefined) {
  const id = nextId++;
  devtools.send(JSON.stringify({ id, method, params, sessionId }));
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}

/** A browser tab on `url`. */
async function openPage(url) {
  const { targetId } = await call('Target.createTarget', { url: 'about:blank' });
  const { sessionId } = await call('Target.attachToTarget', { targetId, flatten: true });
  await call('Page.enable', {}, sessionId);
  await call('Page.navigate', { url }, sessionId);
  const page = {
    targetId,
    sessionId,
    async eval(expression) {
      const answer = await call('Runtime.evaluate', { expression, returnByValue: true, awaitPromise: true }, sessionId);
      if (answer.exceptionDetails) throw new Error(`in the page: ${JSON.stringify(answer.exceptionDetails)}`);
      return answer.result.value;
    },
    state() {
      return this.eval(`document.getElementById('state')?.dataset.state`);
    },
    texts() {
      return this.eval(`[...document.querySelectorAll('#messages li .text')].map((e) => e.textContent)`);
    },
    senders() {
      return this.eval(`[...document.querySelectorAll('#messages li .from')].map((e) => e.textContent)`);
    },
    members() {
      return this.eval(`[...document.querySelectorAll('#members li')].map((e) => e.textContent)`);
    },
    say(text) {
      return this.eval(`(() => {
        document.getElementById('text').value = ${JSON.stringify(text)};
        document.getElementById('compose').requestSubmit();
      })()`);
    },
    close() {
      return call('Target.closeTarget', { targetId });
    },
  };
  await until(async () => (await page.state().catch(() => undefined)) === 'open', `the page ${url} to connect`, 15000);
  return page;
}

before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: run scripts/setup-close-clients`);
  // --durable-acks: a message is acked once the database holds it, so a
  // killed server loses nothing acked and keeps the rooms' epochs.
  server = await Server.start(['--demo', ...(DATABASE_URL ? ['--database-url', DATABASE_URL, '--durable-acks'] : [])]);
  profile = mkdtempSync(join(tmpdir(), 'chorus-chat-chromium-'));
  browser = spawn(
    CHROMIUM,
    [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
      // Background tabs must keep their timers: both pages are "visible".
      '--disable-background-timer-throttling',
      '--disable-renderer-backgrounding',
      '--hide-scrollbars',
      `--user-data-dir=${profile}`,
      '--remote-debugging-port=0',
      'about:blank',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'], detached: true },
  );
  let stderr = '';
  const endpoint = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`Chromium did not start: ${stderr}`)), 30000);
    browser.stderr.on('data', (chunk) => {
      stderr += chunk;
      const found = /DevTools listening on (ws:\/\/\S+)/.exec(stderr);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
    browser.on('exit', (code) => reject(new Error(`Chromium exited (${code}): ${stderr}`)));
  });
  devtools = new WebSocket(endpoint);
  await new Promise((resolve, reject) => {
    devtools.onopen = resolve;
    devtools.onerror = reject;
  });
  devtools.onmessage = (event) => {
    const message = JSON.parse(event.data);
    const waiter = pending.get(message.id);
    if (!waiter) return;
    pending.delete(message.id);
    if (message.error) waiter.reject(new Error(JSON.stringify(message.error)));
    else waiter.resolve(message.result);
  };
});

after(async () => {
  if (devtools) {
    try {
      await Promise.race([call('Browser.close'), sleep(3000)]);
    } catch {
      // already gone
    }
    devtools.close();
  }
  if (browser) {
    try {
      process.kill(-browser.pid, 'SIGKILL');
    } catch {
      // the group is gone already
    }
  }
  if (server) await server.stop();
  await sleep(100);
  if (profile) rmSync(profile, { recursive: true, force: true, maxRetries: 10 });
});

/** Waits until both pages show exactly `expected`. */
async function bothShow(pages, expected, what) {
  await until(
    async () => {
      const lists = await Promise.all(pages.map((p) => p.texts()));
      return lists.every((l) => JSON.stringify(l) === JSON.stringify(expected));
    },
    what,
    15000,
  ).catch(async (e) => {
    const lists = await Promise.all(pages.map((p) => p.texts()));
    throw new Error(`${e.message}: pages show ${JSON.stringify(lists)}, expected ${JSON.stringify(expected)}`);
  });
}

test(
  'two pages chat, and after the server is killed and restarted both show every message once, in order',
  { skip: !DATABASE_URL && 'CHORUS_TEST_DATABASE_URL is not set' },
  async () => {
    // The screenshot is made against a fresh database, in a room named for it.
    const room = process.env.CHORUS_SCREENSHOT ? 'lobby' : `chat-${Date.now()}`;
    const alice = await openPage(`${server.httpUrl}/?name=alice&rooms=${room},random`);
    const bob = await openPage(`${server.httpUrl}/?name=bob&rooms=${room}`);
    const pages = [alice, bob];
    const said = [];
    const say = async (page, text) => {
      await page.say(text);
      said.push(text);
      await bothShow(pages, said, `"${text}" on both pages`);
    };
    await say(alice, 'hi bob');
    await say(bob, 'hi alice');
    await say(alice, 'shall we test a restart?');
    assert.deepEqual(await bob.senders(), ['alice', 'bob', 'alice']);

    const epochOf = (page) => page.eval(`window.chorusClient.rooms.get(${JSON.stringify(room)}).epoch`);
    const epochs = await Promise.all(pages.map(epochOf));
    await server.stop('SIGKILL');
    await until(async () => (await alice.state()) !== 'open', 'alice to see the outage');
    // Typed while the server is down: the client holds it until it is back.
    await alice.say('typed during the outage');
    said.push('typed during the outage');
    await server.start();
    await until(async () => (await alice.state()) === 'open' && (await bob.state()) === 'open', 'both back', 15000);
    await bothShow(pages, said, 'the queued message on both pages');
    // Resumed, not reloaded: the same epoch, so the rejoin replayed the gap.
    assert.deepEqual(await Promise.all(pages.map(epochOf)), epochs);
    await say(bob, 'back again');
    await say(alice, 'every message once, in order');

    if (process.env.CHORUS_SCREENSHOT) {
      await call('Emulation.setDeviceMetricsOverride', { width: 900, height: 520, deviceScaleFactor: 1, mobile: false }, alice.sessionId);
      await sleep(200);
      const shot = await call('Page.captureScreenshot', { format: 'png' }, alice.sessionId);
      writeFileSync(process.env.CHORUS_SCREENSHOT, Buffer.from(shot.data, 'base64'));
    }
    await alice.close();
    await bob.close();
  },
);

test('older history loads when the reader scrolls up, in order, without duplicates', async () => {
  const room = `long-${Date.now()}`;
  const expected = [];
  for (let i = 1; i <= 120; i++) {
    await server.publish(room, { text: `line ${i}` });
    expected.push(`line ${i}`);
  }
  const reader = await openPage(`${server.httpUrl}/?name=reader&rooms=${room}`);
  await until(async () => (await reader.texts()).length === 50, 'the latest page');
  assert.deepEqual(await reader.texts(), expected.slice(70));
  for (const shown of [100, 120]) {
    await reader.eval(`document.getElementById('messages').scrollTop = 0; document.getElementById('messages').dispatchEvent(new Event('scroll'))`);
    await until(async () => (await reader.texts()).length === shown, `${shown} messages after scrolling up`);
  }
  assert.deepEqual(await reader.texts(), expected);
  await reader.close();
});

test(
  'presence shows both users and drops one when its page closes',
  async () => {
    const room = `presence-${Date.now()}`;
    const alice = await openPage(`${server.httpUrl}/?name=alice&rooms=${room}`);
    const bob = await openPage(`${server.httpUrl}/?name=bob&rooms=${room}`);
    await until(async () => JSON.stringify(await alice.members()) === '["alice","bob"]', 'both in alice\'s list');
    await bob.close();
    await until(async () => JSON.stringify(await alice.members()) === '["alice"]', 'bob gone from alice\'s list');
    await alice.close();
  },
);
