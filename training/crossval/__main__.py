"""``python -m training.crossval``: the ``evaluate`` and ``train-final`` subcommands on their own."""

import sys

from training.crossval.cli import main

sys.exit(main())
