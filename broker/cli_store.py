"""`credbroker store migrate`: move image hosts between the file store and Vault."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from broker.config import ServerConfig, add_storage_arguments, vault_options_from
from broker.stores.base import SecretStore, StoreError
from broker.stores.factory import open_backend
from broker.stores.file import DATA_FILE
from broker.stores.migrate import migrate


def add_store_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("store", help="manage the secret store")
    actions = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    move = actions.add_parser(
        "migrate",
        help="copy every image host, secret and the default from one store to another",
        description="Copies, then verifies by reading everything back. The source is only "
        "read; an interrupted run can simply be run again. Stop the brokers (or keep them "
        "on the source) while it runs.",
    )
    move.add_argument("--from", dest="source", choices=["file", "vault"], required=True)
    move.add_argument("--to", dest="target", choices=["file", "vault"], required=True)
    move.add_argument(
        "--overwrite",
        action="store_true",
        help="replace entries the target already holds with different content",
    )
    add_storage_arguments(move, choose_store=False)


def _open(kind: str, args: argparse.Namespace, *, source: bool = False) -> SecretStore:
    if source and kind == "file" and not (args.data_dir / DATA_FILE).exists():
        # Opening a FileStore creates one: never do that to a source that is only read.
        raise StoreError(
            f"there is no embedded store in {args.data_dir} ({DATA_FILE} is missing); "
            "give the broker's data directory with --data-dir or CREDBROKER_DATA_DIR"
        )
    config = ServerConfig(
        address="",
        port=0,
        data_dir=args.data_dir,
        log_level="WARNING",
        grace_seconds=0,
        max_workers=1,
        store=kind,
        vault=vault_options_from(args) if kind == "vault" else None,
    )
    return open_backend(config)


def run_store(args: argparse.Namespace) -> int:
    if args.source == args.target:
        print("error: --from and --to name the same store", file=sys.stderr)
        return 2
    try:
        source = _open(args.source, args, source=True)
        try:
            target = _open(args.target, args)
            try:
                report = migrate(source, target, overwrite=args.overwrite)
            finally:
                target.close()
        finally:
            source.close()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        "migrated {copied} entries ({already_present} already present, {overwritten} "
        "overwritten); verified {verified}".format(**dataclasses.asdict(report))
    )
    return 0
