"""``python -m ewcstab.cli``: the same as ``ewcstab``."""

import sys

from ewcstab.cli import main

sys.exit(main())
