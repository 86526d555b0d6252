"""A FastAPI backend behind clerkgate.

It never sees a token: clerkgate verified it and sends the identity as headers (and has removed
any the client tried to send). Run it on loopback only, so nothing reaches it without passing
clerkgate:

    CLERKGATE_LOCAL_API_TOKEN=... uvicorn app:app --host 127.0.0.1 --port 3000

Clerk's own Python SDK talks to clerkgate's local API (127.0.0.1:9091) instead of
api.clerk.com, so the app holds no Clerk secret key: the bearer it passes is clerkgate's
local_api.token.
"""
import base64
import json
import os

from clerk_backend_api import Clerk
from fastapi import FastAPI, Header, HTTPException

clerk = Clerk(
    bearer_auth=os.environ["CLERKGATE_LOCAL_API_TOKEN"],
    server_url=os.environ.get("CLERKGATE_LOCAL_API_URL", "http://127.0.0.1:9091") + "/v1",
)
app = FastAPI()


def decode_claims(raw: str | None):
    """X-Clerk-Claims: the whole verified payload as base64url JSON (unpadded)."""
    if not raw:
        return None
    return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


@app.get("/healthz")
def healthz():
    return "ok"


@app.get("/me")
def me(
    x_user_id: str | None = Header(default=None),
    x_session_id: str | None = Header(default=None),
    x_org_id: str | None = Header(default=None),
    x_org_role: str | None = Header(default=None),
    x_org_permissions: str | None = Header(default=None),
    x_clerk_claims: str | None = Header(default=None),
):
    if not x_user_id:
        # Only on routes clerkgate marks optional or public; required routes never get here.
        raise HTTPException(status_code=401, detail="signed out")
    permissions = [p for p in (x_org_permissions or "").split(",") if p]
    try:
        user = clerk.users.get(user_id=x_user_id)
    except Exception as e:  # the SDK raises its own error types
        raise HTTPException(status_code=502, detail=f"user lookup failed: {type(e).__name__}")
    email = None
    for address in user.email_addresses or []:
        if address.id == user.primary_email_address_id:
            email = address.email_address
    return {
        "userId": x_user_id,
        "sessionId": x_session_id,
        "orgId": x_org_id,
        "orgRole": x_org_role,
        "permissions": permissions,
        "canManageBilling": "org:billing:manage" in permissions,
        "claims": decode_claims(x_clerk_claims),
        "firstName": user.first_name,
        "email": email,
    }
