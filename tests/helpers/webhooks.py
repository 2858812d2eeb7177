"""A webhook receiver on loopback for tests."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A loopback HTTP server that records each POST and answers from a script of status codes."""

    def __init__(self, script=()):
        self.script = list(script)
        self.received: list[dict] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rec.received.append({"headers": dict(self.headers), "body": body})
                code = rec.script.pop(0) if rec.script else 204
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self):
        return [json.loads(r["body"])["type"] for r in self.received]

    def close(self):
        self.server.shutdown()
