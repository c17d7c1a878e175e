"""Keeping credentials out of everything the project writes or prints.

``redact`` is applied where configs are turned into data (``config.flatten`` / ``config.to_dict``)
and where params are logged; ``split_credentials`` / ``export_credentials`` move a tracking URI's
``user:password@`` into the environment variables MLflow reads (MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD), so MLflow itself only ever sees, stores and prints the clean URI.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"
USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_SECRET_KEY = re.compile(r"(^|[._])(password|passwd|secret|token|api_key|access_key|credentials?)$", re.I)
# scheme://userinfo@ ; the userinfo is "user:password" or a bare token
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s:]*)(:[^/@\s]*)?@")


def is_secret_key(key: str) -> bool:
    """A key that names a secret: ``password``, ``tracking.api_key``, ``aws_secret``, ..."""
    return bool(_SECRET_KEY.search(key))


def _mask_userinfo(m: re.Match) -> str:
    scheme, user, password = m.groups()
    return f"{scheme}{user}:{MASK}@" if password is not None else f"{scheme}{MASK}@"


def redact_uri(text: str) -> str:
    """Every ``scheme://user:pw@`` in ``text`` as ``scheme://user:***@`` (a bare ``token@`` as ``***@``)."""
    return _USERINFO.sub(_mask_userinfo, text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings) with secret-named keys' values masked and
    credentials in URIs redacted; other values are returned as they are."""
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(str(k)) and obj[k] is not None else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_uri(obj)
    return obj


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without userinfo, user, password)``; the URI unchanged and ``None``s when it has none."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) if sep else None


def export_credentials(uri: str) -> str:
    """The URI without userinfo; its user / password go to MLflow's environment variables of this
    process (MLflow sends them as HTTP basic auth on every request to the tracking server)."""
    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ[USER_ENV] = user
    if password is not None:
        os.environ[PASSWORD_ENV] = password
    return clean


def with_env_credentials(uri: str) -> str:
    """An http(s) URI with this process's MLflow credentials put back in, for a process that does not
    share this environment (a Ray worker on another node). Keep it in memory: never log or print it."""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    parts = urlsplit(uri)
    if not user or parts.scheme not in ("http", "https") or "@" in parts.netloc:
        return uri
    userinfo = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit((parts.scheme, f"{userinfo}@{parts.netloc}", parts.path, parts.query, parts.fragment))
