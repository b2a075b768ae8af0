"""token_losses against its floor: a bare no-grad forward over the same sequences (issue 2 target: <= 1.15x).

The floor runs the model's own forward (``model(input_ids, attention_mask)``, full logits) over the probe's
sequences in probe order, ``batch_size`` at a time, each batch right-padded only to its own longest
sequence: what any evaluation loop must at least spend. Both are timed interleaved (the order alternates
every repeat) on the same model and probe, and the medians and their ratio are reported. A third timing,
the same bare forward over token_losses' own batches (longest first), isolates what the loss computation
adds on top of the forward.

Peak memory is measured in fresh subprocesses (the kernel's resident high-water mark ``VmHWM``, reset before
the loop, minus the resident size before it), once
for the floor loop and once for ``token_losses``, so "beyond the forward" is their difference.

    PYTHONPATH=. python benchmarks/bench_token_losses.py            # both settings, 5 repeats, ~8k tokens
    PYTHONPATH=. python benchmarks/bench_token_losses.py --repeats 3 --tokens 4000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from csv_callback.losses import token_losses
from csv_callback.probe import ProbeSet
from csv_callback.testing import pydoc_corpus, train_tokenizer

# A GPT-2-architecture model of realistic shape for its vocabulary, and a small model with a 150k vocabulary
# (Qwen-sized) where the output layer and the log-softmax dominate the cost.
SETTINGS = {
    "gpt2_6x384_v8k": {
        "n_layer": 6,
        "n_embd": 384,
        "n_head": 6,
        "vocab_size": 8192,
        "max_length": 512,
        "batch_size": 8,
    },
    "gpt2_2x128_v150k": {
        "n_layer": 2,
        "n_embd": 128,
        "n_head": 2,
        "vocab_size": 150_000,
        "max_length": 256,
        "batch_size": 8,
    },
}
TOKENIZER_VOCAB = 8192


def build_probe(tokenizer, max_length: int, token_budget: int) -> ProbeSet:
    """pydoc topic pages, in a fixed shuffled order, that fit in ``token_budget`` tokens: lengths from ~50
    tokens to several max_length windows."""
    texts = pydoc_corpus()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    chosen, total = [], 0
    for i in order:
        n = len(tokenizer(texts[i])["input_ids"])
        if total + n <= token_budget:
            chosen.append(texts[i])
            total += n
    return ProbeSet.from_texts(chosen, tokenizer, max_length=max_length)


def build_model(cfg: dict) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["max_length"], n_layer=cfg["n_layer"],
                        n_embd=cfg["n_embd"], n_head=cfg["n_head"], bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def floor_forward(model: torch.nn.Module, probe: ProbeSet, batch_size: int, longest_first: bool = False) -> None:
    """The bare forward: probe order (or longest first), each batch padded to its own longest sequence,
    full logits."""
    order = (torch.argsort(probe.lengths, descending=True, stable=True) if longest_first
             else torch.arange(probe.num_sequences)).tolist()
    with torch.no_grad():
        for b in range(0, probe.num_sequences, batch_size):
            seqs = [probe.sequence(i)[0] for i in order[b : b + batch_size]]
            t_max = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), t_max, dtype=torch.int64)
            attn = torch.zeros(len(seqs), t_max, dtype=torch.int64)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = s
                attn[r, : len(s)] = 1
            model(input_ids=ids, attention_mask=attn, use_cache=False)


def time_setting(name: str, cfg: dict, tokenizer, repeats: int, token_budget: int, workdir: Path) -> dict:
    probe = build_probe(tokenizer, cfg["max_length"], token_budget)
    model = build_model(cfg)
    bs = cfg["batch_size"]
    # Warm-up both (allocator, kernels' first-call costs).
    floor_forward(model, probe, bs)
    token_losses(model, probe, batch_size=bs)
    runs = {"floor": lambda: floor_forward(model, probe, bs), "token_losses": lambda: token_losses(model, probe, bs),
            "floor_longest_first": lambda: floor_forward(model, probe, bs, longest_first=True)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for kind in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[kind]()
            times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    probe_path, model_dir = workdir / f"{name}.probe.safetensors", workdir / f"{name}.model"
    probe.save(probe_path)
    model.save_pretrained(model_dir)
    mem = {kind: peak_rss_delta_mib(kind, model_dir, probe_path, bs) for kind in ("floor", "token_losses")}
    return {
        "setting": name,
        "config": cfg,
        "sequences": probe.num_sequences,
        "scored_tokens": probe.n_tokens,
        "lengths_min_median_max": [int(probe.lengths.min()), int(probe.lengths.median()), int(probe.lengths.max())],
        "repeats": repeats,
        "times_s": times,
        "median_s": med,
        "ratio_of_medians": med["token_losses"] / med["floor"],
        "ratio_per_repeat_median": statistics.median(t / f for t, f in zip(times["token_losses"], times["floor"])),
        # The same forward in token_losses' own batches: what the loss computation itself adds.
        "ratio_vs_longest_first_floor": med["token_losses"] / med["floor_longest_first"],
        "ratio_vs_longest_first_floor_per_repeat_median": statistics.median(
            t / f for t, f in zip(times["token_losses"], times["floor_longest_first"])),
        "peak_rss_delta_mib": mem,
        "loss_memory_beyond_forward_mib": mem["token_losses"] - mem["floor"],
    }


def peak_rss_delta_mib(kind: str, model_dir: Path, probe_path: Path, batch_size: int) -> float:
    """Peak resident memory added by one pass of ``kind``, in a fresh process (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--measure-memory", kind, str(model_dir), str(probe_path),
                          str(batch_size)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return float(out.stdout.strip().splitlines()[-1])


def _measure_memory(kind: str, model_dir: str, probe_path: str, batch_size: int) -> None:
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    probe = ProbeSet.load(probe_path)
    # Reset the kernel's high-water mark (VmHWM) so that loading does not hide the loop's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    if kind == "floor":
        floor_forward(model, probe, batch_size)
    else:
        token_losses(model, probe, batch_size=batch_size)
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_1_5_15": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8000, help="approximate probe size in tokens per setting")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--measure-memory", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_memory:
        kind, model_dir, probe_path, bs = args.measure_memory
        _measure_memory(kind, model_dir, probe_path, int(bs))
        return
    tokenizer = train_tokenizer(pydoc_corpus(), vocab_size=TOKENIZER_VOCAB)
    results = {"machine": machine(), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            res = time_setting(name, SETTINGS[name], tokenizer, args.repeats, args.tokens, Path(tmp))
            results["settings"].append(res)
            print(
                f"{name}: {res['sequences']} seqs, {res['scored_tokens']} tokens, lengths "
                f"{res['lengths_min_median_max']}"
                f" | floor {res['median_s']['floor']:.3f}s  token_losses {res['median_s']['token_losses']:.3f}s"
                f"  ratio {res['ratio_of_medians']:.3f} (per-repeat median {res['ratio_per_repeat_median']:.3f})"
                f" | longest-first floor {res['median_s']['floor_longest_first']:.3f}s"
                f" ratio {res['ratio_vs_longest_first_floor']:.3f}"
                f" (per-repeat median {res['ratio_vs_longest_first_floor_per_repeat_median']:.3f})"
                f" | peak RSS +MiB floor {res['peak_rss_delta_mib']['floor']:.0f}"
                f" token_losses {res['peak_rss_delta_mib']['token_losses']:.0f}",
                flush=True,
            )
    results["machine"]["loadavg_after"] = os.getloadavg()
    print(json.dumps(results["machine"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
