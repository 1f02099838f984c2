// Close-matrix driver for headless Chromium: the page browser.html plays the
// cases with the browser's own WebSocket.
//
// Why it exists: tests/close_matrix.rs checks that every close the server
// sends reaches a browser page with its code and reason (a browser reports
// 1006 for a close frame it never read). This script serves browser.html and
// browser_case.js on a loopback port (a worker needs an http origin), starts
// Chromium with a fresh profile, drives it over the DevTools protocol (with
// the `ws` package: no browser automation library, no browser download),
// calls runCases(spec) in the page, and prints one line `RESULTS <json>`.
//
// Usage: node chromium.mjs SPEC.json   (CHORUS_TEST_CHROMIUM: the binary,
// default /usr/bin/chromium)

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

const here = dirname(fileURLToPath(import.meta.url));
const spec = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const chromium = process.env.CHORUS_TEST_CHROMIUM || '/usr/bin/chromium';

// The two files of the page, and nothing else.
const files = { '/browser.html': 'text/html', '/browser_case.js': 'text/javascript' };
const http = createServer((req, res) => {
  const type = files[req.url];
  if (!type) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(readFileSync(join(here, req.url.slice(1))));
});
await new Promise((ok) => http.listen(0, '127.0.0.1', ok));
const pageUrl = `http://127.0.0.1:${http.address().port}/browser.html`;

const profile = mkdtempSync(join(tmpdir(), 'chorus-chromium-'));
const browser = spawn(chromium, [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage', `--user-data-dir=${profile}`, '--remote-debugging-port=0', 'about:blank',
  // Its own process group, so that its helpers go with it at the end.
], { stdio: ['ignore', 'ignore', 'pipe'], detached: true });

let stderr = '';
let finishing = false;
const exit = new Promise((ok) => browser.on('exit', ok));
let devtools = null;
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));
// Ends Chromium and its helpers, then removes the profile they write to.
async function cleanup() {
  finishing = true;
  http.close();
  if (devtools) {
    devtools.send(JSON.stringify({ id: 0, method: 'Browser.close' }));
    await Promise.race([exit, sleep(5000)]);
  }
  try {
    process.kill(-browser.pid, 'SIGKILL');
  } catch {
    // The group is gone already.
  }
  await sleep(100);
  try {
    rmSync(profile, { recursive: true, force: true, maxRetries: 10 });
  } catch (e) {
    console.error(`chromium.mjs: could not remove ${profile}: ${e.message}`);
  }
}
async function fail(why) {
  if (finishing) return;
  console.error(`chromium.mjs: ${why}\n--- chromium stderr ---\n${stderr}`);
  await cleanup();
  process.exit(1);
}
setTimeout(() => fail('gave up waiting'), spec.timeout_ms + 30000).unref();

// Chromium prints its DevTools address on stderr once it listens.
const endpoint = await new Promise((resolve) => {
  browser.stderr.on('data', (chunk) => {
    stderr += chunk;
    const found = /DevTools listening on (ws:\/\/\S+)/.exec(stderr);
    if (found) resolve(found[1]);
  });
  exit.then(() => fail('chromium exited before it listened'));
});

// A minimal DevTools client: one request at a time per method call.
devtools = new WebSocket(endpoint, { perMessageDeflate: false });
await new Promise((ok, ko) => { devtools.once('open', ok); devtools.once('error', ko); });
let nextId = 1;
const pending = new Map();
devtools.on('message', (data) => {
  const message = JSON.parse(data.toString());
  const waiter = pending.get(message.id);
  if (!waiter) return;
  pending.delete(message.id);
  if (message.error) waiter.ko(new Error(JSON.stringify(message.error)));
  else waiter.ok(message.result);
});
function call(method, params = {}, sessionId = undefined) {
  const id = nextId++;
  devtools.send(JSON.stringify({ id, method, params, sessionId }));
  return new Promise((ok, ko) => pending.set(id, { ok, ko }));
}

try {
  const { targetId } = await call('Target.createTarget', { url: 'about:blank' });
  const { sessionId } = await call('Target.attachToTarget', { targetId, flatten: true });
  await call('Page.navigate', { url: pageUrl }, sessionId);
  // The page is ready once its script has defined runCases.
  for (;;) {
    const ready = await call('Runtime.evaluate', { expression: 'typeof runCases', returnByValue: true }, sessionId);
    if (ready.result.value === 'function') break;
    await new Promise((ok) => setTimeout(ok, 50));
  }
  const evaluated = await call('Runtime.evaluate', {
    expression: `runCases(${JSON.stringify(spec)})`, awaitPromise: true, returnByValue: true,
  }, sessionId);
  if (evaluated.exceptionDetails) await fail(`runCases threw: ${JSON.stringify(evaluated.exceptionDetails)}`);
  console.log('RESULTS ' + JSON.stringify(evaluated.result.value));
} catch (e) {
  await fail(e.stack || String(e));
}
await cleanup();
process.exit(0);
