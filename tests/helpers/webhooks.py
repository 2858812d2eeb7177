"""Webhook delivery seen from the receiving end: a loopback HTTP receiver, the test signing secret, and
README's receiver example (the code block headed ``# webhook receiver``), executed."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import REPO

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes length!").decode()


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


def readme_verify():
    """(verify, WebhookVerificationError) from README.md's receiver example, which must stay ≤ 10 lines."""
    text = (REPO / "README.md").read_text()
    block = text.split("```python\n# webhook receiver\n", 1)[1].split("```", 1)[0]
    assert 0 < len(block.strip().splitlines()) <= 10
    ns: dict = {}
    exec(block, ns)
    return ns["verify"], ns["WebhookVerificationError"]
