"""``python -m memtrace``: the same as the ``memtrace`` command."""

import sys

from .cli import main

sys.exit(main())
