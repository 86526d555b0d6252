// @clerk/backend's authenticateRequest as an oracle for tests/it/browser.rs (browser mode).
//
// stdin: {"options": {publishableKey, secretKey, jwtKey, apiUrl}, "cases": [{url, method, headers}]}
// stdout: one JSON array, per case {status, reason, location, setCookies, cacheControl, error}.
// Only decisions are reported; nothing is verified against a network service except the Backend
// API calls the SDK itself makes (handshake payload, refresh) to options.apiUrl.
import { createClerkClient } from '@clerk/backend';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const { options, cases } = input;

// The SDK logs hints (missing azp, redirect loops) to the console: keep stdout for the answer.
console.log = () => {};
console.warn = () => {};
console.error = () => {};

const clerk = createClerkClient({
  secretKey: options.secretKey,
  publishableKey: options.publishableKey,
  apiUrl: options.apiUrl,
  jwtKey: options.jwtKey,
});

const out = [];
for (const c of cases) {
  const request = new Request(c.url, { method: c.method, headers: c.headers });
  try {
    const state = await clerk.authenticateRequest(request, {
      publishableKey: options.publishableKey,
      secretKey: options.secretKey,
      jwtKey: options.jwtKey,
    });
    const h = state.headers;
    out.push({
      status: state.status,
      reason: state.reason ?? null,
      location: h.get('location'),
      setCookies: h.getSetCookie ? h.getSetCookie() : [],
      cacheControl: h.get('cache-control'),
      userId: state.isAuthenticated ? state.toAuth().userId : null,
      error: null,
    });
  } catch (e) {
    out.push({ status: 'error', reason: null, location: null, setCookies: [], error: String(e) });
  }
}
process.stdout.write(JSON.stringify(out));
