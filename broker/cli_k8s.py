"""`credbroker k8s provision|revoke|list|sync`: Kubernetes pull secrets through a running broker.

The broker talks to the cluster (its own kubeconfig or service account); this
command only talks to the broker (PullSecretService), with the connection
options, error output and exit codes of `credbroker hosts`.

Output: one row per namespace (what happened to the secret and to each
service account, or that namespace's error: code, reason and the API server's
words); `--json` prints the response message (proto field names, every field
present). `--dry-run` changes nothing and says so. Exit status: 0 when every
namespace succeeded, 1 when a namespace or a service account failed (the
other namespaces were still done) or the call failed, 2 for usage errors.
Nothing printed here contains a credential: the broker never returns one
from these RPCs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import grpc

from broker.cli_hosts import (
    EXIT_FAILED,
    EXIT_OK,
    MAX_PAGES,
    CliError,
    Connection,
    _printable,
    add_connection_arguments,
    message_to_json,
    resource_name,
    run_with_channel,
)
from broker.v1 import pull_secrets_pb2 as pb
from broker.v1 import pull_secrets_pb2_grpc

#: Provisioning may wait for new namespaces' default service accounts.
DEFAULT_K8S_TIMEOUT_SECONDS = 120.0
RESULT_COLUMNS = ("NAMESPACE", "SECRET", "CHANGE", "SERVICE ACCOUNTS", "ERROR")
LIST_COLUMNS = ("NAMESPACE", "SECRET", "STATE", "IMAGE HOSTS", "SYNC", "SERVICE ACCOUNTS")


def _connection_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(parser)
    parser.set_defaults(timeout=DEFAULT_K8S_TIMEOUT_SECONDS)
    parser.add_argument(
        "--json", action="store_true", help="print the response as JSON (proto field names)"
    )
    return parser


def _add_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="a target namespace (repeatable)",
    )
    parser.add_argument(
        "-l",
        "--selector",
        default="",
        metavar="SELECTOR",
        help="target the namespaces matching this label selector (kubectl syntax: "
        "'team=a,env in (prod,staging)')",
    )
    parser.add_argument(
        "--secret-name",
        default="",
        metavar="NAME",
        help="name of the Secret (default: credbroker-pull-secret)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would change and change nothing"
    )


def add_k8s_commands(commands: Any) -> None:
    """Add `k8s` and its subcommands to the `credbroker` subparsers action."""
    k8s = commands.add_parser(
        "k8s",
        help="Kubernetes image pull secrets of a running broker",
        description="Provision, revoke, list and sync the Kubernetes image pull secrets "
        "a running broker manages (the broker needs access to the cluster: "
        "`credbroker serve --kubeconfig ...`, or its pod's service account).",
    )
    sub = k8s.add_subparsers(dest="k8s_command", required=True, metavar="COMMAND")

    def leaf(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_text,
            description=description,
            parents=[_connection_parser()],
            allow_abbrev=False,
        )
        parser.set_defaults(k8s_parser=parser)
        return parser

    provision = leaf(
        "provision",
        "create or update a pull secret and reference it from service accounts",
        "Create or update the pull secret in each target namespace with the credentials "
        "of the given image hosts (or of the hosts the given images resolve to), and add "
        "it to the imagePullSecrets of the service accounts, keeping every other entry.",
    )
    _add_targets(provision)
    provision.add_argument(
        "--image-host",
        dest="image_hosts",
        action="append",
        default=[],
        metavar="ID",
        help="an image host whose credentials the secret carries (repeatable)",
    )
    provision.add_argument(
        "--image",
        dest="images",
        action="append",
        default=[],
        metavar="IMAGE",
        help="an image whose image host the secret carries, resolved as ResolveCredentials "
        "does (repeatable)",
    )
    provision.add_argument(
        "--service-account",
        dest="service_accounts",
        action="append",
        default=[],
        metavar="NAME",
        help="a service account to reference the secret from (repeatable; default: default)",
    )
    provision.add_argument(
        "--keep-in-sync",
        action="store_true",
        help="have the broker recreate the secret and its references when they are removed, "
        "and provision namespaces that match the selector later",
    )

    revoke = leaf(
        "revoke",
        "remove a pull secret's references and delete it",
        "Remove the references to the pull secret from every service account of each "
        "target namespace (every other entry stays) and delete the secret; only secrets "
        "managed by credbroker are touched.",
    )
    _add_targets(revoke)

    listing = leaf(
        "list",
        "list the managed pull secrets",
        "List the pull secrets the broker manages, the image hosts each carries and "
        "whether its content is current.",
    )
    listing.add_argument("--namespace", default="", help="only this namespace")

    sync = leaf(
        "sync",
        "bring every managed pull secret up to date now",
        "Rewrite stale managed secrets, provision new namespaces matching kept-in-sync "
        "selectors, recreate deleted secrets and restore removed references.",
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="say what would change and change nothing"
    )


def run_k8s(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    if args.k8s_command in ("provision", "revoke") and not (args.namespaces or args.selector):
        parser: argparse.ArgumentParser = args.k8s_parser
        parser.error("name at least one --namespace or give a --selector")  # exits with 2
    if args.k8s_command == "provision" and not (args.image_hosts or args.images):
        args.k8s_parser.error("name at least one --image-host or --image")

    def act(channel: grpc.Channel, connection: Connection) -> int:
        stub = pull_secrets_pb2_grpc.PullSecretServiceStub(channel)
        if args.k8s_command == "provision":
            return _provision(stub, connection, args, out)
        if args.k8s_command == "revoke":
            return _revoke(stub, connection, args, out)
        if args.k8s_command == "list":
            return _list(stub, connection, args, out)
        return _sync(stub, connection, args, out)

    return run_with_channel(args, act)


# -- commands --------------------------------------------------------------------


def _provision(
    stub: pull_secrets_pb2_grpc.PullSecretServiceStub,
    connection: Connection,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    answer = stub.ProvisionPullSecret(
        pb.ProvisionPullSecretRequest(
            namespaces=args.namespaces,
            namespace_selector=args.selector,
            image_hosts=[resource_name(h) for h in args.image_hosts],
            images=args.images,
            secret_name=args.secret_name,
            service_accounts=args.service_accounts,
            dry_run=args.dry_run,
            keep_in_sync=args.keep_in_sync,
        ),
        timeout=connection.timeout,
    )
    return _report(answer, answer.results, answer.dry_run, args, out)


def _revoke(
    stub: pull_secrets_pb2_grpc.PullSecretServiceStub,
    connection: Connection,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    answer = stub.RevokePullSecret(
        pb.RevokePullSecretRequest(
            namespaces=args.namespaces,
            namespace_selector=args.selector,
            secret_name=args.secret_name,
            dry_run=args.dry_run,
        ),
        timeout=connection.timeout,
    )
    return _report(answer, answer.results, answer.dry_run, args, out)


def _sync(
    stub: pull_secrets_pb2_grpc.PullSecretServiceStub,
    connection: Connection,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    answer = stub.SyncPullSecrets(
        pb.SyncPullSecretsRequest(dry_run=args.dry_run), timeout=connection.timeout
    )
    return _report(answer, answer.results, answer.dry_run, args, out)


def _list(
    stub: pull_secrets_pb2_grpc.PullSecretServiceStub,
    connection: Connection,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    secrets = list(_all_pull_secrets(stub, connection.timeout, args.namespace))
    if args.json:
        _write(out, message_to_json(pb.ListPullSecretsResponse(pull_secrets=secrets)))
    elif not secrets:
        _write(out, "no managed pull secrets")
    else:
        _write(out, format_list(secrets))
    return EXIT_FAILED if any(s.HasField("error") for s in secrets) else EXIT_OK


def _all_pull_secrets(
    stub: pull_secrets_pb2_grpc.PullSecretServiceStub, timeout: float, namespace: str
) -> Iterator[pb.PullSecret]:
    token = ""
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        page = stub.ListPullSecrets(
            pb.ListPullSecretsRequest(namespace=namespace, page_token=token), timeout=timeout
        )
        yield from page.pull_secrets
        token = page.next_page_token
        if not token:
            return
        if token in seen:
            raise CliError("the broker returned the same page token twice; listing stopped")
        seen.add(token)
    raise CliError(f"more than {MAX_PAGES} pages of pull secrets; listing stopped")


# -- output ----------------------------------------------------------------------


def _report(
    answer: Any,
    results: Sequence[pb.NamespaceResult],
    dry_run: bool,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    if args.json:
        _write(out, message_to_json(answer))
    else:
        if dry_run:
            _write(out, "dry run: nothing was changed; this is what would change")
        _write(out, format_results(results) if results else "no namespaces")
    failed = any(_failed(r) for r in results)
    return EXIT_FAILED if failed else EXIT_OK


def _failed(result: pb.NamespaceResult) -> bool:
    return result.HasField("error") or any(a.HasField("error") for a in result.service_accounts)


def _enum_word(value: int, enum: Any, prefix: str) -> str:
    name: str = enum.Name(value)
    return "-" if name.endswith("_UNSPECIFIED") else name.removeprefix(prefix).lower()


def _error_text(error: pb.NamespaceError) -> str:
    return f"{error.code} ({error.reason}): {error.message}"


def format_results(results: Sequence[pb.NamespaceResult]) -> str:
    rows: list[tuple[str, ...]] = [RESULT_COLUMNS]
    for result in results:
        accounts = ", ".join(
            f"{a.name}: {_enum_word(a.change, pb.ServiceAccountChange, 'SERVICE_ACCOUNT_CHANGE_')}"
            for a in result.service_accounts
        )
        errors = [_error_text(result.error)] if result.HasField("error") else []
        errors += [
            f"{a.name}: {_error_text(a.error)}"
            for a in result.service_accounts
            if a.HasField("error")
        ]
        rows.append(
            (
                result.namespace,
                result.secret_name,
                _enum_word(result.secret_change, pb.SecretChange, "SECRET_CHANGE_"),
                accounts or "-",
                "; ".join(errors),
            )
        )
    return _table(rows)


def format_list(secrets: Sequence[pb.PullSecret]) -> str:
    rows: list[tuple[str, ...]] = [LIST_COLUMNS]
    for secret in secrets:
        state = _enum_word(secret.state, pb.PullSecretState, "PULL_SECRET_STATE_")
        if secret.HasField("error"):
            state = f"{state} ({_error_text(secret.error)})"
        rows.append(
            (
                secret.namespace,
                secret.secret_name,
                state,
                ",".join(h.removeprefix("imageHosts/") for h in secret.image_hosts) or "-",
                "yes" if secret.keep_in_sync else "no",
                ",".join(secret.service_accounts) or "-",
            )
        )
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    cleaned = [tuple(_printable(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cleaned) for i in range(len(cleaned[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cleaned
    )


def _write(out: TextIO, text: str) -> None:
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()
