"""Bearer-token authentication for model management (LoadModel, UnloadModel)."""
from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "BATCHRL_ADMIN_TOKEN"


def read_admin_token(token_file: str | None = None) -> str | None:
    """The admin token from ``token_file`` (first line) or else $BATCHRL_ADMIN_TOKEN; None when neither is set."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"admin token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def authorized(metadata, admin_token: str | None) -> tuple[bool, str]:
    """(allowed, reason when not)."""
    if admin_token is None:
        return False, (f"model management is disabled on this server: start it with ${TOKEN_ENV} or "
                       "--admin-token-file to enable it")
    token = bearer_token(metadata)
    if token is None:
        return False, "model management needs the metadata `authorization: Bearer <admin token>`"
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        return False, "the bearer token is not the server's admin token"
    return True, ""
