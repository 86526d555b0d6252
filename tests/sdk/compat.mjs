// Drives one Clerk Backend API with Clerk's own Node SDK (@clerk/backend) and prints every
// result as one JSON object on stdout, keyed by call. tests/it/sdk_compat.rs runs it twice from
// the same starting state, once against clerkgate's local API and once against the fake Clerk
// directly, and compares the two outputs call by call.
//
//   API_URL=http://127.0.0.1:PORT SECRET_KEY=sk_... SESSION_TOKEN=eyJ... PUBLISHABLE_KEY=pk_... \
//     node compat.mjs
//
// The calls and their order are the scenario: the fake's state (seeded by the Rust test) must be
// the same at the start of both runs. A result is {"ok": <the SDK's value as JSON>} or
// {"error": {...}} with the parts of the SDK's error that do not depend on the URL.

import { createClerkClient, verifyToken } from "@clerk/backend";

const apiUrl = process.env.API_URL;
const secretKey = process.env.SECRET_KEY;
const sessionToken = process.env.SESSION_TOKEN;
if (!apiUrl || !secretKey || !sessionToken || !process.env.PUBLISHABLE_KEY) {
  console.error("API_URL, SECRET_KEY, SESSION_TOKEN and PUBLISHABLE_KEY are required");
  process.exit(2);
}

const clerk = createClerkClient({ apiUrl, secretKey });
const results = {};

function describe(err) {
  if (err && typeof err === "object" && "status" in err && Array.isArray(err.errors)) {
    // ClerkAPIResponseError: what an application branches on.
    return {
      kind: "api",
      status: err.status,
      codes: err.errors.map((e) => e.code),
      longMessages: err.errors.map((e) => e.longMessage ?? null),
      // An exception inside the SDK (network, parsing) has only its message to tell.
      messages: err.errors.map((e) => (e.code === "unexpected_error" ? e.message : null)),
      clerkTraceId: err.clerkTraceId ?? null,
      retryAfter: err.retryAfter ?? null,
    };
  }
  // TokenVerificationError and the rest: messages name URLs, so only the kind and reason.
  return { kind: err?.name ?? typeof err, reason: err?.reason ?? null };
}

async function run(name, fn) {
  try {
    const value = await fn();
    results[name] = { ok: JSON.parse(JSON.stringify(value ?? null)) };
  } catch (err) {
    results[name] = { error: describe(err) };
  }
}

const users = clerk.users;
const sessions = clerk.sessions;

// Reads, errors and Clerk's own 500.
await run("getUser", () => users.getUser("user_ada"));
await run("getUser missing", () => users.getUser("user_nobody"));
await run("getUser missing again", () => users.getUser("user_nobody"));
await run("getUser clerk 500", () => users.getUser("user_boom"));

// Lists and counts (getUserList also calls GET /v1/users/count with the filters).
await run("getUserList", () => users.getUserList());
await run("getUserList filtered", () => users.getUserList({ userId: ["user_ada", "user_bob"], limit: 1 }));
await run("getUserList by email", () => users.getUserList({ emailAddress: ["user_cy@example.com"] }));
await run("getCount", () => users.getCount());
await run("getCount filtered", () => users.getCount({ userId: ["user_ada"] }));
await run("getCount query", () => users.getCount({ query: "Bo" }));

// Updates: updateUser with metadata is PATCH /users/{id} plus PUT /users/{id}/metadata.
await run("updateUser name and metadata", () =>
  users.updateUser("user_ada", { firstName: "Ada2", publicMetadata: { plan: "pro", nested: { a: 1 } } }),
);
await run("getUser after updateUser", () => users.getUser("user_ada"));
await run("updateUserMetadata", () => users.updateUserMetadata("user_ada", { publicMetadata: { nested: { b: 2 } } }));
await run("getUser after updateUserMetadata", () => users.getUser("user_ada"));
await run("replaceUserMetadata", () => users.replaceUserMetadata("user_ada", { publicMetadata: { tier: 2 } }));
await run("getUser after replaceUserMetadata", () => users.getUser("user_ada"));
await run("updateUser missing", () => users.updateUser("user_nobody", { firstName: "X" }));

// Moderation.
await run("getUser before ban", () => users.getUser("user_bob"));
await run("banUser", () => users.banUser("user_bob"));
await run("getUser after ban", () => users.getUser("user_bob"));
await run("unbanUser", () => users.unbanUser("user_bob"));
await run("lockUser", () => users.lockUser("user_cy"));
await run("getUser after lock", () => users.getUser("user_cy"));
await run("unlockUser", () => users.unlockUser("user_cy"));
await run("banUser missing", () => users.banUser("user_nobody"));

// Organization memberships of a user.
await run("getOrganizationMembershipList", () => users.getOrganizationMembershipList({ userId: "user_ada" }));
await run("getOrganizationMembershipList page", () =>
  users.getOrganizationMembershipList({ userId: "user_ada", limit: 1, offset: 1 }),
);

// Sessions.
await run("getSessionList", () => sessions.getSessionList({ userId: "user_ada" }));
await run("getSession", () => sessions.getSession("sess_ada1"));
await run("getSession missing", () => sessions.getSession("sess_nobody"));
await run("getToken template", () => sessions.getToken("sess_ada1", "supabase"));
await run("getToken default", () => sessions.getToken("sess_ada1"));
await run("getToken expiresIn", () => sessions.getToken("sess_ada1", "supabase", 120));
await run("getToken unknown template", () => sessions.getToken("sess_ada1", "nope"));
await run("verifySession", () => sessions.verifySession("sess_ada1", sessionToken));
await run("revokeSession", () => sessions.revokeSession("sess_ada2"));
await run("getSession after revoke", () => sessions.getSession("sess_ada2"));
await run("createSession", () => sessions.createSession({ userId: "user_ada" }));

// Deletion.
await run("deleteUser", () => users.deleteUser("user_del"));
await run("getUser after delete", () => users.getUser("user_del"));

// Token verification against {apiUrl}/v1/jwks.
await run("getJwks", () => clerk.jwks.getJwks());
await run("verifyToken", () => verifyToken(sessionToken, { secretKey, apiUrl, skipJwksCache: true }));
await run("verifyToken garbage", () => verifyToken("not.a.token", { secretKey, apiUrl, skipJwksCache: true }));
await run("authenticateRequest", async () => {
  const request = new Request("http://app.example/private", {
    headers: { Authorization: `Bearer ${sessionToken}` },
  });
  const state = await clerk.authenticateRequest(request, { publishableKey: process.env.PUBLISHABLE_KEY });
  const auth = state.toAuth();
  return { status: state.status, reason: state.reason ?? null, userId: auth?.userId ?? null, sessionId: auth?.sessionId ?? null };
});

process.stdout.write(JSON.stringify(results));
