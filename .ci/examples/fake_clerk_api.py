#!/usr/bin/env python3
"""A stand-in for Clerk's Backend API for .ci/examples-test: GET /v1/users/{id} only.

    fake_clerk_api.py PORT SECRET_KEY

Answers with a full Clerk User object (the shape both Clerk SDKs parse) when the request carries
`Authorization: Bearer SECRET_KEY`, else Clerk's 401 error; logs each call's path and whether
the key matched to stdout. Listens on 127.0.0.1 only.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SECRET = int(sys.argv[1]), sys.argv[2]
T = 1716883200000


def user(uid):
    email_id = f"idn_{uid}"
    return {
        "object": "user", "id": uid, "external_id": None, "username": None,
        "first_name": "Ada", "last_name": "Lovelace", "image_url": "https://img.clerk.com/fake",
        "has_image": False, "primary_email_address_id": email_id, "primary_phone_number_id": None,
        "primary_web3_wallet_id": None, "password_enabled": True, "two_factor_enabled": False,
        "totp_enabled": False, "backup_code_enabled": False,
        "email_addresses": [{
            "id": email_id, "object": "email_address", "email_address": "ada@example.com",
            "reserved": False, "linked_to": [], "matches_sso_connection": False,
            "created_at": T, "updated_at": T,
            "verification": {"object": "verification_otp", "status": "verified", "strategy": "email_code",
                             "attempts": 1, "expire_at": None},
        }],
        "phone_numbers": [], "web3_wallets": [], "passkeys": [], "external_accounts": [],
        "saml_accounts": [], "enterprise_accounts": [],
        "public_metadata": {"plan": "pro"}, "private_metadata": {}, "unsafe_metadata": {},
        "last_sign_in_at": T, "banned": False, "locked": False, "lockout_expires_in_seconds": None,
        "verification_attempts_remaining": 100, "created_at": T, "updated_at": T,
        "delete_self_enabled": True, "create_organization_enabled": True,
        "create_organizations_limit": None, "last_active_at": T, "legal_accepted_at": None,
        "mfa_enabled_at": None, "mfa_disabled_at": None,
    }


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == f"Bearer {SECRET}"
        print(json.dumps({"path": self.path, "key_ok": ok}), flush=True)
        if not ok:
            return self.reply(401, {"errors": [{"code": "authentication_invalid", "message": "bad key",
                                                "long_message": "The secret key is invalid."}]})
        parts = self.path.split("?")[0].split("/")
        if len(parts) == 4 and parts[1] == "v1" and parts[2] == "users":
            return self.reply(200, user(parts[3]))
        self.reply(404, {"errors": [{"code": "resource_not_found", "message": "not found",
                                     "long_message": "not found"}]})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
