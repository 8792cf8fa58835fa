"""The `credbroker` command: run the server, and operate it over gRPC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from broker.cli_hosts import add_hosts_parser, run_hosts
from broker.cli_images import add_images_commands, run_images
from broker.cli_k8s import add_k8s_commands, run_k8s
from broker.cli_principals import add_principals_commands, run_principals
from broker.cli_store import add_store_commands, run_store
from broker.config import add_server_arguments, server_config_from


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credbroker", description="Broker for container-registry credentials."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gRPC server")
    add_server_arguments(serve)
    add_hosts_parser(commands)
    add_images_commands(commands)
    add_k8s_commands(commands)
    add_principals_commands(commands)
    add_store_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from broker.server import serve

        return serve(server_config_from(args))
    if args.command == "hosts":
        return run_hosts(args)
    if args.command in ("resolve", "pull"):
        return run_images(args)
    if args.command == "k8s":
        return run_k8s(args)
    if args.command == "principals":
        return run_principals(args)
    if args.command == "store":
        return run_store(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
