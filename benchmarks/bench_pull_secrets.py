"""The pull-secret reconciler's cost, as ratios to a baseline RPC measured in the same run.

Starts the Kubernetes API emulator (tests/support/k8s_emulator.py, in this process, on
127.0.0.1) with M namespaces, and one real broker that reaches it through a kubeconfig,
with `--k8s-sync-interval 0` (no periodic reconciler runs: only a credential change wakes
it). One image host; ProvisionPullSecret with a namespace selector and keep_in_sync, so
every sync also lists the selector's namespaces, as in production. Then, one call at a
time (latency, not throughput: a sync fans out to the API server by itself):

- baseline: ListImageHosts (authentication, authorisation, a store read; no cluster);
- SyncPullSecrets when nothing changed: every namespace UNCHANGED, no write;
- SyncPullSecrets when every secret is stale: every namespace UPDATED. A rotation through
  UpdateImageHost cannot set this up: it wakes the broker's reconciler at once, in-process,
  which rewrites every secret before a SyncPullSecrets could. So the secrets are edited in
  the emulator instead (old content, matching hash annotation): the RPC then does per
  namespace exactly what a rotation makes it do (read, compare, guarded JSON patch of data
  and hash annotation; the service account unchanged);
- rotation -> every secret updated: UpdateImageHost(access_token), then polling the
  emulator's objects until all M secrets carry the new token; the reconciler's own run,
  end to end, woken by the catalog change (the emulator's request log then shows
  exactly one patch per secret and nothing else).

Before each timed call the broker must be idle (no API request for a while), and every
call is checked afterwards: the outcome per namespace, and the API requests it made (no
reconciler run may overlap a timed SyncPullSecrets). Prints seconds (median, p90),
calls/s, Kubernetes API requests per call and the ratio of each median to the baseline's.
The emulator is Python in this process: absolute times include its own cost, which is
why only ratios and request counts compare across machines. Tokens are random and never
printed. Bounded in time; the broker and the emulator are
stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.v1 import image_hosts_pb2 as ih
from broker.v1 import pull_secrets_pb2 as pb
from broker.v1 import pull_secrets_pb2_grpc
from tests.support.broker_process import BrokerProcess
from tests.support.k8s_emulator import K8sEmulator

SECRET = "credbroker-pull-secret"  # noqa: S105 - the default Secret's name
SELECTOR_LABEL = "credbroker-bench"
REGISTRY = "registry.bench.example"
HOST_ID = "bench"
CALL_TIMEOUT = 60.0
#: The broker counts as idle once the emulator saw no request for this long.
QUIET = 0.3
IDLE_TIMEOUT = 30.0
#: How often the rotation case looks at the emulator's resourceVersion counter.
POLL = 0.002
ROTATION_TIMEOUT = 30.0
CONFIG_KEY = ".dockerconfigjson"
SHA_ANNOTATION = "credbroker.dev/content-sha256"


@dataclass
class Case:
    name: str
    seconds: list[float]
    requests: list[int]


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


class Bench:
    def __init__(self, emulator: K8sEmulator, broker: BrokerProcess, namespaces: list[str]) -> None:
        self.emu = emulator
        self.broker = broker
        self.namespaces = namespaces
        self.hosts = broker.image_hosts()
        self.pull_secrets = pull_secrets_pb2_grpc.PullSecretServiceStub(broker.channel())
        self.token = ""

    # -- setup -------------------------------------------------------------------------

    def new_token(self) -> str:
        self.token = f"bench-{secrets.token_urlsafe(24)}"
        return self.token

    def provision(self) -> None:
        self.hosts.CreateImageHost(
            ih.CreateImageHostRequest(
                image_host_id=HOST_ID,
                image_host=ih.ImageHost(
                    url=REGISTRY, username="bot", access_token=self.new_token()
                ),
            ),
            timeout=CALL_TIMEOUT,
        )
        answer = self.pull_secrets.ProvisionPullSecret(
            pb.ProvisionPullSecretRequest(
                namespace_selector=f"{SELECTOR_LABEL}=yes",
                image_hosts=[f"imageHosts/{HOST_ID}"],
                keep_in_sync=True,
            ),
            timeout=CALL_TIMEOUT,
        )
        self.expect(answer.results, pb.SECRET_CHANGE_CREATED, "ProvisionPullSecret")
        self.wait_idle()
        self.check_secrets(self.token)

    # -- checks ------------------------------------------------------------------------

    def expect(self, results: Sequence[pb.NamespaceResult], change: int, what: str) -> None:
        got = {r.namespace: r for r in results}
        if sorted(got) != self.namespaces:
            raise RuntimeError(
                f"{what}: {len(got)} namespaces answered, not {len(self.namespaces)}"
            )
        wanted = pb.SecretChange.Name(change)
        for namespace, result in got.items():
            if result.HasField("error"):
                raise RuntimeError(
                    f"{what}: {namespace}: {result.error.code} {result.error.reason}"
                )
            if result.secret_change != change:
                found = pb.SecretChange.Name(result.secret_change)
                raise RuntimeError(f"{what}: {namespace} is {found}, not {wanted}")
            if any(a.HasField("error") for a in result.service_accounts):
                raise RuntimeError(f"{what}: {namespace}: a service account failed")

    def secrets_with(self, token: str) -> int:
        """How many of the namespaces' secrets carry `token` as the registry's password."""
        count = 0
        for secret in self.emu.list_objects("secrets"):
            if secret["metadata"]["name"] != SECRET:
                continue
            config = json.loads(base64.b64decode(secret["data"][CONFIG_KEY]))
            if config["auths"].get(REGISTRY, {}).get("password") == token:
                count += 1
        return count

    def check_secrets(self, token: str) -> None:
        found = self.secrets_with(token)
        if found != len(self.namespaces):
            raise RuntimeError(f"{found} of {len(self.namespaces)} secrets carry the token")

    def wait_idle(self) -> None:
        """Until the emulator saw no request for QUIET seconds (a reconciler run is over)."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        seen, since = len(self.emu.requests), time.monotonic()
        while time.monotonic() - since < QUIET:
            if time.monotonic() > deadline:
                raise RuntimeError("the broker kept calling the API server")
            time.sleep(0.02)
            now = len(self.emu.requests)
            if now != seen:
                seen, since = now, time.monotonic()

    def writes(self) -> list[tuple[str, str, int | None]]:
        return [(r.method, r.path, r.status) for r in self.emu.requests if r.method != "GET"]

    def expect_secret_patches(self, what: str) -> None:
        """Exactly one successful patch per secret, nothing else written."""
        writes = self.writes()
        patched = sorted(
            path.split("/")[4]
            for method, path, status in writes
            if method == "PATCH" and "/secrets/" in path and status == 200
        )
        if patched != self.namespaces or len(writes) != len(self.namespaces):
            raise RuntimeError(f"{what}: {len(writes)} writes, {len(patched)} secret patches")

    # -- the cases -----------------------------------------------------------------------

    def timed(self, name: str, runs: int, one: Callable[[], tuple[float, int]]) -> Case:
        case = Case(name, [], [])
        for _ in range(runs):
            seconds, requests = one()
            case.seconds.append(seconds)
            case.requests.append(requests)
        return case

    def list_image_hosts(self, seconds: float) -> Case:
        request = ih.ListImageHostsRequest(page_size=50)
        self.hosts.ListImageHosts(request, timeout=CALL_TIMEOUT)  # warm up
        self.emu.clear_requests()
        case = Case("ListImageHosts (baseline)", [], [])
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            start = time.perf_counter()
            self.hosts.ListImageHosts(request, timeout=CALL_TIMEOUT)
            case.seconds.append(time.perf_counter() - start)
        if self.emu.requests:
            raise RuntimeError("ListImageHosts reached the API server")
        case.requests = [0] * len(case.seconds)
        return case

    def sync(self, change: int) -> tuple[float, int]:
        self.emu.clear_requests()
        start = time.perf_counter()
        answer = self.pull_secrets.SyncPullSecrets(
            pb.SyncPullSecretsRequest(), timeout=CALL_TIMEOUT
        )
        elapsed = time.perf_counter() - start
        made = len(self.emu.requests)
        self.expect(answer.results, change, "SyncPullSecrets")
        return elapsed, made

    def sync_unchanged(self) -> tuple[float, int]:
        self.wait_idle()
        elapsed, made = self.sync(pb.SECRET_CHANGE_UNCHANGED)
        if self.writes():
            raise RuntimeError("a SyncPullSecrets with nothing to do wrote to the cluster")
        return elapsed, made

    def sync_stale(self) -> tuple[float, int]:
        self.make_stale()
        self.wait_idle()
        elapsed, made = self.sync(pb.SECRET_CHANGE_UPDATED)
        self.expect_secret_patches("SyncPullSecrets of stale secrets")
        self.check_secrets(self.token)
        return elapsed, made

    def make_stale(self) -> None:
        """Every secret back to an older token, its hash annotation matching: what a
        rotation leaves behind, written by another hand (no broker sees it)."""
        old = {"auths": {REGISTRY: {"username": "bot", "password": "stale", "auth": "c3RhbGU="}}}
        raw = json.dumps(old, separators=(",", ":")).encode()

        def edit(secret: dict[str, Any]) -> None:
            secret["data"][CONFIG_KEY] = base64.b64encode(raw).decode()
            secret["metadata"]["annotations"][SHA_ANNOTATION] = hashlib.sha256(raw).hexdigest()

        for namespace in self.namespaces:
            self.emu.mutate_object("secrets", namespace, SECRET, edit)

    def rotation(self) -> tuple[float, int]:
        self.wait_idle()
        self.emu.clear_requests()
        token = self.new_token()
        request = ih.UpdateImageHostRequest(
            image_host=ih.ImageHost(name=f"imageHosts/{HOST_ID}", access_token=token)
        )
        request.update_mask.paths.append("access_token")
        written = int(self.emu.resource_version)
        start = time.perf_counter()
        self.hosts.UpdateImageHost(request, timeout=CALL_TIMEOUT)
        deadline = time.monotonic() + ROTATION_TIMEOUT
        # The global resourceVersion is a cheap first look (it moves once per write); the
        # secrets themselves are read only once enough writes happened, so that polling
        # takes little from the emulator, which shares this process.
        while int(self.emu.resource_version) - written < len(self.namespaces) or self.secrets_with(
            token
        ) < len(self.namespaces):
            if time.monotonic() > deadline:
                raise RuntimeError("the rotation did not reach every secret in time")
            time.sleep(POLL)
        elapsed = time.perf_counter() - start
        self.wait_idle()
        self.expect_secret_patches("the reconciler after a rotation")
        return elapsed, len(self.emu.requests)


def report(cases: list[Case]) -> None:
    baseline = statistics.median(cases[0].seconds)
    print(
        f"{'case':<50} {'calls':>5} {'median s':>9} {'p90 s':>8} {'calls/s':>8}"
        f" {'k8s req':>7} {'x baseline':>10}"
    )
    for case in cases:
        median = statistics.median(case.seconds)
        requests = statistics.median(case.requests)
        print(
            f"{case.name:<50} {len(case.seconds):>5} {median:>9.4f} {p90(case.seconds):>8.4f}"
            f" {1 / median:>8.1f} {requests:>7.0f} {median / baseline:>10.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--namespaces", type=int, default=50, help="M: namespaces kept in sync")
    parser.add_argument("--seconds", type=float, default=3.0, help="baseline duration")
    parser.add_argument("--syncs", type=int, default=20, help="SyncPullSecrets calls per case")
    parser.add_argument("--rotations", type=int, default=10)
    args = parser.parse_args()

    namespaces = [f"bench-{i:03d}" for i in range(args.namespaces)]
    with tempfile.TemporaryDirectory(prefix="bench-pull-secrets-") as tmp:
        emulator = K8sEmulator().start()
        broker: BrokerProcess | None = None
        try:
            for namespace in namespaces:
                emulator.create_namespace(namespace, labels={SELECTOR_LABEL: "yes"})
            emulator.create_namespace("bench-other", labels={SELECTOR_LABEL: "no"})
            kubeconfig = emulator.write_kubeconfig(Path(tmp) / "kubeconfig")
            broker = BrokerProcess(
                Path(tmp) / "data",
                args=[
                    "--kubeconfig",
                    str(kubeconfig),
                    "--k8s-sync-interval",
                    "0",
                    "--rate-limit",
                    "1000000",
                ],
            ).start()
            bench = Bench(emulator, broker, namespaces)
            bench.provision()
            print(
                f"{len(namespaces)} namespaces kept in sync (selector), 1 image host, "
                "periodic reconciler runs off; one call at a time; "
                "x baseline = median time / baseline median time"
            )
            cases = [
                bench.list_image_hosts(args.seconds),
                bench.timed("SyncPullSecrets, all UNCHANGED", args.syncs, bench.sync_unchanged),
                bench.timed(
                    "SyncPullSecrets, all UPDATED (secrets made stale)",
                    args.syncs,
                    bench.sync_stale,
                ),
                bench.timed(
                    "rotation -> all secrets updated (reconciler)",
                    args.rotations,
                    bench.rotation,
                ),
            ]
            report(cases)
        finally:
            if broker is not None:
                broker.stop()
            emulator.stop()
        if emulator.server_errors:
            raise RuntimeError(f"the emulator failed {len(emulator.server_errors)} time(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
