#!/usr/bin/env python3
"""Offline checks of the rendered deploy/ manifests, called by .ci/deploy-test.

    check_deploy.py manifests RENDERED_DIR SECRET_EXAMPLE
        Semantic checks of the kustomize output (base, native-sidecar overlay, monitoring):
        the wiring between objects, probes, security context, drain timing, labels.
    check_deploy.py metrics METRICS_TXT PROMETHEUSRULE_YAML DASHBOARD_JSON
        Every metric, label and closed-set label value that an alert or a dashboard query uses
        is one the binary exports (METRICS_TXT is a live /metrics scrape).
    check_deploy.py promql-rules PROMETHEUSRULE_YAML DASHBOARD_JSON OUT_DIR
        Writes OUT_DIR/alerts.yaml (the PrometheusRule's groups, for promtool) and
        OUT_DIR/dashboard-rules.yaml (each dashboard query as a recording rule, Grafana
        variables substituted), so that `promtool check rules` parses every expression.
    check_deploy.py compose-env COMPOSE_YAML
        Prints the clerkgate service's fixed environment as KEY=VALUE lines (for check-config).

Exits 1 with one line per problem. Needs PyYAML (a dependency of kubernetes-validate).
"""
import json
import os
import re
import sys
import tomllib

import yaml

problems = []
checks = 0


def check(ok, message):
    global checks
    checks += 1
    if not ok:
        problems.append(message)
    return ok


def finish(what):
    if problems:
        for p in problems:
            print(f"FAIL: {p}", file=sys.stderr)
        print(f"{what}: {len(problems)} of {checks} checks failed", file=sys.stderr)
        sys.exit(1)
    print(f"{what}: {checks} checks passed")


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --------------------------------------------------------------------------------------------
# manifests


def find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def port_of(container, name_or_number):
    for p in container.get("ports", []):
        if p.get("name") == name_or_number or p.get("containerPort") == name_or_number:
            return p["containerPort"]
    return None


def check_workload(label, docs, secret_name, native):
    deployments = find(docs, "Deployment")
    if not check(len(deployments) == 1, f"{label}: expected one Deployment, got {len(deployments)}"):
        return
    dep = deployments[0]
    spec = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    check(selector_matches(dep["spec"]["selector"]["matchLabels"], pod_labels),
          f"{label}: Deployment selector does not match its pod labels")
    containers = spec.get("containers", [])
    inits = spec.get("initContainers", [])
    by_name = {c["name"]: c for c in containers + inits}
    cg = by_name.get("clerkgate")
    app = by_name.get("app")
    if not check(cg is not None and app is not None, f"{label}: containers clerkgate and app expected"):
        return

    if native:
        check(cg in inits and cg not in containers, f"{label}: clerkgate must be an init container")
        check(cg.get("restartPolicy") == "Always", f"{label}: clerkgate init container needs restartPolicy: Always")
        check(app in containers, f"{label}: app must stay a regular container")
    else:
        check(cg in containers and not inits, f"{label}: clerkgate must be a regular container (classic sidecar)")

    # Pod security.
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{label}: pod runAsNonRoot must be true")
    check(psc.get("runAsUser") == 65532, f"{label}: pod runAsUser must be 65532 (the image's UID)")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccompProfile RuntimeDefault")
    check(spec.get("enableServiceLinks") is False,
          f"{label}: enableServiceLinks must be false (CLERKGATE_* service-link variables break the config)")
    for c in (cg, app):
        sc = c.get("securityContext", {})
        check(sc.get("allowPrivilegeEscalation") is False, f"{label}/{c['name']}: allowPrivilegeEscalation false")
        check(sc.get("readOnlyRootFilesystem") is True, f"{label}/{c['name']}: readOnlyRootFilesystem true")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}/{c['name']}: capabilities drop ALL")
        res = c.get("resources", {})
        check("requests" in res and "memory" in res.get("limits", {}), f"{label}/{c['name']}: requests and a memory limit")

    # Ports and probes.
    check(port_of(cg, "http") == 8080, f"{label}: clerkgate port `http` must be 8080")
    check(port_of(cg, "admin") == 9090, f"{label}: clerkgate port `admin` must be 9090")
    check(not app.get("ports"), f"{label}: the app must not expose ports (it listens on 127.0.0.1)")
    probes = {k: cg.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    expect = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for k, path in expect.items():
        check(probes[k].get("path") == path and probes[k].get("port") in ("admin", 9090),
              f"{label}: clerkgate {k} must GET {path} on the admin port, got {probes[k]}")

    # Configuration: the mounted ConfigMap exists, holds TOML, and the drain fits the grace period.
    env = {e["name"]: e.get("value") for e in cg.get("env", [])}
    config_path = env.get("CLERKGATE_CONFIG", "")
    mounts = {m["name"]: m for m in cg.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    toml_text = None
    for vname, m in mounts.items():
        cm_name = volumes.get(vname, {}).get("configMap", {}).get("name")
        if cm_name and config_path.startswith(m["mountPath"].rstrip("/") + "/"):
            cms = find(docs, "ConfigMap", cm_name)
            if check(len(cms) == 1, f"{label}: ConfigMap {cm_name} referenced but not rendered"):
                key = config_path[len(m["mountPath"].rstrip("/")) + 1:]
                toml_text = cms[0].get("data", {}).get(key)
            check(m.get("readOnly") is True, f"{label}: config mount should be readOnly")
    if check(toml_text is not None, f"{label}: CLERKGATE_CONFIG={config_path!r} is not a file of a mounted ConfigMap"):
        cfg = tomllib.loads(toml_text)
        shutdown = cfg.get("shutdown", {})
        delay = int(env.get("CLERKGATE_SHUTDOWN__DELAY_SECONDS") or shutdown.get("delay_seconds", 5))
        drain = int(env.get("CLERKGATE_SHUTDOWN__DRAIN_TIMEOUT_SECONDS") or shutdown.get("drain_timeout_seconds", 20))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        check(grace > delay + drain, f"{label}: terminationGracePeriodSeconds {grace} must exceed delay {delay} + drain {drain}")
        stop_hook = app.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if native:
            check(grace > stop_hook + drain, f"{label}: grace {grace} must exceed the app's preStop {stop_hook} + drain {drain}")
        check(stop_hook >= delay, f"{label}: the app's preStop sleep ({stop_hook}) should cover clerkgate's delay ({delay})")
        upstream = cfg.get("proxy", {}).get("upstream", "")
        check(re.match(r"^http://(127\.0\.0\.1|localhost|\[::1\]):\d+", upstream) is not None,
              f"{label}: proxy.upstream should be the app on loopback, got {upstream!r}")
        app_args = " ".join(app.get("args", []) + app.get("command", []))
        check(upstream.split("//", 1)[1].rstrip("/") in app_args,
              f"{label}: the app's arguments do not mention its listen address {upstream}")
        check(cfg.get("admin", {}).get("listen", "").endswith(":9090"), f"{label}: admin.listen must be on 9090")
        check(cfg.get("proxy", {}).get("listen", "").endswith(":8080"), f"{label}: proxy.listen must be on 8080")
    refs = [e["secretRef"]["name"] for e in cg.get("envFrom", []) if "secretRef" in e]
    check(refs == [secret_name], f"{label}: clerkgate envFrom should reference Secret {secret_name}, got {refs}")

    # Service, NetworkPolicy, PDB.
    services = find(docs, "Service")
    check(len(services) == 1, f"{label}: expected one Service")
    for svc in services:
        check(svc["metadata"]["name"] != "clerkgate",
              f"{label}: a Service named clerkgate injects CLERKGATE_* variables into pods")
        check(selector_matches(svc["spec"]["selector"], pod_labels), f"{label}: Service selector does not match the pods")
        for p in svc["spec"]["ports"]:
            check(port_of(cg, p["targetPort"]) == 8080,
                  f"{label}: Service port {p['port']} must target clerkgate's proxy port, got {p['targetPort']}")
    nps = find(docs, "NetworkPolicy")
    if check(len(nps) == 1, f"{label}: expected one NetworkPolicy"):
        np = nps[0]
        check(selector_matches(np["spec"]["podSelector"]["matchLabels"], pod_labels), f"{label}: NetworkPolicy selects no pod")
        allowed = {p["port"] for rule in np["spec"].get("ingress", []) for p in rule.get("ports", [])}
        check({8080, 9090} <= allowed, f"{label}: NetworkPolicy ingress should allow 8080 and 9090, got {allowed}")
        check(3000 not in allowed, f"{label}: the app port must not be opened")
        egress_ports = {p["port"] for rule in np["spec"].get("egress", []) for p in rule.get("ports", [])}
        check({53, 443} <= egress_ports, f"{label}: egress must allow DNS and HTTPS to Clerk")
    pdbs = find(docs, "PodDisruptionBudget")
    if check(len(pdbs) == 1, f"{label}: expected one PodDisruptionBudget"):
        pdb = pdbs[0]["spec"]
        check(selector_matches(pdb["selector"]["matchLabels"], pod_labels), f"{label}: PDB selects no pod")
        check(pdb.get("minAvailable", 0) < dep["spec"].get("replicas", 1) or "maxUnavailable" in pdb,
              f"{label}: PDB minAvailable must be below replicas, or no node could ever drain")
    return pod_labels, cg


def cmd_manifests(rendered, secret_example):
    secret = load_all(secret_example)
    check(len(secret) == 1 and secret[0]["kind"] == "Secret", "secret.example.yaml: one Secret expected")
    secret_name = secret[0]["metadata"]["name"]
    values = " ".join(secret[0].get("stringData", {}).values())
    check("REPLACE_ME" in values and not re.search(r"sk_(live|test)_[A-Za-z0-9]{20,}", values),
          "secret.example.yaml must hold placeholders only")

    results = {}
    for label, file, native in (("base", "base.yaml", False), ("root", "root.yaml", False),
                                ("native-sidecar", "native-sidecar.yaml", True)):
        docs = load_all(os.path.join(rendered, file))
        check(not find(docs, "Secret"), f"{label}: the rendered output must not contain a Secret")
        results[label] = check_workload(label, docs, secret_name, native)

    mon = load_all(os.path.join(rendered, "monitoring.yaml"))
    pms = find(mon, "PodMonitor", "clerkgate")  # podmonitor-injected.yaml: check_fieldkit.py
    if check(len(pms) == 1, "monitoring: one PodMonitor expected") and results.get("base"):
        pod_labels, cg = results["base"]
        pm = pms[0]["spec"]
        check(selector_matches(pm["selector"]["matchLabels"], pod_labels), "monitoring: PodMonitor selects no sidecar pod")
        for ep in pm["podMetricsEndpoints"]:
            check(port_of(cg, ep["port"]) == 9090, f"monitoring: PodMonitor port {ep['port']} is not clerkgate's admin port")
            check(ep.get("path", "/metrics") == "/metrics", "monitoring: PodMonitor path must be /metrics")
    if results.get("native-sidecar"):
        check(selector_matches(pms[0]["spec"]["selector"]["matchLabels"], results["native-sidecar"][0]),
              "monitoring: PodMonitor does not select the native-sidecar pods")
    rules = find(mon, "PrometheusRule")
    check(len(rules) == 1, "monitoring: one PrometheusRule expected")
    for r in rules:
        for g in r["spec"]["groups"]:
            for rule in g["rules"]:
                check("alert" in rule and rule.get("labels", {}).get("severity") in ("warning", "critical"),
                      f"monitoring: rule {rule.get('alert')} needs a severity label")
                check("summary" in rule.get("annotations", {}), f"monitoring: rule {rule.get('alert')} needs a summary")
    cms = find(mon, "ConfigMap")
    if check(len(cms) == 1, "monitoring: one dashboard ConfigMap expected"):
        data = cms[0].get("data", {})
        check(cms[0]["metadata"].get("labels", {}).get("grafana_dashboard") == "1", "monitoring: grafana_dashboard label")
        for k, v in data.items():
            json.loads(v)
    finish("manifests")


# --------------------------------------------------------------------------------------------
# metrics

# Labels Prometheus adds from the target (PodMonitor) rather than the exporter.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint", "node", "service"}
PROMQL_WORDS = {
    # aggregations and keywords
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
    # functions used or plausible
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "delta", "deriv",
    "exp", "floor", "histogram_quantile", "idelta", "increase", "irate", "label_replace", "label_join", "ln",
    "log2", "log10", "predict_linear", "rate", "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "time",
    "timestamp", "vector", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "last_over_time", "present_over_time",
    # Grafana
    "label_values",
}


def parse_scrape(path):
    """name -> {label -> set(values)}; histogram families also give _bucket/_sum/_count."""
    series = {}
    families = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(None, 3)
                families[name] = kind
                continue
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
            if not m:
                continue
            labels = series.setdefault(m.group(1), {})
            for lm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""):
                labels.setdefault(lm.group(1), set()).add(lm.group(2))
    for name, kind in families.items():
        if kind == "histogram":
            base = series.setdefault(name, {})
            for suffix in ("_bucket", "_sum", "_count"):
                for k, v in series.get(name + suffix, {}).items():
                    if k != "le":
                        base.setdefault(k, set()).update(v)
        else:
            series.setdefault(name, {})
    return series, families


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def check_expr(where, expr, series):
    names = set(series)
    text = expr
    # Grafana variables and range selectors.
    text = re.sub(r"\[[^\]]*\]", "", text)
    # process_* come from the process collector of the same /metrics endpoint.
    metrics_here = set(re.findall(r"\b((?:clerkgate|process)_[a-zA-Z0-9_]+)\b", strip_strings(text)))
    check(metrics_here, f"{where}: no clerkgate metric in {expr!r}")
    for m in sorted(metrics_here):
        check(m in names, f"{where}: {m} is not exported by the binary")
    known_labels = set(TARGET_LABELS)
    for m in metrics_here:
        known_labels |= set(series.get(m, {}))
        if m.endswith("_bucket"):
            known_labels.add("le")
    # Label matchers per selector.
    for sm in re.finditer(r"\b((?:clerkgate|process)_[a-zA-Z0-9_]+)\s*\{([^}]*)\}", text):
        metric, body = sm.group(1), sm.group(2)
        labels = series.get(metric, {})
        for lm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body):
            label, op, value = lm.groups()
            if label in TARGET_LABELS:
                continue
            if label == "le" and metric.endswith("_bucket"):
                continue
            if not check(label in labels, f"{where}: {metric} has no label {label!r}"):
                continue
            if "$" in value:
                continue
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            if op in ("=~", "!~") and any(re.search(r"[.*+?()\[\]{}^\\]", a) for a in alternatives):
                continue  # a real regex: only the label name is checked
            for a in alternatives:
                check(a in labels[label], f"{where}: {metric}{{{label}{op}...}}: value {a!r} is never exported "
                                          f"(known: {sorted(labels[label])})")
    # Grouping and matching label lists.
    for gm in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        for label in [x.strip() for x in gm.group(2).split(",") if x.strip()]:
            check(label in known_labels, f"{where}: {gm.group(1)} ({label}) names a label no metric here has")
    # Any other identifier must be a PromQL word: catches misspelt metric names.
    bare = strip_strings(text)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", bare)
    bare = re.sub(r"\$[a-zA-Z_][a-zA-Z0-9_]*", "", bare)
    bare = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", "", bare)
    for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        if ident.startswith(("clerkgate_", "process_")):
            continue
        check(ident in PROMQL_WORDS, f"{where}: unknown identifier {ident!r} in {expr!r}")


def rule_exprs(rule_path):
    out = []
    for doc in load_all(rule_path):
        if doc.get("kind") != "PrometheusRule":
            continue
        for g in doc["spec"]["groups"]:
            for r in g["rules"]:
                out.append((f"PrometheusRule {g['name']}/{r.get('alert') or r.get('record')}", r["expr"]))
    return out


def dashboard_exprs(dash_path):
    with open(dash_path) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"dashboard panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.match(r"^\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", q)
            if check(m is not None, f"dashboard variable {v['name']}: expected label_values(...), got {q!r}"):
                out.append((f"dashboard variable {v['name']}", m.group(1)))
    return dash, out


def cmd_metrics(metrics_txt, rule_path, dash_path):
    series, families = parse_scrape(metrics_txt)
    check(len(families) >= 10, f"the scrape has only {len(families)} metric families")
    exprs = rule_exprs(rule_path)
    check(len(exprs) >= 5, "too few alert rules")
    dash, dexprs = dashboard_exprs(dash_path)
    check(len(dexprs) >= 10, "too few dashboard queries")
    used = set()
    for where, expr in exprs + dexprs:
        check_expr(where, expr, series)
        used |= set(re.findall(r"\b((?:clerkgate|process)_[a-zA-Z0-9_]+)\b", expr))
    # The issue's list for the dashboard, and the alerts' required subjects.
    dash_text = " ".join(e for _, e in dexprs)
    for m in ("clerkgate_requests_total", "clerkgate_request_duration_seconds_bucket", "clerkgate_auth_failures_total",
              "clerkgate_jwks_age_seconds", "clerkgate_token_cache_hits_total", "clerkgate_token_cache_misses_total",
              "clerkgate_webhook_events_total", "clerkgate_revoked_sessions"):
        check(m in dash_text, f"dashboard: no panel uses {m}")
    rule_text = " ".join(e for _, e in exprs)
    for needle in ("clerkgate_jwks_age_seconds", "clerkgate_jwks_fetches_total", "clerkgate_auth_failures_total",
                   "clerkgate_upstream_errors_total", "clerkgate_ready", 'result="bad_signature"'):
        check(needle in rule_text, f"PrometheusRule: no alert uses {needle}")
    base_families = {f for f in families}
    unused = sorted(f for f in base_families if not any(u == f or u.startswith(f + "_") for u in used))
    print(f"metrics: {len(exprs)} alert expressions, {len(dexprs)} dashboard queries over "
          f"{len(base_families)} exported families" + (f"; not charted: {', '.join(unused)}" if unused else ""))
    finish("metrics")


def cmd_promql_rules(rule_path, dash_path, out_dir):
    groups = []
    for doc in load_all(rule_path):
        if doc.get("kind") == "PrometheusRule":
            groups += doc["spec"]["groups"]
    with open(os.path.join(out_dir, "alerts.yaml"), "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    _, dexprs = dashboard_exprs(dash_path)
    rules = []
    for i, (where, expr) in enumerate(dexprs):
        e = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$pod", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    with open(os.path.join(out_dir, "dashboard-rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
    print(f"wrote {len(groups)} alert groups and {len(rules)} dashboard queries for promtool")


def cmd_compose_env(compose_path):
    with open(compose_path) as f:
        compose = yaml.safe_load(f)
    env = compose["services"]["clerkgate"].get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    for k, v in env.items():
        if v is not None:
            print(f"{k}={v}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"manifests": cmd_manifests, "metrics": cmd_metrics, "promql-rules": cmd_promql_rules,
     "compose-env": cmd_compose_env}[cmd](*args)


if __name__ == "__main__":
    main()
