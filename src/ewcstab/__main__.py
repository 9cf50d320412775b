"""``python -m ewcstab``: the same as ``ewcstab``."""

import sys

from ewcstab.cli import main

sys.exit(main())
