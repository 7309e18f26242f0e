"""``python -m gateway --redis-url URL --port P``: see ``gateway.main``."""

import sys

from gateway.main import main

sys.exit(main())
