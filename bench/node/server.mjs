// The "SDK in the app" baseline for bench/run.py: a Node.js reverse proxy that verifies every
// request with @clerk/backend's verifyToken (networkless: the PEM key via `jwtKey`, no JWKS
// fetch), then forwards it with Node's own http module to the same upstream every contender
// uses. Proxying (rather than answering like the upstream) keeps the comparison like for like:
// every contender pays for one more HTTP hop with a keep-alive upstream pool.
//
// The SDK has no verified-token cache, so every request pays a full RS256 verification; that
// is the cost an application embedding the SDK pays today.
//
// run.py copies this file next to the node_modules it installs (npm install @clerk/backend in
// the work directory) and starts it with:
//   BENCH_PORT BENCH_UPSTREAM_PORT BENCH_PEM (file) BENCH_ISSUER BENCH_AZP
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { verifyToken } from '@clerk/backend';

const port = Number(process.env.BENCH_PORT);
const upstreamPort = Number(process.env.BENCH_UPSTREAM_PORT);
const jwtKey = readFileSync(process.env.BENCH_PEM, 'utf8');
const options = {
  jwtKey,
  issuer: process.env.BENCH_ISSUER,
  authorizedParties: [process.env.BENCH_AZP],
};
const agent = new http.Agent({ keepAlive: true, maxSockets: 512, maxFreeSockets: 512 });

// Bearer header first, else the __session cookie with its __client_uat (same rule as clerkgate:
// 0 < client_uat <= iat, checked once the token is verified).
function findToken(req) {
  const auth = req.headers.authorization;
  if (auth && auth.startsWith('Bearer ')) return { token: auth.slice(7), clientUat: null };
  const cookie = req.headers.cookie;
  if (!cookie) return null;
  let token = null;
  let clientUat = 0;
  for (const part of cookie.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    const name = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    if (name === '__session') token = value;
    else if (name === '__client_uat') clientUat = Number(value) || 0;
  }
  return token ? { token, clientUat } : null;
}

function deny(res, reason) {
  const body = JSON.stringify({ error: 'unauthorized', reason });
  res.writeHead(401, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer(async (req, res) => {
  const found = findToken(req);
  if (!found) return deny(res, 'session-token-missing');
  let claims;
  try {
    claims = await verifyToken(found.token, options);
  } catch (error) {
    return deny(res, error?.reason ?? 'token-invalid');
  }
  if (found.clientUat !== null && !(found.clientUat > 0 && claims.iat >= found.clientUat)) {
    return deny(res, 'session-token-iat-before-client-uat');
  }
  const headers = { ...req.headers };
  delete headers.authorization;
  delete headers.cookie;
  headers['x-user-id'] = claims.sub;
  headers['x-session-id'] = claims.sid;
  const upstream = http.request(
    { host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers, agent },
    (answer) => {
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    },
  );
  upstream.on('error', () => {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  });
  req.pipe(upstream);
});
server.keepAliveTimeout = 75_000;
server.listen(port, '127.0.0.1', () => {
  console.log(`node @clerk/backend proxy on http://127.0.0.1:${port} -> 127.0.0.1:${upstreamPort}`);
});
