"""``python -m aqlm_lora``: the ``aqlm-lora`` command line."""

import sys

from .app.cli import main

sys.exit(main())
