"""``python -m stage_worker --redis-url URL --chain C --stage S``: see ``stage_worker.main``."""

from stage_worker.main import main

raise SystemExit(main())
