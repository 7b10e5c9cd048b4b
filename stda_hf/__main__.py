"""``python -m stda_hf``: the same as the ``stda`` command."""

import sys

from stda_hf.cli import main

sys.exit(main())
