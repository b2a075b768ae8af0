"""The ladder's data world: real English text plus three generated capabilities, the probe, and the tasks.

General text is CPython's pydoc topic pages. Three capability sources are generated, each a line format a
model can only get right by learning that capability from its share of the training data:

- ``facts``: ``N_FACTS`` made-up facts to memorise (``# bq x``: the fact for ``bq`` is ``x``), drawn with
  Zipf-like frequencies, so a model learns them one by one, frequent ones first;
- ``arith``: adding 3 to a one-digit number modulo 10 (``$ 8+3=1``) or a two-digit number modulo 100
  (``$ 47+3=50``): a digit rule, then a carry;
- ``pattern``: continue a random repeating letter pattern (``@ c f k c f k c f``), an in-context skill.

A :class:`Mixture` gives each capability a share of the training lines (the rest is general text); the
mixtures of :data:`MIXTURES` vary those shares widely. The probe is a generic validation set: held-out
pydoc pages plus fresh capability lines in the training format. The downstream tasks are multiple-choice
questions in another format (a cue, then one of four choices) written as lm-eval-harness custom tasks
(YAML with local JSONL ``data_files``); :class:`TaskScorer` scores them in-process exactly as lm-eval does.

Questions come in blocks of four that share one set of four choices, each choice right in exactly one of
them. A model that ignores the question and prefers some choice strings (what an untrained model does)
therefore scores exactly 1/4: chance is chance, not 0.15-0.35 depending on which letters it happens to like,
which would be noise that no loss can predict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from csv_callback import ProbeSet, sequence_loglikelihoods, token_losses
from csv_callback.lmeval import write_multiple_choice_task
from csv_callback.testing import pydoc_corpus, train_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
N_FACTS = 160
FACT_ZIPF = 1.0  # fact i is drawn with probability proportional to (i + 1) ** -FACT_ZIPF
ADDEND = 3
ARITH_DIGITS = (1, 2)  # numbers of one digit (mod 10) or two (mod 100): an easy stage and a harder one
# Pattern questions are generated, so the task can be as large as a real benchmark: at 400 questions the
# accuracy's own sampling noise (lm-eval's acc_stderr squared, 4.9e-4 on average over the ladder) was half
# the 1e-3 error the predictions are asked to reach. Facts and sums ask every item their source has.
N_PATTERN_QUESTIONS = 2000
SOURCES = ("facts", "arith", "pattern")
TASKS = tuple(f"ladder_{s}" for s in SOURCES)
DOMAINS = ("general", *SOURCES)  # the probe's segments, as validation domains: held-out text, then each source's lines
N_PROBE_PAGES = 10  # the first pydoc pages (sorted by topic) are held out of training for the probe
PROBE_CHARS = 1500  # characters of each held-out page in the probe
PROBE_LINES = 40  # capability lines per source in the probe
MAX_LENGTH = 64
VOCAB_SIZE = 512
N_CHOICES = 4
TARGET_DELIMITER = {"ladder_facts": " ", "ladder_arith": "", "ladder_pattern": " "}  # question + this + choice


@dataclass(frozen=True)
class Mixture:
    """Shares of the training lines given to each capability source; the rest is general text."""

    name: str
    facts: float
    arith: float
    pattern: float

    def shares(self) -> dict[str, float]:
        return {s: getattr(self, s) for s in SOURCES}


MIXTURES = (
    Mixture("general", 0.02, 0.02, 0.02),
    Mixture("facts", 0.30, 0.04, 0.04),
    Mixture("arith", 0.04, 0.30, 0.04),
    Mixture("pattern", 0.04, 0.04, 0.30),
    # Without these, holding out a capability's own mixture removed every high score of that task from the
    # fitting set (see the first evaluation in git history: 6bebce2).
    Mixture("balanced", 0.10, 0.10, 0.10),
    Mixture("capable", 0.20, 0.20, 0.20),
    # Two capabilities heavy at once: holding out one mixture still leaves others with high scores of each task.
    Mixture("facts+pattern", 0.20, 0.04, 0.20),
    Mixture("arith+pattern", 0.04, 0.20, 0.20),
    # Sums emerge late and abruptly; at half the lines the smaller sizes learn them too.
    Mixture("arith-heavy", 0.04, 0.50, 0.04),
)


class World:
    """Everything the ladder's runs share, built deterministically from ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        pages = pydoc_corpus()
        self.probe_pages = pages[:N_PROBE_PAGES]
        self.general = [ln for page in pages[N_PROBE_PAGES:] for ln in page.splitlines() if ln.strip()]
        keys = rng.sample([x + y for x in LETTERS for y in LETTERS], N_FACTS)
        # Each block of N_CHOICES consecutive facts has distinct values: its questions share those values as choices.
        values = [v for _ in range(N_FACTS // N_CHOICES) for v in rng.sample(LETTERS, N_CHOICES)]
        self.facts = dict(zip(keys, values))
        self.fact_weights = [(i + 1) ** -FACT_ZIPF for i in range(N_FACTS)]
        self.tokenizer = train_tokenizer(pages, vocab_size=VOCAB_SIZE)
        self.seed = seed

    # ------------------------------------------------------------------ training text
    def line(self, source: str, rng: random.Random) -> str:
        """One training-format line of a capability source; its last item (after the last space or ``=``) is an
        answer: a fact's value, a sum, the pattern's next letter."""
        if source == "facts":
            keys = rng.choices(list(self.facts), weights=self.fact_weights, k=4)
            return " ".join(f"# {k} {self.facts[k]}" for k in keys)
        if source == "arith":
            sums = []
            for _ in range(4):
                digits = rng.choice(ARITH_DIGITS)
                a = rng.randrange(10**digits)
                sums.append(f"$ {_sum_question(a, digits)}{_sum(a, digits)}")
            return " ".join(sums)
        if source == "pattern":
            return "@ " + " ".join(_pattern(rng, 16))
        raise ValueError(f"unknown capability source {source!r}; expected one of {SOURCES}.")

    def training_lines(self, mixture: Mixture, seed: int) -> list[str]:
        """General lines plus capability lines at the mixture's shares, shuffled."""
        rng = random.Random(seed)
        cap_share = sum(mixture.shares().values())
        n_general = len(self.general)
        total = n_general / (1 - cap_share)
        lines = list(self.general)
        for source, share in mixture.shares().items():
            lines += [self.line(source, rng) for _ in range(round(share * total))]
        rng.shuffle(lines)
        return lines

    def token_stream(self, mixture: Mixture, seed: int) -> torch.Tensor:
        """int64 ``[n]``: the mixture's training lines, joined by newlines and tokenized."""
        text = "\n".join(self.training_lines(mixture, seed))
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64)

    def validation_windows(self, n: int = 16) -> torch.Tensor:
        """int64 ``[n, MAX_LENGTH]``: held-out general text that is in neither the training data nor the probe
        (the rest of the probe's pages), for the runs' plain validation loss."""
        text = "\n".join(page[PROBE_CHARS:] for page in self.probe_pages)
        ids = torch.tensor(self.tokenizer(text)["input_ids"][: n * MAX_LENGTH], dtype=torch.int64)
        if len(ids) < n * MAX_LENGTH:
            raise ValueError(f"the held-out pages have only {len(ids)} tokens; ask for fewer than {n} windows.")
        return ids.reshape(n, MAX_LENGTH)

    # ------------------------------------------------------------------ the probe
    def probe(self) -> ProbeSet:
        """Held-out general text, then ``PROBE_LINES`` training-format lines of each capability source
        (fresh lines, not the task questions, whose format differs)."""
        rng = random.Random(self.seed + 1000)  # not the training lines' seeds
        general = ProbeSet.from_texts([p[:PROBE_CHARS] for p in self.probe_pages], self.tokenizer, MAX_LENGTH)
        # Every token of a capability line is scored; its last item is also marked as the answer, for the
        # "label" baseline (answer-token loss).
        caps = [self.line(s, rng) for s in SOURCES for _ in range(PROBE_LINES)]
        return ProbeSet.concat([general, line_probe(caps, self.tokenizer)])

    @staticmethod
    def domain_ranges(probe: ProbeSet) -> dict[str, tuple[int, int]]:
        """Per domain of :data:`DOMAINS`, ``(lo, hi)``: its scored tokens are ``losses[lo:hi]`` of the probe's loss
        vector ``[probe.n_tokens]``; "general" is the held-out text, each source its ``PROBE_LINES`` lines. Relies on
        :meth:`probe`'s layout: the capability lines come last, ``PROBE_LINES`` per source in ``SOURCES`` order."""
        first = probe.num_sequences - len(SOURCES) * PROBE_LINES
        if first < 1:
            raise ValueError(f"the probe has {probe.num_sequences} sequences, not the general text plus "
                             f"{len(SOURCES)} x {PROBE_LINES} capability lines of World.probe(); pass that probe.")
        offsets = probe.score_offsets
        bounds = [0] + [int(offsets[first + k * PROBE_LINES]) for k in range(len(SOURCES) + 1)]
        return {domain: (bounds[k], bounds[k + 1]) for k, domain in enumerate(DOMAINS)}

    @staticmethod
    def answer_masks(probe: ProbeSet) -> dict[str, torch.Tensor]:
        """Per task, bool ``[probe.n_tokens]``: the answer tokens of the probe's lines of that task's source
        (what the "label" baseline averages), within :meth:`domain_ranges`' range of that source."""
        ranges = World.domain_ranges(probe)
        out = {}
        for source, task in zip(SOURCES, TASKS):
            lo, hi = ranges[source]
            mask = torch.zeros(probe.n_tokens, dtype=torch.bool)
            mask[lo:hi] = probe.answer_mask[lo:hi]
            out[task] = mask
        return out

    # ------------------------------------------------------------------ the downstream tasks
    def questions(self, task: str) -> list[dict]:
        """lm-eval docs ``{"question", "choices", "answer"}``: questions in blocks of ``N_CHOICES`` that share
        their choices, each choice right in one question of its block. Each choice follows the question after
        ``TARGET_DELIMITER[task]`` (the YAML's ``target_delimiter``), as in the training lines."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}.")
        rng = random.Random(self.seed + 2000 + TASKS.index(task))
        blocks: list[list[tuple[str, str]]] = []  # per block: (question, right answer) x N_CHOICES
        if task == "ladder_facts":
            keys = list(self.facts)
            blocks = [
                [(f"# {k}", self.facts[k]) for k in keys[i : i + N_CHOICES]] for i in range(0, len(keys), N_CHOICES)
            ]
        elif task == "ladder_arith":
            # One-digit blocks: four of the ten sums. Two-digit blocks: a0, a0 + 1, a0 + 10, a0 + 11 with even
            # tens and units digits (25 disjoint blocks), whose sums differ in the units digit, the tens digit, or
            # both (so the carry matters).
            for _ in range(25):
                blocks.append([(f"$ {_sum_question(a, 1)}", _sum(a, 1)) for a in rng.sample(range(10), N_CHOICES)])
            for a0 in (a for a in range(100) if a % 2 == 0 and (a // 10) % 2 == 0):
                blocks.append([(f"$ {_sum_question(a, 2)}", _sum(a, 2)) for a in (a0, a0 + 1, a0 + 10, a0 + 11)])
        else:
            for _ in range(N_PATTERN_QUESTIONS // N_CHOICES):
                letters = rng.sample(LETTERS, N_CHOICES)
                block = []
                for right in letters:
                    # The context repeats a period of 2-3 of the block's letters, so the distractors include
                    # letters that are in it: copying any letter seen is not enough.
                    period = [right, *rng.sample([c for c in letters if c != right], rng.randint(1, 2))]
                    rng.shuffle(period)
                    length = rng.randint(6, 9)
                    phase = (period.index(right) - length) % len(period)
                    seq = [period[(i + phase) % len(period)] for i in range(length)]
                    block.append(("@ " + " ".join(seq), right))
                blocks.append(block)
        docs = []
        for block in blocks:
            answers = [right for _, right in block]
            for question, right in block:
                choices = rng.sample(answers, len(answers))
                docs.append({"question": question, "choices": choices, "answer": choices.index(right)})
        return docs

    def write_tasks(self, root: Path) -> Path:
        """Write each task as lm-eval-harness custom task YAML + JSONL under ``root``; return ``root``
        (pass it as ``--include_path``)."""
        for task in TASKS:
            write_multiple_choice_task(root, task, self.questions(task), TARGET_DELIMITER[task])
        return root


class TaskScorer:
    """lm-eval-harness's multiple-choice ``acc`` computed in-process: per question, the choice whose
    continuation (``TARGET_DELIMITER[task] + choice``) has the highest summed log-likelihood wins (ties: the first, as
    ``np.argmax``). Built once; scoring a model is one :func:`token_losses` pass over all choices."""

    def __init__(self, world: World, tasks: tuple[str, ...] = TASKS, tokenizer=None) -> None:
        """``tokenizer``: the model's (e.g. loaded from a saved checkpoint); default the world's."""
        self.tasks = tasks
        self.docs = {t: world.questions(t) for t in tasks}
        pairs = [(d["question"], TARGET_DELIMITER[t] + c) for t in tasks for d in self.docs[t] for c in d["choices"]]
        self.probe = ProbeSet.from_pairs(pairs, tokenizer or world.tokenizer, max_length=MAX_LENGTH)

    def loglikelihoods(self, model: torch.nn.Module, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Per task, float64 ``[n_questions, N_CHOICES]``: each choice's summed continuation log-likelihood."""
        per_pair = sequence_loglikelihoods(token_losses(model, self.probe, batch_size=batch_size), self.probe).numpy()
        out, start = {}, 0
        for task in self.tasks:
            n = len(self.docs[task]) * N_CHOICES
            out[task] = per_pair[start : start + n].reshape(-1, N_CHOICES)
            start += n
        return out

    def correct(self, model: torch.nn.Module, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Per task, bool ``[n_questions]``: whether the highest-likelihood choice is the right one."""
        lls = self.loglikelihoods(model, batch_size)
        return {
            t: np.array([np.argmax(row) == d["answer"] for row, d in zip(lls[t], self.docs[t])]) for t in self.tasks
        }

    def __call__(self, model: torch.nn.Module, batch_size: int = 64) -> dict[str, dict[str, float]]:
        """Per task, lm-eval's ``acc`` (the share of questions answered right) and ``acc_stderr``."""
        return {t: accuracy_and_stderr(c) for t, c in self.correct(model, batch_size).items()}


def line_probe(lines: list[str], tokenizer) -> ProbeSet:
    """Capability lines as the probe scores them: one sequence per line, every token after the first scored, the
    line's last item (after its last space or ``=``) marked as the answer."""
    cut = [max(line.rfind(" "), line.rfind("=")) + 1 for line in lines]
    pairs = [(line[:i], line[i:]) for line, i in zip(lines, cut)]
    return ProbeSet.from_pairs(pairs, tokenizer, MAX_LENGTH, score_context=True)


def accuracy_and_stderr(correct: np.ndarray) -> dict[str, float]:
    """lm-eval's ``acc`` and its closed-form ``acc_stderr`` (``mean_stderr``: the sample standard deviation,
    with ``n - 1``, over ``sqrt(n)``) of a bool ``[n]``."""
    c = correct.astype(np.float64)
    return {"acc": float(c.mean()), "acc_stderr": float(c.std(ddof=1) / np.sqrt(len(c)))}


def results_document(scores: dict[str, dict[str, float]], model_name: str) -> dict:
    """An lm-eval-harness results document (the parts :mod:`csv_callback.lmeval` and users read) from
    :class:`TaskScorer`'s per-task ``{"acc", "acc_stderr"}``."""
    return {
        "results": {
            t: {"alias": t, "acc,none": v["acc"], "acc_stderr,none": v["acc_stderr"]} for t, v in scores.items()
        },
        "model_name": model_name,
        "config": {"model": "ladder-fast-scorer", "model_args": {"pretrained": model_name}},
    }


def _sum_question(a: int, digits: int) -> str:
    return f"{a:0{digits}d}+{ADDEND}="


def _sum(a: int, digits: int) -> str:
    return f"{(a + ADDEND) % 10**digits:0{digits}d}"


def _pattern(rng: random.Random, length: int) -> list[str]:
    period = rng.sample(LETTERS, rng.randint(2, 3))
    return [period[i % len(period)] for i in range(length)]
