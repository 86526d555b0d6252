#!/usr/bin/env python3
"""Regression check: revocations past `sessions.max_entries` keep the newest ones.

Found by the soak (`soak/run.py --quick --max-entries 100`): under moka's default TinyLFU
admission a full deny-list refused each new revocation, so the newest revocations (acknowledged
with 200 "processed") were not enforced. Fixed in f8bd710 (LRU eviction). This starts the binary
with `sessions.max_entries = 20`, revokes 60 sessions one by one through signed
`session.revoked` webhooks (each answered 200 "processed"), then sends one fresh, validly
signed token per revoked session. A bounded deny-list cannot hold all 60: the newest 20 must
all be 401 session-revoked, and only the oldest may have been let go. Exits 1 otherwise.

    python3 soak/deny_overflow.py [--max-entries 20] [--revocations 60] [--binary PATH]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the repo
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as soak  # noqa: E402  (the soak driver: keys, fake Clerk, upstream, webhooks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-entries", type=int, default=20)
    ap.add_argument("--revocations", type=int, default=60)
    ap.add_argument("--binary", default=os.path.join(soak.REPO, "target/release/clerkgate"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="clerkgate-deny-overflow-")
    ring = soak.KeyRing()
    fake = soak.FakeClerk(ring)
    up = subprocess.Popen([sys.executable, soak.__file__, "--serve-upstream"],
                          stdout=subprocess.PIPE, text=True)
    upstream_port = int(up.stdout.readline())
    cfg_args = argparse.Namespace(jwks_ttl=3600, jwks_min_refresh=30, skew_ms=5000,
                                  token_cache=1000, max_entries=args.max_entries)
    config = os.path.join(work, "clerkgate.toml")
    soak.write_config(config, upstream_port, fake.port, cfg_args)
    log = os.path.join(work, "clerkgate.log")
    cg = None
    forwarded = [None]  # kept unless the run completes clean
    try:
        cg, proxy, admin = soak.start_clerkgate(args.binary, config, log)
        results = soak.Results(os.path.join(work, "unexpected.jsonl"))
        world = soak.World(ring, 60, 0, 0)
        hooks = soak.Webhooks(world, results, proxy, "/webhooks/clerk")
        sessions = []
        for i in range(args.revocations):
            s = world.new_session(world.new_user())
            world.add_active(s)
            if hooks.revoke(s) is None or s.revoke_ack is None:
                print(f"revocation {i} was not acknowledged: {results.webhooks}")
                return 2
            sessions.append(s)
        time.sleep(1.0)
        conn = soak.Conn(proxy)
        forwarded = []
        for i, s in enumerate(sessions):
            tok = world.mint(s, time.time())[0]
            status, body = conn.request("GET", f"/after-revocation/{i}",
                                        {"Authorization": f"Bearer {tok}"})
            if status != 401:
                forwarded.append((i, s.sid, status, body.decode()[:120], tok))
        metrics = soak.parse_metrics(soak.get(admin, "/metrics")[1].decode())
        gauge = soak.metric(metrics, "clerkgate_revoked_sessions")
        print(f"sessions.max_entries = {args.max_entries}; {len(sessions)} revocations, each "
              f"answered 200 processed; clerkgate_revoked_sessions = {gauge:g}")
        held = min(args.max_entries, len(sessions))
        cutoff = len(sessions) - held
        wrong = [f for f in forwarded if f[0] >= cutoff]
        let_go = [f for f in forwarded if f[0] < cutoff]
        print(f"{len(let_go)} of the {cutoff} oldest revocations were let go by the bound "
              f"(allowed); {len(wrong)} of the newest {held} were forwarded (must be 0):")
        for i, sid, status, body, tok in wrong:
            print(f"  revocation #{i} {sid}: {status} {body}")
        if wrong:
            i, sid, status, body, tok = wrong[-1]
            print(f"\nexample request: GET /after-revocation/{i} with "
                  f"Authorization: Bearer {tok}")
            print(f"evidence kept in {work}")
        forwarded = wrong
        return 1 if wrong else 0
    finally:
        if cg is not None and cg.poll() is None:
            cg.terminate()
            cg.wait(timeout=30)
        up.terminate()
        fake.server.shutdown()
        if not forwarded:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
