"""``python -m expert_worker --redis-url URL --chain C --worker W``: see ``expert_worker.main``."""

from stagemesh.runtime.cpus import idle_team_sleeps

idle_team_sleeps()  # before anything imports torch: see its NOTE

from expert_worker.main import main  # noqa: E402

raise SystemExit(main())
