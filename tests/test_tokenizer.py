"""Tokenizer: encode/decode round trips, the BOS rule, and streaming detokenization."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stagemesh.cli.demo import BOS_ID, CORPUS, EOS_ID, write_tokenizer
from stagemesh.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = ["The river begins in the mountains.", "héllo 世界", "Café in Zürich costs €2 🍞!", " leading  spaces\n"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, vocab_size=1024)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def stream(tok, ids):
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


def test_from_dir_without_tokenizer_json_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_from_dir_rejects_a_broken_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_special_ids_and_vocab_size(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (BOS_ID, EOS_ID, 1024)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_adds_bos_and_decode_round_trips(tok, text):
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_add_bos_token_false_in_config_wins_over_the_post_processor(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": {"content": "<s>"}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == BOS_ID
    assert tok.encode("héllo")[0] != BOS_ID


def test_add_bos_token_true_in_config_prepends_bos_once(tok_dir, tmp_path):
    backend = RustTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    backend.post_processor = None  # Qwen-style: the post-processor adds nothing
    backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path).encode("hi")[0] != BOS_ID
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    ids = Tokenizer.from_dir(tmp_path).encode("hi")
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert rest == ""
    assert all("\ufffd" not in d for d in deltas)


def test_a_character_split_across_tokens_is_held_back_until_complete(tok):
    ids = tok.encode("世")[1:]  # 3 UTF-8 bytes, no merge for them in an English corpus
    assert len(ids) > 1
    deltas, _ = stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "世"


def test_random_ids_with_broken_utf8_still_concatenate_to_decode(tok):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        deltas, rest = stream(tok, ids)
        assert "".join(deltas) + rest == tok.decode(ids), ids


class _RefusingStream:
    """A ``DecodeStream`` that refuses its steps from the ``after``-th on, as tokenizers' does when
    a tokenizer's text is not monotonic ("Invalid prefix encountered")."""

    def __init__(self, real, after: int):
        self.real, self.after = real, after

    def step(self, backend, token_id):
        if self.after == 0:
            raise Exception("Invalid prefix encountered")
        self.after -= 1
        return self.real.step(backend, token_id)


@pytest.mark.parametrize("after", [0, 1, 3])
def test_a_refused_decode_step_goes_on_from_the_whole_text(tok, after):
    for text in TEXTS:
        ids = tok.encode(text)
        dec = IncrementalDecoder(tok)
        dec._stream = _RefusingStream(dec._stream, after)
        deltas = [dec.push(i) for i in ids]
        assert dec._stream is None
        assert "".join(deltas) + dec.flush() == tok.decode(ids), text


def test_incremental_decoding_with_a_context_dependent_decoder():
    """SentencePiece-style: '▁' for spaces, and the decoder drops the text's leading space."""
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    tok = Tokenizer(backend)
    ids = tok.encode("Good bread at the café in Zürich")
    assert tok.decode(ids) == "Good bread at the café in Zürich"
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids)


def test_a_prompt_past_the_context_is_refused_before_its_ids_are_listed(tok):
    from stagemesh.errors import InvalidArgument
    from stagemesh.tokenizer import encode_prompt

    text = "the mesh " * 400
    assert len(encode_prompt(tok, text)) > 64
    with pytest.raises(InvalidArgument, match=r"tokens and the model's context is 64 tokens; .*at most 63 tokens"):
        encode_prompt(tok, text, 64)
    assert encode_prompt(tok, "the mesh", 64) == tuple(tok.encode("the mesh"))
