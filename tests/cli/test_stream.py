"""`stagemesh generate --stream`: the text as its tokens come (the mesh's case is in
tests/integration/test_up_model_repo.py)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from stagemesh.cli.demo import write_demo_model
from stagemesh.cli.stream import print_pieces
from stagemesh.errors import Unavailable
from tests.cli_helpers import run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "m", family="llama", num_layers=2, hidden_size=64,
                            vocab_size=300)


def test_in_process_streaming_prints_the_text_generate_returns(model_dir):
    args = ("generate", "--model", str(model_dir), "--prompt", "The river", "--max-new-tokens", "12",
            "--temperature", "0", "--ignore-eos")
    whole = run_cli(*args, "--json")
    streamed = run_cli(*args, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == json.loads(whole.stdout)["text"] + "\n"


def test_stream_takes_one_request_and_no_json(model_dir, tmp_path):
    done = run_cli("generate", "--model", str(model_dir), "--token-ids", "5,6", "--stream", "--json")
    assert done.returncode == 1 and "--stream" in done.stderr and "--json" in done.stderr
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"token_ids": [5]}\n{"token_ids": [6]}\n')
    done = run_cli("generate", "--model", str(model_dir), "--input", str(inputs), "--stream")
    assert done.returncode == 1 and "--stream takes one request" in done.stderr


async def _pieces(items, error=None):
    for item in items:
        yield item
    if error is not None:
        raise error


def test_pieces_are_printed_as_they_come_and_the_line_ends_even_on_an_error():
    out = io.StringIO()
    asyncio.run(print_pieces(_pieces([(5, "Hel"), (6, ""), (7, "lo"), (None, "")]), out))
    assert out.getvalue() == "Hello\n"
    out = io.StringIO()
    asyncio.run(print_pieces(_pieces([(5, ""), (6, "")]), out))  # no tokenizer: the ids
    assert out.getvalue() == "5 6\n"
    out = io.StringIO()
    with pytest.raises(Unavailable):
        asyncio.run(print_pieces(_pieces([(5, "Hi")], Unavailable("gone")), out))
    assert out.getvalue() == "Hi\n"
