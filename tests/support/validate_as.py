"""``python tests/support/validate_as.py UID``: ``meshguard cni validate`` as UID, the way
meshguard-validation runs in a pod, from any checkout.

Started as root, it imports what the check needs and only then drops to UID, because the
checkout (and its virtualenv) may live where other users cannot read them (a clone under
/root, or in ``mktemp -d``): Python started directly as that uid could not load meshguard.
"""

from __future__ import annotations

import sys

import meshguard.cli
import meshguard.cli.cni
import meshguard.cni.validate
from meshguard.sandbox.probe import drop_privileges


def main(argv: list[str]) -> int:
    uid = int(argv[0])
    drop_privileges(uid=uid, gid=uid)
    return meshguard.cli.main(["cni", "validate"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
