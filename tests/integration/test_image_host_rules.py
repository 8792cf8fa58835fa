"""Every image-host rule of DESIGN.md, through the generated stubs, on a real broker."""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from broker.v1 import image_hosts_pb2 as pb
from broker.v1.image_hosts_pb2_grpc import ImageHostServiceStub
from tests.support.broker_process import BrokerProcess
from tests.support.status import expect_error

pytestmark = pytest.mark.integration

TOKEN = "tok-Zq8rW2-never-returned"


def create(
    hosts: ImageHostServiceStub,
    image_host_id: str,
    url: str,
    *,
    username: str = "",
    token: str = "",
    display_name: str = "",
) -> pb.ImageHost:
    return hosts.CreateImageHost(
        pb.CreateImageHostRequest(
            image_host_id=image_host_id,
            image_host=pb.ImageHost(
                url=url, username=username, access_token=token, display_name=display_name
            ),
        )
    )


def update(
    hosts: ImageHostServiceStub, host: pb.ImageHost, paths: list[str], *, etag: str = ""
) -> pb.ImageHost:
    host.etag = etag
    return hosts.UpdateImageHost(
        pb.UpdateImageHostRequest(
            image_host=host, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
    )


def all_hosts(hosts: ImageHostServiceStub) -> list[pb.ImageHost]:
    return list(hosts.ListImageHosts(pb.ListImageHostsRequest(page_size=1000)).image_hosts)


# -- the seeded default ------------------------------------------------------


def test_empty_store_is_seeded_with_anonymous_docker_hub_as_default(
    hosts: ImageHostServiceStub,
) -> None:
    [seeded] = all_hosts(hosts)
    assert seeded.name == "imageHosts/docker-hub"
    assert seeded.display_name == "Docker Hub"
    assert seeded.url == "https://index.docker.io/v1/"
    assert seeded.registry == "docker.io"
    assert seeded.default
    assert seeded.username == ""
    assert not seeded.access_token_set
    assert hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest()).name == seeded.name


def test_seeding_happens_only_on_an_empty_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = BrokerProcess(data).start()
    try:
        stub = first.image_hosts()
        create(stub, "local", "http://127.0.0.1:5000")
        stub.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name="imageHosts/local", reason="ci")
        )
        stub.DeleteImageHost(pb.DeleteImageHostRequest(name="imageHosts/docker-hub"))
    finally:
        assert first.stop() == 0
    second = BrokerProcess(data).start()
    try:
        names = [h.name for h in all_hosts(second.image_hosts())]
        assert names == ["imageHosts/local"]
    finally:
        second.stop()


# -- normalisation and uniqueness ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "registry", "prefix", "plain_http"),
    [
        ("GCR.io", "gcr.io", "", False),
        ("registry.example.org:5000", "registry.example.org:5000", "", False),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", "", True),
        ("https://ghcr.io/acme/", "ghcr.io", "acme", False),
        ("docker.io/acme", "docker.io", "acme", False),
    ],
)
def test_url_is_normalised(
    hosts: ImageHostServiceStub, url: str, registry: str, prefix: str, plain_http: bool
) -> None:
    host = create(hosts, "h", url)
    assert (host.url, host.registry, host.repository_prefix, host.plain_http) == (
        url,
        registry,
        prefix,
        plain_http,
    )
    assert hosts.GetImageHost(pb.GetImageHostRequest(name="imageHosts/h")) == host


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("", "is required"),
        ("ftp://gcr.io", "scheme must be http:// or https://"),
        ("https://bob:pw@gcr.io", "must not contain credentials"),
        ("bare-name", "must contain '.' or a ':port'"),
        ("gcr.io:99999", "port must be a number"),
        ("gcr.io/Acme", "path components must be lowercase"),
    ],
)
def test_bad_url_is_invalid_argument_naming_field_and_rule(
    hosts: ImageHostServiceStub, url: str, rule: str
) -> None:
    error = expect_error(lambda: create(hosts, "h", url))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rule in error.violations["image_host.url"]
    assert error.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "alias", ["docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/"]
)
def test_docker_hub_aliases_collide_with_the_seeded_host(
    hosts: ImageHostServiceStub, alias: str
) -> None:
    error = expect_error(lambda: create(hosts, "hub2", alias))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "REGISTRY_ALREADY_CLAIMED"
    assert error.metadata == {"registry": "docker.io", "image_host": "imageHosts/docker-hub"}


def test_registry_and_prefix_pair_is_unique(hosts: ImageHostServiceStub) -> None:
    create(hosts, "ghcr", "ghcr.io")
    create(hosts, "ghcr-acme", "ghcr.io/acme")  # a different prefix is another host
    for clash in ("https://ghcr.io/acme/", "GHCR.IO/acme"):
        error = expect_error(lambda clash=clash: create(hosts, "again", clash))
        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        assert error.metadata["image_host"] == "imageHosts/ghcr-acme"
    # http:// and https:// name the same registry.
    create(hosts, "plain", "http://127.0.0.1:5000")
    error = expect_error(lambda: create(hosts, "tls", "https://127.0.0.1:5000"))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS


def test_update_cannot_take_another_hosts_registry_and_frees_its_own(
    hosts: ImageHostServiceStub,
) -> None:
    create(hosts, "a", "a.example.com")
    b = create(hosts, "b", "b.example.com")
    error = expect_error(
        lambda: update(hosts, pb.ImageHost(name=b.name, url="A.example.com"), ["url"])
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    update(hosts, pb.ImageHost(name=b.name, url="c.example.com"), ["url"])
    # b.example.com was released by the move; a.example.com is still taken.
    create(hosts, "b2", "b.example.com")
    assert expect_error(lambda: create(hosts, "a2", "a.example.com")).code == (
        grpc.StatusCode.ALREADY_EXISTS
    )


def test_deleting_a_host_frees_its_registry(hosts: ImageHostServiceStub) -> None:
    host = create(hosts, "q", "quay.io")
    hosts.DeleteImageHost(pb.DeleteImageHostRequest(name=host.name))
    assert create(hosts, "q2", "https://quay.io").registry == "quay.io"


def test_duplicate_id_is_already_exists(hosts: ImageHostServiceStub) -> None:
    create(hosts, "dup", "one.example.com")
    error = expect_error(lambda: create(hosts, "dup", "two.example.com"))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "IMAGE_HOST_ALREADY_EXISTS"


@pytest.mark.parametrize(
    "bad_id", ["", "Upper", "1starts-with-digit", "ends-", "a" * 64, "under_score"]
)
def test_bad_id_is_invalid_argument(hosts: ImageHostServiceStub, bad_id: str) -> None:
    error = expect_error(lambda: create(hosts, bad_id, "one.example.com"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_host_id" in error.violations


@pytest.mark.parametrize(
    ("field", "host", "rule"),
    [
        (
            "image_host.access_token",
            pb.ImageHost(url="x.io", access_token=TOKEN),
            "needs a username",
        ),
        ("image_host.username", pb.ImageHost(url="x.io", username="a:b"), "must not contain ':'"),
        ("image_host.username", pb.ImageHost(url="x.io", username="a b"), "whitespace"),
        (
            "image_host.display_name",
            pb.ImageHost(url="x.io", display_name="x" * 101),
            "at most 100",
        ),
        ("image_host.display_name", pb.ImageHost(url="x.io", display_name="a\tb"), "control"),
    ],
)
def test_bad_fields_are_invalid_argument(
    hosts: ImageHostServiceStub, field: str, host: pb.ImageHost, rule: str
) -> None:
    request = pb.CreateImageHostRequest(image_host_id="h", image_host=host)
    error = expect_error(lambda: hosts.CreateImageHost(request))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rule in error.violations[field]
    assert TOKEN not in error.message


def test_missing_image_host_and_bad_names(hosts: ImageHostServiceStub) -> None:
    error = expect_error(
        lambda: hosts.CreateImageHost(pb.CreateImageHostRequest(image_host_id="x"))
    )
    assert error.violations == {"image_host": "is required"}
    for name in ("", "hosts/x", "imageHosts/", "imageHosts/X"):
        error = expect_error(
            lambda name=name: hosts.GetImageHost(pb.GetImageHostRequest(name=name))
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in error.violations
    error = expect_error(lambda: hosts.GetImageHost(pb.GetImageHostRequest(name="imageHosts/nope")))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "IMAGE_HOST_NOT_FOUND"


# -- the default host -----------------------------------------------------------


def test_exactly_one_default_and_set_default_moves_it(hosts: ImageHostServiceStub) -> None:
    create(hosts, "a", "a.example.com")
    create(hosts, "b", "b.example.com")
    for target in ("a", "b", "docker-hub", "b"):
        changed = hosts.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name=f"imageHosts/{target}", reason="switch")
        )
        assert changed.default
        defaults = [h.name for h in all_hosts(hosts) if h.default]
        assert defaults == [f"imageHosts/{target}"]
        assert hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest()).name == defaults[0]


def test_default_cannot_be_deleted(hosts: ImageHostServiceStub) -> None:
    error = expect_error(
        lambda: hosts.DeleteImageHost(pb.DeleteImageHostRequest(name="imageHosts/docker-hub"))
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "DEFAULT_IMAGE_HOST_UNDELETABLE"
    assert [h.name for h in all_hosts(hosts)] == ["imageHosts/docker-hub"]


def test_set_default_on_missing_host_is_not_found(hosts: ImageHostServiceStub) -> None:
    error = expect_error(
        lambda: hosts.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name="imageHosts/ghost", reason="x")
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (
        hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest()).name == "imageHosts/docker-hub"
    )


def test_set_default_requires_a_reason_and_audits_it(
    broker: BrokerProcess, hosts: ImageHostServiceStub
) -> None:
    create(hosts, "a", "a.example.com")
    error = expect_error(
        lambda: hosts.SetDefaultImageHost(pb.SetDefaultImageHostRequest(name="imageHosts/a"))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in error.violations
    hosts.SetDefaultImageHost(
        pb.SetDefaultImageHostRequest(name="imageHosts/a", reason="mirror for CI")
    )
    audit = [line for line in broker.text().splitlines() if '"SetDefaultImageHost"' in line]
    assert any(
        '"mirror for CI"' in line
        and '"imageHosts/a"' in line
        and '"previous_default": "imageHosts/docker-hub"' in line
        for line in audit
    ), audit


# -- the write-only token ---------------------------------------------------------


def test_access_token_is_never_returned(broker: BrokerProcess, hosts: ImageHostServiceStub) -> None:
    secret = TOKEN.encode()
    responses = [create(hosts, "p", "private.example.com", username="u", token=TOKEN)]
    responses.append(hosts.GetImageHost(pb.GetImageHostRequest(name="imageHosts/p")))
    responses.append(hosts.ListImageHosts(pb.ListImageHostsRequest()))
    responses.append(update(hosts, pb.ImageHost(name="imageHosts/p", display_name="P"), []))
    responses.append(
        hosts.SetDefaultImageHost(pb.SetDefaultImageHostRequest(name="imageHosts/p", reason="r"))
    )
    responses.append(hosts.GetDefaultImageHost(pb.GetDefaultImageHostRequest()))
    for response in responses:
        assert secret not in response.SerializeToString()
    assert responses[0].access_token_set
    assert responses[0].access_token == ""
    assert TOKEN not in broker.text()


# -- updates and the token-clearing rule ---------------------------------------------


def test_update_keeps_token_when_masked_out(hosts: ImageHostServiceStub) -> None:
    host = create(hosts, "p", "p.example.com", username="u", token=TOKEN)
    changed = update(hosts, pb.ImageHost(name=host.name, display_name="Renamed"), ["display_name"])
    assert changed.display_name == "Renamed"
    assert changed.access_token_set


@pytest.mark.parametrize(
    ("change", "paths"),
    [
        (pb.ImageHost(url="q.example.com"), ["url"]),
        (pb.ImageHost(username="someone-else"), ["username"]),
    ],
)
def test_changing_url_or_username_without_token_clears_it(
    hosts: ImageHostServiceStub, change: pb.ImageHost, paths: list[str]
) -> None:
    host = create(hosts, "p", "p.example.com", username="u", token=TOKEN)
    change.name = host.name
    assert not update(hosts, change, paths).access_token_set


def test_changing_url_with_a_new_token_keeps_the_new_token(hosts: ImageHostServiceStub) -> None:
    host = create(hosts, "p", "p.example.com", username="u", token=TOKEN)
    changed = update(
        hosts,
        pb.ImageHost(name=host.name, url="q.example.com", access_token="new"),
        ["url", "access_token"],
    )
    assert changed.access_token_set
    assert changed.registry == "q.example.com"


def test_masking_access_token_with_empty_value_clears_it(hosts: ImageHostServiceStub) -> None:
    host = create(hosts, "p", "p.example.com", username="u", token=TOKEN)
    assert not update(hosts, pb.ImageHost(name=host.name), ["access_token"]).access_token_set


def test_empty_mask_updates_populated_fields_and_star_updates_all(
    hosts: ImageHostServiceStub,
) -> None:
    host = create(hosts, "p", "p.example.com", username="u", token=TOKEN, display_name="P")
    changed = update(hosts, pb.ImageHost(name=host.name, display_name="Q"), [])
    assert (changed.display_name, changed.username, changed.access_token_set) == ("Q", "u", True)
    replaced = update(hosts, pb.ImageHost(name=host.name, url="p.example.com"), ["*"])
    assert (replaced.display_name, replaced.username, replaced.access_token_set) == ("p", "", False)


def test_unknown_mask_path_is_invalid_argument(hosts: ImageHostServiceStub) -> None:
    for path in ("registry", "access_token_set", "etag", "name"):
        error = expect_error(
            lambda path=path: update(hosts, pb.ImageHost(name="imageHosts/docker-hub"), [path])
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "update_mask" in error.violations


def test_update_of_missing_host_is_not_found(hosts: ImageHostServiceStub) -> None:
    error = expect_error(
        lambda: update(hosts, pb.ImageHost(name="imageHosts/ghost", display_name="x"), [])
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


# -- etags and compare-and-set -------------------------------------------------------


def test_stale_etag_is_aborted_everywhere(hosts: ImageHostServiceStub) -> None:
    host = create(hosts, "p", "p.example.com")
    stale = host.etag
    fresh = update(hosts, pb.ImageHost(name=host.name, display_name="v2"), [], etag=stale)
    assert fresh.etag != stale
    for call in (
        lambda: update(hosts, pb.ImageHost(name=host.name, display_name="v3"), [], etag=stale),
        lambda: hosts.DeleteImageHost(pb.DeleteImageHostRequest(name=host.name, etag=stale)),
        lambda: hosts.SetDefaultImageHost(
            pb.SetDefaultImageHostRequest(name=host.name, reason="r", etag=stale)
        ),
    ):
        error = expect_error(call)
        assert error.code == grpc.StatusCode.ABORTED
        assert error.reason == "ETAG_MISMATCH"
    assert hosts.GetImageHost(pb.GetImageHostRequest(name=host.name)).display_name == "v2"
    hosts.DeleteImageHost(pb.DeleteImageHostRequest(name=host.name, etag=fresh.etag))


def test_etag_of_a_recreated_host_differs(hosts: ImageHostServiceStub) -> None:
    first = create(hosts, "p", "p.example.com")
    hosts.DeleteImageHost(pb.DeleteImageHostRequest(name=first.name))
    second = create(hosts, "p", "p.example.com")
    error = expect_error(
        lambda: update(
            hosts, pb.ImageHost(name="imageHosts/p", display_name="x"), [], etag=first.etag
        )
    )
    assert error.code == grpc.StatusCode.ABORTED
    assert second.etag != first.etag


def test_concurrent_updates_with_one_etag_have_one_winner(hosts: ImageHostServiceStub) -> None:
    host = create(hosts, "p", "p.example.com")

    def attempt(index: int) -> str:
        try:
            update(
                hosts, pb.ImageHost(name=host.name, display_name=f"w{index}"), [], etag=host.etag
            )
        except grpc.RpcError as error:
            return str(error.code())
        return f"w{index}"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    winners = [o for o in outcomes if o.startswith("w")]
    assert len(winners) == 1
    assert set(outcomes) - set(winners) == {str(grpc.StatusCode.ABORTED)}
    assert hosts.GetImageHost(pb.GetImageHostRequest(name=host.name)).display_name == winners[0]


def test_concurrent_creates_of_one_registry_have_one_winner(hosts: ImageHostServiceStub) -> None:
    def attempt(index: int) -> str:
        try:
            create(hosts, f"r{index}", "race.example.com")
        except grpc.RpcError as error:
            return str(error.code())
        return "created"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert outcomes.count("created") == 1
    assert set(outcomes) - {"created"} <= {
        str(grpc.StatusCode.ALREADY_EXISTS),
        str(grpc.StatusCode.ABORTED),
    }
    assert sum(h.registry == "race.example.com" for h in all_hosts(hosts)) == 1


# -- listing ---------------------------------------------------------------------


def test_pagination_walks_every_host_once_in_id_order(hosts: ImageHostServiceStub) -> None:
    for index in range(7):
        create(hosts, f"h{index}", f"h{index}.example.com")
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = hosts.ListImageHosts(pb.ListImageHostsRequest(page_size=3, page_token=token))
        assert len(page.image_hosts) <= 3
        seen += [h.name for h in page.image_hosts]
        token = page.next_page_token
        if not token:
            break
    expected = sorted(["imageHosts/docker-hub", *(f"imageHosts/h{i}" for i in range(7))])
    assert seen == expected


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListImageHostsRequest(page_size=-1), "page_size"),
        (pb.ListImageHostsRequest(page_token="not-a-token"), "page_token"),
    ],
)
def test_bad_paging_is_invalid_argument(
    hosts: ImageHostServiceStub, request_: pb.ListImageHostsRequest, field: str
) -> None:
    error = expect_error(lambda: hosts.ListImageHosts(request_))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations


# -- the process ---------------------------------------------------------------------


def test_hosts_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = BrokerProcess(data).start()
    try:
        created = create(first.image_hosts(), "p", "p.example.com", username="u", token=TOKEN)
    finally:
        first.stop()
    second = BrokerProcess(data).start()
    try:
        again = second.image_hosts().GetImageHost(pb.GetImageHostRequest(name="imageHosts/p"))
        assert again == created
    finally:
        second.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    process = BrokerProcess(tmp_path / "data").start()
    all_hosts(process.image_hosts())
    assert process.stop(sig) == 0
    assert "finishing in-flight calls" in process.text()
    assert process.text().rstrip().endswith("stopped")


def test_sigterm_lets_an_in_flight_call_finish(tmp_path: Path) -> None:
    process = BrokerProcess(tmp_path / "data").start()
    stub = process.image_hosts()
    all_hosts(stub)
    # Hold the store's writer lock so that a create stays in flight.
    lock_fd = os.open(process.data_dir / "store.lock", os.O_RDONLY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        future = stub.CreateImageHost.future(
            pb.CreateImageHostRequest(image_host_id="late", image_host=pb.ImageHost(url="late.io")),
            timeout=30,
        )
        # The call is in flight once the broker has the lock file open (waiting for it).
        lock_file = str(process.data_dir / "store.lock")
        descriptors = Path(f"/proc/{process.process.pid}/fd")
        deadline = time.monotonic() + 20
        while not any(os.path.realpath(fd) == lock_file for fd in descriptors.iterdir()):
            assert time.monotonic() < deadline, "the create never reached the store"
            assert not future.done()
            time.sleep(0.02)
        process.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.process.poll() is None, "the broker quit with a call in flight"
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    assert future.result().name == "imageHosts/late"
    assert process.stop() == 0
    restarted = BrokerProcess(tmp_path / "data").start()
    try:
        names = [h.name for h in all_hosts(restarted.image_hosts())]
        assert "imageHosts/late" in names
    finally:
        restarted.stop()
