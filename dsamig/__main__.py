"""``python -m dsamig``."""

import sys

from dsamig.cli import main

sys.exit(main())
