"""``python -m meshguard.cni``: the CNI plugin executable."""

import sys

from meshguard.cni.plugin import run

sys.exit(run())
