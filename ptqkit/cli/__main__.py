"""``python -m ptqkit.cli``: the ``ptqkit`` command."""

import sys

from .entry import main

sys.exit(main())
