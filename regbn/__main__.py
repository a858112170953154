"""``python -m regbn inspect MODULE:FACTORY --input 2x1x28x28``: see `regbn.cli`."""

import sys

from .cli import main

sys.exit(main())
