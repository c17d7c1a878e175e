"""Salted hash routing: deterministic per user, the configured share over many users, champion only
without a challenger or a user id."""

import pytest

from learn.serve.routing import CHALLENGER, CHAMPION, Router, bucket, bucket_of_hash, user_hash

USERS = [f"user-{i}" for i in range(2000)]


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_share_over_2000_users_is_within_two_points(share):
    router = Router(share, salt="exp-1")
    routed = [router.variant(u, has_challenger=True) for u in USERS]
    observed = routed.count(CHALLENGER) / len(USERS)
    assert abs(observed - share) <= 0.02, observed
    assert set(routed) == {CHAMPION, CHALLENGER}


def test_same_user_same_variant_and_a_new_salt_reshuffles():
    a, b = Router(0.3, "exp-1"), Router(0.3, "exp-1")
    first = [a.variant(u) for u in USERS]
    assert first == [a.variant(u) for u in USERS] == [b.variant(u) for u in USERS]
    other = [Router(0.3, "exp-2").variant(u) for u in USERS]
    changed = sum(x != y for x, y in zip(first, other)) / len(USERS)
    assert 0.3 < changed < 0.5  # independent assignments at share 0.3 differ for 2 x 0.3 x 0.7 = 42% of users


def test_growing_the_share_moves_only_champion_users():
    small, large = Router(0.1, "s"), Router(0.2, "s")
    for u in USERS:
        if small.variant(u) == CHALLENGER:
            assert large.variant(u) == CHALLENGER


def test_no_challenger_or_no_user_goes_to_champion():
    router = Router(1.0, "s")
    assert all(router.variant(u, has_challenger=False) == CHAMPION for u in USERS[:200])
    assert all(router.variant(u, has_challenger=True) == CHALLENGER for u in USERS[:200])
    assert router.assign(None, has_challenger=True) == (CHAMPION, None)
    assert all(Router(0.0, "s").variant(u) == CHAMPION for u in USERS[:200])


def test_hash_is_a_fixed_function_and_matches_the_bucket():
    """Keyed BLAKE2b, not Python's per-process hash: the value is pinned here, so a log written by one
    process (or release) joins with click data hashed by another."""
    h = user_hash("user-7", "exp-1")
    assert h == "28e428194fcf10fb1a60e24ae6f6c87c"
    assert bucket("user-7", "exp-1") == bucket_of_hash(h) == int(h[:16], 16) / 2.0 ** 64
    assert user_hash("user-7", "exp-2") != h
    assert user_hash("user-7", "x" * 200) != user_hash("user-7", "y" * 200)  # long salts still count


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="challenger_share"):
        Router(1.5, "s")
    with pytest.raises(ValueError, match="challenger_share"):
        Router(True, "s")
    with pytest.raises(ValueError, match="salt"):
        Router(0.1, None)
    with pytest.raises(ValueError, match="user_id"):
        user_hash("", "s")
    with pytest.raises(ValueError, match="user_id"):
        Router(0.1, "s").assign(42, True)
