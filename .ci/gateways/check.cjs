// Checks the mesh and gateway recipes in deploy/gateways/ (run by .ci/gateways-test).
//
//   node .ci/gateways/check.cjs NPM_DIR
//
// NPM_DIR holds node_modules with `yaml` and the kubernetes-models packages for Istio, Traefik
// and the Gateway API (their validators are generated from the projects' CRD schemas: types,
// enums and required fields). Envoy Gateway has no such package: its SecurityPolicy and
// ClientTrafficPolicy are checked against field lists written from its API reference.
//
// Beyond the schemas, every recipe must agree with the code and the forward-auth deployment:
// the identity headers are exactly the ones config/clerkgate.toml names (allowed upstream, and
// stripped from the client before the check where the proxy does not do it itself), the check
// goes to the clerkgate-forward-auth Service's host, port and forward_auth_path, failures
// refuse (failOpen false), and the webhook path bypasses the check and reaches clerkgate.
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const npmDir = path.resolve(process.argv[2]);
const req = createRequire(path.join(npmDir, "index.js"));
const YAML = req("yaml");
const models = {
  "security.istio.io/v1 AuthorizationPolicy": () => req("@kubernetes-models/istio/security.istio.io/v1").AuthorizationPolicy,
  "networking.istio.io/v1alpha3 EnvoyFilter": () => req("@kubernetes-models/istio/networking.istio.io/v1alpha3").EnvoyFilter,
  "install.istio.io/v1alpha1 IstioOperator": () => req("@kubernetes-models/istio/install.istio.io/v1alpha1").IstioOperator,
  "traefik.io/v1alpha1 Middleware": () => req("@kubernetes-models/traefik/traefik.io/v1alpha1").Middleware,
  "traefik.io/v1alpha1 IngressRoute": () => req("@kubernetes-models/traefik/traefik.io/v1alpha1").IngressRoute,
  "gateway.networking.k8s.io/v1 HTTPRoute": () => req("@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1").HTTPRoute,
  "gateway.networking.k8s.io/v1beta1 ReferenceGrant": () => req("@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1beta1").ReferenceGrant,
};
// Kinds without a schema package, checked by field lists below.
const unschemaed = new Set(["gateway.envoyproxy.io/v1alpha1 SecurityPolicy", "gateway.envoyproxy.io/v1alpha1 ClientTrafficPolicy"]);

const root = path.resolve(__dirname, "..", "..");
const problems = [];
let checks = 0;
function check(ok, msg) {
  checks++;
  if (!ok) problems.push(msg);
  return ok;
}
const sameSet = (a, b) => a.length === b.length && [...a].sort().join() === [...b].sort().join();
const lower = (xs) => (xs || []).map((x) => String(x).toLowerCase());
function onlyFields(where, obj, allowed) {
  for (const k of Object.keys(obj || {})) check(allowed.includes(k), `${where}: unknown field ${k} (known: ${allowed.join(", ")})`);
}

// ------------------------------------------------------------------------------------------
// What the recipes must agree with.
function tomlSection(text, name) {
  const m = text.split(/^\[/m).find((s) => s.startsWith(name + "]"));
  const out = {};
  for (const line of (m || "").split("\n").slice(1)) {
    const kv = line.match(/^([a-z_]+)\s*=\s*"([^"]*)"/);
    if (kv) out[kv[1]] = kv[2];
  }
  return out;
}
const defaults = fs.readFileSync(path.join(root, "config/clerkgate.toml"), "utf8");
const headerKeys = ["user_id", "session_id", "org_id", "org_role", "org_slug", "org_permissions", "actor_id", "claims_header"];
const headerSection = tomlSection(defaults, "headers");
const IDENTITY = headerKeys.map((k) => headerSection[k]).filter(Boolean).map((h) => h.toLowerCase());
check(IDENTITY.length === headerKeys.length, `config/clerkgate.toml [headers]: expected ${headerKeys.length} header names, got ${IDENTITY}`);
const webhookPath = tomlSection(defaults, "webhooks").path;
check(webhookPath === "/webhooks/clerk", `webhooks.path default ${webhookPath}`);

const fa = path.join(root, "deploy/kubernetes/forward-auth");
const faService = YAML.parse(fs.readFileSync(path.join(fa, "service.yaml"), "utf8"));
const faToml = fs.readFileSync(path.join(fa, "clerkgate.toml"), "utf8");
const FA_PATH = tomlSection(faToml, "proxy").forward_auth_path;
const FA_NAME = faService.metadata.name;
const FA_PORT = faService.spec.ports[0].port;
const FA_NS = "auth"; // the namespace deploy/kubernetes/forward-auth is applied to (README, kustomization.yaml)
const FA_HOST = `${FA_NAME}.${FA_NS}.svc.cluster.local`;
check(FA_PATH === "/_clerkgate/auth", `forward-auth clerkgate.toml: forward_auth_path ${FA_PATH}`);
// What the gateway copies from a 200 answer: the identity headers, and Authorization and Cookie
// (the answer's Cookie lacks the session cookies; Authorization is absent unless
// auth.forward_token), so that the token does not reach the app.
const UPSTREAM = [...IDENTITY, "authorization", "cookie"];
check(fs.readFileSync(path.join(fa, "kustomization.yaml"), "utf8").includes(`-n ${FA_NS} `), `forward-auth kustomization.yaml does not say -n ${FA_NS}`);

// ------------------------------------------------------------------------------------------
// Load and schema-check every document.
const gw = path.join(root, "deploy/gateways");
const docs = [];
for (const dir of fs.readdirSync(gw).sort()) {
  for (const file of fs.readdirSync(path.join(gw, dir)).filter((f) => f.endsWith(".yaml")).sort()) {
    for (const d of YAML.parseAllDocuments(fs.readFileSync(path.join(gw, dir, file), "utf8"))) {
      check(d.errors.length === 0, `${dir}/${file}: YAML errors ${d.errors}`);
      const doc = d.toJS();
      if (doc) docs.push({ where: `${dir}/${file} ${doc.kind}/${doc.metadata && doc.metadata.name}`, dir, doc });
    }
  }
}
let validated = 0;
let fieldListed = 0;
for (const { where, doc } of docs) {
  const key = `${doc.apiVersion} ${doc.kind}`;
  check(doc.metadata && doc.metadata.name && doc.metadata.namespace, `${where}: needs metadata.name and metadata.namespace`);
  if (models[key]) {
    const Model = models[key]();
    try {
      new Model(doc).validate();
      validated++;
    } catch (e) {
      check(false, `${where}: schema: ${e.message}`);
    }
  } else {
    check(unschemaed.has(key), `${where}: no schema and no field list for ${key}`);
    fieldListed++;
  }
}
// The validators must be able to fail: an enum violation and a wrong type are refused.
for (const [key, bad] of [
  ["security.istio.io/v1 AuthorizationPolicy", { metadata: { name: "x" }, spec: { action: "ALLOWED" } }],
  ["traefik.io/v1alpha1 Middleware", { metadata: { name: "x" }, spec: { forwardAuth: { authResponseHeaders: "X-User-Id" } } }],
  ["gateway.networking.k8s.io/v1 HTTPRoute", { metadata: { name: "x" }, spec: { rules: [{ matches: [{ path: { type: "Glob" } }] }] } }],
]) {
  let refused = false;
  try {
    new (models[key]())(bad).validate();
  } catch (e) {
    refused = true;
  }
  check(refused, `self-test: the ${key} validator accepted an invalid object`);
}
const find = (dir, kind) => docs.filter((d) => d.dir === dir && d.doc.kind === kind).map((d) => d.doc);
const one = (dir, kind, name) => {
  const xs = find(dir, kind).filter((d) => !name || d.metadata.name === name);
  check(xs.length === 1, `${dir}: expected one ${kind}${name ? " " + name : ""}, got ${xs.length}`);
  return xs[0];
};

// ------------------------------------------------------------------------------------------
// Istio
{
  const op = one("istio", "IstioOperator");
  const providers = (op && op.spec.meshConfig.extensionProviders) || [];
  const p = providers.find((x) => x.envoyExtAuthzHttp) || {};
  const h = p.envoyExtAuthzHttp || {};
  onlyFields("istio provider", h, ["service", "port", "timeout", "pathPrefix", "failOpen", "statusOnError",
    "includeRequestHeadersInCheck", "includeAdditionalHeadersInCheck", "includeRequestBodyInCheck",
    "headersToUpstreamOnAllow", "headersToDownstreamOnDeny", "headersToDownstreamOnAllow"]);
  check(h.service === FA_HOST && h.port === FA_PORT, `istio provider: ${h.service}:${h.port}, expected ${FA_HOST}:${FA_PORT}`);
  check(h.pathPrefix === FA_PATH, `istio provider: pathPrefix ${h.pathPrefix}, expected ${FA_PATH}`);
  check(h.failOpen === false, "istio provider: failOpen must be false");
  check(["authorization", "cookie"].every((x) => lower(h.includeRequestHeadersInCheck).includes(x)),
    "istio provider: the check needs the authorization and cookie headers");
  check(sameSet(lower(h.headersToUpstreamOnAllow), UPSTREAM), `istio provider: headersToUpstreamOnAllow must be ${UPSTREAM}`);
  check(lower(h.headersToDownstreamOnDeny).includes("www-authenticate"), "istio provider: pass WWW-Authenticate on deny");

  const custom = find("istio", "AuthorizationPolicy").filter((a) => a.spec.action === "CUSTOM");
  if (check(custom.length === 1, "istio: one CUSTOM AuthorizationPolicy expected")) {
    const a = custom[0];
    check(a.spec.provider.name === p.name, `istio: CUSTOM policy provider ${a.spec.provider.name}, defined: ${p.name}`);
    const notPaths = (a.spec.rules || []).flatMap((r) => (r.to || []).flatMap((t) => t.operation.notPaths || []));
    check(notPaths.includes(webhookPath), `istio: the CUSTOM policy must skip ${webhookPath} (Svix-signed, no session)`);
    const ef = one("istio", "EnvoyFilter");
    if (ef) {
      check(JSON.stringify(ef.spec.workloadSelector.labels) === JSON.stringify(a.spec.selector.matchLabels),
        "istio: the EnvoyFilter must select the same gateway pods as the CUSTOM policy");
      const cp = ef.spec.configPatches[0];
      check(cp.applyTo === "HTTP_FILTER" && cp.patch.operation === "INSERT_BEFORE" &&
        cp.match.listener.filterChain.filter.subFilter.name === "envoy.filters.http.ext_authz",
        "istio: the strip filter must be inserted before envoy.filters.http.ext_authz");
      const tc = cp.patch.value.typed_config;
      check(tc["@type"] === "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        `istio: strip filter type ${tc["@type"]}`);
      const removed = tc.mutations.request_mutations.map((m) => m.remove);
      check(sameSet(lower(removed), IDENTITY), `istio: the strip filter must remove exactly ${IDENTITY}, got ${removed}`);
      const hcm = ef.spec.configPatches.find((c) => c.applyTo === "NETWORK_FILTER" && c.patch.operation === "MERGE");
      check(hcm && hcm.patch.value.typed_config.common_http_protocol_options.headers_with_underscores_action === "DROP_HEADER",
        "istio: the gateway must drop headers with underscores (X_User_Id)");
    }
  }
  const allow = find("istio", "AuthorizationPolicy").filter((a) => a.spec.action === "ALLOW");
  check(allow.length === 1 && allow[0].spec.rules.every((r) => r.from && r.from.every((f) => (f.source.principals || []).length)),
    "istio: the app needs an ALLOW policy admitting only the ingress gateway's principal");
}

// ------------------------------------------------------------------------------------------
// Envoy Gateway
{
  const sp = one("envoy-gateway", "SecurityPolicy");
  if (sp) {
    onlyFields("envoy-gateway SecurityPolicy spec", sp.spec, ["targetRef", "targetRefs", "targetSelectors", "apiKeyAuth",
      "basicAuth", "cors", "extAuth", "jwt", "oidc", "authorization"]);
    const e = sp.spec.extAuth || {};
    onlyFields("envoy-gateway extAuth", e, ["grpc", "http", "headersToExtAuth", "bodyToExtAuth", "failOpen", "recomputeRoute", "timeout", "contextExtensions"]);
    onlyFields("envoy-gateway extAuth.http", e.http, ["backendRef", "backendRefs", "backendSettings", "path", "headersToBackend"]);
    check(e.failOpen === false, "envoy-gateway: failOpen must be false");
    check(["authorization", "cookie"].every((x) => lower(e.headersToExtAuth).includes(x)),
      "envoy-gateway: headersToExtAuth needs authorization and cookie");
    const br = ((e.http || {}).backendRefs || [])[0] || {};
    check(br.name === FA_NAME && br.namespace === FA_NS && br.port === FA_PORT,
      `envoy-gateway: backendRef ${br.namespace}/${br.name}:${br.port}, expected ${FA_NS}/${FA_NAME}:${FA_PORT}`);
    check(e.http.path === FA_PATH, `envoy-gateway: path ${e.http.path}, expected ${FA_PATH}`);
    check(sameSet(lower(e.http.headersToBackend), UPSTREAM), `envoy-gateway: headersToBackend must be ${UPSTREAM}`);
    const ns = sp.metadata.namespace;
    const routes = find("envoy-gateway", "HTTPRoute");
    const targets = sp.spec.targetRefs.map((t) => routes.find((r) => t.kind === "HTTPRoute" && r.metadata.name === t.name && r.metadata.namespace === ns));
    check(targets.length && targets.every(Boolean), "envoy-gateway: the SecurityPolicy targets an HTTPRoute that is not in the recipe");
    if (br.namespace !== ns) {
      const grants = find("envoy-gateway", "ReferenceGrant").filter((g) => g.metadata.namespace === br.namespace &&
        g.spec.from.some((f) => f.kind === "SecurityPolicy" && f.group === "gateway.envoyproxy.io" && f.namespace === ns) &&
        g.spec.to.some((t) => t.kind === "Service" && t.group === "" && (!t.name || t.name === br.name)));
      check(grants.length === 1, `envoy-gateway: a ReferenceGrant in ${br.namespace} must admit the SecurityPolicy from ${ns}`);
    }
    const ctp = one("envoy-gateway", "ClientTrafficPolicy");
    if (ctp) {
      onlyFields("envoy-gateway ClientTrafficPolicy headers", ctp.spec.headers, ["xForwardedClientCert", "enableEnvoyHeaders",
        "withUnderscoresAllowed", "preserveXRequestID", "requestID", "earlyRequestHeaders", "disableRateLimitHeaders"]);
      onlyFields("envoy-gateway earlyRequestHeaders", ctp.spec.headers.earlyRequestHeaders, ["set", "add", "remove"]);
      check(ctp.spec.headers.withUnderscoresAllowed === false, "envoy-gateway: withUnderscoresAllowed must be false (X_User_Id)");
      check(sameSet(lower(ctp.spec.headers.earlyRequestHeaders.remove), IDENTITY),
        `envoy-gateway: earlyRequestHeaders.remove must be ${IDENTITY}`);
      for (const r of targets.filter(Boolean)) {
        for (const pr of r.spec.parentRefs) {
          check(ctp.spec.targetRefs.some((t) => t.kind === "Gateway" && t.name === pr.name && ctp.metadata.namespace === (pr.namespace || r.metadata.namespace)),
            `envoy-gateway: the ClientTrafficPolicy does not cover Gateway ${pr.namespace}/${pr.name} of route ${r.metadata.name}`);
        }
      }
    }
    const hooks = routes.filter((r) => r.spec.rules.some((rule) => (rule.matches || []).some((m) => m.path && m.path.type === "Exact" && m.path.value === webhookPath)));
    check(hooks.length === 1 && hooks[0].spec.rules[0].backendRefs[0].name === FA_NAME && hooks[0].spec.rules[0].backendRefs[0].port === FA_PORT &&
      hooks[0].metadata.namespace === FA_NS && !sp.spec.targetRefs.some((t) => t.name === hooks[0].metadata.name),
      `envoy-gateway: ${webhookPath} must be routed to ${FA_NAME}:${FA_PORT} without the SecurityPolicy`);
  }
}

// ------------------------------------------------------------------------------------------
// Traefik
{
  const mw = one("traefik", "Middleware");
  if (mw) {
    const f = mw.spec.forwardAuth || {};
    onlyFields("traefik forwardAuth", f, ["address", "tls", "trustForwardHeader", "authResponseHeaders", "authResponseHeadersRegex",
      "authRequestHeaders", "addAuthCookiesToResponse", "headerField", "forwardBody", "maxBodySize", "preserveLocationHeader", "preserveRequestMethod"]);
    check(f.address === `http://${FA_HOST}:${FA_PORT}${FA_PATH}`, `traefik: address ${f.address}`);
    check(f.trustForwardHeader === false, "traefik: trustForwardHeader must be false (clerkgate reads X-Forwarded-Uri)");
    check(sameSet(lower(f.authResponseHeaders), ["authorization", "cookie"]),
      "traefik: authResponseHeaders must be [Authorization, Cookie] (the identity headers go by the regex)");
    // Go's regexp syntax; the (?i) flag becomes JavaScript's i.
    const rx = String(f.authResponseHeadersRegex || "");
    if (check(rx.startsWith("(?i)"), "traefik: authResponseHeadersRegex must be case-insensitive ((?i))")) {
      const re = new RegExp(rx.slice(4), "i");
      for (const h of [...IDENTITY, "x-clerk-anything"]) {
        for (const v of [h, h.replace(/-/g, "_"), h.toUpperCase(), h.replace(/(^|-)([a-z])/g, (m, a, b) => a + b.toUpperCase())]) {
          check(re.test(v), `traefik: authResponseHeadersRegex does not match ${v}`);
        }
      }
      for (const h of ["x-forwarded-uri", "x-request-id", "x-user-agent", "authorization", "x-org"]) {
        check(!re.test(h), `traefik: authResponseHeadersRegex also matches ${h}`);
      }
    }
    const route = one("traefik", "HTTPRoute");
    check(route && route.spec.rules.every((r) => (r.filters || []).some((x) => x.type === "ExtensionRef" &&
      x.extensionRef.group === "traefik.io" && x.extensionRef.kind === "Middleware" && x.extensionRef.name === mw.metadata.name)) &&
      route.metadata.namespace === mw.metadata.namespace, "traefik: every HTTPRoute rule must use the middleware (same namespace)");
    const ir = one("traefik", "IngressRoute");
    check(ir && ir.spec.routes.every((r) => (r.middlewares || []).some((m) => m.name === mw.metadata.name)) &&
      ir.metadata.namespace === mw.metadata.namespace, "traefik: every IngressRoute route must use the middleware");
  }
}

if (problems.length) {
  for (const p of problems) console.error(`FAIL: ${p}`);
  console.error(`gateways: ${problems.length} of ${checks} checks failed`);
  process.exit(1);
}
console.log(`gateways: ${docs.length} objects (${validated} schema-validated, ${fieldListed} Envoy Gateway objects field-checked), ` +
  `${checks} checks passed; identity headers: ${IDENTITY.join(", ")}`);
