"""Bearer tokens: the admin token (model management) and the optional data-plane token
(Act, sessions, ModelInfer). Checked per call by serving/admission.py, in constant time."""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "BATCHRL_ADMIN_TOKEN"
DATA_TOKEN_ENV = "BATCHRL_DATA_TOKEN"


def read_token(token_file: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The token from ``token_file`` (first line) or else $``env``; None when neither is set."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(env) or None


def read_admin_token(token_file: str | None = None) -> str | None:
    return read_token(token_file, TOKEN_ENV)


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _matches(token: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(token.encode(), expected.encode())


@dataclass(frozen=True)
class Tokens:
    """The server's tokens. ``admin`` guards model management (None: disabled); ``data``, when set,
    guards the data plane too, where the admin token is also accepted."""

    admin: str | None = None
    data: str | None = None

    def is_admin(self, metadata) -> bool:
        token = bearer_token(metadata)
        return token is not None and _matches(token, self.admin)

    def refuse_admin(self, metadata) -> str | None:
        """Why an admin call is refused, or None when it is allowed."""
        if self.admin is None:
            return (f"model management is disabled on this server: start it with ${TOKEN_ENV} or "
                    "--admin-token-file to enable it")
        token = bearer_token(metadata)
        if token is None:
            return "model management needs the metadata `authorization: Bearer <admin token>`"
        if not _matches(token, self.admin):
            return "the bearer token is not the server's admin token"
        return None

    def refuse_data(self, metadata) -> str | None:
        """Why a data-plane call is refused, or None when it is allowed (always, without a data token)."""
        if self.data is None:
            return None
        token = bearer_token(metadata)
        if token is None:
            return "this server needs the metadata `authorization: Bearer <data token>` on every call"
        if not (_matches(token, self.data) or _matches(token, self.admin)):
            return "the bearer token is not the server's data token"
        return None
