#!/usr/bin/env python3
"""Offline checks of the field-kit manifests (issue 17), called by .ci/deploy-test.

    check_fieldkit.py RENDERED_DIR OUT_DIR
        RENDERED_DIR holds `kubectl kustomize` output named as .ci/deploy-test names it. Checks:
          - the clerkgate-sidecar and clerkgate-native-sidecar components on the example
            third-party app (overlays/sidecar-component, overlays/sidecar-component-native):
            every labelled Deployment/StatefulSet got the clerkgate container (classic or
            native form) with its ports, probes, security context, resources, Secret and
            ConfigMap; the app containers are unchanged; every labelled Service targets
            clerkgate; every unlabelled object is byte for byte as in the app's own rendering;
            the NetworkPolicy admits clerkgate's ports only; the PodMonitor finds the pods;
          - the two components' container definitions agree;
          - deploy/kubernetes/forward-auth: Deployment, Service, HPA, PDB, NetworkPolicy wiring;
          - every alert's runbook_url names its own section of docs/runbook.md, and back.
        Writes OUT_DIR/<workload>.toml and OUT_DIR/<workload>.env (the clerkgate container's
        literal environment) for every clerkgate container found, for `clerkgate check-config`.

Exits 1 with one line per problem. Needs PyYAML.
"""
import copy
import json
import os
import re
import sys
import tomllib

import yaml

problems = []
checks = 0

COMPONENT_LABEL = ("clerkgate/inject", "true")
POD_LABEL = ("clerkgate/sidecar", "injected")
IMAGE = "registry.example.com/clerkgate:0.1.0"
CLERKGATE_PORTS = {8080, 9090, 9091}  # proxy, admin, local API (loopback)


def check(ok, message):
    global checks
    checks += 1
    if not ok:
        problems.append(message)
    return ok


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


def labelled(doc):
    return doc["metadata"].get("labels", {}).get(COMPONENT_LABEL[0]) == COMPONENT_LABEL[1]


def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def port_number(container, ref):
    for p in container.get("ports", []):
        if ref in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def pod_ports(spec):
    out = {}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for p in c.get("ports", []):
            out.setdefault(p.get("name"), []).append(p["containerPort"])
    return out


def config_of(label, docs, spec, cg):
    """The TOML text the container reads, and its literal env."""
    env = {e["name"]: e.get("value") for e in cg.get("env", []) if "value" in e}
    path = env.get("CLERKGATE_CONFIG", "")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in cg.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        cm_name = volumes.get(m["name"], {}).get("configMap", {}).get("name")
        if cm_name and path.startswith(mount + "/"):
            check(m.get("readOnly") is True, f"{label}: the config mount must be readOnly")
            cms = [d for d in docs if key(d) == ("ConfigMap", cm_name)]
            if check(len(cms) == 1, f"{label}: ConfigMap {cm_name} is mounted but not rendered"):
                text = cms[0].get("data", {}).get(path[len(mount) + 1:])
                if check(text is not None, f"{label}: ConfigMap {cm_name} has no key for {path}"):
                    return text, env
    check(False, f"{label}: CLERKGATE_CONFIG={path!r} is not a file of a mounted ConfigMap")
    return None, env


def check_clerkgate_container(label, cg, http_port_name, admin_port_name):
    check(cg.get("image") == IMAGE, f"{label}: clerkgate image {cg.get('image')!r}, expected {IMAGE} (images:)")
    check(cg.get("args") == ["serve"], f"{label}: clerkgate args must be [serve]")
    check(port_number(cg, http_port_name) == 8080, f"{label}: port {http_port_name} must be 8080")
    check(port_number(cg, admin_port_name) == 9090, f"{label}: port {admin_port_name} must be 9090")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = cg.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") in (admin_port_name, 9090),
              f"{label}: clerkgate {probe} must GET {path} on the admin port, got {get}")
    sc = cg.get("securityContext", {})
    for k, v in (("allowPrivilegeEscalation", False), ("readOnlyRootFilesystem", True), ("privileged", False)):
        check(sc.get(k) is v, f"{label}: clerkgate securityContext.{k} must be {v}")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: clerkgate must drop ALL capabilities")
    res = cg.get("resources", {})
    check({"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}),
          f"{label}: clerkgate needs CPU and memory requests and a memory limit")
    refs = [e["secretRef"]["name"] for e in cg.get("envFrom", []) if "secretRef" in e]
    check(refs == ["clerkgate-clerk"], f"{label}: clerkgate envFrom must be the Secret clerkgate-clerk, got {refs}")


def check_injected(name, docs, original, native, out_dir, pod_monitors):
    by_key = {key(d): d for d in docs}
    orig_by_key = {key(d): d for d in original}

    # Unlabelled objects: untouched, byte for byte.
    unlabelled = [d for d in original if not labelled(d)]
    check(any(d["kind"] == "Deployment" for d in unlabelled), f"{name}: the example needs an unlabelled Deployment")
    for d in unlabelled:
        check(by_key.get(key(d)) == d, f"{name}: unlabelled {key(d)} was changed by the component")

    workloads = [d for d in original if d["kind"] in ("Deployment", "StatefulSet") and labelled(d)]
    check({d["kind"] for d in workloads} == {"Deployment", "StatefulSet"},
          f"{name}: the example needs a labelled Deployment and a labelled StatefulSet")
    injected_pods = []
    for orig in workloads:
        label = f"{name}/{orig['kind']}/{orig['metadata']['name']}"
        dep = by_key.get(key(orig))
        if not check(dep is not None, f"{label}: missing from the rendering"):
            continue
        spec = dep["spec"]["template"]["spec"]
        ospec = orig["spec"]["template"]["spec"]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        injected_pods.append(pod_labels)
        check(pod_labels.get(POD_LABEL[0]) == POD_LABEL[1], f"{label}: pod label {POD_LABEL[0]}={POD_LABEL[1]} missing")
        check(selector_matches(dep["spec"]["selector"]["matchLabels"], pod_labels),
              f"{label}: the selector no longer matches the pod labels")
        check(spec.get("enableServiceLinks") is False, f"{label}: enableServiceLinks must be false")

        containers = {c["name"]: c for c in spec.get("containers", [])}
        inits = {c["name"]: c for c in spec.get("initContainers", [])}
        if native:
            cg = inits.get("clerkgate")
            check(cg is not None and "clerkgate" not in containers, f"{label}: clerkgate must be an init container")
            if cg is None:
                continue
            check(cg.get("restartPolicy") == "Always", f"{label}: the native sidecar needs restartPolicy: Always")
        else:
            cg = containers.get("clerkgate")
            check(cg is not None and "clerkgate" not in inits, f"{label}: clerkgate must be a regular container")
            if cg is None:
                continue
            check("restartPolicy" not in cg, f"{label}: a classic sidecar has no restartPolicy")
        check_clerkgate_container(label, cg, "clerkgate-http", "clerkgate-admin")

        # The app's containers are the original ones, apart from the example's preStop hook.
        apps = [c for c in spec.get("containers", []) if c["name"] != "clerkgate"]
        check([c["name"] for c in apps] == [c["name"] for c in ospec["containers"]],
              f"{label}: the app containers changed")
        for app, oapp in zip(apps, ospec["containers"]):
            a = copy.deepcopy(app)
            a.pop("lifecycle", None)
            check(a == oapp, f"{label}/{app['name']}: the app container was changed beyond a preStop hook")
            clash = {p["containerPort"] for p in app.get("ports", [])} & CLERKGATE_PORTS
            check(not clash, f"{label}/{app['name']}: app port(s) {clash} clash with clerkgate's")
        names = pod_ports(spec)
        dupes = [n for n, ports in names.items() if n and len(ports) > 1]
        check(not dupes, f"{label}: duplicate port names in the pod: {dupes}")

        # Configuration: upstream is one of the app's ports on loopback; drain fits the grace period.
        text, env = config_of(label, docs, spec, cg)
        if text is None:
            continue
        cfg = tomllib.loads(text)
        upstream = env.get("CLERKGATE_PROXY__UPSTREAM") or cfg.get("proxy", {}).get("upstream", "")
        m = re.match(r"^http://(127\.0\.0\.1|localhost|\[::1\]):(\d+)/?$", upstream)
        app_ports = {p["containerPort"] for c in apps for p in c.get("ports", [])}
        check(m is not None and int(m.group(2)) in app_ports,
              f"{label}: proxy.upstream {upstream!r} must be the app's port on loopback (app ports {app_ports})")
        check(cfg.get("proxy", {}).get("listen", "").endswith(":8080"), f"{label}: proxy.listen must be on 8080")
        check(cfg.get("admin", {}).get("listen", "").endswith(":9090"), f"{label}: admin.listen must be on 9090")
        delay = int(env.get("CLERKGATE_SHUTDOWN__DELAY_SECONDS") or cfg.get("shutdown", {}).get("delay_seconds", 5))
        drain = int(cfg.get("shutdown", {}).get("drain_timeout_seconds", 20))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        check(grace > delay + drain, f"{label}: grace period {grace} must exceed delay {delay} + drain {drain}")
        if native:
            check(delay == 0, f"{label}: the native sidecar stops after the app; its readiness delay should be 0")
        else:
            for app in apps:
                hook = app.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                check(hook >= delay, f"{label}/{app['name']}: preStop sleep {hook} must cover clerkgate's delay {delay}")
        base = f"{name}-{orig['kind'].lower()}-{orig['metadata']['name']}"
        with open(os.path.join(out_dir, base + ".toml"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, base + ".env"), "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in env.items() if k != "CLERKGATE_CONFIG"))

    # Services: every labelled one reaches clerkgate on every port, selects injected pods only.
    services = [d for d in original if d["kind"] == "Service" and labelled(d)]
    check(len(services) >= 2, f"{name}: the example needs labelled Services")
    for osvc in services:
        label = f"{name}/Service/{osvc['metadata']['name']}"
        svc = by_key.get(key(osvc))
        check(svc["spec"].get("clusterIP") != "None", f"{label}: a headless Service bypasses clerkgate's port")
        targets = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and selector_matches(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        if check(len(targets) == 1 and labelled(targets[0]), f"{label}: must select exactly one labelled workload"):
            tspec = targets[0]["spec"]["template"]["spec"]
            cg = next((c for c in tspec.get("containers", []) + tspec.get("initContainers", [])
                       if c["name"] == "clerkgate"), None)
            for p in svc["spec"]["ports"]:
                check(cg is not None and port_number(cg, p["targetPort"]) == 8080,
                      f"{label}: port {p['port']} targets {p['targetPort']!r}, not clerkgate's proxy port")

    # NetworkPolicy: selects every injected pod and no other; admits clerkgate's ports only.
    nps = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if check(len(nps) == 1, f"{name}: one NetworkPolicy expected, got {len(nps)}"):
        np = nps[0]["spec"]
        for labels in injected_pods:
            check(selector_matches(np["podSelector"]["matchLabels"], labels), f"{name}: NetworkPolicy misses a pod")
        for d in unlabelled:
            if d["kind"] in ("Deployment", "StatefulSet"):
                check(not selector_matches(np["podSelector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]),
                      f"{name}: NetworkPolicy selects the unlabelled {key(d)}")
        rules = np.get("ingress", [])
        ports = {p.get("port") for r in rules for p in r.get("ports", [])}
        check(ports == {8080, 9090} and all(r.get("ports") for r in rules),
              f"{name}: NetworkPolicy ingress must admit exactly 8080 and 9090, got {ports}")
        check("Ingress" in np.get("policyTypes", []), f"{name}: NetworkPolicy must restrict Ingress")

    # PodMonitor for the injected pods (deploy/monitoring).
    found = [pm for pm in pod_monitors
             if all(selector_matches(pm["spec"]["selector"].get("matchLabels"), l) for l in injected_pods)
             and any(ep.get("port") == "clerkgate-admin" for ep in pm["spec"]["podMetricsEndpoints"])]
    check(len(found) == 1, f"{name}: exactly one PodMonitor must scrape port clerkgate-admin of the injected pods")
    check(not [pm for pm in pod_monitors if pm not in found
               and any(selector_matches(pm["spec"]["selector"].get("matchLabels"), l) for l in injected_pods)],
          f"{name}: another PodMonitor also selects the injected pods (an app port named like it would be scraped)")


def check_components_agree(root):
    classic = load(os.path.join(root, "deploy/kubernetes/components/clerkgate-sidecar/container.yaml"))[0]
    native = load(os.path.join(root, "deploy/kubernetes/components/clerkgate-native-sidecar/container.yaml"))[0]
    c = classic["spec"]["template"]["spec"]["containers"][0]
    n = copy.deepcopy(native["spec"]["template"]["spec"]["initContainers"][0])
    check(n.pop("restartPolicy", None) == "Always", "native component: restartPolicy Always")
    n["env"] = [e for e in n["env"] if e["name"] != "CLERKGATE_SHUTDOWN__DELAY_SECONDS"]
    check(c == n, "components: the classic and native clerkgate containers differ beyond restartPolicy and the delay")


def check_forward_auth(docs, out_dir, pod_monitors):
    label = "forward-auth"
    deps = [d for d in docs if d["kind"] == "Deployment"]
    if not check(len(deps) == 1, f"{label}: one Deployment expected"):
        return
    dep = deps[0]
    spec = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    check(selector_matches(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{label}: selector vs pod labels")
    check([c["name"] for c in spec["containers"]] == ["clerkgate"] and not spec.get("initContainers"),
          f"{label}: the pod runs clerkgate alone")
    cg = spec["containers"][0]
    check_clerkgate_container(label, cg, "http", "admin")
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532, f"{label}: pod runs as 65532, non-root")
    check(spec.get("enableServiceLinks") is False, f"{label}: enableServiceLinks must be false")
    check("replicas" not in dep["spec"], f"{label}: the HPA owns replicas; the Deployment must not set it")

    text, env = config_of(label, docs, spec, cg)
    if text is not None:
        cfg = tomllib.loads(text)
        fa = cfg.get("proxy", {}).get("forward_auth_path", "/_clerkgate/auth")
        check(fa == "/_clerkgate/auth", f"{label}: forward_auth_path must be /_clerkgate/auth, got {fa!r}")
        check(cfg.get("local_api", {}).get("enabled") is False, f"{label}: no app in the pod, local_api must be off")
        check(cfg.get("sessions", {}).get("check") == "api",
              f"{label}: with several replicas a webhook reaches one; sessions.check must be api")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        sd = cfg.get("shutdown", {})
        check(grace > sd.get("delay_seconds", 5) + sd.get("drain_timeout_seconds", 20), f"{label}: grace period")
        with open(os.path.join(out_dir, "forward-auth.toml"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "forward-auth.env"), "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in env.items() if k != "CLERKGATE_CONFIG"))

    svcs = [d for d in docs if d["kind"] == "Service"]
    if check(len(svcs) == 1, f"{label}: one Service expected"):
        svc = svcs[0]
        check(svc["metadata"]["name"] != "clerkgate", f"{label}: a Service named clerkgate injects CLERKGATE_* variables")
        check(selector_matches(svc["spec"]["selector"], pod_labels), f"{label}: Service selects no pod")
        check([port_number(cg, p["targetPort"]) for p in svc["spec"]["ports"]] == [8080],
              f"{label}: the Service must expose the proxy port only")
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    min_replicas = 1
    if check(len(hpas) == 1, f"{label}: one HorizontalPodAutoscaler expected"):
        h = hpas[0]["spec"]
        ref = h["scaleTargetRef"]
        check((ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"]), f"{label}: HPA targets {ref}")
        min_replicas = h.get("minReplicas", 1)
        check(min_replicas >= 2 and h["maxReplicas"] > min_replicas, f"{label}: HPA needs minReplicas >= 2 < maxReplicas")
        for m in h.get("metrics", []):
            if m["type"] == "Resource":
                check(m["resource"]["name"] in cg.get("resources", {}).get("requests", {}),
                      f"{label}: HPA scales on {m['resource']['name']} but the container requests none")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if check(len(pdbs) == 1, f"{label}: one PodDisruptionBudget expected"):
        p = pdbs[0]["spec"]
        check(selector_matches(p["selector"]["matchLabels"], pod_labels), f"{label}: PDB selects no pod")
        check(p.get("maxUnavailable", 0) >= 1 or p.get("minAvailable", 0) < min_replicas,
              f"{label}: the PDB would block every drain")
    nps = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if check(len(nps) == 1, f"{label}: one NetworkPolicy expected"):
        np = nps[0]["spec"]
        check(selector_matches(np["podSelector"]["matchLabels"], pod_labels), f"{label}: NetworkPolicy selects no pod")
        rules = np.get("ingress", [])
        check(all(r.get("from") and r.get("ports") for r in rules), f"{label}: every ingress rule names sources and ports")
        ports = {p["port"] for r in rules for p in r["ports"]}
        check(ports == {8080, 9090}, f"{label}: ingress ports must be 8080 and 9090, got {ports}")
        egress = {p["port"] for r in np.get("egress", []) for p in r.get("ports", [])}
        check({53, 443} <= egress, f"{label}: egress must allow DNS and HTTPS to Clerk")
    check(any(selector_matches(pm["spec"]["selector"].get("matchLabels"), pod_labels)
              and any(port_number(cg, ep.get("port")) == 9090 for ep in pm["spec"]["podMetricsEndpoints"])
              for pm in pod_monitors), f"{label}: no PodMonitor scrapes the admin port of the pods")


def check_runbook(root, monitoring):
    """Every alert links its own section of docs/runbook.md, and every section has its alert."""
    with open(os.path.join(root, "docs/runbook.md")) as f:
        headings = [line[4:].strip() for line in f if line.startswith("### ")]
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-"): h for h in headings}
    alerts = [r for d in monitoring if d["kind"] == "PrometheusRule"
              for g in d["spec"]["groups"] for r in g["rules"] if "alert" in r]
    check(len(alerts) >= 17, f"runbook: only {len(alerts)} alerts found")
    for r in alerts:
        url = r.get("annotations", {}).get("runbook_url", "")
        anchor = url.split("#", 1)[1] if url.startswith("docs/runbook.md#") else None
        check(anchor == r["alert"].lower() and anchor in anchors,
              f"runbook: alert {r['alert']} has runbook_url {url!r}; needs docs/runbook.md#{r['alert'].lower()}")
    names = {r["alert"] for r in alerts}
    for h in headings:
        check(h in names, f"runbook: section {h!r} has no alert of that name")
    for name in ("ClerkgateMetricsAbsent", "ClerkgateFileDescriptorsNearLimit", "ClerkgateRestarting"):
        check(name in names, f"monitoring: alert {name} missing")


def main():
    rendered, out_dir = sys.argv[1], sys.argv[2]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = lambda n: load(os.path.join(rendered, n + ".yaml"))  # noqa: E731
    original = r("kubernetes-examples-third-party-app")
    monitoring = r("monitoring")
    pod_monitors = [d for d in monitoring if d["kind"] == "PodMonitor"]
    check_runbook(root, monitoring)
    check_injected("sidecar-component", r("sidecar-component"), original, False, out_dir, pod_monitors)
    check_injected("sidecar-component-native", r("sidecar-component-native"), original, True, out_dir, pod_monitors)
    check_components_agree(root)
    check_forward_auth(r("kubernetes-forward-auth"), out_dir, pod_monitors)
    if problems:
        for p in problems:
            print(f"FAIL: {p}", file=sys.stderr)
        print(f"field kit: {len(problems)} of {checks} checks failed", file=sys.stderr)
        sys.exit(1)
    print(f"field kit: {checks} checks passed")


if __name__ == "__main__":
    main()
