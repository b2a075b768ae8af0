"""The ladder's data world: real English text plus three generated capabilities, the probe, and the tasks.

General text is CPython's pydoc topic pages. Three capability sources are generated, each a line format a
model can only get right by learning that capability from its share of the training data:

- ``facts``: 26 made-up facts to memorise, one per letter (``# k q``: the fact for k is q);
- ``arith``: adding 3 modulo 10 (``$ 8+3=1``), a rule over the digits (two-operand sums of single digits
  stayed at chance for every size in 1200 steps, so the second operand is fixed);
- ``pattern``: continue a random repeating letter pattern (``@ c f k c f k c f``), an in-context skill.

A :class:`Mixture` gives each capability a share of the training lines (the rest is general text); the
mixtures of :data:`MIXTURES` vary those shares widely. The probe is a generic validation set: held-out
pydoc pages plus a few capability lines in the training format. The downstream tasks are multiple-choice
questions in another format (a cue, then one of four choices) written as lm-eval-harness custom tasks
(YAML with local JSONL ``data_files``); :func:`score_tasks` scores them in-process exactly as lm-eval does.
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
MODULUS = 10
ADDEND = 3
DIGITS = "0123456789"
SOURCES = ("facts", "arith", "pattern")
TASKS = tuple(f"ladder_{s}" for s in SOURCES)
N_PROBE_PAGES = 10  # the first pydoc pages (sorted by topic) are held out of training for the probe
PROBE_CHARS = 1500  # characters of each held-out page in the probe
PROBE_LINES = 4  # capability lines per source in the probe
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
)


class World:
    """Everything the ladder's runs share, built deterministically from ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        pages = pydoc_corpus()
        self.probe_pages = pages[:N_PROBE_PAGES]
        self.general = [ln for page in pages[N_PROBE_PAGES:] for ln in page.splitlines() if ln.strip()]
        self.facts = {k: rng.choice(LETTERS) for k in LETTERS}
        self.tokenizer = train_tokenizer(pages, vocab_size=VOCAB_SIZE)
        self.seed = seed

    # ------------------------------------------------------------------ training text
    def line(self, source: str, rng: random.Random) -> str:
        """One training-format line of a capability source."""
        if source == "facts":
            return " ".join(f"# {k} {self.facts[k]}" for k in rng.sample(LETTERS, 4))
        if source == "arith":
            return " ".join(f"$ {a}+{ADDEND}={(a + ADDEND) % MODULUS}" for a in rng.choices(range(MODULUS), k=4))
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

    # ------------------------------------------------------------------ the probe
    def probe(self) -> ProbeSet:
        """Held-out general text, then ``PROBE_LINES`` training-format lines of each capability source
        (fresh lines, not the task questions, whose format differs)."""
        rng = random.Random(self.seed + 1000)  # not the training lines' seeds
        general = ProbeSet.from_texts([p[:PROBE_CHARS] for p in self.probe_pages], self.tokenizer, MAX_LENGTH)
        # Every token of a capability line is scored; its last item (a fact, a sum, the next letter) is also
        # marked as the answer, for the "label" baseline (answer-token loss).
        caps = [self.line(s, rng) for s in SOURCES for _ in range(PROBE_LINES)]
        pairs = [(line[:-1], line[-1]) for line in caps]  # every line ends in a one-character answer
        return ProbeSet.concat([general, ProbeSet.from_pairs(pairs, self.tokenizer, MAX_LENGTH, score_context=True)])

    @staticmethod
    def answer_masks(probe: ProbeSet) -> dict[str, torch.Tensor]:
        """Per task, bool ``[probe.n_tokens]``: the answer tokens of the probe's lines of that task's source
        (what the "label" baseline averages). Relies on :meth:`probe`'s layout: the capability lines come
        last, ``PROBE_LINES`` per source in ``SOURCES`` order."""
        first = probe.num_sequences - len(SOURCES) * PROBE_LINES
        out = {}
        for k, task in enumerate(TASKS):
            lo = int(probe.score_offsets[first + k * PROBE_LINES])
            hi = int(probe.score_offsets[first + (k + 1) * PROBE_LINES])
            mask = torch.zeros(probe.n_tokens, dtype=torch.bool)
            mask[lo:hi] = probe.answer_mask[lo:hi]
            out[task] = mask
        return out

    # ------------------------------------------------------------------ the downstream tasks
    def questions(self, task: str) -> list[dict]:
        """lm-eval docs ``{"question", "choices", "answer"}``. Each choice follows the question after
        ``TARGET_DELIMITER[task]`` (the YAML's ``target_delimiter``), as in the training lines."""
        rng = random.Random(self.seed + 2000 + TASKS.index(task) if task in TASKS else -1)
        if task == "ladder_facts":
            items = [(f"# {k}", v, LETTERS) for k, v in self.facts.items() for _ in range(3)]
        elif task == "ladder_arith":
            items = [(f"$ {a}+{ADDEND}=", str((a + ADDEND) % MODULUS), DIGITS) for a in range(MODULUS) for _ in range(6)]
        elif task == "ladder_pattern":
            items = []
            for _ in range(80):
                seq = _pattern(rng, rng.randint(6, 9))
                # Distractors: the pattern's other letters first, so copying any seen letter is not enough.
                others = sorted(set(seq) - {seq[-1]})
                items.append(("@ " + " ".join(seq[:-1]), seq[-1], others))
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}.")
        docs = []
        for question, right, pool in items:
            if isinstance(pool, list):  # preferred distractors, topped up with random letters
                extra = rng.sample([c for c in LETTERS if c != right and c not in pool], N_CHOICES - 1 - len(pool))
                wrong = pool[: N_CHOICES - 1] + extra
            else:
                wrong = rng.sample([c for c in pool if c != right], N_CHOICES - 1)
            choices = [right] + wrong
            rng.shuffle(choices)
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

    def __call__(self, model: torch.nn.Module, batch_size: int = 64) -> dict[str, float]:
        """Per task, lm-eval's ``acc``: the share of questions whose highest-likelihood choice is right."""
        lls = self.loglikelihoods(model, batch_size)
        return {t: float(np.mean([np.argmax(row) == d["answer"] for row, d in zip(lls[t], self.docs[t])]))
                for t in self.tasks}


def results_document(scores: dict[str, float], model_name: str) -> dict:
    """An lm-eval-harness results document (the parts :mod:`csv_callback.lmeval` and users read)."""
    return {
        "results": {t: {"alias": t, "acc,none": v, "acc_stderr,none": "N/A"} for t, v in scores.items()},
        "model_name": model_name,
        "config": {"model": "ladder-fast-scorer", "model_args": {"pretrained": model_name}},
    }


def _pattern(rng: random.Random, length: int) -> list[str]:
    period = rng.sample(LETTERS, rng.randint(2, 3))
    return [period[i % len(period)] for i in range(length)]
