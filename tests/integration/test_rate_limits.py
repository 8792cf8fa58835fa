"""Rate limits against a real broker: guessing tokens is slowed, and each principal has a rate.

What the broker does (broker/security/interceptor.py, ratelimit.py), as these tests pin it:

- **Failed authentication, per address.** Every peer IP address has a bucket of
  `--auth-failure-burst` failures that refills one failure per
  `--auth-failure-refill-seconds`. A bearer token is looked at only while the
  bucket holds at least one: once it is empty the broker answers
  RESOURCE_EXHAUSTED (`AUTHENTICATION_RATE_LIMITED`, "retry in N s") *before*
  checking the token, so a correct token from that address is refused too until
  the bucket refills. A guesser therefore gets one guess per refill period and
  cannot even tell whether a guess during the lockout was right. Refused attempts
  do not drain the bucket further, so the address recovers by itself; a
  successful authentication does not drain it either. Calls without any
  authorization header are UNAUTHENTICATED (`CREDENTIALS_REQUIRED`) and neither
  use nor check the budget; health checks stay open. The lockout is per address,
  not per principal: every principal calling from a locked-out address (a shared
  NAT, say) is refused as well.
- **Calls per principal.** Each principal may make `--rate-limit` calls per second
  with bursts of twice that, counted across all its connections, checked before
  the permission check; beyond it RESOURCE_EXHAUSTED (`RATE_LIMITED`). Other
  principals are unaffected.
- Every refused call (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) is an
  audit line, with principal `-` when nobody was authenticated.

Principals are written to principals.json before the broker starts, so no
polling with not-yet-known tokens eats into the failure budget.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.security.principals import PrincipalsFile
from broker.v1 import image_hosts_pb2 as pb
from broker.v1 import image_hosts_pb2_grpc
from tests.support.broker_process import BrokerProcess
from tests.support.status import details_of

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 15.0
LIST = "/broker.v1.ImageHostService/ListImageHosts"
OK = "OK"
EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAUTHENTICATED = "UNAUTHENTICATED"


@dataclass(frozen=True)
class Answer:
    code: str
    reason: str = ""
    message: str = ""


@dataclass
class Broker:
    process: BrokerProcess
    tokens: dict[str, str] = field(repr=False)  # bearer tokens: never in a failure message
    channel: grpc.Channel

    def as_(self, name: str, *, channel: grpc.Channel | None = None) -> Answer:
        """ListImageHosts as principal `name`, by its (real) bearer token."""
        __tracebackhide__ = True  # its locals carry a token
        return call_list(channel or self.channel, f"Bearer {self.tokens[name]}")

    def guess(self, token: str | None) -> Answer:
        """ListImageHosts with a made-up bearer token (no authorization header for None)."""
        return call_list(self.channel, None if token is None else f"Bearer {token}")

    def create_as(self, name: str) -> Answer:
        __tracebackhide__ = True  # its locals carry a token
        stub = image_hosts_pb2_grpc.ImageHostServiceStub(self.channel)
        request = pb.CreateImageHostRequest(
            image_host_id="rate", image_host=pb.ImageHost(url="rate.example.org")
        )
        metadata = [("authorization", f"Bearer {self.tokens[name]}")]
        try:
            stub.CreateImageHost(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            found = details_of(error)
            return Answer(found.code.name, found.reason, found.message)
        return Answer(OK)

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.process.text().splitlines() if line[:1] == "{"]


def call_list(channel: grpc.Channel, authorization: str | None) -> Answer:
    __tracebackhide__ = True  # its arguments carry a token
    stub = image_hosts_pb2_grpc.ImageHostServiceStub(channel)
    metadata = [] if authorization is None else [("authorization", authorization)]
    try:
        stub.ListImageHosts(pb.ListImageHostsRequest(), metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        found = details_of(error)
        return Answer(found.code.name, found.reason, found.message)
    return Answer(OK)


def _start(data_dir: Path, args: Sequence[str], principals: dict[str, list[str]]) -> Broker:
    """Write the principals (admin included, its admin.token too), then start the broker."""
    __tracebackhide__ = True  # its locals carry tokens
    source = PrincipalsFile(data_dir / "principals.json")
    tokens: dict[str, str] = {}
    for name, roles in {"admin": ["admin"], **principals}.items():
        token = source.add(name, roles)
        assert token is not None
        tokens[name] = token
    fd = os.open(data_dir / "admin.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, tokens["admin"].encode() + b"\n")
    finally:
        os.close(fd)
    process = BrokerProcess(data_dir, args=list(args)).start()
    return Broker(process, tokens, grpc.insecure_channel(process.address))


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[Broker] = []

    def starter(args: Sequence[str], principals: dict[str, list[str]] | None = None) -> Broker:
        broker = _start(tmp_path / f"data{len(started)}", args, principals or {})
        started.append(broker)
        return broker

    yield starter
    for broker in started:
        broker.channel.close()
        broker.process.stop()


def _stop(broker: Broker) -> None:
    """Stop the broker so that every audit line it will write is captured."""
    broker.channel.close()
    assert broker.process.stop() == 0


def _no_token_printed(broker: Broker, extra: Sequence[str] = ()) -> None:
    printed = broker.process.text()
    names = [name for name, token in broker.tokens.items() if token in printed]
    assert not names, f"the broker printed the bearer token of {names}"
    found = [n for n, token in enumerate(extra) if token in printed]
    assert not found, f"the broker printed guessed token(s) #{found}"


def test_failed_authentications_lock_the_address_out(start: Any) -> None:
    broker = start(
        ["--auth-failure-burst", "3", "--auth-failure-refill-seconds", "60"],
        {"alice": ["viewer"]},
    )
    guesses = [f"cbt_guess{n:02d}{os.urandom(8).hex()}" for n in range(8)]

    assert broker.as_("admin").code == OK  # a success does not use the budget
    for guess in guesses[:3]:
        answer = broker.guess(guess)
        assert answer == Answer(
            UNAUTHENTICATED,
            "INVALID_TOKEN",
            "the authorization header is not 'Bearer <token>' with a valid token",
        )
    locked = broker.guess(guesses[3])
    assert (locked.code, locked.reason) == (EXHAUSTED, "AUTHENTICATION_RATE_LIMITED")
    wait = re.search(r"retry in (\d+) s", locked.message)
    assert wait is not None, locked.message
    assert 50 <= int(wait.group(1)) <= 60

    # Refused before the token is looked at: correct tokens too, from this address.
    for name in ("admin", "alice"):
        answer = broker.as_(name)
        assert (answer.code, answer.reason) == (EXHAUSTED, "AUTHENTICATION_RATE_LIMITED"), name
    # Further guesses stay refused (and do not extend the wait: they take nothing).
    for guess in guesses[4:]:
        answer = broker.guess(guess)
        assert answer.reason == "AUTHENTICATION_RATE_LIMITED"
    # No header at all is not a guess: UNAUTHENTICATED, neither counted nor refused.
    answer = broker.guess(None)
    assert answer == Answer(
        UNAUTHENTICATED,
        "CREDENTIALS_REQUIRED",
        "credentials required: send 'authorization: Bearer <token>' or a client certificate",
    )
    # A new connection from the same address is the same address.
    with grpc.insecure_channel(broker.process.address) as other:
        answer = broker.as_("admin", channel=other)
        assert answer.reason == "AUTHENTICATION_RATE_LIMITED"
    # Health stays open.
    health = health_pb2_grpc.HealthStub(broker.channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status
    assert status == health_pb2.HealthCheckResponse.SERVING

    _stop(broker)
    refused = [r for r in broker.audit_records() if r.get("method") == LIST]
    assert all(r["principal"] == "-" and r["outcome"] == "FAILED" for r in refused)
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in refused)
    codes = [r["code"] for r in refused]
    # 3 wrong tokens + 1 missing header; 1 + 2 correct + 4 guesses + 1 other connection.
    assert codes.count(UNAUTHENTICATED) == 4
    assert codes.count(EXHAUSTED) == 8
    _no_token_printed(broker, guesses)


def test_address_recovers_after_the_refill_time(start: Any) -> None:
    refill = 0.5
    broker = start(["--auth-failure-burst", "2", "--auth-failure-refill-seconds", str(refill)])

    # Guess until refused (bounded); refills during the loop may allow a few more.
    began = time.monotonic()
    failures = 0
    for n in range(40):
        answer = broker.guess(f"cbt_wrong{n}")
        if answer.code == EXHAUSTED:
            break
        assert answer.reason == "INVALID_TOKEN"
        failures += 1
    else:
        pytest.fail("40 wrong tokens in a row were never refused")
    elapsed = time.monotonic() - began
    assert answer.reason == "AUTHENTICATION_RATE_LIMITED"
    assert 2 <= failures <= 2 + int(elapsed / refill) + 1, (failures, elapsed)

    # Without doing anything, the address gets one attempt back after `refill` seconds.
    locked_at = time.monotonic()
    for _ in range(50):
        answer = broker.as_("admin")
        if answer.code == OK:
            break
        assert answer.reason == "AUTHENTICATION_RATE_LIMITED"
        time.sleep(0.1)
    else:
        pytest.fail("the address did not recover within 5 s")
    assert time.monotonic() - locked_at < 4 * refill + 2

    # One failure is all it got back: a wrong token, and the next is refused again.
    before = time.monotonic()
    first, second = broker.guess("cbt_wrong-again"), broker.guess("cbt_wrong-once-more")
    assert first.reason == "INVALID_TOKEN"
    if time.monotonic() - before < refill * 0.8:  # else a refill may have come in between
        assert second.reason == "AUTHENTICATION_RATE_LIMITED"

    # After burst * refill seconds the whole burst is back.
    time.sleep(2 * refill + 0.3)
    before = time.monotonic()
    answers = [broker.guess(f"cbt_burst{n}").reason for n in range(3)]
    if time.monotonic() - before < refill * 0.8:
        assert answers == ["INVALID_TOKEN", "INVALID_TOKEN", "AUTHENTICATION_RATE_LIMITED"]
    assert broker.process.process.poll() is None
    _stop(broker)
    _no_token_printed(broker)


def _burst(call: Any, rate: int, count: int = 30) -> list[Answer]:
    """`count` calls as fast as they go: the first 2 * rate pass, then a few refills."""
    began = time.monotonic()
    answers = [call(n) for n in range(count)]
    elapsed = time.monotonic() - began
    codes = [a.code for a in answers]
    passed = len([c for c in codes if c != EXHAUSTED])
    assert EXHAUSTED not in codes[: 2 * rate], codes
    assert 2 * rate <= passed <= 2 * rate + int(elapsed * rate) + 1, (passed, elapsed)
    assert {a.reason for a in answers if a.code == EXHAUSTED} == {"RATE_LIMITED"}
    return answers


def test_each_principal_has_its_own_call_rate(start: Any) -> None:
    rate = 5  # calls per second, bursts of 10
    broker = start(
        ["--rate-limit", str(rate)],
        {"alice": ["viewer"], "bob": ["viewer"], "carol": ["viewer"]},
    )

    # Alice alternates between two connections: they share her one bucket.
    with grpc.insecure_channel(broker.process.address) as other:
        channels = [broker.channel, other]
        answers = _burst(lambda n: broker.as_("alice", channel=channels[n % 2]), rate)
    assert {a.code for a in answers} == {OK, EXHAUSTED}
    refused = [a for a in answers if a.code == EXHAUSTED]
    assert "principal alice is over its call rate" in refused[0].message

    # Another principal is not affected, nor is the admin.
    assert [broker.as_("bob").code for _ in range(5)] == [OK] * 5
    assert broker.as_("admin").code == OK

    # The rate comes before the role check, and calls refused by the role count.
    denied = _burst(lambda n: broker.create_as("carol"), rate)
    assert {a.code for a in denied} == {"PERMISSION_DENIED", EXHAUSTED}
    assert {a.reason for a in denied if a.code != EXHAUSTED} == {"METHOD_NOT_ALLOWED"}

    # Alice recovers by herself, at `rate` calls per second.
    extra_refusals = 0
    for _ in range(50):
        answer = broker.as_("alice")
        if answer.code == OK:
            break
        extra_refusals += 1
        time.sleep(0.05)
    else:
        pytest.fail("alice did not get a call through within the bound")

    _stop(broker)
    records = broker.audit_records()
    limited = [r for r in records if r.get("code") == EXHAUSTED]
    assert all(r["outcome"] == "FAILED" for r in limited)
    by_alice = [r for r in limited if r["principal"] == "alice"]
    by_carol = [r for r in limited if r["principal"] == "carol"]
    assert len(by_alice) + len(by_carol) == len(limited), "someone else was rate limited"
    assert len(by_alice) == len(refused) + extra_refusals
    assert len(by_carol) == len([a for a in denied if a.code == EXHAUSTED])
    assert {r["audit"] for r in by_carol} == {"CreateImageHost"}
    denials = [r for r in records if r.get("code") == "PERMISSION_DENIED"]
    assert len(denials) == len([a for a in denied if a.code == "PERMISSION_DENIED"])
    _no_token_printed(broker)
