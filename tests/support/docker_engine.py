"""A real `dockerd` (Debian docker.io) for tests, and tiny images made without any pull.

`DockerEngine(work_dir).start()` runs dockerd with its own data root, exec root,
pid file, unix socket and `--config-file`, the vfs storage driver, no bridge and
no iptables, and its own containerd (started by dockerd under its exec root).

It runs in a private mount namespace (`unshare --mount`) where

- a directory of the test bed is bind-mounted over `/etc/docker`, so the daemon
  reads `certs.d/<host:port>/ca.crt` from `engine.certs_d` (see `trust_ca`)
  and never the machine's `/etc/docker`;
- a tmpfs covers `/run`, so containerd's shim sockets (`/run/containerd/s/…`)
  and any machine-wide containerd socket stay out of sight: the daemon always
  starts its own containerd, and nothing it creates there outlives it.

`DockerEngine(work_dir, network_namespace=path, insecure_registries=[…])` runs the
same daemon inside an existing network namespace (`nsenter --net=<path>`, e.g. a
holder's `/proc/<pid>/ns/net`; not `ip netns exec`, which remounts /sys and hides
the cgroup v1 mounts) and passes `--insecure-registry` for plain-HTTP registries
that are not on 127.0.0.0/8 (the Swarm test bed, `tests/support/swarm_bed.py`).

Containers get `--cgroup-parent=/<unique name>`; `stop()` removes containers,
SIGTERMs dockerd, then ends whatever is left in its mount namespace (its
containerd, shims) by pid and removes the cgroup directories it created.

Images: `rootfs_tar()` is `/bin/busybox` (Debian busybox-static) plus `/bin/sh`;
`engine.import_image(ref, marker)` imports it with `CMD echo <marker>`, so
`engine.run(ref)` prints the marker (containers run with `--network=none`).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import secrets
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from tests.support.docker_processes import (
    STOP_TIMEOUT,
    ManagedProcess,
    TestbedError,
    clean_environment,
    kill_pids,
    require_binary,
    wait_until,
)

START_TIMEOUT = 30.0
PULL_TIMEOUT = 60.0
BUSYBOX = Path("/bin/busybox")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PT_INTERP = 3
_MARKER = re.compile(r"[A-Za-z0-9._-]+")
# The script run inside the new mount namespace; "$@" is the dockerd command line.
_NAMESPACE_SCRIPT = """set -eu
mount -n -t tmpfs -o mode=0755,size=64m credbroker-run /run
mount -n --bind "$ETC_DOCKER" /etc/docker
exec "$@"
"""


class DockerPullError(AssertionError):
    """A failed pull: `message` is the engine's text.

    The engine reports a failure either as the HTTP status of `POST /images/create`
    (`status_code` set, e.g. 500 for "no basic auth credentials") or, once the
    stream has begun, as an `error` line inside the 200 stream (`status_code` None).
    """

    def __init__(
        self,
        reference: str,
        message: str,
        lines: list[dict[str, Any]],
        status_code: int | None = None,
    ) -> None:
        super().__init__(f"pull of {reference} failed: {message}")
        self.reference = reference
        self.message = message
        self.lines = lines
        self.status_code = status_code


@dataclass
class PullResult:
    reference: str
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def digest(self) -> str | None:
        for line in self.lines:
            status = str(line.get("status", ""))
            if status.startswith("Digest: "):
                return status.removeprefix("Digest: ").strip()
        return None


def rootfs_tar(busybox: Path = BUSYBOX) -> bytes:
    """A root file system with `/bin/busybox` and `/bin/sh -> busybox`, as a tar."""
    if not busybox.exists():
        raise TestbedError(
            f"{busybox} is missing: the Debian package busybox-static is in DEB_PACKAGES, "
            "run `make setup`"
        )
    data = busybox.read_bytes()
    if not _is_static_elf(data):
        raise TestbedError(
            f"{busybox} is not statically linked: install the Debian package busybox-static "
            "(it replaces busybox), run `make setup`"
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in ("sh", "echo", "cat"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def _is_static_elf(data: bytes) -> bool:
    """An x86-64/arm64 ELF64 executable without a PT_INTERP (dynamic loader) header."""
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for index in range(phnum):
        start = phoff + index * phentsize
        if int.from_bytes(data[start : start + 4], "little") == _PT_INTERP:
            return False
    return True


def split_reference(reference: str) -> tuple[str, str]:
    """`host:port/team/tool:1.0` -> (`host:port/team/tool`, `1.0`); digests stay whole."""
    if "@" in reference:
        return reference, ""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        return reference, "latest"
    return name, tag


class DockerEngine:
    """dockerd with everything of its own; `client` is a docker-py `DockerClient`."""

    def __init__(
        self,
        work_dir: Path,
        *,
        network_namespace: str | None = None,
        insecure_registries: Sequence[str] = (),
    ) -> None:
        self.work_dir = work_dir
        #: A network namespace path the daemon runs in (None: this process's own).
        self.network_namespace = network_namespace
        #: `host:port` of plain-HTTP registries outside 127.0.0.0/8.
        self.insecure_registries = tuple(insecure_registries)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 108 bytes: the exec root (containerd's
        # socket, libnetwork's) and the API socket live in a short private directory.
        self.run_dir = Path(tempfile.mkdtemp(prefix="cbdock-", dir="/tmp"))
        self.data_root = work_dir / "data"
        self.exec_root = self.run_dir / "exec"
        self.socket_path = self.run_dir / "docker.sock"
        self.pidfile = self.run_dir / "dockerd.pid"
        self.config_file = work_dir / "daemon.json"
        self.etc_docker = work_dir / "etc-docker"
        self.certs_d = self.etc_docker / "certs.d"
        self.log_path = work_dir / "dockerd.log"
        self.cgroup_parent = f"credbroker-testbed-{secrets.token_hex(4)}"
        self._process: ManagedProcess | None = None
        self._mount_namespace: str | None = None
        self._client: docker.DockerClient | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def docker_host(self) -> str:
        """The value for DOCKER_HOST (and docker-py's `base_url`)."""
        return f"unix://{self.socket_path}"

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise TestbedError("the Docker engine is not running")
        return self._client

    @property
    def api(self) -> docker.APIClient:
        return self.client.api

    @property
    def pid(self) -> int:
        if self._process is None:
            raise TestbedError("the Docker engine is not running")
        return self._process.pid

    def start(self) -> DockerEngine:
        dockerd = require_binary("dockerd", "docker.io")
        require_binary("containerd", "docker.io (containerd)")
        require_binary("runc", "docker.io (runc)")
        unshare = require_binary("unshare", "util-linux")
        if not Path("/etc/docker").is_dir():
            raise TestbedError(
                "/etc/docker does not exist: it is the mount point for the engine's private "
                "certs.d (the Debian packages docker.io/docker-registry create it)"
            )
        self.data_root.mkdir(exist_ok=True)
        self.exec_root.mkdir(exist_ok=True)
        self.certs_d.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps({"debug": False}) + "\n")
        enter: list[str] = []
        if self.network_namespace is not None:
            nsenter = require_binary("nsenter", "util-linux")
            # nsenter and unshare both exec: the daemon keeps the pid ManagedProcess knows.
            enter = [nsenter, f"--net={self.network_namespace}", "--"]
        argv = [
            *enter,
            unshare,
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            _NAMESPACE_SCRIPT,
            "credbroker-dockerd",
            dockerd,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "--host",
            self.docker_host,
            "--config-file",
            str(self.config_file),
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--cgroup-parent=/{self.cgroup_parent}",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
            *(f"--insecure-registry={address}" for address in self.insecure_registries),
        ]
        process = ManagedProcess(
            "dockerd",
            argv,
            self.log_path,
            env=clean_environment({"ETC_DOCKER": str(self.etc_docker)}),
        )
        self._process = process.start()
        try:
            self._client = wait_until(
                self._connect,
                timeout=START_TIMEOUT,
                what=f"dockerd (log {self.log_path})",
                alive=process.death,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _note_mount_namespace(self) -> None:
        """Remember the daemon's mount namespace once it differs from ours."""
        if self._mount_namespace is not None or self._process is None:
            return
        with contextlib.suppress(OSError):
            namespace = os.readlink(f"/proc/{self._process.pid}/ns/mnt")
            if namespace != os.readlink("/proc/self/ns/mnt"):
                self._mount_namespace = namespace

    def _connect(self) -> docker.DockerClient | None:
        self._note_mount_namespace()
        if not self.socket_path.exists():
            return None
        try:
            # Without a version, docker-py asks the daemon for it: that is the first probe.
            client = docker.DockerClient(base_url=self.docker_host, timeout=PULL_TIMEOUT)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return None
        try:
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            client.close()
            return None
        return client

    def stop(self) -> None:
        """Remove containers, stop dockerd, end its leftovers. Idempotent."""
        if self._client is not None:
            # The daemon may already be gone (then requests, not docker-py, raises).
            with contextlib.suppress(
                docker.errors.DockerException, requests.exceptions.RequestException
            ):
                for container in self._client.containers.list(all=True):
                    container.remove(force=True)
            self._client.close()
            self._client = None
        leftovers: list[int] = []
        if self._process is not None:
            self._note_mount_namespace()
            namespace = self._mount_namespace
            self._process.stop(STOP_TIMEOUT)
            if namespace is not None:
                leftovers = _pids_in_mount_namespace(namespace)
            self._process = None
        containerd_pid = _read_pid(self.exec_root / "containerd" / "containerd.pid")
        if (
            containerd_pid is not None
            and containerd_pid not in leftovers
            and _same_mount_namespace(containerd_pid, self._mount_namespace)
        ):
            leftovers.append(containerd_pid)
        kill_pids(leftovers)
        self._remove_cgroups()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        candidates = [_CGROUP_ROOT / self.cgroup_parent]
        candidates += [d / self.cgroup_parent for d in _CGROUP_ROOT.glob("*") if d.is_dir()]
        for top in candidates:
            if not top.is_dir():
                continue
            # Deepest first: a cgroup directory can only be removed when it has no children.
            for directory in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        if self._process is None:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return self._process.log_tail(lines)

    # -- certs.d ---------------------------------------------------------------------

    def trust_ca(self, address: str, ca_path: Path) -> Path:
        """Put `ca_path` at certs.d/<address>/ca.crt (read by the daemon on every pull)."""
        directory = self.certs_d / address
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "ca.crt"
        shutil.copyfile(ca_path, target)
        return target

    def distrust(self, address: str) -> None:
        shutil.rmtree(self.certs_d / address, ignore_errors=True)

    # -- images ----------------------------------------------------------------------

    def import_image(self, reference: str, marker: str, rootfs: bytes | None = None) -> str:
        """Import the busybox root file system as `reference`; it prints `marker`.

        Returns the image id.
        """
        if not _MARKER.fullmatch(marker):
            raise ValueError(f"a marker is letters, digits, '.', '_' and '-': {marker!r}")
        repository, tag = split_reference(reference)
        self.api.import_image_from_data(
            rootfs if rootfs is not None else rootfs_tar(),
            repository=repository,
            tag=tag,
            changes=[f'CMD ["/bin/sh", "-c", "echo {marker}"]'],
        )
        image_id: str = self.client.images.get(reference).id
        return image_id

    def pull(self, reference: str, auth_config: Mapping[str, str] | None = None) -> PullResult:
        """Pull through the API; every stream line is checked for `error`."""
        repository, tag = split_reference(reference)
        result = PullResult(reference)
        try:
            stream: Iterable[dict[str, Any]] = self.api.pull(
                repository,
                tag=tag or None,
                auth_config=dict(auth_config) if auth_config is not None else None,
                stream=True,
                decode=True,
            )
        except docker.errors.APIError as error:
            raise DockerPullError(
                reference, str(error.explanation or error), [], error.status_code
            ) from None
        for line in stream:
            result.lines.append(line)
            if "error" in line or "errorDetail" in line:
                message = str(line.get("error") or line.get("errorDetail"))
                raise DockerPullError(reference, message, result.lines)
        return result

    def pull_with_header(self, reference: str, registry_auth: str | None) -> PullResult:
        """`POST /images/create` with a raw `X-Registry-Auth` value, as a broker sends it."""
        repository, tag = split_reference(reference)
        query = {"fromImage": repository, **({"tag": tag} if tag else {})}
        connection = _UnixHTTPConnection(self.socket_path, PULL_TIMEOUT)
        headers = {"X-Registry-Auth": registry_auth} if registry_auth is not None else {}
        try:
            connection.request(
                "POST", f"/images/create?{urllib.parse.urlencode(query)}", headers=headers
            )
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
        finally:
            connection.close()
        if response.status != 200:
            try:
                message = str(json.loads(body).get("message", body))
            except ValueError:
                message = body
            raise DockerPullError(reference, message, [], response.status)
        result = PullResult(reference)
        for text in body.splitlines():
            if not text.strip():
                continue
            line = json.loads(text)
            result.lines.append(line)
            if "error" in line or "errorDetail" in line:
                message = str(line.get("error") or line.get("errorDetail"))
                raise DockerPullError(reference, message, result.lines)
        return result

    def push(self, reference: str, auth_config: Mapping[str, str] | None = None) -> str:
        """Push through the API; returns the manifest digest the registry reported."""
        repository, tag = split_reference(reference)
        digest: str | None = None
        lines: list[dict[str, Any]] = []
        for line in self.api.push(
            repository,
            tag=tag,
            auth_config=dict(auth_config) if auth_config is not None else None,
            stream=True,
            decode=True,
        ):
            lines.append(line)
            if "error" in line or "errorDetail" in line:
                raise TestbedError(
                    f"push of {reference} failed: {line.get('error') or line.get('errorDetail')}"
                )
            aux = line.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
        if digest is None:
            raise TestbedError(f"push of {reference} reported no digest: {lines}")
        return digest

    def run(self, reference: str, command: list[str] | None = None) -> str:
        """`docker run --rm --network=none reference [command]`; returns its output."""
        output = self.client.containers.run(
            reference,
            command,
            network_mode="none",
            remove=True,
            stdout=True,
            stderr=True,
        )
        return output.decode() if isinstance(output, bytes) else str(output)

    def remove_image(self, reference: str) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.client.images.remove(reference, force=True)

    def image_ids(self) -> set[str]:
        return {image.id for image in self.client.images.list(all=True)}

    @contextlib.contextmanager
    def scratch(self) -> Iterator[DockerEngine]:
        """Removes the images and containers a test created, whatever happens."""
        before_images = self.image_ids()
        before_containers = {c.id for c in self.client.containers.list(all=True)}
        try:
            yield self
        finally:
            for container in self.client.containers.list(all=True):
                if container.id not in before_containers:
                    with contextlib.suppress(docker.errors.NotFound):
                        container.remove(force=True)
            for image_id in self.image_ids() - before_images:
                with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                    self.client.images.remove(image_id, force=True)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the engine's unix socket (the Docker API, without docker-py)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _same_mount_namespace(pid: int, namespace: str | None) -> bool:
    if namespace is None:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == namespace
    except OSError:
        return False


def _pids_in_mount_namespace(namespace: str) -> list[int]:
    """Processes still in the engine's private mount namespace (containerd, shims)."""
    own = os.readlink("/proc/self/ns/mnt")
    if namespace == own:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _same_mount_namespace(int(entry.name), namespace):
            pids.append(int(entry.name))
    return pids
