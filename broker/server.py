"""Builds and runs the gRPC server."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.api.errors import ErrorMappingInterceptor
from broker.api.image_hosts import ImageHostServicer
from broker.config import ServerConfig
from broker.core.audit import AuditSink
from broker.core.image_hosts import ImageHostCatalog
from broker.security.audit import AuditTrail
from broker.stores.base import SecretStore, StoreCorrupt, StoreUnavailable
from broker.stores.file import FileStore
from broker.v1 import image_hosts_pb2, image_hosts_pb2_grpc

_log = logging.getLogger("credbroker")

SERVICE_NAMES: Sequence[str] = (
    image_hosts_pb2.DESCRIPTOR.services_by_name["ImageHostService"].full_name,
)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int

    def stop(self, grace: float) -> None:
        # Tell load balancers first, then let in-flight calls finish.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_server(config: ServerConfig, store: SecretStore, audit: AuditSink) -> RunningServer:
    catalog = ImageHostCatalog(store, audit)
    if catalog.ensure_seeded():
        _log.info("empty store: seeded Docker Hub (anonymous) as the default image host")

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        interceptors=[ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    image_hosts_pb2_grpc.add_ImageHostServiceServicer_to_server(ImageHostServicer(catalog), server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    host = f"[{config.address}]" if ":" in config.address else config.address
    port = server.add_insecure_port(f"{host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {host}:{config.port}")
    server.start()
    _log.info("listening on %s:%d (store: %s)", host, port, config.data_dir)
    return RunningServer(server=server, health=health_servicer, port=port)


def serve(config: ServerConfig) -> int:
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        store = FileStore(config.data_dir)
    except (StoreCorrupt, StoreUnavailable) as exc:
        _log.error("cannot open the store: %s", exc)
        return 2
    try:
        running = start_server(config, store, AuditTrail(sys.stderr))
    except OSError as exc:
        _log.error("cannot start: %s", exc)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _log.info("%s received: finishing in-flight calls", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    running.stop(config.grace_seconds)
    store.close()
    _log.info("stopped")
    return 0
