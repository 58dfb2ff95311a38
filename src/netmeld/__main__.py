"""``python -m netmeld``: the command line."""

import sys

from netmeld.cli import main

sys.exit(main())
