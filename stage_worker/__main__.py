"""``python -m stage_worker --redis-url URL --chain C --stage S``: see ``stage_worker.main``."""

from stagemesh.runtime.cpus import idle_team_sleeps

idle_team_sleeps()  # before anything imports torch: see its NOTE

from stage_worker.main import main  # noqa: E402

raise SystemExit(main())
