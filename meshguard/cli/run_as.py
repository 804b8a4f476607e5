"""Run a ``meshguard`` command under another uid: ``python -m meshguard.cli.run_as UID GID
-- serve-authz ...``.

Started as root, it imports everything first and only then drops to the uid/gid, because
the interpreter and its libraries may live where other users cannot read them (a pyenv
under /root, say): a process started directly as that uid could not even load Python.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded lazily by socket.getfqdn, unreadable after the drop
import sys
from collections.abc import Sequence

import meshguard.cli
import meshguard.cli.init
import meshguard.cli.inject
import meshguard.cli.rules
import meshguard.cli.serve
from meshguard.sandbox.probe import drop_privileges

#: Every command's module, imported above so nothing is loaded after the drop.
COMMANDS = (meshguard.cli.init, meshguard.cli.inject, meshguard.cli.rules, meshguard.cli.serve)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[2] != "--":
        print("usage: python -m meshguard.cli.run_as UID GID -- COMMAND...", file=sys.stderr)
        return 2
    uid, gid = int(args[0]), int(args[1])
    drop_privileges(uid=uid, gid=gid)
    return meshguard.cli.main(args[3:])


if __name__ == "__main__":
    raise SystemExit(main())
