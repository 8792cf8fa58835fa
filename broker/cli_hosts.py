"""`credbroker hosts ...`: operate the image hosts of a running broker over gRPC.

Output: a table or key/value view for people, `--json` (the response message
with proto field names, every field present) for scripts. Errors go to stderr
as `error: <CODE>: <message>` with the field violations and the ErrorInfo
reason of the status; the exit code is 1 for every failed call, 2 for usage.

Access tokens are write-only: they are read from a file or standard input
(never from the command line, where shell history and the process list would
keep them) and nothing this module prints contains one.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.config import default_data_dir, env_path, seconds_type
from broker.v1 import image_hosts_pb2, image_hosts_pb2_grpc
from clients.channel import open_channel as clients_open_channel
from clients.channel import read_token_file

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT_SECONDS = 10.0
RESOURCE_PREFIX = "imageHosts/"
#: `--access-token-file -` reads standard input.
STDIN_PATH = "-"
#: Upper bound on what is read as an access token (the broker accepts 8192 characters).
MAX_TOKEN_BYTES = 64 * 1024
#: `hosts list` follows next_page_token at most this many times.
MAX_PAGES = 10_000
#: `hosts test` waits for a registry (up to three requests of 10 s each on the broker).
TEST_TIMEOUT_SECONDS = 60.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure reported as `error: <message>` and exit code 1; never carries a secret."""


class UsageError(CliError):
    """A command line that cannot work: reported with the usage, exit code 2."""


# -- connection ----------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """How to reach the broker.

    Everything about transport security belongs here and in `open_channel`:
    TLS (`--cacert`, `--cert`, `--key`) becomes channel credentials; a bearer
    token (read from a file or the environment, like access tokens never from
    the command line) goes into every call's metadata through a client
    interceptor, since gRPC sends call credentials only over TLS.
    """

    server: str
    timeout: float
    token: str | None = dataclasses.field(default=None, repr=False)
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


def _default_token_file() -> str | None:
    """The token file to use when none is named: $CREDBROKER_TOKEN_FILE, else the
    admin token that the first `credbroker serve` wrote into its data directory."""
    named = os.environ.get("CREDBROKER_TOKEN_FILE")
    if named:
        return named
    data_dir = Path(os.environ.get("CREDBROKER_DATA_DIR") or default_data_dir())
    candidate = data_dir / "admin.token"
    return str(candidate) if candidate.is_file() else None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        type=_server_address,
        default=os.environ.get("CREDBROKER_SERVER") or DEFAULT_SERVER,
        help="address of the broker (env CREDBROKER_SERVER, default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="deadline of each call to the broker (default %(default)s)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        type=Path,
        default=_default_token_file(),
        help="file holding your bearer token (env CREDBROKER_TOKEN_FILE; default: the "
        "admin.token of the data directory when present; env CREDBROKER_TOKEN also works)",
    )
    parser.add_argument(
        "--cacert",
        metavar="PATH",
        type=Path,
        default=env_path("CREDBROKER_CACERT"),
        help="CA certificate that signed the broker's TLS certificate (env CREDBROKER_CACERT)",
    )
    parser.add_argument(
        "--cert",
        metavar="PATH",
        type=Path,
        default=env_path("CREDBROKER_CERT"),
        help="client certificate for mutual TLS (env CREDBROKER_CERT)",
    )
    parser.add_argument(
        "--key",
        metavar="PATH",
        type=Path,
        default=env_path("CREDBROKER_KEY"),
        help="client private key for mutual TLS (env CREDBROKER_KEY)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        default=os.environ.get("CREDBROKER_SERVER_NAME"),
        help="name to verify in the broker's certificate, when it differs from HOST",
    )


def connection_from(args: argparse.Namespace) -> Connection:
    token = os.environ.get("CREDBROKER_TOKEN") or None
    if args.token_file is not None:
        try:
            token = read_token_file(args.token_file)
        except OSError as exc:
            raise CliError(
                f"cannot read the token file {args.token_file}: {exc.strerror}"
            ) from None
    return Connection(
        server=args.server,
        timeout=args.timeout,
        token=token,
        cacert=args.cacert,
        cert=args.cert,
        key=args.key,
        server_name=args.server_name,
    )


def open_channel(connection: Connection) -> grpc.Channel:
    """The one place where the CLI makes a channel to the broker."""
    try:
        return clients_open_channel(
            connection.server,
            token=connection.token,
            ca_file=connection.cacert,
            cert_file=connection.cert,
            key_file=connection.key,
            server_name=connection.server_name,
        )
    except OSError as exc:
        raise CliError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _server_address(value: str) -> str:
    if not value or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise argparse.ArgumentTypeError("must be HOST:PORT, for example 127.0.0.1:50051")
    return value


_positive_seconds = seconds_type(3600, zero_allowed=False)


# -- arguments -----------------------------------------------------------------


class _RefuseTokenOnCommandLine(argparse.Action):
    """`--access-token VALUE` fails without echoing VALUE anywhere."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "an access token is never taken on the command line (shell history and the "
            "process list would keep it); use --access-token-file PATH or --access-token-stdin"
        )


class _RefuseCandidateTokenOnCommandLine(argparse.Action):
    """`--candidate-token VALUE` fails without echoing VALUE anywhere."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "a candidate token is never taken on the command line (shell history and the "
            "process list would keep it); use --candidate-token-file PATH or "
            "--candidate-token-stdin"
        )


def _add_token_arguments(parser: argparse.ArgumentParser, *, allow_clear: bool) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--access-token-file",
        metavar="PATH",
        help="read the access token from PATH ('-' for standard input); "
        "trailing newlines are dropped",
    )
    group.add_argument(
        "--access-token-stdin",
        action="store_true",
        help="read the access token from standard input (prompts without echo on a terminal)",
    )
    if allow_clear:
        group.add_argument(
            "--clear-access-token",
            action="store_true",
            help="remove the stored access token",
        )
    parser.add_argument(
        "--access-token", nargs="?", action=_RefuseTokenOnCommandLine, help=argparse.SUPPRESS
    )


def add_hosts_parser(commands: Any) -> None:
    """Add `hosts` and its subcommands to the `credbroker` subparsers action."""

    def common_options(timeout: float = DEFAULT_TIMEOUT_SECONDS) -> argparse.ArgumentParser:
        # One parent per deadline: set_defaults() on a shared parent would change
        # the default of every command that uses it.
        common = argparse.ArgumentParser(add_help=False)
        add_connection_arguments(common)
        common.set_defaults(timeout=timeout)
        common.add_argument(
            "--json",
            action="store_true",
            help="print the response as JSON (proto field names) for scripts",
        )
        return common

    common = common_options()

    hosts = commands.add_parser(
        "hosts",
        help="manage the image hosts of a running broker",
        description="Manage the image hosts (registries and their credentials) of a "
        "running broker. ID is an image host id or its resource name imageHosts/ID.",
    )
    sub = hosts.add_subparsers(dest="hosts_command", required=True, metavar="COMMAND")

    def leaf(
        name: str,
        help_text: str,
        description: str = "",
        parent: argparse.ArgumentParser = common,
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            parents=[parent],
            allow_abbrev=False,
        )
        parser.set_defaults(hosts_parser=parser)
        return parser

    leaf("list", "list every image host").add_argument(
        "--page-size",
        type=int,
        default=0,
        help=argparse.SUPPRESS,  # size of each ListImageHosts page; all pages are listed
    )

    leaf("show", "show one image host").add_argument("id", metavar="ID")

    add = leaf("add", "create an image host")
    add.add_argument("id", metavar="ID", help="new id: lowercase letters, digits and '-'")
    add.add_argument(
        "--url",
        required=True,
        help="registry as you would type it: gcr.io, registry.example.org:5000, "
        "http://127.0.0.1:5000 (plain HTTP), ghcr.io/acme (scoped to acme/)",
    )
    add.add_argument("--display-name", help="label shown to people (default: the id)")
    add.add_argument("--username", help="account on the registry (default: anonymous)")
    _add_token_arguments(add, allow_clear=False)

    update = leaf(
        "update",
        "change fields of an image host",
        "Change an image host: only the fields given as options are changed. Changing "
        "--url or --username without a new access token clears the stored token.",
    )
    update.add_argument("id", metavar="ID")
    update.add_argument("--display-name", help="new label ('' resets it to the id)")
    update.add_argument("--url", help="new registry URL")
    update.add_argument("--username", help="new account name ('' for anonymous)")
    _add_token_arguments(update, allow_clear=True)
    update.add_argument("--etag", default="", help="change only if the host still has this etag")

    remove = leaf("remove", "delete an image host (not the default one)")
    remove.add_argument("id", metavar="ID")
    remove.add_argument("--etag", default="", help="delete only if the host still has this etag")

    set_default = leaf(
        "set-default", "make an image host the default for unqualified image references"
    )
    set_default.add_argument("id", metavar="ID")
    set_default.add_argument(
        "--reason", required=True, help="why the default changes (recorded in the audit trail)"
    )
    set_default.add_argument(
        "--etag", default="", help="change only if the host still has this etag"
    )

    test = leaf(
        "test",
        "check that the registry answers and accepts the credentials",
        "Run the registry v2 handshake (GET /v2/, then the Basic or Bearer token flow) "
        "against the host's registry with its stored credentials, or with candidate "
        "credentials that are used once and never stored. Prints the result, the "
        "registry's words, the authentication scheme, the endpoint and the latency; "
        "exits 1 unless the result is OK.",
        parent=common_options(TEST_TIMEOUT_SECONDS),
    )
    test.add_argument("id", metavar="ID")
    test.add_argument(
        "--candidate-username",
        metavar="NAME",
        help="try this account instead of the stored one (with a candidate token)",
    )
    candidate = test.add_mutually_exclusive_group()
    candidate.add_argument(
        "--candidate-token-file",
        metavar="PATH",
        help="read the candidate password or token from PATH ('-' for standard input)",
    )
    candidate.add_argument(
        "--candidate-token-stdin",
        action="store_true",
        help="read the candidate password or token from standard input",
    )
    candidate.add_argument(
        "--candidate-anonymous",
        action="store_true",
        help="try without any credentials instead of the stored ones",
    )
    test.add_argument(
        "--candidate-token",
        nargs="?",
        action=_RefuseCandidateTokenOnCommandLine,
        help=argparse.SUPPRESS,
    )


# -- running -------------------------------------------------------------------


def run_hosts(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    try:
        check_usage(args)
    except UsageError as exc:
        parser: argparse.ArgumentParser = args.hosts_parser
        parser.error(_printable(str(exc)))  # exits with 2
    command = _COMMANDS[args.hosts_command]

    def act(channel: grpc.Channel, connection: Connection) -> int | None:
        stub = image_hosts_pb2_grpc.ImageHostServiceStub(channel)
        return command(_Call(stub, connection, args, out))

    return run_with_channel(args, act)


def run_with_channel(
    args: argparse.Namespace, action: Callable[[grpc.Channel, Connection], int | None]
) -> int:
    """Open the channel the options describe, run `action`, and turn every failure
    into a clear message on stderr and an exit code (never a traceback)."""
    connection = Connection(server=args.server, timeout=args.timeout)
    try:
        connection = connection_from(args)
        with open_channel(connection) as channel:
            status = action(channel, connection)
        return EXIT_OK if status is None else status
    except grpc.RpcError as exc:
        for line in describe_rpc_error(exc, connection):
            print(line, file=sys.stderr)
        return EXIT_FAILED
    except CliError as exc:
        print(f"error: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`credbroker hosts list | head`): nothing left to say.
        _silence_stdout()
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


@dataclass(frozen=True)
class _Call:
    stub: image_hosts_pb2_grpc.ImageHostServiceStub
    connection: Connection
    args: argparse.Namespace
    out: TextIO

    def emit(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()

    def emit_json(self, message: Message) -> None:
        self.emit(message_to_json(message))


def _cmd_list(call: _Call) -> None:
    hosts = list(list_all_hosts(call.stub, call.connection.timeout, call.args.page_size))
    if call.args.json:
        call.emit_json(image_hosts_pb2.ListImageHostsResponse(image_hosts=hosts))
    else:
        call.emit(format_table(hosts))


def _cmd_show(call: _Call) -> None:
    host = call.stub.GetImageHost(
        image_hosts_pb2.GetImageHostRequest(name=resource_name(call.args.id)),
        timeout=call.connection.timeout,
    )
    _emit_host(call, host)


def _cmd_add(call: _Call) -> None:
    args = call.args
    host = image_hosts_pb2.ImageHost(url=args.url)
    if args.display_name is not None:
        host.display_name = args.display_name
    if args.username is not None:
        host.username = args.username
    token = _token_from(args)
    if token is not None:
        host.access_token = token
    created = call.stub.CreateImageHost(
        image_hosts_pb2.CreateImageHostRequest(image_host_id=host_id(args.id), image_host=host),
        timeout=call.connection.timeout,
    )
    _emit_host(call, created, f"created {created.name}")


def _cmd_update(call: _Call) -> None:
    request = build_update_request(call.args)
    updated = call.stub.UpdateImageHost(request, timeout=call.connection.timeout)
    mask = set(request.update_mask.paths)
    note = None
    if mask & {"url", "username"} and "access_token" not in mask and not updated.access_token_set:
        note = "no access token is stored now: a new url or username without a new token clears it"
    _emit_host(call, updated, f"updated {updated.name} ({', '.join(request.update_mask.paths)})")
    if note and not call.args.json:
        print(f"note: {note}", file=sys.stderr)


def _cmd_remove(call: _Call) -> None:
    name = resource_name(call.args.id)
    empty = call.stub.DeleteImageHost(
        image_hosts_pb2.DeleteImageHostRequest(name=name, etag=call.args.etag),
        timeout=call.connection.timeout,
    )
    if call.args.json:
        call.emit_json(empty)
    else:
        call.emit(f"deleted {_printable(name)}")


def _cmd_set_default(call: _Call) -> None:
    host = call.stub.SetDefaultImageHost(
        image_hosts_pb2.SetDefaultImageHostRequest(
            name=resource_name(call.args.id), reason=call.args.reason, etag=call.args.etag
        ),
        timeout=call.connection.timeout,
    )
    _emit_host(call, host, f"{host.name} is now the default image host")


def _cmd_test(call: _Call) -> int:
    args = call.args
    request = image_hosts_pb2.TestImageHostRequest(name=resource_name(args.id))
    token = _candidate_token_from(args)
    if args.candidate_anonymous or args.candidate_username is not None or token is not None:
        request.use_candidate_credentials = True
        request.candidate_username = args.candidate_username or ""
        if token is not None:
            request.candidate_access_token = token
    answer = call.stub.TestImageHost(request, timeout=call.connection.timeout)
    if call.args.json:
        call.emit_json(answer)
    else:
        call.emit(format_test_result(answer))
    ok = answer.result == image_hosts_pb2.TEST_IMAGE_HOST_RESULT_OK
    return EXIT_OK if ok else EXIT_FAILED


# A command returns None (success) or its exit code.
_COMMANDS: dict[str, Callable[[_Call], int | None]] = {
    "list": _cmd_list,
    "show": _cmd_show,
    "add": _cmd_add,
    "update": _cmd_update,
    "remove": _cmd_remove,
    "set-default": _cmd_set_default,
    "test": _cmd_test,
}


def _emit_host(call: _Call, host: image_hosts_pb2.ImageHost, headline: str | None = None) -> None:
    if call.args.json:
        call.emit_json(host)
        return
    text = format_host(host)
    call.emit(f"{_printable(headline)}\n{text}" if headline else text)


# -- requests ------------------------------------------------------------------


def host_id(value: str) -> str:
    """`local` and `imageHosts/local` both name the host `local`."""
    return value.removeprefix(RESOURCE_PREFIX)


def resource_name(value: str) -> str:
    return RESOURCE_PREFIX + host_id(value)


def list_all_hosts(
    stub: image_hosts_pb2_grpc.ImageHostServiceStub, timeout: float, page_size: int = 0
) -> Iterator[image_hosts_pb2.ImageHost]:
    """Every host, following next_page_token; fails rather than loop forever."""
    token = ""
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        page = stub.ListImageHosts(
            image_hosts_pb2.ListImageHostsRequest(page_size=page_size, page_token=token),
            timeout=timeout,
        )
        yield from page.image_hosts
        token = page.next_page_token
        if not token:
            return
        if token in seen:
            raise CliError("the broker returned the same page token twice; listing stopped")
        seen.add(token)
    raise CliError(f"more than {MAX_PAGES} pages of image hosts; listing stopped")


def check_usage(args: argparse.Namespace) -> None:
    """Command lines argparse alone cannot reject; checked before anything is read or sent."""
    if (
        args.hosts_command == "test"
        and args.candidate_anonymous
        and args.candidate_username is not None
    ):
        raise UsageError("--candidate-anonymous takes no --candidate-username")
    if args.hosts_command == "update":
        given = [f for f in UPDATE_OPTIONS if getattr(args, f) not in (None, False)]
        if not given:
            raise UsageError(
                "nothing to update: give at least one of "
                + ", ".join("--" + f.replace("_", "-") for f in UPDATE_OPTIONS)
            )


UPDATE_OPTIONS = (
    "display_name",
    "url",
    "username",
    "access_token_file",
    "access_token_stdin",
    "clear_access_token",
)


def build_update_request(args: argparse.Namespace) -> image_hosts_pb2.UpdateImageHostRequest:
    """An update whose mask names exactly the options given on the command line."""
    host = image_hosts_pb2.ImageHost(name=resource_name(args.id), etag=args.etag)
    paths = [f for f in ("display_name", "url", "username") if getattr(args, f) is not None]
    for field in paths:
        setattr(host, field, getattr(args, field))
    token = _token_from(args)
    if token is not None:
        host.access_token = token
        paths.append("access_token")
    elif args.clear_access_token:
        paths.append("access_token")  # in the mask with an empty value: removed
    return image_hosts_pb2.UpdateImageHostRequest(
        image_host=host, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def _token_from(args: argparse.Namespace) -> str | None:
    if args.access_token_stdin or args.access_token_file == STDIN_PATH:
        return read_access_token_stdin()
    if args.access_token_file is not None:
        return read_access_token_file(args.access_token_file)
    return None


def _candidate_token_from(args: argparse.Namespace) -> str | None:
    if args.candidate_token_stdin or args.candidate_token_file == STDIN_PATH:
        return read_access_token_stdin()
    if args.candidate_token_file is not None:
        return read_access_token_file(args.candidate_token_file)
    return None


def read_access_token_file(path: str) -> str:
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        # The OS message names the file and the problem, never its content.
        raise CliError(f"cannot read the access token file {path}: {exc.strerror}") from None
    return _decode_token(raw, f"the access token file {path}")


def read_access_token_stdin() -> str:
    if sys.stdin is None:
        raise CliError("no standard input to read the access token from")
    if sys.stdin.isatty():
        try:
            return _check_token(getpass.getpass("Access token: "), "the terminal")
        except EOFError:
            raise CliError("no access token entered") from None
    return _decode_token(sys.stdin.buffer.read(MAX_TOKEN_BYTES + 1), "standard input")


def _decode_token(raw: bytes, source: str) -> str:
    if len(raw) > MAX_TOKEN_BYTES:
        raise CliError(f"{source} holds more than {MAX_TOKEN_BYTES} bytes: not an access token")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Not str(exc): it quotes the offending bytes.
        raise CliError(f"{source} is not UTF-8 text") from None
    return _check_token(text.rstrip("\r\n"), source)


def _check_token(token: str, source: str) -> str:
    if not token:
        raise CliError(f"the access token from {source} is empty")
    return token


# -- output --------------------------------------------------------------------


def message_to_json(message: Message) -> str:
    return json.dumps(message_to_dict(message), indent=2, ensure_ascii=False)


def message_to_dict(message: Message) -> dict[str, Any]:
    """The JSON form scripts rely on: proto field names in proto order, every field
    present (false, "" and 0 included), input-only fields (access_token) left out."""
    raw = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _public_fields(message.DESCRIPTOR, raw)


def _public_fields(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    # `descriptor` is a message Descriptor (pure-Python or upb: hence Any).
    result: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in data or _input_only(field):
            continue
        value = data[field.name]
        nested = field.message_type
        if nested is not None and not nested.GetOptions().map_entry:
            if isinstance(value, dict):
                value = _public_fields(nested, value)
            elif isinstance(value, list):
                value = [_public_fields(nested, v) if isinstance(v, dict) else v for v in value]
        result[field.name] = value
    return result


def _input_only(field: FieldDescriptor) -> bool:
    """Whether the field is marked `(google.api.field_behavior) = INPUT_ONLY`."""
    for option, value in field.GetOptions().ListFields():
        if option.full_name == "google.api.field_behavior" and option.enum_type is not None:
            input_only = option.enum_type.values_by_name["INPUT_ONLY"].number
            return input_only in value
    return False


TABLE_COLUMNS = ("NAME", "DISPLAY NAME", "REGISTRY", "USERNAME", "TOKEN", "DEFAULT")


def table_row(host: image_hosts_pb2.ImageHost) -> tuple[str, ...]:
    registry = host.registry
    if host.repository_prefix:
        registry += "/" + host.repository_prefix
    return (
        host_id(host.name),
        host.display_name,
        registry,
        host.username or "-",
        "set" if host.access_token_set else "-",
        "*" if host.default else "",
    )


def format_table(hosts: Sequence[image_hosts_pb2.ImageHost]) -> str:
    rows = [TABLE_COLUMNS, *(tuple(_printable(c) for c in table_row(h)) for h in hosts)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def format_host(host: image_hosts_pb2.ImageHost) -> str:
    def stamp(field: str) -> str:
        return getattr(host, field).ToJsonString() if host.HasField(field) else "-"

    items = [
        ("name", host.name),
        ("display_name", host.display_name),
        ("url", host.url),
        ("registry", host.registry),
        ("repository_prefix", host.repository_prefix or "-"),
        ("plain_http", _yes_no(host.plain_http)),
        ("username", host.username or "-"),
        ("access_token", "set" if host.access_token_set else "not set"),
        ("default", _yes_no(host.default)),
        ("create_time", stamp("create_time")),
        ("update_time", stamp("update_time")),
        ("etag", host.etag),
    ]
    width = max(len(key) for key, _ in items) + 1
    return "\n".join(f"{(key + ':').ljust(width)} {_printable(value)}" for key, value in items)


TEST_RESULT_PREFIX = "TEST_IMAGE_HOST_RESULT_"


def format_test_result(answer: image_hosts_pb2.TestImageHostResponse) -> str:
    result = image_hosts_pb2.TestImageHostResult.Name(answer.result)
    latency = answer.latency.ToTimedelta().total_seconds()
    items = [
        ("result", result.removeprefix(TEST_RESULT_PREFIX)),
        ("message", answer.message or "-"),
        ("auth_scheme", answer.auth_scheme or "-"),
        ("endpoint", answer.endpoint or "-"),
        ("latency", f"{latency * 1000:.0f} ms"),
    ]
    width = max(len(key) for key, _ in items) + 1
    return "\n".join(f"{(key + ':').ljust(width)} {_printable(value)}" for key, value in items)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _printable(text: str) -> str:
    """Keep control characters from a server or an argument off the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


# -- errors --------------------------------------------------------------------


def describe_rpc_error(error: grpc.RpcError, connection: Connection) -> list[str]:
    """`error: CODE: message`, then the field violations and the ErrorInfo reason."""
    if not isinstance(error, grpc.Call):
        return [f"error: the call to the broker at {connection.server} failed"]
    code = error.code()
    code_name = code.name if code is not None else "UNKNOWN"
    details = error.details() or ""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None  # details that do not match the status: show the status alone

    violations: list[tuple[str, str]] = []
    reasons: list[str] = []
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
        elif packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reasons.append(info.reason)

    from_broker = bool(reasons or violations)
    if code == grpc.StatusCode.UNAVAILABLE and not from_broker:
        message = (
            f"cannot reach the broker at {connection.server} (is `credbroker serve` running "
            "there? choose the address with --server or CREDBROKER_SERVER)"
        )
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not from_broker:
        message = (
            f"no answer from the broker at {connection.server} within "
            f"{connection.timeout:g}s (--timeout)"
        )
    else:
        message = details or "(no message)"
    lines = [f"error: {code_name}: {_printable(message)}"]
    lines += [f"  {_printable(field)}: {_printable(text)}" for field, text in violations]
    lines += [f"  error reason: {_printable(reason)}" for reason in reasons if reason]
    if not from_broker and details and message != details:
        lines.append(f"  detail: {_printable(details)}")
    return lines


def _silence_stdout() -> None:
    # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
