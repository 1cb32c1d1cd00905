"""``python -m demo``: the same as ``pacsnode demo``."""

import sys

from demo.cli import main

sys.exit(main())
