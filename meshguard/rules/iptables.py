"""Reading ``iptables-save`` output, running the iptables tools, and the locks around them.

The parser is pure (text in, :class:`SavedState` out) so the install plan can be tested
without root. :class:`CommandRunner` is the only place that starts iptables processes.

Two locks serialize writers of a network namespace's tables:

- :func:`abstract_socket_lock` — an abstract unix socket: its names are per network
  namespace (whatever mount namespace, container or node process binds it), binding is
  exclusive, and the kernel frees it when the holder dies;
- :func:`xtables_lock` — iptables' own ``flock`` on ``/run/xtables.lock`` or
  ``$XTABLES_LOCKFILE`` (what ``iptables -w`` and iptables-legacy take), so legacy writers
  that share that file (Istio's ``iptables-restore -w`` in the same mount namespace) wait
  for us and we for them. iptables-nft takes no lock (the kernel applies each restore as
  one transaction) and accepts ``-w`` only to ignore it; no ``iptables-save`` takes ``-w``.
  The tools we start while holding it must not take it again (a second open file of the
  lock would wait for us forever): :attr:`XtablesLock.env` points them at a private one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shlex
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from meshguard.errors import MeshguardFailure
from meshguard.process import run_command

XTABLES_LOCK: Final = Path("/run/xtables.lock")
#: The environment variable iptables (1.8.5+) reads its lock file's path from.
XTABLES_LOCKFILE_ENV: Final = "XTABLES_LOCKFILE"
_POLL_SECONDS: Final = (0.002, 0.05)  # first and longest pause between two tries of a lock

log = logging.getLogger(__name__)


@dataclass
class SavedTable:
    chains: list[str] = field(default_factory=list)
    builtins: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def rules_of(self, chain: str) -> list[str]:
        return self.rules.get(chain, [])


@dataclass
class SavedState:
    tables: dict[str, SavedTable] = field(default_factory=dict)

    def table(self, name: str) -> SavedTable:
        return self.tables.get(name, SavedTable())


def parse_save(text: str) -> SavedState:
    """Parse ``iptables-save`` output into tables, chains and rule specs (``-A`` stripped)."""
    state = SavedState()
    current: SavedTable | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = state.tables.setdefault(line[1:], SavedTable())
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise MeshguardFailure(f"iptables-save line {number} outside a table: {line!r}")
        elif line.startswith(":"):
            chain, policy, *_ = (line[1:] + " -").split()
            current.chains.append(chain)
            if policy != "-":
                current.builtins.add(chain)
            current.rules.setdefault(chain, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.setdefault(chain, []).append(rest[0] if rest else "")
        else:
            raise MeshguardFailure(f"iptables-save line {number} not understood: {line!r}")
    return state


def jump_target(spec: str) -> str | None:
    """The chain a rule jumps to (``-j X`` / ``-g X``), if any."""
    try:
        words = shlex.split(spec)
    except ValueError:
        words = spec.split()
    for flag, value in itertools.pairwise(words):
        if flag in {"-j", "-g", "--jump", "--goto"}:
            return value
    return None


@dataclass(frozen=True, kw_only=True)
class Deadline:
    """How long a lock may be waited for: ``timeout`` seconds, ending at monotonic ``at``."""

    timeout: float
    at: float

    @classmethod
    def after(cls, timeout: float) -> Deadline:
        return cls(timeout=timeout, at=time.monotonic() + timeout)


@dataclass(frozen=True, kw_only=True)
class EnvRunner:
    """A :class:`CommandRunner` that starts every tool with ``env`` added."""

    env: Mapping[str, str]

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str:
        return run_command(argv, stdin=stdin, env=self.env)


@dataclass(frozen=True, kw_only=True)
class XtablesLock:
    """iptables' lock as held by :func:`xtables_lock`."""

    held: bool  # False when the lock file cannot be opened (read-only /run): nothing to share
    env: Mapping[str, str]  # for the tools started while it is held


def xtables_lock_path() -> Path:
    """The file iptables locks: ``$XTABLES_LOCKFILE`` (e.g. on an emptyDir when ``/run`` is
    read-only), else ``/run/xtables.lock``."""
    return Path(os.environ.get(XTABLES_LOCKFILE_ENV) or XTABLES_LOCK)


@contextlib.contextmanager
def abstract_socket_lock(name: str, *, deadline: Deadline) -> Iterator[None]:
    """Hold the abstract unix socket ``@name`` of this network namespace until the block ends.

    Waits while another process holds it; at the deadline raises :class:`MeshguardFailure`
    naming the holder's pid when the kernel can tell it.
    """
    address = "\0" + name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lock:
        try:
            _poll(
                lambda: _try_bind(lock, address),
                deadline=deadline,
                on_busy=lambda: _log_waiting(f"@{name}", _socket_holder(address)),
            )
        except TimeoutError:
            holder = _socket_holder(address)
            who = f"another meshguard installer{f' (pid {holder})' if holder else ''}"
            raise MeshguardFailure(
                f"{who} holds the install lock of this network namespace (@{name});"
                f" gave up after {deadline.timeout:g}s"
            ) from None
        # Listening lets a waiting installer learn our pid (SO_PEERCRED) for its message.
        lock.listen(8)
        yield


@contextlib.contextmanager
def xtables_lock(path: Path, *, deadline: Deadline) -> Iterator[XtablesLock]:
    """Hold iptables' own lock (``flock`` on ``path``) until the block ends.

    Tools started while it is held must get :attr:`XtablesLock.env`: it points their lock at
    a private memory file, so iptables-legacy does not wait for the lock we hold.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # A read-only /run (readOnlyRootFilesystem): no iptables-legacy here can lock it
        # either, and the namespace lock still serializes meshguard's installers.
        fields = {"event": "xtables-lock-skipped", "path": str(path), "error": str(exc)}
        log.debug("iptables' lock file cannot be opened, not taken", extra={"fields": fields})
        fd = -1
    if fd < 0:
        yield XtablesLock(held=False, env={})
        return
    try:
        try:
            _poll(
                lambda: _try_flock(fd),
                deadline=deadline,
                on_busy=lambda: _log_waiting(str(path), _flock_holder(path)),
            )
        except TimeoutError:
            holder = _flock_holder(path)
            raise MeshguardFailure(
                f"another process{f' (pid {holder})' if holder else ''} holds iptables' lock"
                f" {path}; gave up after {deadline.timeout:g}s"
            ) from None
        try:
            private = os.memfd_create("meshguard-xtables-lock", os.MFD_CLOEXEC)
        except OSError as exc:
            raise MeshguardFailure(
                f"cannot create a private lock file for iptables: {exc}"
            ) from None
        try:
            yield XtablesLock(
                held=True, env={XTABLES_LOCKFILE_ENV: f"/proc/{os.getpid()}/fd/{private}"}
            )
        finally:
            os.close(private)
    finally:
        os.close(fd)  # also releases the flock


def _poll(attempt: Callable[[], bool], *, deadline: Deadline, on_busy: Callable[[], None]) -> None:
    """Call ``attempt`` until it returns True; :class:`TimeoutError` at the deadline."""
    pause = _POLL_SECONDS[0]
    if attempt():
        return
    on_busy()
    while True:
        left = deadline.at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_SECONDS[1])
        if attempt():
            return


def _try_bind(lock: socket.socket, address: str) -> bool:
    try:
        lock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise MeshguardFailure(f"cannot create the install lock @{address[1:]}: {exc}") from None
    return True


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _socket_holder(address: str) -> int | None:
    """The pid of the process listening on ``address``, if it is visible from here."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(address)
            credentials = probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
        except OSError:
            return None
    pid: int = struct.unpack("3i", credentials)[0]
    return pid or None  # 0: the holder lives in a pid namespace we cannot see


def _flock_holder(path: Path) -> int | None:
    """The pid holding a flock on ``path`` according to /proc/locks, if listed."""
    try:
        stat = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in text.splitlines():
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:19:567 0 EOF"; "->" marks a waiter.
        if len(words) >= 6 and words[1] == "FLOCK" and words[5] == inode:
            with contextlib.suppress(ValueError):
                return int(words[4]) or None
    return None


def _log_waiting(lock: str, holder: int | None) -> None:
    log.info(
        "waiting for a lock held by another process",
        extra={"fields": {"event": "lock-wait", "lock": lock, "holder_pid": holder}},
    )
