"""The principals file, the server's registry of principals, and the token buckets.

No server here: PrincipalsFile and PrincipalRegistry on a temporary file (the
registry's reload interval is set to 0 where a test changes the file), and
TokenBuckets with an injected clock. Tokens are wrapped in `Token`, whose repr
is redacted, and checks on them assert on booleans: a failure never prints one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from broker.security import principals as principals_module
from broker.security.principals import (
    ROLES,
    PrincipalRegistry,
    PrincipalsError,
    PrincipalsFile,
    hash_token,
    new_token,
)
from broker.security.ratelimit import TokenBuckets
from tests.support.auth_helpers import Secrets, Token

GOOD_HASH = "0" * 64


@pytest.fixture
def sensitive() -> Secrets:
    return Secrets()


@pytest.fixture
def source(tmp_path: Path) -> PrincipalsFile:
    return PrincipalsFile(tmp_path / "data" / "principals.json")


@pytest.fixture
def instant_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry checks the file on every call instead of once a second."""
    monkeypatch.setattr(principals_module, "_RELOAD_INTERVAL", 0.0)


def add(source: PrincipalsFile, sensitive: Secrets, name: str, *roles: str, **kw: Any) -> Token:
    token = source.add(name, roles, **kw)
    assert token is not None
    return sensitive.add(token)


def replace_text(path: Path, content: str | bytes) -> None:
    """Write the file the way editors and PrincipalsFile do: a new file renamed over it."""
    tmp = path.with_name(path.name + ".edit")
    data = content.encode() if isinstance(content, str) else content
    tmp.write_bytes(data)
    os.replace(tmp, path)


def document(*principals: dict[str, Any]) -> str:
    return json.dumps({"principals": list(principals)})


def found(registry: PrincipalRegistry, token: str) -> str | None:
    principal = registry.by_token(token)
    return None if principal is None else principal.name


# -- the file -----------------------------------------------------------------------------------


def test_file_stores_only_sha256_hashes(source: PrincipalsFile, sensitive: Secrets) -> None:
    alice = add(source, sensitive, "alice", "viewer")
    bob = add(source, sensitive, "bob", "admin", image_hosts=["b"])
    text = source.path.read_text()
    sensitive.assert_absent(text, "principals.json")
    stored = json.loads(text)["principals"]
    hashes = [p["token_sha256"] for p in stored]
    expected = [[hashlib.sha256(t.encode()).hexdigest()] for t in (alice, bob)]
    same = hashes == expected
    assert same, "the file does not hold exactly the SHA-256 of each token"
    assert hash_token(alice) == hashlib.sha256(alice.encode()).hexdigest()
    assert stat.S_IMODE(source.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(source.path.parent.stat().st_mode) == 0o700
    assert [p["image_hosts"] for p in stored] == [[], ["b"]]


def test_new_tokens_are_random_and_recognisable(sensitive: Secrets) -> None:
    tokens = [sensitive.add(new_token()) for _ in range(20)]
    distinct = len(set(tokens)) == len(tokens)
    shaped = all(t.startswith("cbt_") and len(t) >= 40 for t in tokens)
    assert distinct, "new_token() repeated itself"
    assert shaped, "tokens are not cbt_ followed by 256 random bits"


def test_load_of_a_missing_file_is_empty(source: PrincipalsFile) -> None:
    assert not source.exists()
    assert source.load() == []
    assert PrincipalRegistry(source).principals() == []


def test_add_refuses_a_duplicate_name(source: PrincipalsFile, sensitive: Secrets) -> None:
    add(source, sensitive, "alice", "viewer")
    before = source.path.read_bytes()
    with pytest.raises(PrincipalsError, match="alice already exists"):
        source.add("alice", ["admin"])
    assert source.path.read_bytes() == before


@pytest.mark.parametrize(
    ("name", "roles", "kw", "message"),
    [
        ("Alice", ["viewer"], {}, "name 'Alice' is invalid"),
        ("alice", [], {}, "roles must be among"),
        ("alice", ["root"], {}, "roles must be among"),
        ("alice", ["viewer"], {"certificate_identities": ["node-7"]}, "cn:NAME or uri:URI"),
        ("alice", ["viewer"], {"certificate_identities": ["cn:"]}, "cn:NAME or uri:URI"),
        ("alice", ["viewer"], {"with_token": False}, "needs a token or a certificate identity"),
    ],
    ids=["bad-name", "no-role", "unknown-role", "bare-identity", "empty-cn", "nothing-to-log-in"],
)
def test_add_refuses_bad_principals(
    source: PrincipalsFile, name: str, roles: list[str], kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(PrincipalsError, match=message):
        source.add(name, roles, **kw)
    assert source.load() == []


def test_certificate_only_principal_has_no_token(source: PrincipalsFile) -> None:
    token = source.add(
        "node-7", ["launcher"], certificate_identities=["cn:node-7"], with_token=False
    )
    assert token is None
    (principal,) = source.load()
    assert principal.token_hashes == ()
    assert principal.certificate_identities == {"cn:node-7"}


def test_remove_and_rotate_need_an_existing_principal(source: PrincipalsFile) -> None:
    with pytest.raises(PrincipalsError, match="nobody does not exist"):
        source.remove("nobody")
    with pytest.raises(PrincipalsError, match="nobody does not exist"):
        source.rotate_token("nobody")


def test_rotate_replaces_every_token_and_keeps_the_rest(
    source: PrincipalsFile, sensitive: Secrets
) -> None:
    source.path.parent.mkdir(mode=0o700, parents=True)
    replace_text(
        source.path,
        document(
            {
                "name": "ci",
                "roles": ["launcher", "viewer"],
                "image_hosts": ["a"],
                "token_sha256": [GOOD_HASH, "1" * 64],
                "certificate_identities": ["uri:spiffe://example.org/ci"],
            },
            {"name": "other", "roles": ["viewer"], "token_sha256": ["2" * 64]},
        ),
    )
    new = sensitive.add(source.rotate_token("ci"))
    ci, other = source.load()
    rotated = ci.token_hashes == (hash_token(new),)
    assert rotated, "rotate-token did not leave exactly the new token"
    assert ci.roles == {"launcher", "viewer"}
    assert ci.image_hosts == {"a"}
    assert ci.certificate_identities == {"uri:spiffe://example.org/ci"}
    assert other.token_hashes == ("2" * 64,)
    sensitive.assert_absent(source.path.read_text(), "principals.json")


# -- invalid files ------------------------------------------------------------------------------


def _principal(**fields: Any) -> dict[str, Any]:
    return {"name": "alice", "roles": ["viewer"], "token_sha256": [GOOD_HASH], **fields}


INVALID_FILES: dict[str, tuple[str, str]] = {
    "not-json": ("{ nope", "not valid JSON"),
    "not-an-object": ("[]", 'expected {"principals": [...]}'),
    "principals-not-a-list": ('{"principals": {}}', 'expected {"principals": [...]}'),
    "principal-not-an-object": ('{"principals": ["alice"]}', "must be a JSON object"),
    "no-name": (document(_principal(name=None)), "name None is invalid"),
    "uppercase-name": (document(_principal(name="Alice")), "name 'Alice' is invalid"),
    "no-roles": (document(_principal(roles=[])), "roles must be among"),
    "unknown-role": (document(_principal(roles=["viewer", "root"])), "roles must be among"),
    "short-hash": (document(_principal(token_sha256=["abc"])), "SHA-256 hex digests"),
    "uppercase-hash": (document(_principal(token_sha256=["A" * 64])), "SHA-256 hex digests"),
    "bare-identity": (
        document(_principal(certificate_identities=["node-7"])),
        "cn:NAME or uri:URI",
    ),
    "duplicate-names": (document(_principal(), _principal()), "names must be unique"),
}


@pytest.mark.parametrize("case", INVALID_FILES)
def test_invalid_file_raises_principals_error(source: PrincipalsFile, case: str) -> None:
    content, message = INVALID_FILES[case]
    source.path.parent.mkdir(parents=True)
    source.path.write_text(content)
    with pytest.raises(PrincipalsError) as raised:
        source.load()
    assert message in str(raised.value)
    assert str(source.path) in str(raised.value), "the error does not name the file"
    with pytest.raises(PrincipalsError):
        PrincipalRegistry(source)


#: Files with a field of the wrong JSON type (or not text at all). Each must be
#: refused with PrincipalsError like any other invalid file, never accepted with a
#: different meaning, and never with another exception (which the server does not
#: expect: see test_broken_edit_keeps_the_last_good_principals).
TYPE_CONFUSED_FILES: dict[str, str | bytes] = {
    "roles-a-number": document(_principal(roles=5)),
    "roles-nested-list": document(_principal(roles=[["admin"]])),
    "hashes-a-number": document(_principal(token_sha256=5)),
    # Not a one-host scope: a string is not a list ({"t", "e", "a", "m", "-"} today).
    "image-hosts-a-string": document(_principal(image_hosts="team-a")),
    "not-utf8": b'{"principals": [{"name": "\xff"}]}',
}


@pytest.mark.parametrize("case", TYPE_CONFUSED_FILES)
def test_type_confused_file_raises_principals_error(source: PrincipalsFile, case: str) -> None:
    source.path.parent.mkdir(parents=True)
    replace_text(source.path, TYPE_CONFUSED_FILES[case])
    outcome: object
    try:
        outcome = source.load()
    except PrincipalsError as exc:
        outcome = exc
    except Exception as exc:  # noqa: BLE001 - the point: which exception escapes
        pytest.fail(f"load() raised {type(exc).__name__}: {exc}, not PrincipalsError")
    assert isinstance(outcome, PrincipalsError), f"load() accepted the file: {outcome}"
    assert str(source.path) in str(outcome), "the error does not name the file"


# -- the registry -------------------------------------------------------------------------------


@pytest.fixture
def people(source: PrincipalsFile, sensitive: Secrets) -> dict[str, Token]:
    return {
        "alice": add(source, sensitive, "alice", "viewer"),
        "bob": add(source, sensitive, "bob", "admin", "launcher", image_hosts=["b"]),
        "carol": add(
            source,
            sensitive,
            "carol",
            "launcher",
            certificate_identities=["cn:carol", "uri:spiffe://example.org/carol"],
        ),
    }


def test_by_token_finds_the_right_principal(
    source: PrincipalsFile, people: dict[str, Token], sensitive: Secrets
) -> None:
    registry = PrincipalRegistry(source)
    answers = {name: found(registry, token) for name, token in people.items()}
    assert answers == {name: name for name in people}
    bob = registry.by_token(people["bob"])
    assert bob is not None
    assert bob.roles == {"admin", "launcher"}
    assert bob.image_hosts == {"b"}
    assert bob.may_use_host("b")
    assert not bob.may_use_host("a")
    alice = registry.by_token(people["alice"])
    assert alice is not None
    assert alice.may_use_host("anything"), "no image_hosts means every host"


def test_by_token_finds_nobody_for_other_strings(
    source: PrincipalsFile, people: dict[str, Token], sensitive: Secrets
) -> None:
    registry = PrincipalRegistry(source)
    alice = people["alice"]
    others = {
        "a fresh token": sensitive.add(new_token()),
        "empty": "",
        "the stored hash itself": hash_token(alice),
        "a prefix": sensitive.add(alice[:-1]),
        "with a newline": sensitive.add(alice + "\n"),
        "upper case": sensitive.add(alice.upper()),
    }
    matches = {what: found(registry, value) for what, value in others.items()}
    assert matches == dict.fromkeys(others)


def test_by_certificate(source: PrincipalsFile, people: dict[str, Token]) -> None:
    registry = PrincipalRegistry(source)

    def who(*identities: str) -> str | None:
        principal = registry.by_certificate(identities)
        return None if principal is None else principal.name

    assert who("cn:carol") == "carol"
    assert who("cn:somebody", "uri:spiffe://example.org/carol") == "carol"
    assert who("carol") is None, "an identity without its cn:/uri: form matched"
    assert who("uri:carol") is None
    assert who("cn:alice") is None
    assert who() is None


def test_registry_sees_added_removed_and_rotated_principals(
    source: PrincipalsFile, people: dict[str, Token], sensitive: Secrets, instant_reload: None
) -> None:
    registry = PrincipalRegistry(source)
    dave = add(source, sensitive, "dave", "provisioner")
    assert found(registry, dave) == "dave"
    source.remove("alice")
    assert found(registry, people["alice"]) is None
    new_bob = sensitive.add(source.rotate_token("bob"))
    assert found(registry, people["bob"]) is None
    assert found(registry, new_bob) == "bob"
    assert sorted(p.name for p in registry.principals()) == ["bob", "carol", "dave"]


BROKEN_EDITS: dict[str, str | bytes] = {
    "truncated-json": '{"principals": [',
    "empty-file": "",
    "principals-not-a-list": '{"principals": "everyone"}',
    "unknown-role": document(_principal(roles=["root"])),
}
# One of each failure kind of TYPE_CONFUSED_FILES is enough here.
TYPE_CONFUSED_EDITS = ("roles-a-number", "image-hosts-a-string", "not-utf8")


@pytest.mark.parametrize(
    "edit",
    [
        *BROKEN_EDITS,
        *TYPE_CONFUSED_EDITS,
    ],
)
def test_broken_edit_keeps_the_last_good_principals(
    source: PrincipalsFile,
    people: dict[str, Token],
    sensitive: Secrets,
    instant_reload: None,
    edit: str,
) -> None:
    registry = PrincipalRegistry(source)
    good = source.path.read_text()
    replace_text(source.path, {**BROKEN_EDITS, **TYPE_CONFUSED_FILES}[edit])
    try:
        answers = {name: found(registry, token) for name, token in people.items()}
        by_cert = registry.by_certificate(["cn:carol"])
    except Exception as exc:  # noqa: BLE001 - the point: nothing may escape
        pytest.fail(f"the registry raised {type(exc).__name__} on a broken edit: {exc}")
    assert answers == {name: name for name in people}, "a broken edit changed who may log in"
    assert by_cert is not None
    # Once the file is good again, its changes apply.
    replace_text(source.path, good)
    eve = add(source, sensitive, "eve", "viewer")
    assert found(registry, eve) == "eve"


def test_deleting_the_file_removes_every_principal(
    source: PrincipalsFile, people: dict[str, Token], instant_reload: None
) -> None:
    registry = PrincipalRegistry(source)
    assert found(registry, people["alice"]) == "alice"
    source.path.unlink()
    assert registry.principals() == []
    assert found(registry, people["alice"]) is None


# -- token buckets ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def takes(buckets: TokenBuckets, key: str, limit: int = 1000) -> int:
    """How many calls `key` may make right now (bounded)."""
    count = 0
    while count < limit and buckets.take(key):
        count += 1
    return count


def test_a_new_key_has_a_full_burst(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1, burst=3, clock=clock)
    assert [buckets.take("p") for _ in range(4)] == [True, True, True, False]


def test_buckets_refill_at_the_rate(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2, burst=4, clock=clock)
    assert takes(buckets, "p") == 4
    clock.advance(0.4)
    assert not buckets.take("p"), "0.8 of a call refilled, not 1"
    clock.advance(0.1)
    assert buckets.take("p")
    assert not buckets.take("p")
    clock.advance(1.0)
    assert takes(buckets, "p") == 2


def test_refill_is_capped_at_the_burst(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=10, burst=5, clock=clock)
    assert takes(buckets, "p") == 5
    clock.advance(3600)
    assert takes(buckets, "p") == 5


def test_a_refused_take_takes_nothing(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1, burst=2, clock=clock)
    assert takes(buckets, "p") == 2
    for _ in range(10):
        assert not buckets.take("p")
    clock.advance(1.0)
    assert takes(buckets, "p") == 1


def test_cost_and_has(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1, burst=3, clock=clock)
    for _ in range(5):
        assert buckets.has("p")  # looking takes nothing
    assert buckets.take("p", cost=2)
    assert not buckets.has("p", cost=2)
    assert not buckets.take("p", cost=2)
    assert buckets.has("p")
    assert not buckets.take("q", cost=4), "a cost above the burst can never be paid"


def test_keys_are_independent(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1, burst=2, clock=clock)
    assert takes(buckets, "alice") == 2
    assert takes(buckets, "bob") == 2
    assert not buckets.has("alice")


def test_retry_after(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=0.5, burst=1, clock=clock)
    assert buckets.retry_after("p") == 0.0
    assert buckets.take("p")
    assert buckets.retry_after("p") == pytest.approx(2.0)
    clock.advance(1.5)
    assert buckets.retry_after("p") == pytest.approx(0.5)
    clock.advance(0.5)
    assert buckets.retry_after("p") == 0.0
    never = TokenBuckets(rate=0, burst=1, clock=clock)
    assert never.take("p")
    assert never.retry_after("p") == float("inf")
    clock.advance(10**6)
    assert not never.take("p"), "rate 0 refilled"


def test_max_keys_drops_the_least_recently_used(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=0.001, burst=2, max_keys=2, clock=clock)
    assert takes(buckets, "a") == 2
    assert takes(buckets, "b") == 2
    assert not buckets.take("a")  # a is now the most recently used
    assert buckets.take("c")  # a third key: b, the least recently used, is dropped
    assert takes(buckets, "b") == 2, "b was not dropped (its bucket would be empty)"
    # Now c and b are kept; a was dropped when b came back.
    assert takes(buckets, "a") == 2


def test_memory_is_bounded_by_max_keys(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1, burst=1, max_keys=50, clock=clock)
    for i in range(500):
        buckets.take(f"peer-{i}")
    kept = sum(not buckets.has(f"peer-{i}") for i in range(500))
    assert kept == 50, "an empty bucket is one that was kept"


def test_roles_are_the_documented_four() -> None:
    assert set(ROLES) == {"admin", "launcher", "provisioner", "viewer"}
