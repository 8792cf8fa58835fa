"""Server settings from flags, then CREDBROKER_* environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 50051


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "credbroker"


@dataclass(frozen=True)
class ServerConfig:
    address: str
    port: int
    data_dir: Path
    log_level: str
    grace_seconds: float
    max_workers: int


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--address",
        default=env("CREDBROKER_ADDRESS", DEFAULT_ADDRESS),
        help="address to listen on (env CREDBROKER_ADDRESS, default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("CREDBROKER_PORT", str(DEFAULT_PORT))),
        help="port to listen on, 0 for any free port (env CREDBROKER_PORT, default %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env("CREDBROKER_DATA_DIR", str(default_data_dir()))),
        help="directory of the embedded store (env CREDBROKER_DATA_DIR, default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=env("CREDBROKER_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env CREDBROKER_LOG_LEVEL, default %(default)s)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=float(env("CREDBROKER_GRACE_SECONDS", "10")),
        help="how long in-flight calls may finish on shutdown (default %(default)s)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=int(env("CREDBROKER_MAX_WORKERS", "16")),
        help="threads serving calls (default %(default)s)",
    )


def server_config_from(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        address=args.address,
        port=args.port,
        data_dir=args.data_dir,
        log_level=args.log_level,
        grace_seconds=args.grace_seconds,
        max_workers=args.max_workers,
    )
