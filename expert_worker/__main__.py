"""``python -m expert_worker --redis-url URL --chain C --worker W``: see ``expert_worker.main``."""

from expert_worker.main import main

raise SystemExit(main())
