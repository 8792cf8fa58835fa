"""`credbroker resolve IMAGE` and `credbroker pull IMAGE`: images through a running broker.

`resolve` shows which registry, image host and account an image reference gets
(ResolveCredentials). The secret and the X-Registry-Auth value (which holds the
secret, base64-encoded) are withheld unless `--show-secret` asks for them; the
broker records the disclosure in its audit trail either way.

`pull` pulls the image on the broker's Docker engine (PullImage) and follows its
progress: on a terminal one redrawn line per layer with a progress bar, otherwise
one plain line whenever a layer's status changes; then the digest and the
digest-pinned reference. `--swarm` pulls on every Swarm node instead (the broker
does so by itself when its engine is a Swarm manager) and prints one line per
node as it finishes; the command exits 1 when a node failed. `--json` prints
every message as one JSON line.

Connection options, error output and exit codes are those of `credbroker hosts`:
a failed call prints `error: <CODE>: <message>` and the reason, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from broker.cli_hosts import (
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    Connection,
    _printable,
    add_connection_arguments,
    message_to_dict,
    run_with_channel,
)
from broker.v1 import credentials_pb2, credentials_pb2_grpc, pulls_pb2, pulls_pb2_grpc

#: A pull waits for the registry and the engine: a longer default deadline than other calls.
DEFAULT_PULL_TIMEOUT_SECONDS = 1800.0
#: ResolveCredentials fields that carry the secret (registry_auth holds it base64-encoded).
SECRET_FIELDS = ("secret", "registry_auth")
BAR_WIDTH = 30
_CLEAR_LINE = "\r\x1b[K"


def _connection_parser(default_timeout: float | None = None) -> argparse.ArgumentParser:
    # A parser of its own per command: set_defaults() on a shared parent would change
    # the default of every command that uses it.
    parser = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(parser)
    if default_timeout is not None:
        parser.set_defaults(timeout=default_timeout)
    return parser


def add_images_commands(commands: Any) -> None:
    """Add `resolve` and `pull` to the `credbroker` subparsers action."""
    resolve = commands.add_parser(
        "resolve",
        help="show the registry, image host and account an image gets",
        description="Resolve an image reference as a launcher would (ResolveCredentials): "
        "the fully qualified image, its registry, the image host whose credentials apply "
        "and the username. The secret is only printed with --show-secret.",
        parents=[_connection_parser()],
        allow_abbrev=False,
    )
    resolve.add_argument(
        "image", metavar="IMAGE", help="image reference, as `docker pull` takes it"
    )
    resolve.add_argument(
        "--show-secret",
        action="store_true",
        help="also print the secret and the X-Registry-Auth value (withheld otherwise)",
    )
    resolve.add_argument("--json", action="store_true", help="print the response as JSON")
    resolve.set_defaults(images_command="resolve")

    pull = commands.add_parser(
        "pull",
        help="pull an image on the broker's Docker engine or every Swarm node",
        description="Pull an image with the credentials of its image host (PullImage), "
        "following the progress; then print the digest and the digest-pinned reference. "
        "On a Swarm manager the image goes to every ready, active node (or those matching "
        "--constraint), one line per node.",
        parents=[_connection_parser(DEFAULT_PULL_TIMEOUT_SECONDS)],
        allow_abbrev=False,
    )
    pull.add_argument("image", metavar="IMAGE", help="image reference, as `docker pull` takes it")
    backend = pull.add_mutually_exclusive_group()
    backend.add_argument(
        "--swarm",
        dest="backend",
        action="store_const",
        const=pulls_pb2.PULL_BACKEND_SWARM,
        default=pulls_pb2.PULL_BACKEND_UNSPECIFIED,
        help="pull on every Swarm node that can run the image (default on a Swarm manager)",
    )
    backend.add_argument(
        "--docker",
        dest="backend",
        action="store_const",
        const=pulls_pb2.PULL_BACKEND_DOCKER,
        help="pull on the broker's Docker engine only, even on a Swarm manager",
    )
    pull.add_argument(
        "--constraint",
        dest="constraints",
        action="append",
        default=[],
        metavar="EXPR",
        help="Swarm: only nodes matching this placement constraint, e.g. node.role==worker "
        "(repeatable: all must match)",
    )
    pull.add_argument(
        "--show-registry-auth",
        action="store_true",
        help="also print the X-Registry-Auth value for your own service create "
        "(it holds the credentials; the broker audits the disclosure)",
    )
    pull.add_argument("--platform", default="", help="platform to pull, e.g. linux/amd64")
    pull.add_argument(
        "--json",
        action="store_true",
        help="print every progress message and the result as JSON lines",
    )
    pull.set_defaults(images_command="pull")


def run_images(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout

    def act(channel: grpc.Channel, connection: Connection) -> int:
        if args.images_command == "resolve":
            return _resolve(channel, connection, args, out)
        return _pull(channel, connection, args, out)

    return run_with_channel(args, act)


# -- resolve -------------------------------------------------------------------


def _resolve(
    channel: grpc.Channel, connection: Connection, args: argparse.Namespace, out: TextIO
) -> int:
    stub = credentials_pb2_grpc.CredentialServiceStub(channel)
    answer = stub.ResolveCredentials(
        credentials_pb2.ResolveCredentialsRequest(image=args.image), timeout=connection.timeout
    )
    if args.json:
        data = message_to_dict(answer)
        if not args.show_secret:
            for name in SECRET_FIELDS:
                data.pop(name, None)
        _write(out, json.dumps(data, indent=2, ensure_ascii=False))
    else:
        _write(out, format_resolution(answer, show_secret=args.show_secret))
    return EXIT_OK


def format_resolution(
    answer: credentials_pb2.ResolveCredentialsResponse, *, show_secret: bool
) -> str:
    items = [
        ("image", answer.image),
        ("registry", answer.registry),
        ("image_host", answer.image_host or "- (no image host matches: anonymous)"),
        ("anonymous", "yes" if answer.anonymous else "no"),
        ("username", answer.username or "-"),
        ("server_address", answer.server_address),
        ("plain_http", "yes" if answer.plain_http else "no"),
    ]
    if answer.anonymous:
        items.append(("secret", "-"))
    elif show_secret:
        items += [("secret", answer.secret), ("registry_auth", answer.registry_auth)]
    else:
        items.append(("secret", "(withheld; --show-secret prints it)"))
    width = max(len(key) for key, _ in items) + 1
    return "\n".join(f"{(key + ':').ljust(width)} {_printable(value)}" for key, value in items)


# -- pull ----------------------------------------------------------------------


def _pull(
    channel: grpc.Channel, connection: Connection, args: argparse.Namespace, out: TextIO
) -> int:
    stub = pulls_pb2_grpc.PullServiceStub(channel)
    call = stub.PullImage(
        pulls_pb2.PullImageRequest(
            image=args.image,
            platform=args.platform,
            backend=args.backend,
            placement_constraints=args.constraints,
            include_registry_auth=args.show_registry_auth,
        ),
        timeout=connection.timeout,
    )
    display: ProgressDisplay
    if args.json:
        display = JsonLines(out)
    elif out.isatty():
        display = TerminalProgress(out)
    else:
        display = PlainProgress(out)
    result: pulls_pb2.PullResult | None = None
    try:
        for message in call:
            if message.HasField("result"):
                result = message.result
                display.result(result)
            elif message.HasField("node"):
                display.node(message.node)
            else:
                display.progress(message.progress)
    except KeyboardInterrupt:
        call.cancel()  # type: ignore[no-untyped-call]  # the broker stops the pull
        display.interrupted()
        raise
    if result is None:
        raise CliError("the broker ended the pull without a result")
    failed = any(n.state == pulls_pb2.NODE_PULL_STATE_FAILED for n in result.nodes)
    return EXIT_FAILED if failed else EXIT_OK


class ProgressDisplay:
    def progress(self, event: pulls_pb2.LayerProgress) -> None:
        raise NotImplementedError

    def result(self, result: pulls_pb2.PullResult) -> None:
        raise NotImplementedError

    def node(self, event: pulls_pb2.NodePull) -> None:
        """One Swarm node's outcome: a line of its own, whatever the display."""
        raise NotImplementedError

    def interrupted(self) -> None:
        """The pull was interrupted (Ctrl-C): leave the output tidy."""


def describe_node(event: pulls_pb2.NodePull) -> str:
    state = pulls_pb2.NodePullState.Name(event.state).removeprefix("NODE_PULL_STATE_")
    text = f"node {_printable(event.node_id)} ({_printable(event.hostname)}): {state}"
    return f"{text}: {_printable(event.reason)}" if event.reason else text


def _summary(result: pulls_pb2.PullResult) -> str:
    items = [
        ("pulled", result.image),
        ("digest", result.digest or "-"),
        ("pinned_image", result.pinned_image),
        ("image_host", result.image_host or "- (anonymous)"),
    ]
    if result.backend == pulls_pb2.PULL_BACKEND_SWARM:
        counts = {
            state: sum(1 for n in result.nodes if n.state == value)
            for state, value in (
                ("pulled", pulls_pb2.NODE_PULL_STATE_PULLED),
                ("already present", pulls_pb2.NODE_PULL_STATE_ALREADY_PRESENT),
                ("failed", pulls_pb2.NODE_PULL_STATE_FAILED),
            )
        }
        items.append(("nodes", ", ".join(f"{n} {state}" for state, n in counts.items())))
    if result.registry_auth:
        items.append(("registry_auth", result.registry_auth))
    width = max(len(key) for key, _ in items) + 1
    return "\n".join(f"{(key + ':').ljust(width)} {_printable(value)}" for key, value in items)


def _describe(event: pulls_pb2.LayerProgress) -> str:
    status = _printable(event.status)
    return f"{_printable(event.layer)}: {status}" if event.layer else status


def _write(out: TextIO, text: str) -> None:
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


@dataclass
class PlainProgress(ProgressDisplay):
    """One line per change of a layer's status (not one per byte count): for logs and pipes."""

    out: TextIO
    _last: dict[str, str] = field(default_factory=dict)

    def progress(self, event: pulls_pb2.LayerProgress) -> None:
        if self._last.get(event.layer) == event.status and event.layer:
            return
        self._last[event.layer] = event.status
        _write(self.out, _describe(event))

    def result(self, result: pulls_pb2.PullResult) -> None:
        _write(self.out, _summary(result))

    def node(self, event: pulls_pb2.NodePull) -> None:
        _write(self.out, describe_node(event))


def progress_bar(current: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[=========>          ]  1.2MB/3.4MB`, as `docker pull` draws it."""
    if total <= 0:
        return ""
    done = min(max(current, 0), total)
    filled = width * done // total
    arrow = ">" if filled < width else ""
    bar = "=" * filled + arrow + " " * (width - filled - len(arrow))
    return f"[{bar}] {_size(done)}/{_size(total)}"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class TerminalProgress(ProgressDisplay):
    """One row per layer, redrawn in place (cursor movements), with a progress bar."""

    out: TextIO
    _rows: list[str] = field(default_factory=list)
    _columns: int = field(default_factory=lambda: shutil.get_terminal_size().columns)

    def progress(self, event: pulls_pb2.LayerProgress) -> None:
        text = _describe(event)
        bar = progress_bar(event.current_bytes, event.total_bytes)
        if bar:
            text = f"{text} {bar}"
        # A row that wraps would throw the cursor movements off by a line.
        text = text[: max(self._columns - 1, 20)]
        if not event.layer:
            # A line about the whole image: printed below the layer rows, which are
            # then left as they are.
            self._rows.clear()
            self._emit(text + "\n")
            return
        if event.layer not in self._rows:
            self._rows.append(event.layer)
            self._emit(text + "\n")
            return
        up = len(self._rows) - self._rows.index(event.layer)
        self._emit(f"\x1b[{up}A{_CLEAR_LINE}{text}\x1b[{up}B\r")

    def result(self, result: pulls_pb2.PullResult) -> None:
        self._rows.clear()
        self._emit(_summary(result) + "\n")

    def node(self, event: pulls_pb2.NodePull) -> None:
        self._rows.clear()
        self._emit(describe_node(event) + "\n")

    def interrupted(self) -> None:
        self._emit("\ninterrupted: the pull is cancelled\n")

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


@dataclass
class JsonLines(ProgressDisplay):
    """Every message of the stream as one JSON object per line (proto field names)."""

    out: TextIO

    def progress(self, event: pulls_pb2.LayerProgress) -> None:
        _write(self.out, json.dumps({"progress": message_to_dict(event)}, ensure_ascii=False))

    def result(self, result: pulls_pb2.PullResult) -> None:
        _write(self.out, json.dumps({"result": message_to_dict(result)}, ensure_ascii=False))

    def node(self, event: pulls_pb2.NodePull) -> None:
        _write(self.out, json.dumps({"node": message_to_dict(event)}, ensure_ascii=False))
