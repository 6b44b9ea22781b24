"""``python -m aqlm_lora``: the ``aqlm-lora`` command line."""

import sys

from .cli import main

sys.exit(main())
