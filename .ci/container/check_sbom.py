#!/usr/bin/env python3
"""Checks the CycloneDX SBOM that `cargo cyclonedx` wrote against Cargo.lock and the resolved graph.

    check_sbom.py SBOM_JSON CARGO_LOCK TARGET_TRIPLE

The SBOM must describe the clerkgate binary (metadata.component), and its components must be
exactly the crates compiled into it: the closure of clerkgate's normal (not dev, not build)
dependencies on TARGET_TRIPLE, from `cargo metadata --locked --offline`. Each component needs
a pkg:cargo purl with its version, a license expression, and the SHA-256 that Cargo.lock
records for it; the dependency graph must name only known components.
"""
import json
import subprocess
import sys
import tomllib

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
    seen, todo = set(), [root]
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]) and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    return {(pkgs[i]["name"], pkgs[i]["version"]) for i in seen}


def main():
    sbom_path, lock_path, triple = sys.argv[1:4]
    with open(sbom_path) as f:
        bom = json.load(f)
    with open(lock_path, "rb") as f:
        lock = tomllib.load(f)
    checksums = {(p["name"], p["version"]): p.get("checksum") for p in lock["package"]}

    check(bom.get("bomFormat") == "CycloneDX", "bomFormat must be CycloneDX")
    check(bom.get("specVersion") == "1.5", f"specVersion {bom.get('specVersion')!r}, expected 1.5")
    top = bom.get("metadata", {}).get("component", {})
    check(top.get("name") == "clerkgate" and top.get("type") == "application",
          f"metadata.component must be the clerkgate application, got {top.get('name')!r}/{top.get('type')!r}")
    check(top.get("licenses") == [{"expression": "Apache-2.0"}], "clerkgate's own license must be Apache-2.0")

    components = bom.get("components", [])
    listed = {}
    for c in components:
        nv = (c.get("name"), c.get("version"))
        check(nv not in listed, f"{nv} listed twice")
        listed[nv] = c
        check(c.get("purl", "").startswith(f"pkg:cargo/{nv[0]}@{nv[1]}"), f"{nv}: purl {c.get('purl')!r}")
        check(bool(c.get("licenses")), f"{nv}: no license")
        if check(nv in checksums, f"{nv}: not in Cargo.lock"):
            sha = [h["content"] for h in c.get("hashes", []) if h.get("alg") == "SHA-256"]
            check(sha == [checksums[nv]], f"{nv}: SHA-256 {sha} differs from Cargo.lock's {checksums[nv]}")

    expected = runtime_closure(triple)
    missing = sorted(expected - set(listed))
    extra = sorted(set(listed) - expected)
    check(not missing, f"crates compiled into the binary but missing from the SBOM: {missing}")
    check(not extra, f"SBOM components that are not runtime dependencies: {extra}")
    for dev_only in ("criterion", "proptest", "rcgen"):
        check(not any(n == dev_only for n, _ in listed), f"dev-dependency {dev_only} is in the SBOM")

    refs = {c.get("bom-ref") for c in components} | {top.get("bom-ref")}
    for d in bom.get("dependencies", []):
        check(d.get("ref") in refs, f"dependency entry for unknown ref {d.get('ref')}")
        for r in d.get("dependsOn", []):
            check(r in refs, f"{d.get('ref')} depends on unknown ref {r}")

    if problems:
        for p in problems:
            print(f"FAIL: sbom: {p}", file=sys.stderr)
        sys.exit(1)
    print(f"sbom: {len(components)} components = the {len(expected)} crates compiled into clerkgate for {triple}, "
          "each with purl, license and Cargo.lock's SHA-256")


if __name__ == "__main__":
    main()
