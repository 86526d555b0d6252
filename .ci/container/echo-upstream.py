#!/usr/bin/env python3
"""A tiny upstream for the container and deploy tests: answers every request with JSON
{"path": ..., "headers": {...}} so a test can see what clerkgate forwarded.

    python3 .ci/container/echo-upstream.py PORT      # binds 127.0.0.1 only
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "upstream": "echo-upstream",
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, fmt, *args):  # quiet
        pass


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Echo)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
