"""scripts/hop_breakdown.py: one token's time along a chain, from a hand-made timeline."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hop_breakdown.py"
spec = importlib.util.spec_from_file_location("hop_breakdown", SCRIPT)
hop_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hop_breakdown)


def test_each_stage_s_step_the_gaps_forward_and_the_way_back():
    # Two stages, steps 7 and 8 (times in s): stage 0 runs 7 in [0, 1 ms], stage 1 in
    # [1.5, 3.5 ms]; stage 0 starts step 8 at 4.5 ms. So: compute 1 and 2 ms, forward gap
    # 0.5 ms, back 4.5 - 3.5 = 1 ms, 4.5 ms a token. Step 8 has no successor: not counted.
    chain = {"stages": [
        {"steps": [[0.0, 0.001, 7], [0.0045, 0.0055, 8]]},
        {"steps": [[0.0015, 0.0035, 7], [0.006, 0.008, 8]]},
    ]}
    got = hop_breakdown.breakdown(chain)
    assert got["steps"] == 1
    assert got["compute_ms"] == [1.0, 2.0]
    assert got["forward_gap_ms"] == [0.5]
    assert got["back_ms"] == 1.0 and got["per_token_ms"] == 4.5


def test_a_timeline_without_a_step_every_stage_ran_says_what_to_do():
    chain = {"stages": [{"steps": [[0.0, 0.001, 1]]}, {"steps": [[0.002, 0.003, 2]]}]}
    with pytest.raises(SystemExit, match="run one stream first"):
        hop_breakdown.breakdown(chain)
