// One close-matrix case played with the browser's own `WebSocket`, in the
// page or in a dedicated worker (see browser.html): the code, reason and
// wasClean of the `close` event the application gets.
//
// Why a shared file: the slow-consumer case must stop reading, and a page
// stops reading only by blocking its thread, which would hold up every other
// case; so that case runs this same code in a worker of its own.

function play(c, timeoutMs) {
  return new Promise((resolve) => {
    const ws = new WebSocket(c.url);
    const timer = setTimeout(() => {
      resolve({ case: c.name, code: null, reason: 'timeout' });
      ws.close();
    }, timeoutMs);
    ws.onclose = (e) => {
      clearTimeout(timer);
      resolve({ case: c.name, code: e.code, reason: e.reason, clean: e.wasClean });
    };
    if (c.do === 'compress') {
      // Compression check (tests/compression.rs): after `joined`, send the
      // case's text; report the negotiated extensions and the body of the
      // `message` that comes back.
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        if (m.type === 'joined') ws.send(c.text);
        if (m.type !== 'message') return;
        clearTimeout(timer);
        resolve({ case: c.name, extensions: ws.extensions, body: m.body });
        ws.close(1000);
      };
      return;
    }
    ws.onopen = () => {
      switch (c.do) {
        case 'close': ws.close(c.code, c.reason); break;
        case 'send': ws.send(c.text); break;
        case 'big': ws.send('x'.repeat(c.bytes)); break;
        case 'flood': for (let i = 0; i < c.count; i++) ws.send('{"type":"ping"}'); break;
        case 'stall':
          // After `joined`, block this thread: the browser stops taking
          // frames off the socket, as for an application that cannot keep up.
          ws.onmessage = () => {
            ws.onmessage = null;
            const until = Date.now() + c.ms;
            while (Date.now() < until) { /* busy: no event runs meanwhile */ }
          };
          break;
        default: break; // 'wait': the server closes by itself.
      }
    };
  });
}

// In a worker: play the case posted to it and post back the result.
if (typeof WorkerGlobalScope !== 'undefined' && self instanceof WorkerGlobalScope) {
  self.onmessage = async (e) => self.postMessage(await play(e.data.case, e.data.timeoutMs));
}
