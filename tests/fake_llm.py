"""A tiny OpenAI-compatible HTTP server on 127.0.0.1 that answers what a test scripts:
the misbehaving teachers (slow, failing, garbage) a real server rarely is on demand."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Script = Callable[[int, dict, dict], tuple[int, dict[str, str], bytes]]


def chat(content: str, **extra: Any) -> bytes:
    body = {
        "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }  # fmt: skip
    return json.dumps(body | extra).encode()


@contextmanager
def fake_server(script: Script) -> Iterator[tuple[str, list[dict]]]:
    """Answer POST /v1/chat/completions with script(n, body, headers); log every request."""
    seen: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen.append({"body": body, "headers": dict(self.headers)})
                n = len(seen)
            status, headers, payload = script(n, body, dict(self.headers))
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
