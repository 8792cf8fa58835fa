"""Throughput of the broker's hot read paths, as ratios to a baseline in the same run.

Starts one real broker (embedded store, plaintext on loopback), then for a fixed
time per case runs CLIENTS threads calling one RPC in a loop:
- baseline: grpc.health.v1.Health/Check (no authentication, no store);
- GetImageHost and ListImageHosts (authentication, authorisation, store read).
Prints calls/s, p50/p99 latency and the ratio to the baseline. Bounded in time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.v1 import image_hosts_pb2 as pb
from tests.support.broker_process import BrokerProcess


def measure(call: Callable[[], object], clients: int, seconds: float) -> tuple[float, list[float]]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def worker(index: int) -> None:
        mine = latencies[index]
        while time.monotonic() < stop:
            start = time.perf_counter()
            call()
            mine.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    merged = sorted(x for chunk in latencies for x in chunk)
    return len(merged) / elapsed, merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hosts", type=int, default=50, help="image hosts in the store")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        broker = BrokerProcess(Path(tmp) / "data", args=["--rate-limit", "1000000"]).start()
        try:
            stub = broker.image_hosts()
            for index in range(args.hosts):
                stub.CreateImageHost(
                    pb.CreateImageHostRequest(
                        image_host_id=f"h{index}",
                        image_host=pb.ImageHost(url=f"h{index}.example.com", username="u"),
                    )
                )
            health = health_pb2_grpc.HealthStub(broker.channel())
            cases: dict[str, Callable[[], object]] = {
                "Health/Check (baseline)": lambda: health.Check(health_pb2.HealthCheckRequest()),
                "GetImageHost": lambda: stub.GetImageHost(
                    pb.GetImageHostRequest(name="imageHosts/h7")
                ),
                "ListImageHosts (page of 50)": lambda: stub.ListImageHosts(
                    pb.ListImageHostsRequest(page_size=50)
                ),
            }
            baseline = 0.0
            print(f"{args.clients} clients, {args.seconds:.0f} s per case, {args.hosts} hosts")
            print(f"{'case':<30} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}")
            for name, call in cases.items():
                call()  # warm up the connection and caches
                rate, latencies = measure(call, args.clients, args.seconds)
                baseline = baseline or rate
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(len(latencies) * 0.99)] * 1000
                print(f"{name:<30} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f} {rate / baseline:>6.2f}")
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
