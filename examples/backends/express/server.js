// An Express backend behind clerkgate. It never sees a token: clerkgate verified it and sends
// the identity as headers (and has removed any the client tried to send). The app listens on
// loopback only, so nothing reaches it without passing clerkgate.
//
//   CLERKGATE_LOCAL_API_TOKEN=... PORT=3000 node server.js
//
// Clerk's own SDK talks to clerkgate's local API (127.0.0.1:9091) instead of api.clerk.com,
// so the app holds no Clerk secret key: the "secret key" it passes is clerkgate's
// local_api.token.
"use strict";
const express = require("express");
const { createClerkClient } = require("@clerk/backend");

const clerk = createClerkClient({
  secretKey: process.env.CLERKGATE_LOCAL_API_TOKEN,
  apiUrl: process.env.CLERKGATE_LOCAL_API_URL || "http://127.0.0.1:9091",
});

// X-Clerk-Claims: the whole verified payload as base64url JSON.
function claims(req) {
  const raw = req.get("x-clerk-claims");
  return raw ? JSON.parse(Buffer.from(raw, "base64url").toString("utf8")) : null;
}

const app = express();

app.get("/healthz", (req, res) => res.send("ok"));

app.get("/me", async (req, res) => {
  const userId = req.get("x-user-id");
  if (!userId) {
    // Only on routes clerkgate marks optional or public; required routes never get here.
    return res.status(401).json({ error: "signed out" });
  }
  const permissions = (req.get("x-org-permissions") || "").split(",").filter(Boolean);
  try {
    const user = await clerk.users.getUser(userId);
    res.json({
      userId,
      sessionId: req.get("x-session-id") || null,
      orgId: req.get("x-org-id") || null,
      orgRole: req.get("x-org-role") || null,
      permissions,
      canManageBilling: permissions.includes("org:billing:manage"),
      claims: claims(req),
      firstName: user.firstName,
      email: user.primaryEmailAddress ? user.primaryEmailAddress.emailAddress : null,
    });
  } catch (e) {
    res.status(502).json({ error: "user lookup failed", status: e.status || null });
  }
});

const port = Number(process.env.PORT || 3000);
app.listen(port, "127.0.0.1", () => console.log(`express example on 127.0.0.1:${port}`));
