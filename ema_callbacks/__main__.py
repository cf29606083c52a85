"""``python -m ema_callbacks``: the command line."""

import sys

from ema_callbacks.cli import main

sys.exit(main())
