"""The peer that scripts/bench-peer measures chorus against: uWebSockets.

uWebSockets with its native topic publish is the fastest fanout server we
know of. This is a minimal server on it (through the Python binding
socketify) that speaks the part of chorus's PROTOCOL.md that loadgen uses,
so that the same loadgen scenarios run against both:

* the upgrade on any path; the token is not checked (loadgen's are valid);
* `join` -> `joined` with the room's latest `seq` and an `epoch`; the
  connection subscribes to the room's topic;
* `send` with `ref` -> the room's next `seq`, one `message` frame encoded
  once and handed to uWebSockets' `publish` (every subscriber, the sender
  too if it joined, gets the same bytes), then `ack` to the sender;
* WebSocket pings are answered by uWebSockets itself.

Nothing else of the protocol (history, presence, limits) is there: it would
only cost the peer time that loadgen does not measure.

Usage: python bench-peer-server.py PORT   (prints "listening on 127.0.0.1:PORT")
"""

import json
import sys

from socketify import App, AppListenOptions, CompressOptions, OpCode

EPOCH = "peer"

# Room name -> the last seq given in it.
latest_seq = {}


def on_message(ws, message, opcode):
    try:
        request = json.loads(message)
        kind = request["type"]
        room = request["room"]
    except (ValueError, KeyError, TypeError):
        ws.send('{"type":"error","code":"bad_request","message":"not understood"}', OpCode.TEXT)
        return
    if kind == "send":
        seq = latest_seq.get(room, 0) + 1
        latest_seq[room] = seq
        body = json.dumps(request.get("body"), separators=(",", ":"))
        room_json = json.dumps(room)
        frame = f'{{"type":"message","room":{room_json},"seq":{seq},"from":"peer","ts":0,"body":{body}}}'
        app.publish(room, frame, OpCode.TEXT)
        reference = request.get("ref")
        if reference is not None:
            ack = json.dumps({"type": "ack", "ref": reference, "room": room, "seq": seq}, separators=(",", ":"))
            ws.send(ack, OpCode.TEXT)
    elif kind == "join":
        ws.subscribe(room)
        joined = {"type": "joined", "room": room, "seq": latest_seq.get(room, 0), "epoch": EPOCH}
        ws.send(json.dumps(joined, separators=(",", ":")), OpCode.TEXT)
    elif kind == "leave":
        ws.unsubscribe(room)
        ws.send(json.dumps({"type": "left", "room": room}, separators=(",", ":")), OpCode.TEXT)


def main():
    global app
    port = int(sys.argv[1])
    app = App()
    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": 1 << 20,
            # Generous: loadgen's members read everything.
            "max_backpressure": 64 << 20,
            "idle_timeout": 0,
            "message": on_message,
        },
    )
    app.listen(
        AppListenOptions(port=port, host="127.0.0.1"),
        lambda config: print(f"listening on 127.0.0.1:{port}", flush=True),
    )
    # Not app.run(): socketify's own loop spins asyncio around libuv's
    # run_nowait, a core busy even when idle, and every figure of CPU per
    # delivery would carry it. libuv's blocking loop is how a uWebSockets
    # server in C runs.
    app.loop.uv_loop.run()


if __name__ == "__main__":
    main()
