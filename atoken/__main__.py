"""``python -m atoken``: see :mod:`atoken.cli`."""

import sys

from atoken.cli import main

sys.exit(main())
