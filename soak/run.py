#!/usr/bin/env python3
"""Soak test for clerkgate: minutes of mixed traffic against the release binary.

Not part of `cargo test`. See soak/README.md. In short:

    cargo build --release
    python3 soak/run.py --quick          # about 1 minute
    python3 soak/run.py                  # 10 minutes (--minutes N to change)

What runs, all on 127.0.0.1 with ephemeral ports:
  * a fake Clerk Backend API (thread in this process) serving GET /v1/jwks, bearer-checked;
  * an upstream (a child process running this file with --serve-upstream) that answers with
    the X-User-Id / X-Session-Id it received and remembers every request id it saw;
  * target/release/clerkgate serve --config <generated toml in a temp dir>.

Then worker threads send valid, invalid, revoked, banned and retired-key traffic, the rotator
rotates the signing key every minute or so, and the webhook threads revoke sessions and ban
users through Svix-signed webhooks, with bursts of a couple of hundred deliveries (replays and
forgeries included). Every response is classified against what the README promises; anything
else is "unexpected" and fails the run. RSS is sampled every 5 s; /metrics is cross-checked.

Tokens are RS256 JWTs signed with the `cryptography` package (PyPI); everything else is stdlib.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import hmac
import http.client
import http.server
import json
import os
import random
import re
import secrets
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

try:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
except ImportError:  # pragma: no cover - message for humans
    sys.exit("soak/run.py needs the `cryptography` package: python3 -m pip install cryptography")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUER = "https://clerk.soak.example"
SECRET_KEY = "sk_test_soak_" + secrets.token_hex(16)
WEBHOOK_KEY = secrets.token_bytes(24)
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()
WRONG_WEBHOOK_KEY = secrets.token_bytes(24)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_int(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


# --------------------------------------------------------------------------------------------
# Keys and tokens


class SigningKey:
    def __init__(self, kid: str):
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        pub = self.private.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                "n": b64url_int(pub.n), "e": b64url_int(pub.e)}

    def sign(self, header: dict, payload: dict, alg_hash=None) -> str:
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64url(json.dumps(payload, separators=(",", ":")).encode()))
        sig = self.private.sign(signing_input.encode(), padding.PKCS1v15(),
                                alg_hash or hashes.SHA256())
        return signing_input + "." + b64url(sig)


def claims(uid: str, sid: str, iat: int, exp: int, iss: str = ISSUER, **extra) -> dict:
    c = {"azp": "http://localhost:3000", "exp": exp, "iat": iat, "iss": iss,
         "jti": secrets.token_hex(10), "nbf": iat - 10, "sid": sid, "sub": uid, "v": 2,
         "sts": "active"}
    c.update(extra)
    return c


class KeyRing:
    """The instance's keys: what the fake Clerk publishes and what tokens are signed with."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counter = 0
        first = self._new_key()
        self.keys = {first.kid: first}
        self.published = [first.kid]
        self.signing = first
        self.removed_at: dict[str, float] = {}  # kid -> when the fake Clerk stopped serving it
        self.effective: dict[str, float] = {}  # kid -> clerkgate has surely dropped it since
        self.probes: dict[str, list] = {}  # kid -> [(token, uid, sid, exp)] signed with it
        self.rogue = SigningKey("ins_rogue")  # never published

    def _new_key(self) -> SigningKey:
        self.counter += 1
        return SigningKey(f"ins_soak{self.counter:03d}{secrets.token_hex(4)}")

    def jwks(self) -> tuple[bytes, tuple]:
        with self.lock:
            kids = tuple(self.published)
            body = json.dumps({"keys": [self.keys[k].jwk() for k in kids]}).encode()
        return body, kids

    def current(self) -> SigningKey:
        with self.lock:
            return self.signing


# --------------------------------------------------------------------------------------------
# Fake Clerk Backend API


class FakeClerk:
    def __init__(self, ring: KeyRing):
        self.ring = ring
        self.lock = threading.Lock()
        self.fetches: list[tuple[float, tuple]] = []  # (served at, kids)
        self.unauthorized = 0
        self.unexpected_calls: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path != "/v1/jwks":
                    with fake.lock:
                        fake.unexpected_calls.append(f"GET {self.path}")
                    return self._send(404, b'{"errors":[{"code":"resource_not_found"}]}')
                if self.headers.get("Authorization") != f"Bearer {SECRET_KEY}":
                    with fake.lock:
                        fake.unauthorized += 1
                    return self._send(401, b'{"errors":[{"code":"authentication_invalid"}]}')
                body, kids = fake.ring.jwks()
                self._send(200, body)
                with fake.lock:
                    fake.fetches.append((time.time(), kids))

            def do_POST(self):
                with fake.lock:
                    fake.unexpected_calls.append(f"POST {self.path}")
                self._send(404, b"{}")

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_served(self, kid: str, present: bool, after: float, timeout: float):
        """The time of the first JWKS response after `after` that has (or lacks) `kid`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                for t, kids in reversed(self.fetches):
                    if t <= after:
                        break
                    if (kid in kids) == present:
                        # the earliest such fetch after `after`
                        first = t
                        for t2, kids2 in self.fetches:
                            if t2 > after and (kid in kids2) == present:
                                first = t2
                                break
                        return first
            time.sleep(0.2)
        return None


# --------------------------------------------------------------------------------------------
# Upstream (child process)


def serve_upstream():
    """Runs in a child process: answers with the identity it received, remembers request ids."""
    seen: dict[str, list] = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/__soak/seen":
                with lock:
                    body = json.dumps(seen).encode()
            else:
                uid = self.headers.get("X-User-Id")
                sid = self.headers.get("X-Session-Id")
                rid = self.path.rsplit("/", 1)[-1]
                with lock:
                    entry = seen.setdefault(rid, [uid, sid, 0])
                    entry[2] += 1
                body = json.dumps({"rid": rid, "uid": uid, "sid": sid,
                                   "auth": self.headers.get("Authorization")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    server.serve_forever()


# --------------------------------------------------------------------------------------------
# Model of sessions and users


class User:
    __slots__ = ("uid", "ban_sent", "ban_ack", "sessions")

    def __init__(self, uid):
        self.uid = uid
        self.ban_sent = None
        self.ban_ack = None
        self.sessions = []


class Session:
    __slots__ = ("sid", "user", "token", "exp", "iat", "kid", "lock", "revoke_sent",
                 "revoke_ack", "broken")

    def __init__(self, sid, user):
        self.sid = sid
        self.user = user
        self.token = None
        self.exp = 0
        self.iat = 0
        self.kid = None
        self.lock = threading.Lock()
        self.revoke_sent = None
        self.revoke_ack = None
        self.broken = False  # a webhook about it got an unexpected answer: state unknown


class World:
    def __init__(self, ring: KeyRing, token_ttl: int, n_users: int, sessions_per_user: int):
        self.ring = ring
        self.token_ttl = token_ttl
        self.lock = threading.Lock()
        self.users: list[User] = []
        self.active: list[Session] = []
        self.active_idx: dict[str, int] = {}
        self.revoked = collections.deque(maxlen=400)
        self.banned = collections.deque(maxlen=400)
        self.n = 0
        for _ in range(n_users):
            u = self.new_user()
            for _ in range(sessions_per_user):
                self.add_active(self.new_session(u))

    def new_user(self) -> User:
        with self.lock:
            self.n += 1
            u = User(f"user_soak{self.n:06d}")
            self.users.append(u)
            return u

    def new_session(self, user: User) -> Session:
        with self.lock:
            self.n += 1
            s = Session(f"sess_soak{self.n:06d}{secrets.token_hex(3)}", user)
            user.sessions.append(s)
            return s

    def add_active(self, s: Session):
        with self.lock:
            self.active_idx[s.sid] = len(self.active)
            self.active.append(s)

    def remove_active(self, s: Session) -> bool:
        with self.lock:
            i = self.active_idx.pop(s.sid, None)
            if i is None:
                return False
            last = self.active.pop()
            if last is not s:
                self.active[i] = last
                self.active_idx[last.sid] = i
            return True

    def random_active(self) -> Session | None:
        with self.lock:
            return random.choice(self.active) if self.active else None

    def mint(self, s: Session, now: float) -> tuple[str, float, int, str]:
        key = self.ring.current()
        iat = int(now)
        exp = iat + self.token_ttl
        tok = key.sign({"alg": "RS256", "kid": key.kid, "typ": "JWT"},
                       claims(s.user.uid, s.sid, iat, exp))
        return tok, exp, iat, key.kid

    def token_for(self, s: Session, now: float) -> tuple[str, float, int, str]:
        """The session's current token, re-minted once a third of its lifetime is left."""
        with s.lock:
            if s.token is None or s.exp - now < self.token_ttl / 3:
                s.token, s.exp, s.iat, s.kid = self.mint(s, now)
            return s.token, s.exp, s.iat, s.kid


# --------------------------------------------------------------------------------------------
# Results


class Results:
    def __init__(self, evidence_path: str):
        self.lock = threading.Lock()
        self.by_cat = collections.defaultdict(collections.Counter)  # cat -> Counter(outcome)
        self.unexpected = collections.Counter()
        self.unexpected_samples = []
        self.latency_valid = []
        self.status_reason = collections.Counter()  # (status, reason) for proxied requests
        self.refused_rids = set()
        self.accepted_rids = set()
        self.token_requests = 0
        self.webhooks = collections.Counter()  # webhook outcome -> n
        self.webhook_sent = 0
        self.evidence = open(evidence_path, "a")
        self.checks = []  # (name, ok, detail)

    def record(self, cat, outcome, ok, rid, status, reason, latency=None, detail=None,
               has_token=True):
        with self.lock:
            self.by_cat[cat][outcome] += 1
            self.status_reason[(status, reason)] += 1
            if has_token:
                self.token_requests += 1
            if status == 200:
                self.accepted_rids.add(rid)
            elif status is not None:
                self.refused_rids.add(rid)
            if latency is not None:
                self.latency_valid.append(latency)
            if not ok:
                self.unexpected[f"{cat}: {outcome}"] += 1
                if detail is not None:
                    self.evidence.write(json.dumps(detail) + "\n")
                    self.evidence.flush()
                    if len(self.unexpected_samples) < 20:
                        self.unexpected_samples.append(detail)

    def webhook(self, outcome, ok, detail=None):
        with self.lock:
            self.webhook_sent += 1
            self.webhooks[outcome] += 1
            if not ok:
                self.unexpected[f"webhook: {outcome}"] += 1
                if detail is not None:
                    self.evidence.write(json.dumps(detail) + "\n")
                    self.evidence.flush()
                    if len(self.unexpected_samples) < 20:
                        self.unexpected_samples.append(detail)

    def check(self, name, ok, detail=""):
        with self.lock:
            self.checks.append((name, bool(ok), detail))


# --------------------------------------------------------------------------------------------
# HTTP client helpers


RECONNECTS = collections.Counter()


class Conn:
    def __init__(self, port):
        self.port = port
        self.c = None

    def request(self, method, path, headers, body=None, timeout=15):
        for attempt in range(2):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                self.c.request(method, path, body=body, headers=headers)
                r = self.c.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.c.close()
                    self.c = None
                return r.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                # A keep-alive connection the server closed while idle: one clean retry only
                # when nothing was answered (the request was not processed).
                self.c.close()
                self.c = None
                RECONNECTS[type(e).__name__] += 1
                if attempt == 1 or not isinstance(e, http.client.RemoteDisconnected):
                    raise
        raise RuntimeError("unreachable")


def reason_of(data: bytes):
    try:
        return json.loads(data).get("reason")
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# Traffic


GARBAGE = ["not-a-jwt", "a.b.c", "eyJhbGciOiJSUzI1NiJ9", "....", "x" * 300,
           "e30.e30.e30.e30"]


class Traffic:
    """One worker thread's request loop."""

    CATS = [  # category, weight
        ("valid", 70), ("revoked", 7), ("banned", 3), ("retired", 2), ("missing", 2),
        ("garbage", 2), ("bad_signature", 3), ("expired", 3), ("wrong_issuer", 3),
        ("alg_none", 1), ("unknown_kid", 2), ("not_yet_valid", 2),
    ]
    EXPECTED_REASON = {
        "missing": "session-token-missing", "garbage": "token-invalid",
        "bad_signature": "token-invalid-signature", "expired": "token-expired",
        "wrong_issuer": "token-invalid-issuer", "alg_none": "token-invalid-algorithm",
        "unknown_kid": "jwk-kid-mismatch", "not_yet_valid": "token-not-active-yet",
    }

    def __init__(self, world: World, results: Results, port: int, stop: threading.Event,
                 interval: float, seq):
        self.world = world
        self.ring = world.ring
        self.results = results
        self.conn = Conn(port)
        self.stop = stop
        self.interval = interval
        self.seq = seq
        names, weights = zip(*self.CATS)
        self.names = names
        self.weights = weights

    def run(self):
        next_at = time.time() + random.random() * self.interval
        while not self.stop.is_set():
            now = time.time()
            if next_at > now:
                time.sleep(next_at - now)
            next_at = max(next_at + self.interval, time.time() - 1.0)
            cat = random.choices(self.names, self.weights)[0]
            try:
                self.one(cat)
            except Exception as e:  # a bug in the driver is a failed run too
                self.results.record(cat, f"driver error {type(e).__name__}", False, None,
                                    None, None, detail={"cat": cat, "error": repr(e)})

    # -- building a request --------------------------------------------------------------

    def plan(self, cat, now):
        """(token or None, expected identity (uid, sid) or None, context for classification)."""
        w, ring = self.world, self.ring
        if cat == "valid":
            s = w.random_active()
            if s is None:
                return None
            tok, exp, iat, kid = w.token_for(s, now)
            return tok, {"session": s, "kid": kid, "iat": iat}
        if cat == "revoked":
            with w.lock:
                if not w.revoked:
                    return None
                s = random.choice(w.revoked)
            with s.lock:
                old = (s.token, s.exp, s.iat, s.kid)
            if old[0] is not None and old[1] - now > 3 and random.random() < 0.5:
                tok, exp, iat, kid = old  # likely still in the token cache
            else:
                tok, exp, iat, kid = w.mint(s, now)  # a fresh token for a revoked session
            return tok, {"session": s, "kid": kid, "iat": iat}
        if cat == "banned":
            with w.lock:
                if not w.banned:
                    return None
                s = random.choice(w.banned)
            with s.lock:
                tok, exp, iat, kid = s.token, s.exp, s.iat, s.kid
            if tok is None or exp - now < 3 or s.user.ban_sent is None \
                    or iat >= int(s.user.ban_sent):
                return None
            return tok, {"session": s, "kid": kid, "iat": iat}
        if cat == "retired":
            with ring.lock:
                pools = [p for p in ring.probes.values() if p]
                if not pools:
                    return None
                tok, uid, sid, exp, kid = random.choice(random.choice(pools))
            if exp - now < 3:
                return None
            return tok, {"probe": (uid, sid), "kid": kid}
        key = ring.current()
        iat = int(now)
        uid, sid = "user_attacker", "sess_attacker"
        hdr = {"alg": "RS256", "kid": key.kid, "typ": "JWT"}
        if cat == "missing":
            return "", {}
        if cat == "garbage":
            return random.choice(GARBAGE), {}
        if cat == "bad_signature":
            return ring.rogue.sign(hdr, claims(uid, sid, iat, iat + 60)), {}
        if cat == "expired":
            return key.sign(hdr, claims(uid, sid, iat - 600, iat - 120)), {}
        if cat == "wrong_issuer":
            return key.sign(hdr, claims(uid, sid, iat, iat + 60,
                                        iss="https://evil.accounts.example")), {}
        if cat == "alg_none":
            h = b64url(json.dumps({"alg": "none", "kid": key.kid}).encode())
            p = b64url(json.dumps(claims(uid, sid, iat, iat + 60)).encode())
            return f"{h}.{p}.", {}
        if cat == "unknown_kid":
            forged = dict(hdr, kid="ins_forged" + secrets.token_hex(6))
            return ring.rogue.sign(forged, claims(uid, sid, iat, iat + 60)), {}
        if cat == "not_yet_valid":
            return key.sign(hdr, claims(uid, sid, iat, iat + 600, nbf=iat + 300)), {}
        raise ValueError(cat)

    def one(self, cat):
        now = time.time()
        planned = self.plan(cat, now)
        if planned is None:
            cat = "valid"
            planned = self.plan(cat, now)
            if planned is None:
                return
        tok, ctx = planned
        rid = f"{os.getpid()}-{next(self.seq)}"
        headers = {}
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        if random.random() < 0.2:  # a client trying to spoof its identity: always stripped
            headers["X-User-Id"] = "user_spoofed"
            headers["X-Session-Id"] = "sess_spoofed"
        t_s = time.time()
        try:
            status, data = self.conn.request("GET", f"/soak/{cat}/{rid}", headers)
        except Exception as e:
            t_e = time.time()
            self.results.record(cat, f"connection error {type(e).__name__}", False, rid, None,
                                None, detail={"cat": cat, "rid": rid, "error": repr(e),
                                              "t_start": t_s, "t_end": t_e, "token": tok},
                                has_token=bool(tok))
            return
        t_e = time.time()
        self.classify(cat, ctx, tok, rid, status, data, t_s, t_e)

    # -- what the answer should have been ----------------------------------------------

    def allowed(self, ctx, t_s, t_e):
        """Acceptable (status, reason) answers for a token that is genuinely signed by the
        instance, given revocations, bans and key removals around the request's time."""
        ring = self.ring
        kid = ctx.get("kid")
        # Key lookup comes before the session check, so a removed key decides first.
        eff = ring.effective.get(kid)
        rem = ring.removed_at.get(kid)
        if eff is not None and eff < t_s:
            return {(401, "jwk-kid-mismatch")}, "key retired"
        ok = set()
        racing = []
        if rem is not None and rem < t_e:
            ok.add((401, "jwk-kid-mismatch"))
            racing.append("key removal")
        if "probe" in ctx:
            ok.add((200, None))
            return ok, "+".join(racing) or "probe live"
        s: Session = ctx["session"]
        u = s.user
        iat = ctx["iat"]
        if s.revoke_ack is not None and s.revoke_ack < t_s:
            return ok | {(401, "session-revoked")}, "session revoked"
        if u.ban_ack is not None and u.ban_ack < t_s and iat < int(u.ban_sent):
            return ok | {(401, "user-revoked")}, "user banned"
        ok.add((200, None))
        if s.revoke_sent is not None and s.revoke_sent < t_e:
            ok.add((401, "session-revoked"))
            racing.append("revocation in flight")
        if u.ban_sent is not None and u.ban_sent < t_e:
            ok.add((401, "user-revoked"))
            racing.append("ban in flight")
        return ok, "+".join(racing) or "live"

    def classify(self, cat, ctx, tok, rid, status, data, t_s, t_e):
        reason = None if status == 200 else reason_of(data)
        latency = None
        if cat in self.EXPECTED_REASON:
            want = {(401, self.EXPECTED_REASON[cat])}
            why = "invalid"
            expected_identity = None
        else:
            if ctx.get("session") is not None and ctx["session"].broken:
                return  # a webhook about it failed: reported there, nothing to expect here
            want, why = self.allowed(ctx, t_s, t_e)
            if "probe" in ctx:
                expected_identity = ctx["probe"]
            else:
                expected_identity = (ctx["session"].user.uid, ctx["session"].sid)
        got = (status, reason)
        ok = got in want
        if ok and status == 200:
            body = json.loads(data)
            if (body.get("uid"), body.get("sid")) != expected_identity or body.get("auth"):
                ok = False
                reason = f"wrong identity upstream {body.get('uid')}/{body.get('sid')}"
            elif cat == "valid" and why == "live":
                latency = (t_e - t_s) * 1000.0
        outcome = f"{status} {reason or ''}".strip() + f" ({why})"
        if not ok:
            outcome = f"UNEXPECTED {status} {reason} (wanted {sorted(map(str, want))}; {why})"
        detail = None
        if not ok:
            s = ctx.get("session")
            detail = {"cat": cat, "rid": rid, "status": status, "body": data.decode("utf-8",
                      "replace")[:500], "t_start": t_s, "t_end": t_e, "token": tok,
                      "why": why, "kid": ctx.get("kid"),
                      "session": s.sid if s else None,
                      "revoke_sent": s.revoke_sent if s else None,
                      "revoke_ack": s.revoke_ack if s else None,
                      "ban_sent": s.user.ban_sent if s else None,
                      "ban_ack": s.user.ban_ack if s else None,
                      "kid_removed_at": self.ring.removed_at.get(ctx.get("kid")),
                      "kid_effective": self.ring.effective.get(ctx.get("kid"))}
        self.results.record(cat, outcome, ok, rid, status, reason, latency, detail,
                            has_token=bool(tok))


# --------------------------------------------------------------------------------------------
# Webhooks


def svix_sign(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event(kind: str, data: dict) -> bytes:
    return json.dumps({"type": kind, "object": "event", "data": data,
                       "timestamp": int(time.time() * 1000),
                       "instance_id": "ins_soak"}).encode()


class Webhooks:
    def __init__(self, world: World, results: Results, port: int, path: str):
        self.world = world
        self.results = results
        self.port = port
        self.path = path
        self.local = threading.local()
        self.lock = threading.Lock()
        self.revocations = 0
        self.bans = 0
        self.created = 0

    def conn(self) -> Conn:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = Conn(self.port)
        return c

    def post(self, msg_id, ts, body, sig, drop_headers=False):
        headers = {"Content-Type": "application/json"}
        if not drop_headers:
            headers.update({"svix-id": msg_id, "svix-timestamp": str(ts),
                            "svix-signature": sig})
        try:
            status, data = self.conn().request("POST", self.path, headers, body)
        except Exception as e:
            return None, repr(e)
        try:
            j = json.loads(data)
        except Exception:
            j = {}
        return status, j.get("status") or j.get("reason")

    def deliver(self, label, body, expect, msg_id=None, ts=None, key=WEBHOOK_KEY,
                tamper=None, drop_headers=False, resend_of=None):
        """Sends one delivery and records it; returns (ok, msg_id, ts, sig)."""
        msg_id = msg_id or "msg_" + secrets.token_hex(12)
        ts = ts if ts is not None else int(time.time())
        sig = svix_sign(key, msg_id, ts, body)
        sent_body = body
        if tamper is not None:  # a genuinely signed body, changed in transit
            sent_body = tamper
            assert sent_body != body
        if resend_of is not None:  # an exact replay of an earlier delivery
            msg_id, ts, sig = resend_of
        status, what = self.post(msg_id, ts, sent_body, sig, drop_headers)
        ok = (status, what) == expect
        outcome = f"{label}: {status} {what}"
        if not ok:
            outcome = f"UNEXPECTED {label}: {status} {what} (wanted {expect})"
        self.results.webhook(outcome, ok, None if ok else {
            "webhook": label, "id": msg_id, "ts": ts, "status": status, "answer": what,
            "expected": list(expect), "body": body.decode()})
        return ok, msg_id, ts, sig

    # -- state-changing deliveries -----------------------------------------------------

    def revoke(self, s: Session):
        if not self.world.remove_active(s):
            return None
        s.revoke_sent = time.time()
        body = event("session.revoked", {"id": s.sid, "object": "session",
                                         "user_id": s.user.uid, "status": "revoked"})
        ok, *delivery = self.deliver("session.revoked", body, (200, "processed"))
        if ok:
            s.revoke_ack = time.time()
            with self.world.lock:
                self.world.revoked.append(s)
            with self.lock:
                self.revocations += 1
        else:
            s.broken = True
        return body, delivery

    def ban(self, u: User, kind: str):
        sessions = [s for s in u.sessions if self.world.remove_active(s)]
        if not sessions or u.ban_sent is not None:
            return None
        u.ban_sent = time.time()
        if kind == "user.deleted":
            body = event("user.deleted", {"id": u.uid, "object": "user", "deleted": True})
        else:
            body = event("user.updated", {"id": u.uid, "object": "user", "banned": True,
                                          "locked": False})
        ok, *delivery = self.deliver(kind + " (ban)", body, (200, "processed"))
        if ok:
            u.ban_ack = time.time()
            with self.world.lock:
                self.world.banned.extend(sessions)
            with self.lock:
                self.bans += 1
        else:
            for s in sessions:
                s.broken = True
        return body, delivery

    def create(self):
        w = self.world
        with w.lock:
            candidates = [u for u in random.sample(w.users, min(5, len(w.users)))
                          if u.ban_sent is None]
        u = candidates[0] if candidates and random.random() < 0.7 else w.new_user()
        s = w.new_session(u)
        body = event("session.created", {"id": s.sid, "object": "session",
                                         "user_id": u.uid, "status": "active"})
        ok, *delivery = self.deliver("session.created", body, (200, "processed"))
        if ok:
            w.add_active(s)
            with self.lock:
                self.created += 1
        return body, delivery

    def neutral(self):
        s = self.world.random_active()
        if s is not None and random.random() < 0.5:
            body = event("user.updated", {"id": s.user.uid, "object": "user",
                                          "banned": False, "locked": False})
            label = "user.updated (not banned)"
        else:
            body = event("email.created", {"id": "ema_" + secrets.token_hex(8),
                                           "object": "email"})
            label = "email.created"
        ok, *delivery = self.deliver(label, body, (200, "processed"))
        return body, delivery

    def forged(self):
        """A revocation of an active session that must have no effect."""
        s = self.world.random_active()
        sid = s.sid if s else "sess_nobody"
        body = event("session.revoked", {"id": sid, "object": "session", "status": "revoked"})
        how = random.choice(["wrong-secret", "tampered", "stale", "future", "no-headers"])
        if how == "wrong-secret":
            self.deliver("forged (wrong secret)", body, (401, "webhook-signature-invalid"),
                         key=WRONG_WEBHOOK_KEY)
        elif how == "tampered":
            # Clerk signed a revocation of some other session; the id is swapped in transit.
            signed = event("session.revoked", {"id": "sess_someone_else", "object": "session",
                                               "status": "revoked"})
            self.deliver("forged (body changed)", signed, (401, "webhook-signature-invalid"),
                         tamper=signed.replace(b"sess_someone_else", sid.encode()))
        elif how == "stale":
            self.deliver("forged (stale timestamp)", body,
                         (401, "webhook-timestamp-out-of-tolerance"), ts=int(time.time()) - 900)
        elif how == "future":
            self.deliver("forged (future timestamp)", body,
                         (401, "webhook-timestamp-out-of-tolerance"), ts=int(time.time()) + 900)
        else:
            self.deliver("forged (no svix headers)", body, (400, "webhook-headers-missing"),
                         drop_headers=True)

    def replay(self, original):
        """Svix retry or replay of an acknowledged delivery: must be a 200 duplicate."""
        if original is None:
            return
        body, (msg_id, ts, sig) = original
        if random.random() < 0.5:
            self.deliver("replay (same headers)", body, (200, "duplicate"),
                         resend_of=(msg_id, ts, sig))
        else:  # a retry: same id and body, a new attempt timestamp
            self.deliver("replay (new timestamp)", body, (200, "duplicate"), msg_id=msg_id)

    # -- schedules -----------------------------------------------------------------------

    def steady(self, stop: threading.Event, period: float):
        tick = 0
        while not stop.wait(period):
            tick += 1
            w = self.world
            s = w.random_active()
            if s is not None:
                done = self.revoke(s)
                if done is not None and tick % 4 == 0:
                    self.replay(done)
            self.create()
            if tick % 10 == 0:
                self.ban_someone("user.updated" if tick % 20 else "user.deleted")
            if tick % 5 == 0:
                self.forged()
            if tick % 7 == 0:
                self.neutral()

    def ban_someone(self, kind):
        now = time.time()
        w = self.world
        with w.lock:
            pool = random.sample(w.users, min(20, len(w.users)))
        for u in pool:
            if u.ban_sent is not None or not u.sessions:
                continue
            # Only users whose tokens all predate this second, so `iat < cut-off` is certain.
            if any(s.iat >= int(now) - 1 for s in u.sessions):
                continue
            if any(s.revoke_sent is not None or s.broken for s in u.sessions):
                continue
            if self.ban(u, kind) is not None:
                return

    def burst(self, size: int, threads: int) -> dict:
        """`size` deliveries as fast as `threads` senders go: revocations, creations, neutral
        events, forgeries, and replays of deliveries acknowledged earlier in the burst."""
        n_revoke = int(size * 0.30)
        n_create = int(size * 0.25)
        n_neutral = int(size * 0.10)
        n_forged = int(size * 0.15)
        n_replay = size - n_revoke - n_create - n_neutral - n_forged
        t0 = time.time()
        before = self.results.webhook_sent
        acked = []
        acked_lock = threading.Lock()

        def originals(kind):
            if kind == "revoke":
                s = self.world.random_active()
                r = self.revoke(s) if s is not None else None
            elif kind == "create":
                r = self.create()
            elif kind == "neutral":
                r = self.neutral()
            else:
                self.forged()
                return
            if r is not None:
                with acked_lock:
                    acked.append(r)

        jobs = (["revoke"] * n_revoke + ["create"] * n_create + ["neutral"] * n_neutral
                + ["forged"] * n_forged)
        random.shuffle(jobs)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(originals, jobs))
            with acked_lock:
                sample = random.sample(acked, min(n_replay, len(acked)))
            list(pool.map(self.replay, sample))
        return {"deliveries": self.results.webhook_sent - before,
                "seconds": round(time.time() - t0, 2)}


# --------------------------------------------------------------------------------------------
# Key rotation


class Rotator:
    def __init__(self, world: World, fake: FakeClerk, results: Results, refresh_s: float,
                 skew_s: float, n_probes: int):
        self.world = world
        self.ring = world.ring
        self.fake = fake
        self.results = results
        self.refresh_s = refresh_s
        self.skew_s = skew_s
        self.n_probes = n_probes
        self.log = []  # (t, event)
        self.timers = []

    def rotate(self):
        ring = self.ring
        with ring.lock:
            new = ring._new_key()
            ring.keys[new.kid] = new
            ring.published.append(new.kid)
        t_pub = time.time()
        self.log.append((t_pub, f"published {new.kid}"))
        # Tokens are signed with a new key only once clerkgate has fetched a JWKS holding it
        # (as an identity provider pre-publishes keys), so valid tokens never meet an unknown kid.
        seen = self.fake.wait_served(new.kid, True, t_pub, timeout=3 * self.refresh_s + 10)
        if seen is None:
            self.results.check(f"JWKS with {new.kid} fetched within {3 * self.refresh_s + 10:.0f} s",
                               False, "clerkgate never fetched the rotated JWKS")
            return
        time.sleep(1.0)
        now = time.time()
        with ring.lock:
            old = ring.signing
            ring.signing = new
        self.log.append((now, f"signing with {new.kid} (fetched {now - seen:.1f} s earlier)"))
        # Probes: long-lived tokens from the old key, used while it is published (so they sit in
        # the token cache), and after its removal, when they must be refused.
        iat = int(now)
        exp = iat + self.world.token_ttl + 120
        probes = []
        for i in range(self.n_probes):
            uid, sid = f"user_probe_{old.kid}_{i}", f"sess_probe_{old.kid}_{i}"
            tok = old.sign({"alg": "RS256", "kid": old.kid, "typ": "JWT"},
                           claims(uid, sid, iat, exp))
            probes.append((tok, uid, sid, exp, old.kid))
        with ring.lock:
            ring.probes[old.kid] = probes
        # Remove the old key once every pool token signed with it has expired.
        delay = self.world.token_ttl + self.skew_s + 5
        t = threading.Timer(delay, self.retire, args=(old.kid,))
        t.daemon = True
        t.start()
        self.timers.append(t)

    def retire(self, kid):
        ring = self.ring
        with ring.lock:
            ring.published.remove(kid)
            t_rem = time.time()
            ring.removed_at[kid] = t_rem
        self.log.append((t_rem, f"removed {kid}"))
        seen = self.fake.wait_served(kid, False, t_rem, timeout=3 * self.refresh_s + 10)
        if seen is None:
            self.results.check(f"JWKS without {kid} fetched", False, "no refresh after removal")
            return
        with ring.lock:
            ring.effective[kid] = seen + 1.0
        self.log.append((seen, f"clerkgate fetched the JWKS without {kid}"))

    def run(self, stop: threading.Event, every: float):
        while not stop.wait(every):
            try:
                self.rotate()
            except Exception as e:
                self.results.check("rotation", False, repr(e))


# --------------------------------------------------------------------------------------------
# clerkgate process, RSS, metrics


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$', line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(snapshot: dict, name: str, **labels) -> float:
    want = tuple(sorted(labels.items()))
    return snapshot.get((name, want), 0.0)


def metric_sum(snapshot: dict, name: str, **labels) -> float:
    total = 0.0
    for (n, ls), v in snapshot.items():
        if n == name and all(dict(ls).get(k) == val for k, val in labels.items()):
            total += v
    return total


def get(port, path, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def write_config(path, upstream_port, clerk_port, args):
    cfg = f"""# generated by soak/run.py
[proxy]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:{upstream_port}"

[admin]
listen = "127.0.0.1:0"

[clerk]
secret_key = "{SECRET_KEY}"
api_url = "http://127.0.0.1:{clerk_port}"
issuer = "{ISSUER}"
jwks_ttl_seconds = {args.jwks_ttl}
jwks_min_refresh_interval_seconds = {args.jwks_min_refresh}

[auth]
clock_skew_ms = {args.skew_ms}
token_cache_capacity = {args.token_cache}

[webhooks]
secret = "{WEBHOOK_SECRET}"

[sessions]
check = "webhook"
max_entries = {args.max_entries}

[local_api]
enabled = false

[log]
format = "json"
level = "info"

[shutdown]
delay_seconds = 0
drain_timeout_seconds = 5
"""
    with open(path, "w") as f:
        f.write(cfg)


def start_clerkgate(binary, config, log_path):
    log = open(log_path, "w")
    p = subprocess.Popen([binary, "serve", "--config", config], stdout=log,
                         stderr=subprocess.STDOUT, cwd=os.path.dirname(config))
    deadline = time.time() + 20
    proxy = admin = None
    while time.time() < deadline and (proxy is None or admin is None):
        if p.poll() is not None:
            raise RuntimeError(f"clerkgate exited with {p.returncode}; see {log_path}")
        with open(log_path) as f:
            for line in f:
                if "clerkgate listening" in line:
                    proxy = int(re.search(r'proxy"?\s*[:=]\s*"?Some\([\d.]+:(\d+)\)', line)
                                .group(1))
                    admin = int(re.search(r'admin"?\s*[:=]\s*"?Some\([\d.]+:(\d+)\)', line)
                                .group(1))
        time.sleep(0.1)
    if proxy is None:
        raise RuntimeError(f"clerkgate did not log its listeners; see {log_path}")
    while time.time() < deadline:
        try:
            if get(admin, "/readyz")[0] == 200:
                return p, proxy, admin
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"clerkgate never became ready; see {log_path}")


# --------------------------------------------------------------------------------------------
# Main


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def git_head():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true",
                    help="about 60 s with faster rotations and bursts, for trying it out")
    ap.add_argument("--binary", default=os.path.join(REPO, "target/release/clerkgate"))
    ap.add_argument("--rps", type=float, default=120.0, help="target proxy requests per second")
    ap.add_argument("--threads", type=int, default=8, help="traffic threads")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--sessions-per-user", type=int, default=2)
    ap.add_argument("--token-ttl", type=int, default=60, help="session token lifetime, s")
    ap.add_argument("--rotate-every", type=float, default=60.0)
    ap.add_argument("--burst-every", type=float, default=60.0)
    ap.add_argument("--burst-size", type=int, default=200)
    ap.add_argument("--webhook-period", type=float, default=1.0, help="steady webhook tick, s")
    ap.add_argument("--jwks-ttl", type=int, default=10, help="clerk.jwks_ttl_seconds")
    ap.add_argument("--jwks-min-refresh", type=int, default=5)
    ap.add_argument("--skew-ms", type=int, default=5000)
    ap.add_argument("--token-cache", type=int, default=1000, help="auth.token_cache_capacity")
    ap.add_argument("--max-entries", type=int, default=20000, help="sessions.max_entries")
    ap.add_argument("--rss-margin-mib", type=float, default=8.0)
    ap.add_argument("--p99-max-ms", type=float, default=None,
                    help="fail when the p99 of valid requests exceeds this (off by default)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--report", help="also write the Markdown summary to this file")
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        serve_upstream()
        return 0
    if args.quick:
        args.minutes = 1.0
        args.rotate_every = min(args.rotate_every, 15.0)
        args.burst_every = min(args.burst_every, 20.0)
        args.token_ttl = min(args.token_ttl, 20)
    duration = args.minutes * 60.0
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary} not found: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="clerkgate-soak-")
    print(f"work dir: {work}", flush=True)
    results = Results(os.path.join(work, "unexpected.jsonl"))
    ring = KeyRing()
    fake = FakeClerk(ring)
    up = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream"],
                          stdout=subprocess.PIPE, text=True)
    upstream_port = int(up.stdout.readline())
    config = os.path.join(work, "clerkgate.toml")
    write_config(config, upstream_port, fake.port, args)
    log_path = os.path.join(work, "clerkgate.log")
    cg = None
    try:
        cg, proxy_port, admin_port = start_clerkgate(args.binary, config, log_path)
        print(f"clerkgate pid {cg.pid}: proxy :{proxy_port}, admin :{admin_port}, "
              f"fake Clerk :{fake.port}, upstream :{upstream_port}", flush=True)
        return run(args, duration, work, results, ring, fake, up, upstream_port, cg,
                   proxy_port, admin_port, log_path)
    finally:
        if cg is not None and cg.poll() is None:
            cg.kill()
        if up.poll() is None:
            up.terminate()
        fake.server.shutdown()
        if not args.keep and not results.unexpected and all(ok for _, ok, _ in results.checks):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"evidence kept in {work}")


def run(args, duration, work, results, ring, fake, up, upstream_port, cg, proxy_port,
        admin_port, log_path):
    world = World(ring, args.token_ttl, args.users, args.sessions_per_user)
    stop = threading.Event()
    seq = iter(range(1, 10**12))
    seq_lock = threading.Lock()

    class Seq:
        def __next__(self):
            with seq_lock:
                return next(seq)

    load_start = loadavg()
    cpu_start = os.times()
    base_rss = rss_kib(cg.pid)
    m0 = parse_metrics(get(admin_port, "/metrics")[1].decode())
    rss_series = []  # (t offset s, KiB)
    t0 = time.time()

    def sample_rss():
        while True:
            v = rss_kib(cg.pid)
            if v is not None:
                rss_series.append((round(time.time() - t0), v))
            if stop.wait(5.0):
                return

    loads = []

    def sample_load():
        while not stop.wait(30.0):
            loads.append(loadavg())

    threads = [threading.Thread(target=sample_rss, daemon=True),
               threading.Thread(target=sample_load, daemon=True)]
    interval = args.threads / args.rps
    s = Seq()
    for _ in range(args.threads):
        tr = Traffic(world, results, proxy_port, stop, interval, s)
        threads.append(threading.Thread(target=tr.run, daemon=True))
    hooks = Webhooks(world, results, proxy_port, "/webhooks/clerk")
    threads.append(threading.Thread(target=hooks.steady, args=(stop, args.webhook_period),
                                    daemon=True))
    rot = Rotator(world, fake, results, refresh_s=0.9 * args.jwks_ttl,
                  skew_s=args.skew_ms / 1000.0, n_probes=20)
    threads.append(threading.Thread(target=rot.run, args=(stop, args.rotate_every),
                                    daemon=True))
    bursts = []

    def burster():
        # offset from the rotations so both are seen separately and together over the run
        first = min(args.burst_every / 2, duration / 2)
        if stop.wait(first):
            return
        while True:
            b = hooks.burst(args.burst_size, threads=8)
            b["at"] = round(time.time() - t0)
            bursts.append(b)
            print(f"  burst at {b['at']} s: {b['deliveries']} deliveries in {b['seconds']} s",
                  flush=True)
            if stop.wait(args.burst_every):
                return

    threads.append(threading.Thread(target=burster, daemon=True))
    for t in threads:
        t.start()
    print(f"driving {duration:.0f} s at ~{args.rps:.0f} req/s with {args.threads} threads "
          f"(load {load_start})", flush=True)
    next_report = t0 + 60
    while time.time() - t0 < duration:
        time.sleep(1.0)
        if cg.poll() is not None:
            results.check("clerkgate stays up", False, f"exited with {cg.returncode}")
            break
        if time.time() >= next_report:
            next_report += 60
            with results.lock:
                n = sum(sum(c.values()) for c in results.by_cat.values())
                bad = sum(results.unexpected.values())
            print(f"  {time.time() - t0:5.0f} s: {n} requests, {bad} unexpected, "
                  f"RSS {rss_series[-1][1] / 1024:.1f} MiB, load {loadavg()}", flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    for t in rot.timers:
        t.cancel()
    elapsed = time.time() - t0
    cpu_end = os.times()
    time.sleep(1.0)
    results.check("clerkgate stays up", cg.poll() is None,
                  "" if cg.poll() is None else f"exit {cg.returncode}")
    m1 = parse_metrics(get(admin_port, "/metrics")[1].decode()) if cg.poll() is None else {}
    final_rss = rss_kib(cg.pid)
    seen = json.loads(get(upstream_port, "/__soak/seen", timeout=30)[1])

    # -- checks ------------------------------------------------------------------------
    n_unexpected = sum(results.unexpected.values())
    results.check("unexpected outcomes = 0", n_unexpected == 0, f"{n_unexpected}")

    leaked = [rid for rid in results.refused_rids if rid in seen]
    results.check("no refused request reached the upstream", not leaked,
                  f"{len(leaked)} leaked, e.g. {leaked[:5]}")
    missing = [rid for rid in results.accepted_rids if rid not in seen]
    results.check("every 200 came from the upstream", not missing, f"{len(missing)} missing")
    dup = [rid for rid, v in seen.items() if v[2] != 1]
    results.check("the upstream saw each request once", not dup, f"{len(dup)} repeated")

    # RSS: skip warm-up (first 20 % or 60 s), then compare thirds.
    warm = min(60, duration * 0.2)
    steady = [v for t, v in rss_series if t >= warm]
    rss_summary = {}
    if len(steady) >= 6:
        third = len(steady) // 3
        first_max, last_max = max(steady[:third]), max(steady[-third:])
        margin = args.rss_margin_mib * 1024 + 0.10 * first_max
        rss_summary = {"first_third_max": first_max, "last_third_max": last_max,
                       "margin": margin}
        results.check("RSS plateaus (last-third max <= first-third max + 10 % + margin)",
                      last_max <= first_max + margin,
                      f"{first_max / 1024:.1f} -> {last_max / 1024:.1f} MiB "
                      f"(allowed {(first_max + margin) / 1024:.1f})")
    else:
        results.check("RSS plateaus", False, "too few samples")
    # A bound from the configured caches: generous per-entry sizes over the idle RSS.
    bound = (base_rss + args.token_cache * 8 + 4 * args.max_entries * 1 + 64 * 1024)
    max_rss = max(v for _, v in rss_series)
    results.check("RSS below the cache-derived bound", max_rss <= bound,
                  f"max {max_rss / 1024:.1f} MiB, bound {bound / 1024:.1f} MiB "
                  f"(idle {base_rss / 1024:.1f} + token cache {args.token_cache} x 8 KiB "
                  f"+ 4 maps x {args.max_entries} x 1 KiB + 64 MiB)")

    # /metrics cross-check (deltas over the run).
    def delta(name, **labels):
        return int(metric(m1, name, **labels) - metric(m0, name, **labels))

    def delta_sum(name, **labels):
        return int(metric_sum(m1, name, **labels) - metric_sum(m0, name, **labels))

    reasons = collections.Counter()
    for (status, reason), n in results.status_reason.items():
        if status == 401:
            reasons[reason] += n
    all_reasons = {dict(ls)["reason"] for (n, ls) in m1 if n == "clerkgate_auth_failures_total"}
    mismatched = {r: (delta("clerkgate_auth_failures_total", reason=r), reasons.get(r, 0))
                  for r in all_reasons | set(reasons)
                  if delta("clerkgate_auth_failures_total", reason=r) != reasons.get(r, 0)}
    results.check("clerkgate_auth_failures_total matches the driver's 401s by reason",
                  not mismatched, f"metric vs driver: {mismatched}" if mismatched else
                  f"{sum(reasons.values())} refusals over {len(reasons)} reasons")
    n200 = sum(n for (st, _), n in results.status_reason.items() if st == 200)
    n401 = sum(n for (st, _), n in results.status_reason.items() if st == 401)
    fw = delta("clerkgate_requests_total", outcome="forwarded")
    un = delta("clerkgate_requests_total", outcome="unauthorized")
    wh = delta("clerkgate_requests_total", outcome="webhook")
    results.check("requests_total{forwarded} = driver 200s = upstream requests",
                  fw == n200 == len(seen), f"{fw} / {n200} / {len(seen)}")
    results.check("requests_total{unauthorized} = driver 401s", un == n401, f"{un} / {n401}")
    results.check("requests_total{webhook} = webhooks sent", wh == results.webhook_sent,
                  f"{wh} / {results.webhook_sent}")
    hits = delta("clerkgate_token_cache_hits_total")
    misses = delta("clerkgate_token_cache_misses_total")
    results.check("token cache hits + misses = requests carrying a token",
                  hits + misses == results.token_requests,
                  f"{hits} + {misses} vs {results.token_requests}")
    wh_processed = delta_sum("clerkgate_webhook_events_total", result="processed")
    wh_dup = delta_sum("clerkgate_webhook_events_total", result="duplicate")
    wh_badsig = delta_sum("clerkgate_webhook_events_total", result="bad_signature")
    wh_stale = delta_sum("clerkgate_webhook_events_total", result="stale")
    wh_malformed = delta_sum("clerkgate_webhook_events_total", result="malformed")

    def driver_wh(pred):
        return sum(n for k, n in results.webhooks.items() if pred(k))

    d_processed = driver_wh(lambda k: k.endswith(" 200 processed"))
    d_dup = driver_wh(lambda k: k.endswith(" 200 duplicate"))
    d_badsig = driver_wh(lambda k: "webhook-signature-invalid" in k)
    d_stale = driver_wh(lambda k: "out-of-tolerance" in k)
    d_malformed = driver_wh(lambda k: "webhook-headers-missing" in k)
    results.check("webhook_events_total matches the driver (processed/duplicate/bad "
                  "signature/stale/malformed)",
                  (wh_processed, wh_dup, wh_badsig, wh_stale, wh_malformed)
                  == (d_processed, d_dup, d_badsig, d_stale, d_malformed),
                  f"metrics {(wh_processed, wh_dup, wh_badsig, wh_stale, wh_malformed)} vs "
                  f"driver {(d_processed, d_dup, d_badsig, d_stale, d_malformed)}")
    revoked_gauge = int(metric(m1, "clerkgate_revoked_sessions"))
    results.check("clerkgate_revoked_sessions = sessions revoked",
                  revoked_gauge == hooks.revocations or hooks.revocations > args.max_entries,
                  f"{revoked_gauge} / {hooks.revocations}")
    fetch_ok = delta("clerkgate_jwks_fetches_total", result="ok")
    with fake.lock:
        served = len([f for f in fake.fetches if f[0] >= t0])
        unauthorized = fake.unauthorized
        odd_calls = list(fake.unexpected_calls)
    results.check("jwks_fetches_total{ok} = JWKS responses served", abs(fetch_ok - served) <= 1,
                  f"{fetch_ok} / {served}")
    max_fetches = elapsed / (0.9 * args.jwks_ttl) + elapsed / args.jwks_min_refresh + 5
    results.check("JWKS fetches bounded despite forged kids", served <= max_fetches,
                  f"{served} fetches in {elapsed:.0f} s (bound {max_fetches:.0f})")
    results.check("fake Clerk: bearer always right, no other endpoint called",
                  unauthorized == 0 and not odd_calls, f"{unauthorized} 401s, {odd_calls[:5]}")
    lat = sorted(results.latency_valid)
    p50, p90, p99 = (percentile(lat, q) for q in (0.50, 0.90, 0.99))
    if args.p99_max_ms is not None:
        results.check(f"p99 of valid requests <= {args.p99_max_ms} ms", p99 <= args.p99_max_ms,
                      f"{p99:.1f} ms")

    # Shutdown: SIGTERM, clean exit, no panic in the log.
    exit_code = None
    if cg.poll() is None:
        cg.send_signal(signal.SIGTERM)
        try:
            exit_code = cg.wait(timeout=30)
        except subprocess.TimeoutExpired:
            exit_code = "timeout"
    else:
        exit_code = cg.returncode
    results.check("clerkgate exits 0 on SIGTERM", exit_code == 0, f"{exit_code}")
    with open(log_path) as f:
        log_text = f.read()
    panics = log_text.count("panicked")
    errors = len(re.findall(r'"level":"ERROR"', log_text))
    results.check("no panic or ERROR in clerkgate's log", panics == 0 and errors == 0,
                  f"{panics} panics, {errors} errors")

    # -- report --------------------------------------------------------------------------
    def hist_q(q):
        buckets = sorted((float(dict(ls)["le"]), m1.get((n, ls), 0) - m0.get((n, ls), 0))
                         for (n, ls) in m1 if n == "clerkgate_request_duration_seconds_bucket")
        if not buckets or buckets[-1][1] == 0:
            return "?"
        for le, count in buckets:
            if count >= q * buckets[-1][1]:
                return f"{le * 1000:g} ms" if le != float("inf") else "inf"
        return "?"

    cpu_used = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    total = sum(sum(c.values()) for c in results.by_cat.values())
    out = []
    w = out.append
    w(f"## clerkgate soak: {elapsed / 60:.1f} min, {total} proxied requests "
      f"({total / elapsed:.0f}/s), {results.webhook_sent} webhooks\n")
    w(f"Binary: {args.binary} (built {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(args.binary)))}), "
      f"repo HEAD {git_head()}.\n")
    w(f"Machine: {os.cpu_count()} cores, load average at start {load_start}, during "
      f"{', '.join(loads) or '-'}; driver CPU {cpu_used:.0f} s. "
      f"Config: token TTL {args.token_ttl} s, rotation every {args.rotate_every:.0f} s, "
      f"burst of {args.burst_size} every {args.burst_every:.0f} s, JWKS TTL {args.jwks_ttl} s, "
      f"token cache {args.token_cache}, sessions.max_entries {args.max_entries}.\n")
    w("### Checks\n")
    w("| check | result | detail |\n| --- | --- | --- |")
    for name, ok, detail in results.checks:
        w(f"| {name} | {'PASS' if ok else '**FAIL**'} | {detail} |")
    w("\n### Proxied requests by category and outcome\n")
    w("| category | outcome | count |\n| --- | --- | ---: |")
    for cat in sorted(results.by_cat):
        for outcome, n in sorted(results.by_cat[cat].items(), key=lambda kv: -kv[1]):
            w(f"| {cat} | {outcome} | {n} |")
    w("\n### Webhook deliveries\n")
    w("| delivery: answer | count |\n| --- | ---: |")
    for k, n in sorted(results.webhooks.items(), key=lambda kv: -kv[1]):
        w(f"| {k} | {n} |")
    w(f"\nRevocations {hooks.revocations}, user bans/deletions {hooks.bans}, sessions created "
      f"{hooks.created}. Bursts: "
      + (", ".join(f"{b['deliveries']} in {b['seconds']} s at {b['at']} s" for b in bursts)
         or "none"))
    w(f"\nKeep-alive connections found closed by the server and reopened (the request was "
      f"resent once, only when no answer had arrived): {dict(RECONNECTS) or 0}.")
    w("\n### Latency of valid requests (client round trip through clerkgate and the Python "
      "upstream)\n")
    w(f"n = {len(lat)}, p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms, "
      f"max {lat[-1] if lat else float('nan'):.1f} ms")
    w(f"\nclerkgate's own view (clerkgate_request_duration_seconds, every request incl. "
      f"refusals and webhooks, bucket upper bounds): p50 <= {hist_q(0.50)}, "
      f"p99 <= {hist_q(0.99)}.")
    w("\n### RSS of clerkgate (VmRSS, sampled every 5 s)\n")
    w(f"idle before traffic {base_rss / 1024:.1f} MiB, max {max_rss / 1024:.1f} MiB, final "
      f"{(final_rss or 0) / 1024:.1f} MiB"
      + (f"; after warm-up: first-third max {rss_summary['first_third_max'] / 1024:.1f} MiB, "
         f"last-third max {rss_summary['last_third_max'] / 1024:.1f} MiB" if rss_summary else ""))
    w("\n```")
    w("t(s)  " + " ".join(f"{t:>5}" for t, _ in rss_series[::max(1, len(rss_series) // 24)]))
    w("MiB   " + " ".join(f"{v / 1024:5.1f}" for _, v in
                          rss_series[::max(1, len(rss_series) // 24)]))
    w("```")
    w("\n### Key rotations\n")
    for t, what in sorted(rot.log):
        w(f"- {t - t0:6.1f} s: {what}")
    w("\n### clerkgate /metrics deltas\n")
    w("| metric | delta |\n| --- | ---: |")
    for key in sorted(set(m1) | set(m0)):
        name, ls = key
        if name.endswith("_bucket") or name.startswith("clerkgate_request_duration"):
            continue
        d = m1.get(key, 0) - m0.get(key, 0)
        if d:
            lab = ",".join(f'{k}="{v}"' for k, v in ls)
            w(f"| {name}{{{lab}}} | {d:g} |")
    w(f"\nGauges at the end: revoked_sessions {revoked_gauge}, jwks_keys "
      f"{metric(m1, 'clerkgate_jwks_keys'):g}.")
    if results.unexpected:
        w("\n### Unexpected outcomes\n")
        for k, n in results.unexpected.most_common():
            w(f"- {n} x {k}")
        w(f"\nEvidence (every unexpected request, with token and timings): "
          f"{os.path.join(work, 'unexpected.jsonl')}; clerkgate log: {log_path}")
    failed = [name for name, ok, _ in results.checks if not ok]
    w(f"\n**{'PASS' if not failed else 'FAIL'}**" + (f": {', '.join(failed)}" if failed else ""))
    report = "\n".join(out)
    print("\n" + report)
    for path in filter(None, [os.path.join(work, "report.md"), args.report]):
        with open(path, "w") as f:
            f.write(report + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
