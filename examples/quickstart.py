"""Quickstart: probe -> per-token losses -> fitted salience vector -> predicted scores, on CPU in ~2 minutes.

A toy world with a capability to learn: 26 made-up facts, one per letter ("# k q": the fact for k is q),
mixed at different shares into real English text (CPython's pydoc pages). Tiny GPT-2 models train on
four mixtures; at several checkpoints we record (a) per-token losses on a fixed probe of mostly general
text and (b) a real multiple-choice score on the facts, computed the way lm-eval-harness does (the
choice with the highest log-likelihood wins). ``fit_salience`` then learns which probe tokens predict
the score, holding out whole mixtures.

    python examples/quickstart.py [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from csv_callback import ProbeSet, SalienceVector, fit_salience, sequence_loglikelihoods, token_losses
from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SHARES = (0.02, 0.08, 0.2, 0.4)  # fraction of training lines that are fact lines, one run per mixture


def fact_line(table: dict[str, str], rng: random.Random, n: int = 4) -> str:
    return " ".join(f"# {k} {table[k]}" for k in rng.sample(LETTERS, n))


def fact_questions(table: dict[str, str], rng: random.Random) -> list[tuple[str, list[str], int]]:
    """(context, 4 choices, index of the right one), three questions per fact with other distractors."""
    out = []
    for key, value in table.items():
        for _ in range(3):
            choices = [value, *rng.sample([c for c in LETTERS if c != value], 3)]
            rng.shuffle(choices)
            out.append((f"# {key}", [" " + c for c in choices], choices.index(value)))
    return out


def mc_accuracy(model, tokenizer, questions) -> float:
    """lm-eval-style multiple choice: the choice with the highest summed log-likelihood wins."""
    pairs = [(ctx, c) for ctx, choices, _ in questions for c in choices]
    probe = ProbeSet.from_pairs(pairs, tokenizer, max_length=64)
    loglik = sequence_loglikelihoods(token_losses(model, probe, batch_size=64), probe).view(len(questions), -1)
    truth = torch.tensor([right for _, _, right in questions])
    return float((loglik.argmax(1) == truth).float().mean())


def batches(lines: list[str], tokenizer, seq_len: int, rng: random.Random):
    """Endless random windows of the shuffled, concatenated lines (nanoGPT-style)."""
    ids = torch.tensor(tokenizer("\n".join(rng.sample(lines, len(lines))))["input_ids"])
    while True:
        starts = torch.randint(0, len(ids) - seq_len - 1, (16,))
        yield torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


def train_run(share: float, text: list[str], table, questions, tokenizer, probe, steps: int, seed: int):
    """Train one tiny GPT-2 on a mixture; return per-checkpoint (probe losses, score)."""
    rng = random.Random(seed)
    lines = text + [fact_line(table, rng) for _ in range(int(share / (1 - share) * len(text)))]
    model = tiny_gpt2(len(tokenizer), n_positions=64, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    checkpoints = set(np.unique(np.geomspace(25, steps, 8).astype(int)).tolist())
    rows, scores = [], []
    for step, batch in enumerate(batches(lines, tokenizer, 64, rng), start=1):
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            rows.append(token_losses(model, probe, batch_size=32).numpy())
            scores.append(mc_accuracy(model, tokenizer, questions))
            print(f"  mixture {share:>4}: step {step:4d}  train loss {loss.item():.3f}  fact accuracy {scores[-1]:.3f}")
        if step == steps:
            return rows, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    pages = pydoc_corpus()
    train_text = [line for page in pages[10:] for line in page.splitlines() if line.strip()]
    tokenizer = train_tokenizer(pages, vocab_size=512)
    table = {k: rng.choice(LETTERS) for k in LETTERS}
    questions = fact_questions(table, rng)

    # The probe: held-out general text plus a few fact lines, as a validation set would be.
    general = ProbeSet.from_texts([p[:1500] for p in pages[:10]], tokenizer, max_length=64)
    probe = ProbeSet.concat([general, ProbeSet.from_texts([fact_line(table, rng) for _ in range(6)], tokenizer, 64)])
    print(f"probe: {probe}")

    losses, scores, groups = [], [], []
    for k, share in enumerate(SHARES):
        rows, sc = train_run(share, train_text, table, questions, tokenizer, probe, args.steps, seed=k)
        losses += rows
        scores += sc
        groups += [f"share={share}"] * len(rows)

    sv = fit_salience(np.stack(losses), np.array(scores), groups=groups, probe=probe, task="facts")
    args.out.mkdir(parents=True, exist_ok=True)
    sv.save(args.out / "facts.safetensors")
    probe.save(args.out / "probe.safetensors")
    back = SalienceVector.load(args.out / "facts.safetensors")
    back.check_probe(ProbeSet.load(args.out / "probe.safetensors"))

    print("\nheld-out-mixture error of each predictor (leave one mixture out):")
    print(f"  {'method':<8} {'MSE':>10} {'MAE':>8}")
    for method in sv.fit_report["cv_mse"]:
        print(f"  {method:<8} {sv.fit_report['cv_mse'][method]:>10.2e} {sv.fit_report['cv_mae'][method]:>8.4f}")
    n_general = general.n_tokens  # the fact lines come after the general text in the probe
    print(f"salience on the fact lines: {sv.weights[n_general:].sum():.0%} of the weight, "
          f"{1 - n_general / probe.n_tokens:.0%} of the probe's tokens")
    print(f"saved {args.out / 'facts.safetensors'} and {args.out / 'probe.safetensors'}")


if __name__ == "__main__":
    main()
