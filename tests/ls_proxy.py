"""A small HTTP proxy in front of the session's Label Studio that forwards every request and, for the
ones a test picks, answers 504 after Label Studio handled them: the write happened, its caller cannot
know it (a gateway timing out, a dropped answer). Used through the `ls_proxy` fixture (conftest.py)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length", "content-encoding"}
PREDICTION_IMPORT = re.compile(r"^/api/projects/\d+/import/predictions")


@dataclass
class LabelStudioProxy:
    target: str
    url: str = ""
    # (method, path) -> True: forward, then answer 504 instead of Label Studio's answer
    swallow: Callable[[str, str], bool] = lambda method, path: False
    swallowed: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, Label Studio's status)
    forwarded: list[tuple[str, str]] = field(default_factory=list)

    def swallow_prediction_imports(self, times: int | None = None) -> None:
        """Every prediction import (the first `times` only, when given) is stored by Label Studio and answered 504."""
        left = [times]

        def pick(method: str, path: str) -> bool:
            if method != "POST" or not PREDICTION_IMPORT.match(path):
                return False
            if left[0] is None:
                return True
            left[0] -= 1
            return left[0] >= 0

        self.swallow = pick

    def imports(self) -> int:
        """How many prediction imports reached Label Studio through the proxy."""
        return sum(1 for method, path in self.forwarded if method == "POST" and PREDICTION_IMPORT.match(path))


def serve(proxy: LabelStudioProxy) -> ThreadingHTTPServer:
    client = httpx.Client(base_url=proxy.target, timeout=300)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "host"}
            answer = client.request(self.command, self.path, content=body, headers=headers)
            with lock:
                proxy.forwarded.append((self.command, self.path))
                swallowed = proxy.swallow(self.command, self.path)
                if swallowed:
                    proxy.swallowed.append((self.command, self.path, answer.status_code))
            status, content = (504, b'{"detail": "gateway timeout (the test proxy)"}') if swallowed else (answer.status_code, answer.content)
            self.send_response(status)
            if not swallowed:
                for name, value in answer.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
            else:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="ls-proxy", daemon=True).start()
    return server
