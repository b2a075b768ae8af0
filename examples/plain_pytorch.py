"""Predicted benchmark scores in a plain PyTorch training loop (no Lightning, no Trainer), logged to W&B by the loop.

A tiny GPT-2 built from a config trains nanoGPT-style on CPython's pydoc pages, with the locally trained
tokenizer the shipped probe and ladder vectors (examples/assets) were built with. At its evaluation points the
loop asks the evaluator for the predicted scores and logs them with ``wandb.log``; ``csv_callback.wandb_view``
adds the predictions table and the salience views. General text teaches none of the ladder's capabilities,
so expect the predictions to stay near chance (0.25). W&B runs offline, under ``--out``/wandb.

    python examples/plain_pytorch.py --steps 300 --eval-every 50 --out plain_run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import wandb

from csv_callback import SalienceEvaluator, wandb_view
from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
BLOCK = 64  # the probe's max_length: the model's context must hold it


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50, help="training steps between evaluations (and the last)")
    ap.add_argument("--out", type=Path, default=Path("plain_run"), help="where the offline W&B run goes")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be at least 1.")
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread on a busy CPU
    torch.manual_seed(0)

    pages = pydoc_corpus()
    tokenizer = train_tokenizer(pages, vocab_size=512)  # the shipped probe's tokenizer, rebuilt locally
    data = torch.tensor(tokenizer("\n".join(pages[10:]))["input_ids"])  # the first 10 pages are the probe's text
    model = tiny_gpt2(len(tokenizer), n_positions=BLOCK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    evaluator = SalienceEvaluator(sorted(ASSETS.glob("ladder_*.safetensors")), ASSETS / "probe.safetensors",
                                  batch_size=32)
    evaluator.check_tokenizer(tokenizer)
    evaluator.check_model(model)  # a probe the model cannot score fails now, not at the first evaluation

    args.out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="csv-callback-plain", dir=args.out, mode="offline", config={"steps": args.steps})
    wandb_view.define_metrics(run, evaluator)  # max/min summaries; plotted against wandb.log's step
    wandb_view.log_salience_views(run, evaluator, tokenizer, step=0)  # once: the vectors do not change
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - BLOCK - 1, (16,)).tolist()
        batch = torch.stack([data[s : s + BLOCK + 1] for s in starts])
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"train/loss": loss.item()}
        if step % args.eval_every == 0 or step == args.steps:
            metrics |= evaluator.evaluate(model, step, training=True).metrics
            wandb_view.log_predictions_table(run, evaluator, step=step)
            print(f"step {step}: predicted " + ", ".join(f"{v.task} {metrics[f'csv/{v.task}/pred']:.3f}"
                                                         for v in evaluator.vectors), flush=True)
        wandb.log(metrics, step=step)
    run.finish()


if __name__ == "__main__":
    main()
