"""``python -m frontend --redis-url URL --gateway HOST:PORT --port P``: see ``frontend.main``."""

from frontend.main import main

raise SystemExit(main())
