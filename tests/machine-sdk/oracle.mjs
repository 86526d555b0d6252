// The @clerk/backend oracle for tests/it/machine/sdk.rs: reads one JSON job on stdin, answers
// one JSON result on stdout. Nothing here decides anything: every answer is the SDK's own.
//
//   requests: authenticateRequest(Bearer token, { acceptsToken }) against the fake Backend API
//   has:      signedInAuthObject(claims).has(params)
//   reverification: reverificationError(config), the body clerk-js recognises
import { createClerkClient } from '@clerk/backend';
import { signedInAuthObject, reverificationError } from '@clerk/backend/internal';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const job = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const clerk = createClerkClient({
  secretKey: job.secretKey,
  publishableKey: job.publishableKey,
  apiUrl: job.apiUrl,
  telemetry: { disabled: true },
});

const requests = [];
for (const { token, accepts } of job.requests ?? []) {
  const request = new Request('http://localhost:3000/api', {
    headers: { authorization: `Bearer ${token}` },
  });
  try {
    const state = await clerk.authenticateRequest(request, { acceptsToken: accepts });
    const auth = state.isAuthenticated ? state.toAuth() : null;
    requests.push({
      status: state.status,
      reason: state.reason ?? null,
      tokenType: state.tokenType ?? null,
      subject: auth ? (auth.userId ?? auth.subject ?? null) : null,
    });
  } catch (e) {
    requests.push({ status: 'error', reason: String(e && e.message), tokenType: null });
  }
}

// null: the SDK throws while decoding the claims (a malformed `fea`), so nothing is granted.
const has = (job.has ?? []).map(({ claims, params }) => {
  try {
    return signedInAuthObject({}, 'token', claims).has(params);
  } catch {
    return null;
  }
});
const reverification = (job.reverification ?? []).map((c) => reverificationError(c));

process.stdout.write(JSON.stringify({ requests, has, reverification }));
