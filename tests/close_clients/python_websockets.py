"""Close-matrix driver for Python's `websockets` library (asyncio client).

Why it exists: tests/close_matrix.rs checks that every close the server sends
reaches the application of real client libraries with its code and reason.
This script plays the cases of the spec file given as its only argument, all
at once, and prints one line `RESULTS <json>`: for each case, the code and
reason that `websockets` hands the application, i.e. the `rcvd` close frame of
the `ConnectionClosed` exception that `recv()` raises (1006 when it has none).
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State


async def until_closed(ws):
    """Reads (and ignores) messages until the library reports the close."""
    while True:
        try:
            await ws.recv()
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return 1006, ""
            return closed.rcvd.code, closed.rcvd.reason


async def compressed_round_trip(ws, case):
    """Compression check (tests/compression.rs): after `joined`, sends the
    case's text and returns the extensions negotiated and the body of the
    `message` that comes back."""
    await ws.recv()
    await ws.send(case["text"])
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "message":
            break
    deflate = [e for e in ws.protocol.extensions if e.name == "permessage-deflate"]
    return {
        "extensions": [e.name for e in ws.protocol.extensions],
        "no_context_takeover": [d.remote_no_context_takeover and d.local_no_context_takeover for d in deflate],
        "body": message["body"],
    }


async def play(case):
    # No keepalive pings of our own: a ping timeout must be the server's.
    ws = await connect(case["url"], ping_interval=None, open_timeout=10, close_timeout=5)
    try:
        return await play_on(ws, case)
    finally:
        await close_after(ws)


async def play_on(ws, case):
    action = case["do"]
    if action == "compress":
        return await compressed_round_trip(ws, case)
    try:
        if action == "close":
            await ws.close(case["code"], case["reason"])
        elif action == "send":
            await ws.send(case["text"])
        elif action == "big":
            await ws.send("x" * case["bytes"])
        elif action == "flood":
            for _ in range(case["count"]):
                await ws.send('{"type":"ping"}')
        elif action == "stall":
            await ws.recv()  # `joined`: a member of the room from here on.
            # Not calling recv() is how an application stops reading: past
            # its receive queue, the library stops reading the socket.
            await asyncio.sleep(case["ms"] / 1000)
    except ConnectionClosed:
        pass  # The server closed while we were still at it: the point of some cases.
    return await until_closed(ws)


async def close_after(ws):
    """Closes the connection once the case has its result, as leaving
    `async with connect(...)` would, but survives a bug of CPython's asyncio
    (3.11 to 3.13): when a transport closes with data still buffered (the
    rest of an 8 MB message the server refused) and that data drains,
    `_write_ready` calls `_call_connection_lost` without counting the loss,
    so the `abort()` that websockets' `close()` then makes finds the
    transport's loop gone and raises AttributeError. The connection is
    closed by then and the application already has the server's close."""
    try:
        await ws.close()
    except AttributeError:
        if ws.state is not State.CLOSED:
            raise


async def run(case, timeout_s):
    try:
        result = await asyncio.wait_for(play(case), timeout_s)
        if isinstance(result, dict):
            return {"case": case["name"], **result}
        code, reason = result
        return {"case": case["name"], "code": code, "reason": reason}
    except Exception as failure:  # Reported in the cell, so one case never hides the others.
        return {"case": case["name"], "code": None, "reason": f"{type(failure).__name__}: {failure}"}


async def main():
    with open(sys.argv[1], encoding="utf-8") as spec_file:
        spec = json.load(spec_file)
    timeout_s = spec["timeout_ms"] / 1000
    results = await asyncio.gather(*(run(case, timeout_s) for case in spec["cases"]))
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
