"""The Dockerfile's own steps, replayed on this machine (no container engine here).

:func:`parse` reads the Dockerfile into stages; :class:`Replay` builds them in order, each in
a root of its own: an overlay whose lower layer is this host's root (Debian bookworm, the
stand-in for the ``python:3.11-slim-bookworm`` base: its ``/usr/local/bin/python`` is linked
to this interpreter) and whose upper layer holds what the stage wrote. Each instruction is
replayed at the paths it names: ``COPY`` from the build context or ``--from`` another
stage's root, ``ENV`` (``$VAR`` expanded), ``RUN`` with ``chroot`` into the stage root
(``python -m venv``, ``pip install`` from this machine's pip configuration, ``groupadd``,
``gcc``); ``apt-get`` steps are checked instead of run: each package must be installed on
this host, which the stage sees through its lower layer. A stage sees no other stage's
files except through ``COPY --from``, as in an image, so a path baked into a file at build
time (a console script's shebang) that the COPY moved is missing at run time, as it would
be in the image. :meth:`Replay.run` then runs a command in a stage's root the way the
kubelet would: the image's ENTRYPOINT and CMD unless the container sets ``command`` /
``args``, its ENV, as the container's uid/gid or else the Dockerfile's USER.

Needs root (mount, chroot). Mounts are undone on exit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

#: Docker's default PATH for a Linux image.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ReplayError(Exception):
    """A Dockerfile step could not be replayed (the message names the step)."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the unnamed last stage (the default target)
    base: str
    instructions: tuple[Instruction, ...]


def parse(path: Path) -> list[Stage]:
    """The stages, in order; continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = []
            stages.append(Stage(name.strip() or None, base.strip(), ()))
        if current is None:
            raise ReplayError(f"{keyword} before the first FROM")
        current.append(Instruction(keyword, rest.strip()))
        stages[-1] = Stage(stages[-1].name, stages[-1].base, tuple(current))
    return stages


@dataclass
class BuiltStage:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    user: str = "0:0"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReplayError(f"expected the exec form (a JSON list of strings): {args}")
    return list(value)


def _expand(text: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), text)


class Replay:
    """Builds the Dockerfile's stages (``with Replay(dockerfile, context) as replay``)."""

    def __init__(self, dockerfile: Path, context: Path) -> None:
        self.dockerfile = dockerfile
        self.context = context
        self.stages: dict[str | None, BuiltStage] = {}
        self._mounts: list[Path] = []
        self._tmp = Path(tempfile.mkdtemp(prefix="meshguard-image-"))
        os.chmod(self._tmp, 0o755)

    def __enter__(self) -> Replay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for mount in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        self._mounts.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # --- building -------------------------------------------------------------------------

    def build(self, *, target: str | None = None) -> BuiltStage:
        """Every stage up to ``target`` (None: all, the last is the default target)."""
        for index, stage in enumerate(parse(self.dockerfile)):
            if stage.name not in self.stages:
                self.stages[stage.name] = self._build_stage(index, stage)
            if target is not None and stage.name == target:
                return self.stages[stage.name]
        if target is not None:
            raise ReplayError(f"no stage named {target!r}")
        return self.stages[None]

    def _root(self, index: int) -> Path:
        layer = self._tmp / f"stage-{index}"
        upper, work, root = layer / "upper", layer / "work", layer / "root"
        for directory in (upper, work, root):
            directory.mkdir(parents=True)
        options = f"lowerdir=/,upperdir={upper},workdir={work}"
        _check(["mount", "-t", "overlay", "overlay", "-o", options, str(root)], "overlay mount")
        self._mounts.append(root)
        for special in ("proc", "dev"):
            target = root / special
            _check(["mount", "--rbind", f"/{special}", str(target)], f"bind /{special}")
            self._mounts.append(target)
        # what the stage must not see of this host: other checkouts' and the temp dir
        _check(["mount", "-t", "tmpfs", "tmpfs", str(root / "tmp")], "tmpfs /tmp")
        self._mounts.append(root / "tmp")
        # the base image's interpreter, at /usr/local/bin as in python:3.11-slim, and
        # reachable by any uid as there (this host's interpreter lives under /root: the
        # overlay's copy of /root is opened to traversal, the host's is untouched)
        os.chmod(root / "root", 0o711)
        interpreter = Path(os.path.realpath(sys.executable))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        stdlib = interpreter.parent.parent / "lib" / version
        links = {f"usr/local/bin/{name}": interpreter for name in ("python", "python3", version)}
        # a virtualenv finds its standard library from home = /usr/local/bin
        links[f"usr/local/lib/{version}"] = stdlib
        for where, to in links.items():
            link = root / where
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            elif link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(to)
        return root

    def _build_stage(self, index: int, stage: Stage) -> BuiltStage:
        built = BuiltStage(root=self._root(index), env={"PATH": DEFAULT_PATH, "HOME": "/root"})
        for instruction in stage.instructions:
            self._step(built, instruction, stage)
        return built

    def _step(self, built: BuiltStage, instruction: Instruction, stage: Stage) -> None:
        keyword, args = instruction.keyword, instruction.args
        if keyword in {"FROM", "LABEL", "ARG", "WORKDIR"}:
            return
        if keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                built.env[key] = _expand(value, built.env)
        elif keyword == "USER":
            built.user = args if ":" in args else f"{args}:{args}"
        elif keyword == "ENTRYPOINT":
            built.entrypoint = _exec_form(args)
        elif keyword == "CMD":
            built.cmd = _exec_form(args)
        elif keyword == "COPY":
            self._copy(built, args)
        elif keyword == "RUN":
            self._run_step(built, args, stage)
        else:
            raise ReplayError(f"stage {stage.name}: cannot replay {keyword} {args}")

    def _copy(self, built: BuiltStage, args: str) -> None:
        words = shlex.split(args)
        source_root = self.context
        if words[0].startswith("--from="):
            source_root = self.stages[words.pop(0).removeprefix("--from=")].root
        *sources, destination = words
        for source in sources:
            origin = source_root / source.lstrip("/")
            target = built.root / destination.lstrip("/")
            if destination.endswith("/"):
                target = target / origin.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    target,
                    symlinks=True,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                shutil.copy2(origin, target, follow_symlinks=False)

    def _run_step(self, built: BuiltStage, args: str, stage: Stage) -> None:
        kept = []
        for part in (p.strip() for p in args.split("&&")):
            if part.startswith("apt-get install"):
                _check_installed(part)
            elif part.startswith("apt-get update") or part == "rm -rf /var/lib/apt/lists/*":
                continue
            else:
                kept.append(part)
        if not kept:
            return
        done = self.run(built, ["/bin/sh", "-c", " && ".join(kept)], user="0:0")
        if done.returncode != 0:
            raise ReplayError(
                f"stage {stage.name}: RUN {' && '.join(kept)} failed ({done.returncode}):"
                f" {done.stderr[-2000:]}"
            )

    # --- running ---------------------------------------------------------------------------

    def run(
        self,
        built: BuiltStage,
        argv: Sequence[str],
        *,
        user: str | None = None,
        wrap: Sequence[str] = (),
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` in the stage's root with its ENV, as ``user`` (default: its USER);
        ``wrap``: a prefix run outside the root (``ip netns exec NAME``)."""
        env = [f"{key}={value}" for key, value in built.env.items()]
        command = [
            *wrap,
            "chroot",
            f"--userspec={user or built.user}",
            str(built.root),
            "/usr/bin/env",
            "-i",
            *env,
            *argv,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout, cwd="/"
        )

    def run_container(
        self,
        built: BuiltStage,
        container: Mapping[str, object],
        *,
        extra_args: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """A Kubernetes container spec in this image: ``command`` replaces ENTRYPOINT (and
        drops CMD), ``args`` replace CMD; runAsUser/runAsGroup, else the image's USER."""
        command = container.get("command")
        args = container.get("args")
        argv = list(command) if isinstance(command, list) else list(built.entrypoint)
        if isinstance(args, list):
            argv += [str(a) for a in args]
        elif not isinstance(command, list):
            argv += built.cmd
        context = container.get("securityContext")
        user = built.user
        if isinstance(context, dict) and "runAsUser" in context:
            uid = context["runAsUser"]
            user = f"{uid}:{context.get('runAsGroup', uid)}"
        return self.run(built, [*argv, *extra_args], user=user, wrap=wrap)


def _check(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ReplayError(f"{what}: {' '.join(argv)}: {done.stderr.strip()}")


def _check_installed(step: str) -> None:
    """An ``apt-get install`` step: every package must be installed on this host."""
    packages = [w for w in shlex.split(step)[2:] if not w.startswith("-")]
    for package in packages:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if not done.stdout.startswith("install ok installed"):
            raise ReplayError(f"{step}: {package} is not installed on this host (the base)")
