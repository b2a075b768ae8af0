import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csv_callback import ProbeMismatchError, ProbeSet
from csv_callback.testing import train_tokenizer


def test_from_texts_scores_every_next_token(tokenizer):
    texts = ["def f(x): return x + 1", "Lists are mutable sequences."]
    probe = ProbeSet.from_texts(texts, tokenizer, max_length=64)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert probe.num_sequences == 2
    assert probe.n_tokens == sum(n - 1 for n in lengths)
    assert not probe.answer_mask.any()
    ids0, mask0 = probe.sequence(0)
    assert ids0.tolist() == tokenizer(texts[0])["input_ids"]
    assert mask0.tolist() == [False] + [True] * (lengths[0] - 1)
    assert probe.score_offsets.tolist() == [0, lengths[0] - 1, probe.n_tokens]


def test_long_text_is_split_with_one_token_overlap(tokenizer, corpus):
    text = corpus[0]
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 100
    probe = ProbeSet.from_texts([text], tokenizer, max_length=32)
    assert probe.n_tokens == len(ids) - 1  # every next-token position once
    assert all(int(n) <= 32 for n in probe.lengths)
    assert probe.scored_token_ids().tolist() == ids[1:]


def test_from_pairs_follows_lm_eval_tokenization(tokenizer):
    pairs = [("Question: what is 2+2? Answer: ", "4"), {"context": "x", "continuation": " = 1"}, ("", "hello")]
    probe = ProbeSet.from_pairs(pairs, tokenizer, max_length=64)
    # trailing spaces of the context move to the continuation
    ctx = tokenizer("Question: what is 2+2? Answer:", add_special_tokens=False)["input_ids"]
    whole = tokenizer("Question: what is 2+2? Answer: 4", add_special_tokens=False)["input_ids"]
    ids0, mask0 = probe.sequence(0)
    assert ids0.tolist() == ctx + whole[len(ctx):]
    assert mask0.sum() == len(whole) - len(ctx)
    # an empty context becomes EOS
    ids2, mask2 = probe.sequence(2)
    assert ids2[0] == tokenizer.eos_token_id and not mask2[0] and mask2[1:].all()
    assert probe.answer_mask.all() and probe.n_tokens == int(probe.score_mask.sum())


def test_from_pairs_score_context_and_left_truncation(tokenizer):
    context = "word " * 50
    probe = ProbeSet.from_pairs([(context, "end")], tokenizer, max_length=16, score_context=True)
    ids, mask = probe.sequence(0)
    n_cont = int(probe.answer_mask.sum())
    assert len(ids) == 16 and mask[1:].all() and not mask[0]
    assert probe.answer_mask.tolist() == [False] * (15 - n_cont) + [True] * n_cont


def test_concat_keeps_answer_mask_and_fingerprint_changes(tokenizer):
    text = ProbeSet.from_texts(["Some general text here."], tokenizer, 64)
    pairs = ProbeSet.from_pairs([("Q: capital? A:", " Paris")], tokenizer, 64)
    both = ProbeSet.concat([text, pairs])
    assert both.n_tokens == text.n_tokens + pairs.n_tokens
    assert both.answer_mask.tolist() == [False] * text.n_tokens + [True] * pairs.n_tokens
    assert len({text.fingerprint, pairs.fingerprint, both.fingerprint}) == 3
    assert both.sequence(1)[0].tolist() == pairs.sequence(0)[0].tolist()


def test_fingerprint_is_stable_and_sensitive(tokenizer):
    a = ProbeSet.from_texts(["alpha beta gamma"], tokenizer, 64)
    b = ProbeSet.from_texts(["alpha beta gamma"], tokenizer, 64)
    c = ProbeSet.from_texts(["alpha beta delta"], tokenizer, 64)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_save_load_round_trip(tmp_path, tokenizer):
    probe = ProbeSet.concat([
        ProbeSet.from_texts(["General text for the probe."], tokenizer, 64),
        ProbeSet.from_pairs([("2 + 2 =", " 4")], tokenizer, 64),
    ])
    probe.save(tmp_path / "p.safetensors")
    back = ProbeSet.load(tmp_path / "p.safetensors")
    assert back.fingerprint == probe.fingerprint
    for name in ("input_ids", "offsets", "score_mask", "answer_mask"):
        assert torch.equal(getattr(back, name), getattr(probe, name))
    assert back.tokenizer_hash == probe.tokenizer_hash and back.max_length == probe.max_length


def test_tokenizer_mismatch_is_detected(tokenizer, corpus):
    probe = ProbeSet.from_texts(["hello there"], tokenizer, 64)
    probe.check_tokenizer(tokenizer)
    other = train_tokenizer(corpus[:5], vocab_size=300)
    with pytest.raises(ProbeMismatchError, match="not the one this probe was built with"):
        probe.check_tokenizer(other)
    with pytest.raises(ProbeMismatchError, match="different tokenizers"):
        ProbeSet.concat([probe, ProbeSet.from_texts(["hello there"], other, 64)])


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda t: ProbeSet.from_texts([], t, 64), "texts is empty"),
        (lambda t: ProbeSet.from_texts(["a"], t, 64), "needs >= 2 tokens"),
        (lambda t: ProbeSet.from_texts(["hello world"], t, 1), "max_length"),
        (lambda t: ProbeSet.from_texts([3], t, 64), "expected str"),
        (lambda t: ProbeSet.from_pairs([], t, 64), "pairs is empty"),
        (lambda t: ProbeSet.from_pairs([{"context": "a"}], t, 64), "keys 'context' and 'continuation'"),
        (lambda t: ProbeSet.from_pairs([("a", "b", "c")], t, 64), "tuple or a dict"),
        (lambda t: ProbeSet.from_pairs([("a", "")], t, 64), "encodes to no tokens"),
        (lambda t: ProbeSet.from_pairs([("a", "word " * 40)], t, 8), "does not fit max_length"),
        (lambda t: ProbeSet.from_texts("one string", t, 64), "texts is a single str.*pass a list of texts"),
        (lambda t: ProbeSet.from_pairs("one string", t, 64), "pairs is a single str.*pass a list of pairs"),
        (lambda t: ProbeSet.concat([ProbeSet.from_texts(["hello world"], t, 64), "p.safetensors"]),
         "joins ProbeSets only: probes\\[1\\] is str"),
    ],
)
def test_bad_input_raises(tokenizer, build, match):
    with pytest.raises(ValueError, match=match):
        build(tokenizer)


def test_corrupt_and_foreign_files(tmp_path, tokenizer):
    probe = ProbeSet.from_texts(["hello world again"], tokenizer, 64)
    path = tmp_path / "p.safetensors"
    probe.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable \.safetensors"):
        ProbeSet.load(tmp_path / "trunc.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"not a readable \.safetensors"):
        ProbeSet.load(tmp_path / "text.safetensors")
    with pytest.raises(FileNotFoundError):
        ProbeSet.load(tmp_path / "missing.safetensors")
    # a flipped token id no longer matches the stored fingerprint
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["input_ids"][1] += 1
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="corrupt"):
        ProbeSet.load(tmp_path / "tampered.safetensors")


def _parts(probe: ProbeSet) -> dict:
    return {"input_ids": probe.input_ids, "offsets": probe.offsets, "score_mask": probe.score_mask,
            "answer_mask": probe.answer_mask, "tokenizer_hash": probe.tokenizer_hash, "max_length": probe.max_length}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: {"input_ids": p["input_ids"] * 0 - 1}, "negative token id"),
        (
            lambda p: {"input_ids": p["input_ids"].float() + 0.5},
            "input_ids must be an integer tensor, got torch.float32",
        ),
        (lambda p: {"input_ids": p["input_ids"].bool()}, "input_ids must be an integer tensor, got torch.bool"),
        (lambda p: {"offsets": p["offsets"].double()}, "offsets must be an integer tensor"),
        (lambda p: {"score_mask": p["score_mask"].long()}, "score_mask must be a bool tensor, got torch.int64"),
        (lambda p: {"tokenizer_hash": ""}, "tokenizer_hash must be a non-empty str"),
        (lambda p: {"max_length": 64.5}, "max_length must be an int >= 2, got 64.5"),
    ],
)
def test_constructor_refuses_what_it_would_coerce(tokenizer, change, match):
    """Token ids index a vocabulary: a float id 0.7 must not become token 0, nor -1 the last token."""
    parts = _parts(ProbeSet.from_texts(["hello world, again and again"], tokenizer, 64))
    with pytest.raises(ValueError, match=match):
        ProbeSet(**{**parts, **change(parts)})


@pytest.mark.parametrize(
    "meta_change, tensor_change, reason",
    [
        ({"tokenizer_hash": None}, {}, r"its metadata lacks \['tokenizer_hash'\]"),
        ({"max_length": None}, {}, r"its metadata lacks \['max_length'\]"),
        ({"max_length": "abc"}, {}, "its max_length 'abc' is not a whole number"),
        ({"max_length": "2"}, {}, "more than max_length=2"),
        ({}, {"offsets": lambda t: t.float()}, "offsets must be an integer tensor"),
        ({}, {"input_ids": lambda t: t - 1000}, "negative token id"),
        ({"fingerprint": None}, {}, "does not match the stored tokens; the file is corrupt"),
    ],
)
def test_malformed_probe_file_names_the_file(tmp_path, tokenizer, meta_change, tensor_change, reason):
    good = tmp_path / "good.safetensors"
    ProbeSet.from_texts(["hello world again", "and a second text"], tokenizer, 64).save(good)
    with safe_open(str(good), framework="pt") as f:
        meta = {k: v for k, v in {**f.metadata(), **meta_change}.items() if v is not None}
    tensors = load_file(str(good))
    tensors.update({k: fn(tensors[k]) for k, fn in tensor_change.items()})
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    before = path.read_bytes()
    with pytest.raises(
        ValueError, match=f"{re.escape(str(path))} is not a valid csv_callback probe file: .*{reason}.*; rebuild it"
    ):
        ProbeSet.load(path)
    assert path.read_bytes() == before


def test_save_refuses_a_directory_or_a_missing_parent(tmp_path, tokenizer):
    probe = ProbeSet.from_texts(["hello world again"], tokenizer, 64)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; pass a file path"):
        probe.save(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no such directory; create it first"):
        probe.save(tmp_path / "missing" / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and not any((tmp_path / "d").iterdir())
