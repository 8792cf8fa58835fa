"""`credbroker principals ...`: manage who may call the broker (on the broker's host).

These commands edit the principals file directly; a running broker picks up
changes within a second. A new token is shown once and never stored in clear.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from broker.config import default_data_dir
from broker.security.principals import ROLES, PrincipalsError, PrincipalsFile


def add_principals_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("principals", help="manage principals, roles and tokens")
    _location_arguments(parser, suppress_defaults=False)
    # The same options after the action (`principals add NAME --data-dir D`); SUPPRESS
    # keeps the subparser from overwriting a value given before the action.
    location = argparse.ArgumentParser(add_help=False)
    _location_arguments(location, suppress_defaults=True)
    actions = parser.add_subparsers(dest="principals_command", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", help="add a principal and print its new token once", parents=[location]
    )
    add.add_argument("name")
    add.add_argument("--role", action="append", required=True, choices=ROLES, dest="roles")
    add.add_argument(
        "--image-host",
        action="append",
        default=[],
        dest="image_hosts",
        help="limit the principal to this image host id (repeatable); default: all hosts",
    )
    add.add_argument(
        "--cert-identity",
        action="append",
        default=[],
        dest="cert_identities",
        help="client certificate identity mapped to it: cn:NAME or uri:URI (repeatable)",
    )
    add.add_argument("--no-token", action="store_true", help="certificate identities only")
    add.add_argument(
        "--token-file", type=Path, help="write the token to this new file (mode 0600) instead"
    )

    listing = actions.add_parser("list", help="list principals (never tokens)", parents=[location])
    listing.add_argument("--json", action="store_true")

    remove = actions.add_parser("remove", help="remove a principal", parents=[location])
    remove.add_argument("name")

    rotate = actions.add_parser(
        "rotate-token", help="replace a principal's tokens by a new one", parents=[location]
    )
    rotate.add_argument("name")
    rotate.add_argument("--token-file", type=Path)


def _location_arguments(parser: argparse.ArgumentParser, *, suppress_defaults: bool) -> None:
    parser.add_argument(
        "--principals-file",
        type=Path,
        default=argparse.SUPPRESS if suppress_defaults else None,
        help="default: $CREDBROKER_PRINCIPALS_FILE or DATA_DIR/principals.json",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS
        if suppress_defaults
        else Path(os.environ.get("CREDBROKER_DATA_DIR", str(default_data_dir()))),
        help="the broker's data directory (env CREDBROKER_DATA_DIR)",
    )


def _source(args: argparse.Namespace) -> PrincipalsFile:
    path = args.principals_file or os.environ.get("CREDBROKER_PRINCIPALS_FILE")
    return PrincipalsFile(Path(path) if path else args.data_dir / "principals.json")


@contextlib.contextmanager
def _hand_over(token_file: Path | None) -> Iterator[Callable[[str], None]]:
    """Where a new token goes. A --token-file is created (new, 0600) *before* the
    principals file changes, and removed again if the change fails: a failed command
    must not leave a principal (or a rotated principal) with a token nobody got."""
    if token_file is None:

        def show(token: str) -> None:
            print(token)
            print("store this token now: it is not kept and cannot be shown again", file=sys.stderr)

        yield show
        return
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = False
    try:
        with os.fdopen(fd, "w") as handle:

            def write(token: str) -> None:
                nonlocal written
                handle.write(token + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                written = True

            yield write
    finally:
        if not written:
            token_file.unlink(missing_ok=True)
    print(f"token written to {token_file} (mode 0600)", file=sys.stderr)


def run_principals(args: argparse.Namespace) -> int:
    source = _source(args)
    try:
        if args.principals_command == "add":
            with _hand_over(None if args.no_token else args.token_file) as hand_over:
                token = source.add(
                    args.name,
                    args.roles,
                    image_hosts=args.image_hosts,
                    certificate_identities=args.cert_identities,
                    with_token=not args.no_token,
                )
                if token is not None:
                    hand_over(token)
            return 0
        if args.principals_command == "list":
            principals = source.load()
            if args.json:
                rows = [
                    {
                        "name": p.name,
                        "roles": sorted(p.roles),
                        "image_hosts": sorted(p.image_hosts),
                        "certificate_identities": sorted(p.certificate_identities),
                        "tokens": len(p.token_hashes),
                    }
                    for p in principals
                ]
                print(json.dumps(rows, indent=2))
                return 0
            print(f"{'NAME':<20} {'ROLES':<24} {'IMAGE HOSTS':<24} {'TOKENS':<6} CERTIFICATES")
            for p in principals:
                print(
                    f"{p.name:<20} {','.join(sorted(p.roles)):<24} "
                    f"{','.join(sorted(p.image_hosts)) or '*':<24} {len(p.token_hashes):<6} "
                    f"{','.join(sorted(p.certificate_identities)) or '-'}"
                )
            return 0
        if args.principals_command == "remove":
            source.remove(args.name)
            return 0
        if args.principals_command == "rotate-token":
            with _hand_over(args.token_file) as hand_over:
                hand_over(source.rotate_token(args.name))
            return 0
    except (PrincipalsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled principals command {args.principals_command}")
