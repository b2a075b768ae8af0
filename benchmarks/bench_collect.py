"""Where ``csv-callback collect`` spends its time, and whether its memory grows with the checkpoint count.

Saves N Hugging Face checkpoints of a small GPT-2 (built from a config, tokenizer trained locally), then runs
``csv_callback.collect.collect`` over them (what ``csv-callback collect`` calls after argument checks) and
measures:

- the share of the wall time spent inside the model's ``forward`` (timed with forward hooks), and inside
  ``token_losses`` (forward + float32 log-softmax + bookkeeping); the rest is checkpoint loading and
  store writes;
- the process's resident memory after each checkpoint (it must not grow with N).

Target (issue 5): forward >= 90% of the wall time.

    PYTHONPATH=/work/main python benchmarks/bench_collect.py --checkpoints 6 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import csv_callback.collect as collect_mod
from csv_callback import ProbeSet
from csv_callback.collect import collect, resolve_checkpoints
from csv_callback.store import LossStore
from csv_callback.testing import pydoc_corpus, train_tokenizer


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def make_checkpoints(root: Path, tokenizer, n: int, layers: int, width: int) -> list[Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_layer=layers, n_head=4, n_embd=width,
                         bos_token_id=0, eos_token_id=0)
        d = root / f"step{i}"
        GPT2LMHeadModel(cfg).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def run_once(dirs: list[Path], probe: ProbeSet, store_dir: Path, batch_size: int) -> dict[str, float]:
    timers = {"forward": 0.0, "token_losses": 0.0}
    rss = []
    real_load, real_losses = collect_mod.load_model, collect_mod.token_losses

    def timed_load(*a, **k):
        model = real_load(*a, **k)
        start = {}
        model.register_forward_pre_hook(lambda m, i: start.__setitem__("t", time.perf_counter()))
        model.register_forward_hook(
            lambda m, i, o: timers.__setitem__("forward", timers["forward"] + time.perf_counter() - start["t"])
        )
        return model

    def timed_losses(*a, **k):
        t = time.perf_counter()
        out = real_losses(*a, **k)
        timers["token_losses"] += time.perf_counter() - t
        rss.append(rss_mib())
        return out

    collect_mod.load_model, collect_mod.token_losses = timed_load, timed_losses
    try:
        store = LossStore(store_dir, probe)
        t = time.perf_counter()
        collect(resolve_checkpoints(dirs), probe, store, torch.device("cpu"), batch_size=batch_size, progress=False)
        wall = time.perf_counter() - t
    finally:
        collect_mod.load_model, collect_mod.token_losses = real_load, real_losses
    return {"wall": wall, **timers, "rss_first": rss[0], "rss_last": rss[-1], "rss_max": max(rss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--texts", type=int, default=60, help="pydoc pages in the probe")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    corpus = pydoc_corpus()
    tok = train_tokenizer(corpus, vocab_size=4096)
    probe = ProbeSet.from_texts(corpus[: args.texts], tok, max_length=args.max_length)
    print(f"probe: {probe.num_sequences} sequences, {probe.n_tokens} tokens; model GPT-2 {args.layers}x{args.width}, "
          f"vocab {len(tok)}; {args.checkpoints} checkpoints; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_checkpoints(Path(tmp) / "ckpts", tok, args.checkpoints, args.layers, args.width)
        runs = [run_once(dirs, probe, Path(tmp) / f"store{r}", args.batch_size) for r in range(args.repeats)]
    for r in runs:
        print(
            f"wall {r['wall']:.2f}s  forward {r['forward'] / r['wall']:.1%}  token_losses "
            f"{r['token_losses'] / r['wall']:.1%}  "
            f"RSS after 1st/last checkpoint {r['rss_first']:.0f}/{r['rss_last']:.0f} MiB"
        )
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    print(f"median over {len(runs)}: wall {med('wall'):.2f}s, {med('wall') / args.checkpoints:.2f}s/checkpoint, "
          f"{probe.n_tokens * args.checkpoints / med('wall'):.0f} tokens/s; forward share "
          f"{statistics.median(r['forward'] / r['wall'] for r in runs):.1%}, token_losses share "
          f"{statistics.median(r['token_losses'] / r['wall'] for r in runs):.1%}; RSS growth first->last checkpoint "
          f"{statistics.median(r['rss_last'] - r['rss_first'] for r in runs):+.0f} MiB")


if __name__ == "__main__":
    main()
