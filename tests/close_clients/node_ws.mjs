// Close-matrix driver for Node's `ws` package.
//
// Why it exists: tests/close_matrix.rs checks that every close the server
// sends reaches the application of real client libraries with its code and
// reason. This script plays the cases of the spec file given as its only
// argument, all at once, and prints one line `RESULTS <json>`: for each case,
// the code and reason of the `close` event that `ws` emits.

import { readFileSync } from 'node:fs';
import WebSocket from 'ws';

function play(c, timeoutMs) {
  return new Promise((resolve) => {
    const ws = new WebSocket(c.url);
    let error = '';
    const timer = setTimeout(() => {
      ws.terminate();
      resolve({ case: c.name, code: null, reason: `timeout ${error}`.trim() });
    }, timeoutMs);
    // `ws` emits `error` before `close` when the connection fails; the cell
    // shows what `close` says, the error only when nothing else came.
    ws.on('error', (e) => { error = e.message; });
    ws.on('close', (code, reason) => {
      clearTimeout(timer);
      resolve({ case: c.name, code, reason: reason.toString() });
    });
    // A send after the server's close fails through its callback: ignored,
    // since the flood and the big message expect exactly that.
    const ignore = () => {};
    ws.on('open', () => {
      switch (c.do) {
        case 'close': ws.close(c.code, c.reason); break;
        case 'send': ws.send(c.text, ignore); break;
        case 'big': ws.send('x'.repeat(c.bytes), ignore); break;
        case 'flood': for (let i = 0; i < c.count; i++) ws.send('{"type":"ping"}', ignore); break;
        case 'stall':
          // After `joined`, stop reading the socket for a while, as a
          // consumer that cannot keep up does.
          ws.once('message', () => {
            ws.pause();
            setTimeout(() => ws.resume(), c.ms);
          });
          break;
        default: break; // 'wait': the server closes by itself.
      }
    });
  });
}

const spec = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const results = await Promise.all(spec.cases.map((c) => play(c, spec.timeout_ms)));
console.log('RESULTS ' + JSON.stringify(results));
