#!/usr/bin/env python3
"""Memory under held connections: clerkgate's own RSS, measured on its own process.

Two checks that used to run inside `cargo test` (tests/it/hostile/protocol.rs), where the RSS
of the shared test process also counted every other test running alongside it:

1. 5000 idle keep-alive connections (each has completed one request, a 401) grow clerkgate's
   RSS by less than 200 MiB, and a new request is still answered while they are held and after
   they are gone.
2. Ten clients that each ask for a 64 MiB response and never read a byte: other clients are
   still served, and clerkgate's RSS grows by less than 320 MiB (half of the 640 MiB asked
   for: back-pressure, not buffering, which would show all of it).

Exits 1 when a check fails. The behaviour half of each (served while held, served after) stays
in `cargo test`; this adds the memory half, on the binary alone.

    cargo build --release
    python3 soak/connections.py [--idle 5000] [--binary PATH]
"""

import argparse
import http.server
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the repo
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as soak  # noqa: E402  (the soak driver: keys, fake Clerk, config, process)

KEEP_ALIVE_GET = b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n"


class BigUpstream(http.server.BaseHTTPRequestHandler):
    """`GET /big/<n>`: n bytes of a..z with a Content-Length, written in 64 KiB pieces;
    anything else: 200 `ok`."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        m = re.fullmatch(r"/big/(\d+)", self.path)
        n = int(m.group(1)) if m else 2
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if not m:
            self.wfile.write(b"ok")
            return
        piece = bytes(b"abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(64 * 1024 + 26))
        sent = 0
        try:
            while sent < n:
                size = min(64 * 1024, n - sent)
                start = sent % 26
                self.wfile.write(piece[start:start + size])
                sent += size
        except OSError:
            pass  # the proxy gave up on the download: fine

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def read_response(sock, timeout):
    """Reads one Content-Length response; returns its status, or None."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        while len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            body += chunk
        return int(head.split(b" ", 2)[1])
    except OSError:
        return None


def answered(proxy, path="/held"):
    """Status of one request on a fresh connection (None when none came within 15 s)."""
    with socket.create_connection(("127.0.0.1", proxy), timeout=15) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        return read_response(s, 15)


def idle_connections(proxy, n):
    held = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", proxy), timeout=15)
        s.sendall(KEEP_ALIVE_GET)
        if read_response(s, 15) != 401:
            raise RuntimeError(f"idle connection {i} was not answered 401")
        held.append(s)
    return held


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--binary", default=os.path.join(soak.REPO, "target/release/clerkgate"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="clerkgate-connections-")
    ring = soak.KeyRing()
    fake = soak.FakeClerk(ring)
    upstream = Server(("127.0.0.1", 0), BigUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    cfg_args = argparse.Namespace(jwks_ttl=3600, jwks_min_refresh=30, skew_ms=5000,
                                  token_cache=1000, max_entries=1000)
    config = os.path.join(work, "clerkgate.toml")
    soak.write_config(config, upstream.server_address[1], fake.port, cfg_args)
    with open(config) as f:
        text = f.read().replace("[proxy]\n", "[proxy]\nheader_read_timeout_seconds = 60\n", 1)
    with open(config, "w") as f:
        f.write(text + '\n[[routes]]\npath = "/big/**"\nauth = "public"\n')
    log = os.path.join(work, "clerkgate.log")
    cg = None
    failed = []

    def check(name, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failed.append(name)

    try:
        cg, proxy, _admin = soak.start_clerkgate(args.binary, config, log)

        before = soak.rss_kib(cg.pid)
        held = idle_connections(proxy, args.idle)
        during = soak.rss_kib(cg.pid)
        growth = (during - before) / 1024
        check(f"{args.idle} idle keep-alive connections", growth < 200,
              f"RSS {before / 1024:.1f} -> {during / 1024:.1f} MiB (+{growth:.1f}, bound 200)")
        check("served while they are held", answered(proxy) == 401, "a new request got 401")
        for s in held:
            s.close()
        check("served after they are gone", answered(proxy) == 401, "a new request got 401")

        before = soak.rss_kib(cg.pid)
        stalled = []
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", proxy), timeout=15)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(b"GET /big/67108864 HTTP/1.1\r\nHost: a\r\n\r\n")
            stalled.append(s)
        served = [answered(proxy, "/big/10") for _ in range(5) if time.sleep(0.2) is None]
        check("others served next to 10 stalled 64 MiB downloads", served == [200] * 5,
              f"statuses {served}")
        growth = (soak.rss_kib(cg.pid) - before) / 1024
        check("10 stalled 64 MiB downloads", growth < 320,
              f"RSS +{growth:.1f} MiB of 640 MiB asked for (bound 320)")
        for s in stalled:
            s.close()
        if failed:
            print(f"evidence kept in {work}")
        return 1 if failed else 0
    finally:
        if cg is not None and cg.poll() is None:
            cg.terminate()
            cg.wait(timeout=30)
        upstream.shutdown()
        fake.server.shutdown()
        if not failed:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
