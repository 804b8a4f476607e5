"""HTTP peers the end-to-end L7 tests need beyond the sandbox's HTTP/1.1 echo and probe.

Run as a script inside the pod's network namespace, as root; each command drops to the
container's uid/gid before touching the network (the kernel's owner match must see it):

- ``serve-h2c``: an h2c (HTTP/2 cleartext, prior knowledge) echo server on one port, dual
  stack; answers every request with a JSON body (server, port, method, path, protocol,
  meshguard headers); prints ``ready`` once bound. Anything that is not HTTP/2 (an HTTP/1.1
  request line) is a protocol error: the connection is closed.
- ``h2c``: one HTTP/2 prior-knowledge request (JSON target on stdin), prints status and body.
- ``raw``: one request sent byte for byte over a plain socket (the request line is not
  rewritten by any client library), prints status and body.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from meshguard.sandbox.probe import drop_privileges

TIMEOUT = 3.0


def serve_h2c(*, name: str, port: int) -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", port))
    listener.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_h2c_connection, args=(conn, name, port), daemon=True).start()


def _h2c_connection(conn: socket.socket, name: str, port: int) -> None:
    h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    requests: dict[int, dict[str, str]] = {}
    with conn, contextlib.suppress(OSError, h2.exceptions.ProtocolError):
        h2conn.initiate_connection()
        conn.sendall(h2conn.data_to_send())
        while data := conn.recv(65536):
            for event in h2conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = {_text(k): _text(v) for k, v in event.headers or []}
                elif isinstance(event, h2.events.DataReceived):
                    h2conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    _answer(h2conn, event.stream_id, requests.pop(event.stream_id, {}), name, port)
            conn.sendall(h2conn.data_to_send())


def _answer(
    h2conn: h2.connection.H2Connection, stream: int, headers: dict[str, str], name: str, port: int
) -> None:
    body = json.dumps(
        {
            "server": name,
            "port": port,
            "protocol": "h2c",
            "method": headers.get(":method"),
            "path": headers.get(":path"),
            "meshguard_headers": sorted(h for h in headers if h.startswith("x-meshguard")),
        }
    ).encode()
    h2conn.send_headers(
        stream,
        [(":status", "200"), ("content-type", "application/json"),
         ("content-length", str(len(body)))],
    )  # fmt: skip
    h2conn.send_data(stream, body, end_stream=True)


def h2c_request(target: dict[str, Any]) -> dict[str, Any]:
    host, port = str(target["host"]), int(target["port"])
    h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    status, body = 0, b""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            h2conn.initiate_connection()
            stream = h2conn.get_next_available_stream_id()
            headers = [
                (":method", target.get("method", "GET")),
                (":path", target.get("path", "/")),
                (":scheme", "http"),
                (":authority", f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"),
                *(target.get("headers") or {}).items(),
            ]
            h2conn.send_headers(stream, headers, end_stream=True)
            sock.sendall(h2conn.data_to_send())
            done = False
            while not done and (data := sock.recv(65536)):
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers or [])[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        h2conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(
                        event,
                        h2.events.StreamEnded
                        | h2.events.StreamReset
                        | h2.events.ConnectionTerminated,
                    ):
                        done = True
                sock.sendall(h2conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError) as exc:
        return {"status": status, "error": f"{type(exc).__name__}: {exc}", "body": body.decode()}
    return _outcome(status, body)


def raw_request(target: dict[str, Any]) -> dict[str, Any]:
    host, port = str(target["host"]), int(target["port"])
    received = b""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(str(target["request"]).encode("latin-1"))
            while chunk := sock.recv(65536):
                received += chunk
    except TimeoutError:
        pass  # keep-alive: whatever arrived is the answer
    except OSError as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    head, _, body = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    return _outcome(status, body)


def _outcome(status: int, body: bytes) -> dict[str, Any]:
    text = body.decode(errors="replace")
    if status == 200:
        with contextlib.suppress(ValueError):
            return {"status": 200, **json.loads(text)}
    return {"status": status, "body": text[:400]}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve-h2c", "h2c", "raw"])
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    drop_privileges(uid=args.uid, gid=args.gid)
    if args.command == "serve-h2c":
        serve_h2c(name=args.name, port=args.port)
        return 0
    target = json.load(sys.stdin)
    json.dump(h2c_request(target) if args.command == "h2c" else raw_request(target), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
