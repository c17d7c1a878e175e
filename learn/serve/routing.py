"""Which variant answers a user: a salted hash of the user id against the challenger's share.

    router = Router(challenger_share=0.1, salt="exp-2026-12")
    router.variant("user-42", has_challenger=True)     # "champion" or "challenger", always the same
    user_hash("user-42", "exp-2026-12")                 # what the assignment log stores instead of the id

The hash is BLAKE2b keyed with the salt (16 bytes, hex), the same in every process, machine and
Python version (Python's own ``hash`` is randomised per process). The first 8 bytes read as an
integer over 2**64 give the user's bucket in [0, 1); a bucket under ``challenger_share`` goes to
the challenger. Changing the salt reshuffles every user; changing the share moves only the users
whose bucket lies between the old and the new share. A request without a user id always goes to
the champion, and so does every request when there is no challenger.

To join the assignment log with click data, hash the clicks' user ids with :func:`user_hash` and
the same salt.
"""

from __future__ import annotations

import hashlib

CHAMPION = "champion"
CHALLENGER = "challenger"
VARIANTS = (CHAMPION, CHALLENGER)
_DIGEST_BYTES = 16
_BUCKET_BYTES = 8


def _digest(user_id: str, salt: str) -> bytes:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    if not isinstance(salt, str):
        raise ValueError(f"salt must be a string, got {type(salt).__name__}")
    # BLAKE2b takes a key of at most 64 bytes: a longer salt is hashed down to one first
    key = salt.encode("utf-8")
    if len(key) > 64:
        key = hashlib.blake2b(key, digest_size=64).digest()
    return hashlib.blake2b(user_id.encode("utf-8"), key=key, digest_size=_DIGEST_BYTES).digest()


def user_hash(user_id: str, salt: str) -> str:
    """The salted hash of ``user_id`` as 32 hex characters (what the assignment log keeps)."""
    return _digest(user_id, salt).hex()


def bucket_of_hash(hex_hash: str) -> float:
    """The bucket in [0, 1) of a :func:`user_hash` value."""
    return int(hex_hash[: 2 * _BUCKET_BYTES], 16) / 2.0 ** (8 * _BUCKET_BYTES)


def bucket(user_id: str, salt: str) -> float:
    """The user's bucket in [0, 1): uniform over users, fixed for a (user, salt) pair."""
    return bucket_of_hash(user_hash(user_id, salt))


def check_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"challenger_share must be a number in [0, 1], got {share!r}")
    return float(share)


class Router:
    """Deterministic champion/challenger assignment by salted user-id hash."""

    def __init__(self, challenger_share: float, salt: str) -> None:
        self.challenger_share = check_share(challenger_share)
        if not isinstance(salt, str):
            raise ValueError(f"salt must be a string, got {type(salt).__name__}")
        self.salt = salt

    def assign(self, user_id: str | None, has_challenger: bool) -> tuple[str, str | None]:
        """(variant, user hash or None for a request without a user id)."""
        if user_id is None:
            return CHAMPION, None
        hashed = user_hash(user_id, self.salt)
        if has_challenger and bucket_of_hash(hashed) < self.challenger_share:
            return CHALLENGER, hashed
        return CHAMPION, hashed

    def variant(self, user_id: str | None, has_challenger: bool = True) -> str:
        return self.assign(user_id, has_challenger)[0]
