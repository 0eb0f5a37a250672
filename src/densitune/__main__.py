"""``python -m densitune``: the same as the ``densitune`` command."""

import sys

from densitune.cli import main

sys.exit(main())
