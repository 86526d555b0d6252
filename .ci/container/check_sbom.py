#!/usr/bin/env python3
"""Checks the dependency list that `cargo auditable` embedded in a clerkgate binary.

    check_sbom.py BINARY CARGO_LOCK TARGET_TRIPLE

cargo auditable stores the build's dependency tree as zlib-compressed JSON in the ELF section
`.dep-v0`, where image scanners (Trivy, Grype, Syft, `cargo audit bin`) read it. The section is
extracted with objcopy and must list:
  - the root package clerkgate at Cargo.toml's version;
  - as runtime dependencies every crate compiled into the binary: the closure of clerkgate's
    normal dependencies on TARGET_TRIPLE from `cargo metadata --locked --offline`, proc-macros
    and what only they use excluded (those run in the compiler; cargo auditable lists some of
    them as runtime too, which is allowed), and nothing else;
  - only crates.io packages at the versions Cargo.lock pins, dependency indices in range.
"""
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import zlib

problems = []


def check(ok, message):
    if not ok:
        problems.append(message)
    return ok


def runtime_closure(triple):
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform", triple],
        check=True, capture_output=True, text=True,
    ).stdout
    meta = json.loads(out)
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == "clerkgate" and p["source"] is None)

    def proc_macro(pid):
        return any("proc-macro" in t["kind"] for t in pkgs[pid]["targets"])

    def closure(skip_proc_macros):
        seen, todo = set(), [root]
        while todo:
            for dep in nodes[todo.pop()]["deps"]:
                pid = dep["pkg"]
                if any(k["kind"] is None for k in dep["dep_kinds"]) and pid not in seen:
                    if not (skip_proc_macros and proc_macro(pid)):
                        seen.add(pid)
                        todo.append(pid)
        return {(pkgs[i]["name"], pkgs[i]["version"]) for i in seen}

    compiled_in = closure(True)
    return compiled_in, closure(False) - compiled_in, pkgs[root]["version"]


def embedded(binary):
    with tempfile.TemporaryDirectory() as tmp:
        section = os.path.join(tmp, "dep-v0")
        r = subprocess.run(["objcopy", "--dump-section", f".dep-v0={section}", binary, os.path.join(tmp, "copy")],
                           capture_output=True, text=True)
        if not check(r.returncode == 0 and os.path.exists(section),
                     f"{binary} has no .dep-v0 section (not built with `cargo auditable build`?) {r.stderr.strip()}"):
            return None
        with open(section, "rb") as f:
            return json.loads(zlib.decompress(f.read()))


def main():
    binary, lock_path, triple = sys.argv[1:4]
    with open(lock_path, "rb") as f:
        locked = {(p["name"], p["version"]) for p in tomllib.load(f)["package"]}
    data = embedded(binary)
    if data is not None:
        packages = data.get("packages", [])
        roots = [p for p in packages if p.get("root")]
        expected, proc_macros, version = runtime_closure(triple)
        check(len(roots) == 1 and (roots[0]["name"], roots[0]["version"]) == ("clerkgate", version),
              f"root package must be clerkgate {version}, got {roots}")
        runtime = {(p["name"], p["version"]) for p in packages if not p.get("root") and p.get("kind", "runtime") == "runtime"}
        build = {(p["name"], p["version"]) for p in packages if p.get("kind") == "build"}
        missing = sorted(expected - runtime)
        check(not missing, f"compiled into the binary but not listed as runtime dependencies: {missing}")
        # cargo auditable also lists some proc-macros as runtime; nothing outside the lock file.
        check(runtime <= expected | proc_macros, f"runtime dependencies that are not in the build: "
              f"{sorted(runtime - expected - proc_macros)}")
        for p in packages:
            nv = (p["name"], p["version"])
            if p.get("root"):
                continue
            check(nv in locked, f"{nv} is not in Cargo.lock")
            check(p.get("source") == "crates.io", f"{nv}: source {p.get('source')!r}, expected crates.io")
            check(all(0 <= i < len(packages) for i in p.get("dependencies", [])), f"{nv}: dependency index out of range")
        for dev_only in ("criterion", "proptest", "rcgen"):
            check(not any(n == dev_only for n, _ in runtime | build), f"dev-dependency {dev_only} is embedded")
    if problems:
        for p in problems:
            print(f"FAIL: embedded dependency list: {p}", file=sys.stderr)
        sys.exit(1)
    print(f"cargo auditable: {binary} lists {len(runtime)} runtime dependencies (every one of the {len(expected)} crates "
          f"compiled in for {triple}) and {len(build)} build-time ones, all crates.io at Cargo.lock's versions")


if __name__ == "__main__":
    main()
