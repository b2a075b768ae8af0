import pytest
import torch
from torch import nn

import csv_callback.losses as losses_mod
from csv_callback import ProbeSet, sequence_loglikelihoods, token_losses
from csv_callback.testing import tiny_gpt2


def reference_losses(model, probe: ProbeSet) -> torch.Tensor:
    """Naive float64 reference: one unpadded sequence at a time, log-softmax in float64."""
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(probe.num_sequences):
            ids, mask = probe.sequence(i)
            logits = model(input_ids=ids[None]).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    out.append(-logp[t - 1, ids[t]])
    return torch.stack(out)


def mixed_probe(tokenizer, corpus) -> ProbeSet:
    texts = [corpus[3][:400], "x = 1", corpus[7][:1500], "Short one here.", corpus[11][:900]]
    pairs = [
        ("The keyword to define a function is", " def"),
        ("", "import sys"),
        ("Lists are" + " very" * 30, " mutable"),
    ]
    return ProbeSet.concat([
        ProbeSet.from_texts(texts, tokenizer, max_length=96),
        ProbeSet.from_pairs(pairs, tokenizer, max_length=48, score_context=True),
    ])


def test_matches_float64_reference_with_padding(model, tokenizer, corpus):
    probe = mixed_probe(tokenizer, corpus)
    assert len(set(probe.lengths.tolist())) > 3  # batches really are padded
    got = token_losses(model, probe, batch_size=3)
    assert got.dtype == torch.float32 and got.shape == (probe.n_tokens,)
    torch.testing.assert_close(got.double(), reference_losses(model, probe), atol=1e-5, rtol=0)


def test_pairs_give_lm_eval_continuation_loglikelihood(model, tokenizer):
    pairs = [("Question: which keyword defines a function? Answer:", " def"), ("a b c", " d e f")]
    probe = ProbeSet.from_pairs(pairs, tokenizer, max_length=64)
    got = token_losses(model, probe)
    model.eval()  # the reference below must not run dropout either
    for i, (ctx, cont) in enumerate(pairs):
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        cont_ids = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"][len(ctx_ids):]
        inp = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inp).logits[0].double(), -1)
        ll = sum(logp[len(ctx_ids) - 1 + j, c] for j, c in enumerate(cont_ids))
        a, b = probe.score_offsets[i], probe.score_offsets[i + 1]
        assert float(-got[a:b].double().sum()) == pytest.approx(float(ll), abs=1e-4)
        assert float(sequence_loglikelihoods(got, probe)[i]) == pytest.approx(float(ll), abs=1e-4)
    with pytest.raises(ValueError, match="must have shape"):
        sequence_loglikelihoods(got[:-1], probe)


def test_batch_size_chunking_and_order_do_not_change_result(model, tokenizer, corpus, monkeypatch):
    probe = mixed_probe(tokenizer, corpus)
    base = token_losses(model, probe, batch_size=1)
    monkeypatch.setattr(losses_mod, "_CHUNK_ELEMENTS", 3 * len(tokenizer))  # 3 rows per log-softmax chunk
    chunked = token_losses(model, probe, batch_size=4)
    torch.testing.assert_close(chunked, base, atol=1e-5, rtol=0)
    # a shard in a given order returns those sequences' losses in that order
    seqs = torch.tensor([4, 0, 2])
    shard = token_losses(model, probe, batch_size=2, sequences=seqs)
    so = probe.score_offsets
    expected = torch.cat([base[so[i]:so[i + 1]] for i in seqs.tolist()])
    torch.testing.assert_close(shard, expected, atol=1e-5, rtol=0)


class PlainLM(nn.Module):
    """Not an HF model: ids [B, T] -> logits [B, T, V], with a dropout that eval mode must switch off."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.drop = nn.Dropout(0.5)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.drop(self.emb(ids)))[0])


def test_plain_module_and_modes_restored(tokenizer, corpus):
    torch.manual_seed(0)
    lm = PlainLM(len(tokenizer))
    lm.train()
    lm.head.eval()  # a mixed state must come back exactly as it was
    probe = ProbeSet.from_texts(corpus[:4], tokenizer, max_length=40)
    a = token_losses(lm, probe, batch_size=5)
    b = token_losses(lm, probe, batch_size=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # deterministic: dropout was off
    assert lm.training and lm.drop.training and lm.rnn.training and not lm.head.training
    ids, _ = probe.sequence(0)
    with torch.no_grad():
        lm.eval()
        logp = torch.log_softmax(lm(ids[None])[0].double(), -1)
    assert float(a[0]) == pytest.approx(float(-logp[0, ids[1]]), abs=1e-5)


def test_bf16_autocast_still_float32_log_softmax(model, tokenizer, corpus):
    probe = ProbeSet.from_texts(corpus[:3], tokenizer, max_length=64)
    exact = token_losses(model, probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = token_losses(model, probe)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - exact).abs().mean() < 0.05  # only the forward is bf16


def test_model_with_bad_output_is_rejected(tokenizer):
    probe = ProbeSet.from_texts(["hello world, again"], tokenizer, 16)

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, ids):
            return ids.float()  # [B, T]: no vocabulary axis

    with pytest.raises(ValueError, match=r"logits of shape \[batch, seq, vocab\]"):
        token_losses(Bad(), probe)
    with pytest.raises(ValueError, match="batch_size"):
        token_losses(Bad(), probe, batch_size=0)


class TinyVocabLM(nn.Module):
    """Not an HF model and no embedding to inspect: only its logits show the vocabulary is too small."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, ids):
        return torch.zeros(*ids.shape, 10)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda tok: tiny_gpt2(100), r"the probe has token id \d+, but the model's vocabulary has 100 entries"),
        (
            lambda tok: tiny_gpt2(len(tok), n_positions=16),
            r"sequences of up to \d+ tokens, but the model takes at most 16 positions; rebuild the probe with "
            r"max_length <= 16",
        ),
        (lambda tok: TinyVocabLM(), r"logits cover a vocabulary of 10, but the probe has token id \d+"),
    ],
)
def test_probe_that_does_not_fit_the_model(tokenizer, corpus, build, match):
    """Ids beyond the vocabulary or sequences beyond the positions: a clear error, not an IndexError."""
    probe = ProbeSet.from_texts([corpus[3][:600]], tokenizer, max_length=64)
    assert int(probe.lengths.max()) > 16 and int(probe.input_ids.max()) >= 100
    with pytest.raises(ValueError, match=match):
        token_losses(build(tokenizer), probe)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sequences": [100]}, r"sequences has index 100, but the probe has 3 sequences; pass indices in \[0, 2\]"),
        ({"sequences": [-1]}, "sequences has index -1"),
        ({"sequences": [0.7]}, "integer sequence indices, got torch.float32"),
        ({"sequences": [True]}, "integer sequence indices, got torch.bool"),
        ({"sequences": [[0, 1]]}, r"1-D list or tensor .* of shape \(1, 2\)"),
        ({"sequences": "01"}, "sequences must be integer indices"),
        ({"model": lambda ids: ids}, r"model must be a torch.nn.Module \(.*\), got function"),
        ({"probe": "probe.safetensors"}, "probe must be a ProbeSet, got str"),
    ],
)
def test_bad_arguments(model, tokenizer, kwargs, match):
    probe = ProbeSet.from_texts(["x = 1", "Short one here.", "def f(): pass"], tokenizer, max_length=32)
    args = {"model": model, "probe": probe, **kwargs}
    with pytest.raises(ValueError, match=match):
        token_losses(**args)
    assert token_losses(model, probe, sequences=[]).shape == (0,)  # an empty shard is no error


def test_sequence_loglikelihoods_takes_array_likes(model, tokenizer):
    probe = ProbeSet.from_pairs([("2 + 2 =", " 4"), ("Lists are", " mutable")], tokenizer, max_length=32)
    losses = token_losses(model, probe)
    want = sequence_loglikelihoods(losses, probe)
    for other in (losses.numpy(), losses.tolist(), losses.numpy().astype("float64")):
        torch.testing.assert_close(sequence_loglikelihoods(other, probe), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="losses must be a tensor or array of numbers"):
        sequence_loglikelihoods(["a"] * probe.n_tokens, probe)
    with pytest.raises(ValueError, match="probe must be a ProbeSet"):
        sequence_loglikelihoods(losses, None)
