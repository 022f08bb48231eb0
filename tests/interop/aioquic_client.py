#!/usr/bin/env python3
"""An openpista protocol client in another QUIC stack (aioquic), written from
docs/PROTOCOL.md alone. Used by crates/cli/tests/interop.rs.

Connects with ALPN openpista/1, pins the server certificate by its SHA-256
fingerprint (checked right after the TLS handshake, before the token is sent),
says hello, sends one message, lists sessions and reads the session's history.
Prints a JSON summary on stdout.

Exit codes: 0 success; 1 protocol violation or transport failure; 2 usage;
3 the server refused the handshake (the error code is printed on stdout as
{"refused": CODE, ...}); 4 certificate fingerprint mismatch.
"""

import argparse
import asyncio
import json
import ssl
import struct
import sys
import uuid

try:
    from aioquic.asyncio import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset
    from cryptography.hazmat.primitives import hashes
except ImportError as exc:  # pragma: no cover
    print(f"aioquic is not installed ({exc}); `bash scripts/test.sh` installs it", file=sys.stderr)
    sys.exit(5)

ALPN = "openpista/1"
MAX_FRAME = 1_048_576
TIMEOUT = 30.0


class Violation(Exception):
    """The server broke docs/PROTOCOL.md."""


class Refused(Exception):
    def __init__(self, code, message, via):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.via = code, message, via


class Mismatch(Exception):
    pass


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queues = {}
        self.closed = None  # (error_code, reason) once terminated

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            q = self.queues.setdefault(event.stream_id, asyncio.Queue())
            q.put_nowait(("data", event.data, event.end_stream))
        elif isinstance(event, StreamReset):
            q = self.queues.setdefault(event.stream_id, asyncio.Queue())
            q.put_nowait(("reset", event.error_code, True))
        elif isinstance(event, ConnectionTerminated):
            self.closed = (event.error_code, event.reason_phrase)
            for q in self.queues.values():
                q.put_nowait(("closed", None, True))

    def check_fingerprint(self, expected):
        cert = self._quic.tls._peer_certificate
        if cert is None:
            raise Mismatch("the server presented no certificate")
        got = ":".join(f"{b:02x}" for b in cert.fingerprint(hashes.SHA256()))
        if got != expected:
            raise Mismatch(f"certificate fingerprint {got} != pinned {expected}")

    async def request(self, frame, terminal, max_frame):
        """Opens a bidirectional stream, writes one frame, finishes the send
        side, and reads frames until one whose type is in `terminal`."""
        sid = self._quic.get_next_available_stream_id()
        queue = self.queues.setdefault(sid, asyncio.Queue())
        body = json.dumps(frame).encode()
        self._quic.send_stream_data(sid, struct.pack(">I", len(body)) + body, end_stream=True)
        self.transmit()
        frames, buf, ended = [], b"", False
        while True:
            # decode every complete frame in the buffer
            while len(buf) >= 4:
                (n,) = struct.unpack(">I", buf[:4])
                if n > max_frame:
                    raise Violation(f"frame of {n} bytes above max_frame_size {max_frame}")
                if len(buf) < 4 + n:
                    break
                try:
                    obj = json.loads(buf[4 : 4 + n].decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise Violation(f"frame is not UTF-8 JSON: {exc}") from exc
                buf = buf[4 + n :]
                if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                    raise Violation(f"frame is not an object with a string type: {obj!r}")
                frames.append(obj)
                if obj["type"] in terminal or obj["type"] == "error":
                    return frames
            if ended:
                if buf:
                    raise Violation("stream ended inside a frame")
                if self.closed is not None:
                    code, reason = self.closed
                    if code == 1 and reason:
                        raise Refused(reason, "connection closed", "close")
                    raise Violation(f"connection closed ({code}, {reason!r}) before a terminal frame")
                raise Violation(f"stream ended before a terminal frame; got {[f['type'] for f in frames]}")
            try:
                kind, data, end = await asyncio.wait_for(queue.get(), TIMEOUT)
            except asyncio.TimeoutError:
                raise Violation(f"no terminal frame within {TIMEOUT}s") from None
            if kind == "data":
                buf += data
            elif kind == "reset":
                raise Violation(f"stream reset by the server (code {data})")
            ended = end or kind == "closed"


def expect(cond, what):
    if not cond:
        raise Violation(what)


async def run(args):
    host, _, port = args.addr.rpartition(":")
    host = host.strip("[]")
    with open(args.token_file, encoding="utf-8") as f:
        token = f.read().strip()
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    # The certificate is self-signed: no chain check, the pin below instead.
    config.verify_mode = ssl.CERT_NONE
    config.server_name = host
    fingerprint = args.fingerprint.strip().lower()

    async with connect(host, int(port), configuration=config, create_protocol=Client,
                       wait_connected=True) as client:
        # Before a single byte (the token) goes out: check the pin.
        client.check_fingerprint(fingerprint)
        expect(client._quic.tls.alpn_negotiated == ALPN, "ALPN openpista/1 was not negotiated")

        hello = {"type": "hello", "protocol_version": 1, "token": token, "client_name": "aioquic-interop"}
        reply = await client.request(hello, {"welcome"}, MAX_FRAME)
        expect(len(reply) == 1, f"handshake: expected one frame, got {reply}")
        welcome = reply[0]
        if welcome["type"] == "error":
            raise Refused(welcome.get("code"), welcome.get("message"), "frame")
        expect(welcome.get("protocol_version") == 1, f"welcome: protocol_version {welcome}")
        max_frame = welcome.get("max_frame_size", MAX_FRAME)
        expect(isinstance(max_frame, int) and max_frame > 0, f"welcome: max_frame_size {welcome}")

        events = await client.request(
            {"type": "send_message", "session_id": None, "text": args.text,
             "idempotency_key": str(uuid.uuid4())},
            {"final"}, max_frame)
        types = [e["type"] for e in events]
        expect(types[0] == "accepted", f"send_message: first frame is not accepted: {types}")
        allowed = {"text_delta", "tool_started", "tool_finished", "approval_required"}
        expect(all(t in allowed for t in types[1:-1]), f"send_message: unexpected events {types}")
        last = events[-1]
        if last["type"] == "error":
            raise Violation(f"the turn failed: {last}")
        session_id = events[0].get("session_id")
        expect(isinstance(session_id, str) and session_id, f"accepted without session_id: {events[0]}")
        expect(isinstance(last.get("text"), str), f"final without text: {last}")

        sessions = await client.request({"type": "list_sessions", "limit": 50}, {"sessions"}, max_frame)
        expect([f["type"] for f in sessions] == ["sessions"], f"list_sessions: {sessions}")
        ids = [s.get("id") for s in sessions[0].get("sessions", [])]
        expect(session_id in ids, f"list_sessions: {session_id} not in {ids}")

        history = await client.request(
            {"type": "get_history", "session_id": session_id, "limit": 200}, {"history"}, max_frame)
        expect([f["type"] for f in history] == ["history"], f"get_history: {history}")
        expect(history[0].get("session_id") == session_id, f"get_history: {history[0]}")
        messages = history[0].get("messages")
        expect(isinstance(messages, list), f"get_history: {history[0]}")

        client.close(error_code=0)
        return {
            "welcome": welcome,
            "events": types,
            "session_id": session_id,
            "final_text": last["text"],
            "sessions": len(ids),
            "history_len": len(messages),
            "history_roles": [m.get("role") for m in messages],
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True, help="HOST:PORT")
    p.add_argument("--token-file", required=True)
    p.add_argument("--fingerprint", required=True, help="SHA-256, hex with colons")
    p.add_argument("--text", default="hello from aioquic")
    args = p.parse_args()
    try:
        summary = asyncio.run(asyncio.wait_for(run(args), 60))
    except Mismatch as exc:
        print(f"fingerprint mismatch: {exc}", file=sys.stderr)
        sys.exit(4)
    except Refused as exc:
        print(json.dumps({"refused": exc.code, "message": exc.message, "via": exc.via}))
        print(f"refused by the server: {exc}", file=sys.stderr)
        sys.exit(3)
    except Violation as exc:
        print(f"protocol violation: {exc}", file=sys.stderr)
        sys.exit(1)
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        print(f"transport failure: {exc!r}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
