"""The scripts are imported as modules of their own folder: a process a script spawns (the bare
gRPC servers of ``grpc_floor`` and ``hop_floor``) imports its target by module name."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
