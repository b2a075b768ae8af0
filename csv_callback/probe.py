"""What is measured: a fixed, tokenized probe set and which of its tokens are scored.

A :class:`ProbeSet` is a list of token sequences. Token ``t`` of a sequence is *scored* when the model's
next-token loss for it (predicted from tokens ``0..t-1``) belongs to the probe's loss vector; the scored
tokens, in sequence order, are the ``n_tokens`` coordinates a salience vector weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._checks import is_integer_tensor, require_int, require_str
from .files import atomic_save, malformed_file, read_safetensors

FORMAT = "csv_callback.probe/1"
_TENSORS = ("input_ids", "offsets", "score_mask", "answer_mask")


class ProbeMismatchError(ValueError):
    """Losses, a probe, a tokenizer or a salience vector belong to different probe sets."""


def tokenizer_hash(tokenizer: Any) -> str:
    """Stable SHA-256 of a tokenizer's vocabulary (token -> id map), first 16 hex digits.

    Two tokenizers with the same hash map every token string to the same id, so token ids mean the same.
    """
    try:
        vocab = tokenizer.get_vocab()
    except AttributeError as e:
        raise TypeError(
            f"{type(tokenizer).__name__} has no get_vocab(); pass a Hugging Face tokenizer "
            "(e.g. transformers.AutoTokenizer.from_pretrained(local_dir))."
        ) from e
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ProbeSet:
    """A tokenized probe set.

    Attributes:
        input_ids: int64 ``[total_tokens]``, all sequences concatenated.
        offsets: int64 ``[num_sequences + 1]``; sequence ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``.
        score_mask: bool ``[total_tokens]``; True where the token's next-token loss is measured. Never True
            at the first token of a sequence (it has no context).
        answer_mask: bool ``[n_tokens]``, one entry per scored token; True for answer (continuation) tokens.
        tokenizer_hash: :func:`tokenizer_hash` of the tokenizer that made the ids.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        score_mask: torch.Tensor,
        answer_mask: torch.Tensor,
        tokenizer_hash: str,
        max_length: int,
    ) -> None:
        self.input_ids = _typed_tensor(input_ids, "input_ids", torch.int64)
        self.offsets = _typed_tensor(offsets, "offsets", torch.int64)
        self.score_mask = _typed_tensor(score_mask, "score_mask", torch.bool)
        self.answer_mask = _typed_tensor(answer_mask, "answer_mask", torch.bool)
        self.tokenizer_hash = require_str(tokenizer_hash, "ProbeSet: tokenizer_hash")
        self.max_length = require_int(max_length, "ProbeSet: max_length", 2)
        self._validate()
        self.fingerprint = self._fingerprint()

    def _validate(self) -> None:
        ids, off, sm = self.input_ids, self.offsets, self.score_mask
        if ids.ndim != 1 or off.ndim != 1 or sm.shape != ids.shape:
            raise ValueError("ProbeSet: input_ids and score_mask must be 1-D of equal length, offsets 1-D.")
        if len(ids) and int(ids.min()) < 0:
            raise ValueError(
                f"ProbeSet: input_ids has {int((ids < 0).sum())} negative token id(s) (min {int(ids.min())}); "
                "token ids index the tokenizer's vocabulary and must be >= 0."
            )
        if len(off) < 2:
            raise ValueError("ProbeSet is empty: it needs at least one sequence with a scored token.")
        lengths = off[1:] - off[:-1]
        if off[0] != 0 or off[-1] != len(ids) or bool((lengths < 2).any()):
            raise ValueError(
                "ProbeSet: offsets must start at 0, end at len(input_ids) and give sequences of >= 2 tokens."
            )
        if bool(sm[off[:-1]].any()):
            raise ValueError("ProbeSet: the first token of a sequence cannot be scored (it has no context).")
        if int(sm.sum()) == 0:
            raise ValueError("ProbeSet is empty: no token is scored.")
        if self.answer_mask.shape != (int(sm.sum()),):
            raise ValueError(
                f"ProbeSet: answer_mask must have one entry per scored token ({int(sm.sum())}), "
                f"got shape {tuple(self.answer_mask.shape)}."
            )
        if int(lengths.max()) > self.max_length:
            raise ValueError(
                f"ProbeSet: a sequence has {int(lengths.max())} tokens, more than max_length={self.max_length}."
            )

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.input_ids, self.offsets, self.score_mask.to(torch.uint8)):
            h.update(t.numpy().tobytes())
        h.update(self.tokenizer_hash.encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_texts(
        cls, texts: Iterable[str], tokenizer: Any, max_length: int = 1024, add_special_tokens: bool = True
    ) -> ProbeSet:
        """Score every next-token position of every text.

        A text longer than ``max_length`` tokens becomes several sequences that overlap by one token, so
        every token after the text's first is still scored exactly once (with a context truncated to the
        window). Raises ValueError for an empty list, a bare str (pass ``[text]``) or a text of fewer than 2
        tokens.
        """
        max_length = require_int(max_length, "max_length", 2)
        tok_hash = tokenizer_hash(tokenizer)
        seqs, masks = [], []
        for i, text in enumerate(_non_empty(texts, "texts")):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] is {type(text).__name__}, expected str.")
            ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            if len(ids) < 2:
                raise ValueError(
                    f"texts[{i}] ({text[:40]!r}) has {len(ids)} token(s); a text needs >= 2 tokens to score "
                    "one next-token prediction. Remove it or join it to a neighbour."
                )
            step = max_length - 1
            for start in range(0, len(ids) - 1, step):
                chunk = ids[start : start + max_length]
                seqs.append(chunk)
                masks.append([False] + [True] * (len(chunk) - 1))
        n_scored = sum(len(m) - 1 for m in masks)
        return cls._build(seqs, masks, [False] * n_scored, tok_hash, max_length)

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[tuple[str, str] | Mapping[str, str]],
        tokenizer: Any,
        max_length: int = 1024,
        score_context: bool = False,
    ) -> ProbeSet:
        """Score the continuation tokens of (context, continuation) pairs, as lm-eval-harness does.

        Tokenization follows lm-eval-harness's ``loglikelihood`` requests: trailing spaces of the context
        move to the continuation, the continuation's tokens are those of ``encode(context + continuation)``
        after ``len(encode(context))``, no special tokens are added, an empty context becomes the EOS token,
        and a pair longer than ``max_length`` keeps its last ``max_length`` tokens (the context is cut on
        the left). With ``score_context=True`` the context's next-token losses are scored as well;
        ``answer_mask`` marks the continuation tokens either way.
        """
        max_length = require_int(max_length, "max_length", 2)
        tok_hash = tokenizer_hash(tokenizer)
        seqs, masks, answer = [], [], []
        for i, pair in enumerate(_non_empty(pairs, "pairs")):
            context, continuation = _unpack_pair(pair, i)
            ctx_ids, cont_ids = _encode_pair(tokenizer, context, continuation, i)
            if len(cont_ids) > max_length - 1:
                raise ValueError(
                    f"pairs[{i}]: the continuation has {len(cont_ids)} tokens, which does not fit max_length="
                    f"{max_length} with one token of context; raise max_length or shorten it."
                )
            ids = (ctx_ids + cont_ids)[-max_length:]
            n_ctx = len(ids) - len(cont_ids)
            mask = [False] + [score_context] * (n_ctx - 1) + [True] * len(cont_ids)
            seqs.append(ids)
            masks.append(mask)
            answer += [False] * (sum(mask) - len(cont_ids)) + [True] * len(cont_ids)
        return cls._build(seqs, masks, answer, tok_hash, max_length)

    @classmethod
    def _build(cls, seqs, masks, answer, tok_hash: str, max_length: int) -> ProbeSet:
        lengths = [len(s) for s in seqs]
        return cls(
            input_ids=torch.tensor([t for s in seqs for t in s], dtype=torch.int64),
            offsets=torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
            score_mask=torch.tensor([m for ms in masks for m in ms], dtype=torch.bool),
            answer_mask=torch.tensor(answer, dtype=torch.bool),
            tokenizer_hash=tok_hash,
            max_length=max_length,
        )

    @classmethod
    def concat(cls, probes: Sequence[ProbeSet]) -> ProbeSet:
        """Join probes made with the same tokenizer, e.g. general text plus answer-bearing pairs."""
        probes = list(probes)
        if not probes:
            raise ValueError("ProbeSet.concat needs at least one probe.")
        others = [f"probes[{i}] is {type(p).__name__}" for i, p in enumerate(probes) if not isinstance(p, ProbeSet)]
        if others:
            raise ValueError(f"ProbeSet.concat joins ProbeSets only: {', '.join(others)}; load it with ProbeSet.load.")
        hashes = {p.tokenizer_hash for p in probes}
        if len(hashes) > 1:
            raise ProbeMismatchError(f"ProbeSet.concat: the probes come from different tokenizers {sorted(hashes)}.")
        shifts = np.cumsum([0] + [len(p.input_ids) for p in probes[:-1]])
        return cls(
            input_ids=torch.cat([p.input_ids for p in probes]),
            offsets=torch.cat(
                [torch.zeros(1, dtype=torch.int64)] + [p.offsets[1:] + s for p, s in zip(probes, shifts)]
            ),
            score_mask=torch.cat([p.score_mask for p in probes]),
            answer_mask=torch.cat([p.answer_mask for p in probes]),
            tokenizer_hash=probes[0].tokenizer_hash,
            max_length=max(p.max_length for p in probes),
        )

    # ------------------------------------------------------------------ views
    @property
    def n_tokens(self) -> int:
        """Number of scored tokens: the length of the probe's loss vector."""
        return len(self.answer_mask)

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[num_sequences]``: tokens per sequence."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def score_offsets(self) -> torch.Tensor:
        """int64 ``[num_sequences + 1]``; sequence ``i``'s losses are
        ``losses[score_offsets[i]:score_offsets[i+1]]``."""
        c = torch.cumsum(self.score_mask, 0)
        return torch.cat([torch.zeros(1, dtype=torch.int64), c[self.offsets[1:] - 1]])

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[len_i]`` and score mask ``[len_i]`` of sequence ``i``."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.score_mask[a:b]

    def scored_token_ids(self) -> torch.Tensor:
        """int64 ``[n_tokens]``: the id of each scored token, in loss-vector order."""
        return self.input_ids[self.score_mask]

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise :class:`ProbeMismatchError` unless ``tokenizer`` has the vocabulary the probe was built with."""
        got = tokenizer_hash(tokenizer)
        if got != self.tokenizer_hash:
            raise ProbeMismatchError(
                f"the tokenizer (vocabulary hash {got}) is not the one this probe was built with "
                f"({self.tokenizer_hash}); rebuild the probe with this tokenizer or use the model's own tokenizer."
            )

    def __repr__(self) -> str:
        return (
            f"ProbeSet(sequences={self.num_sequences}, n_tokens={self.n_tokens}, "
            f"answer_tokens={int(self.answer_mask.sum())}, fingerprint={self.fingerprint!r})"
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the probe as one .safetensors file (atomically: a crash leaves the old file or none)."""
        meta = {"format": FORMAT, "tokenizer_hash": self.tokenizer_hash, "max_length": str(self.max_length),
                "fingerprint": self.fingerprint}
        tensors = {"input_ids": self.input_ids, "offsets": self.offsets, "score_mask": self.score_mask,
                   "answer_mask": self.answer_mask}
        atomic_save(tensors, meta, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProbeSet:
        """Read a probe written by :meth:`save`.

        Raises FileNotFoundError for a missing file and ValueError naming the file for anything else: not a
        safetensors file, another format, malformed metadata or tensors, or tokens that do not match the
        stored fingerprint.
        """
        tensors, meta = read_safetensors(path, FORMAT, _TENSORS)
        with malformed_file(path, "probe", "rebuild it (csv-callback probe, or ProbeSet.from_texts / from_pairs) "
                                           "and save it again"):
            missing = [k for k in ("tokenizer_hash", "max_length") if k not in meta]
            if missing:
                raise ValueError(f"its metadata lacks {missing}")
            if not meta["max_length"].isascii() or not meta["max_length"].isdigit():
                raise ValueError(f"its max_length {meta['max_length']!r} is not a whole number")
            probe = cls(**{k: tensors[k] for k in _TENSORS}, tokenizer_hash=meta["tokenizer_hash"],
                        max_length=int(meta["max_length"]))
            if probe.fingerprint != meta.get("fingerprint"):
                raise ValueError("the stored fingerprint does not match the stored tokens; the file is corrupt")
        return probe


def _typed_tensor(x: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` (int64 or bool), refusing values the conversion would change."""
    t = torch.as_tensor(x)
    ok = t.dtype == torch.bool if dtype == torch.bool else is_integer_tensor(t)
    if t.numel() and not ok:
        kind = "a bool" if dtype == torch.bool else "an integer"
        raise ValueError(f"ProbeSet: {name} must be {kind} tensor, got {t.dtype}; build probes with "
                         "ProbeSet.from_texts / from_pairs, or pass tensors of that dtype.")
    return t.to(dtype)


def _non_empty(items: Iterable, name: str) -> list:
    if isinstance(items, (str, bytes)):  # a str is iterable: each character would become an item
        raise ValueError(f"{name} is a single str, which would be read one character at a time; pass a list of "
                         f"{name} (e.g. [x] for a single one).")
    items = list(items)
    if not items:
        raise ValueError(f"{name} is empty; a probe needs at least one item.")
    return items


def _unpack_pair(pair: Any, i: int) -> tuple[str, str]:
    if isinstance(pair, Mapping):
        if "context" not in pair or "continuation" not in pair:
            raise ValueError(f"pairs[{i}] must have keys 'context' and 'continuation', got {sorted(pair)}.")
        context, continuation = pair["context"], pair["continuation"]
    elif isinstance(pair, (tuple, list)) and len(pair) == 2:
        context, continuation = pair
    else:
        raise ValueError(f"pairs[{i}] must be a (context, continuation) tuple or a dict with those keys.")
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise ValueError(f"pairs[{i}]: context and continuation must be strings.")
    return context, continuation


def _encode_pair(tokenizer: Any, context: str, continuation: str, i: int) -> tuple[list[int], list[int]]:
    """lm-eval-harness's ``LM._encode_pair``: split ``encode(context + continuation)`` after the context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]

    def encode(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    if context:
        ctx = encode(context)
        cont = encode(context + continuation)[len(ctx) :]
    else:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"pairs[{i}] has an empty context and the tokenizer has no EOS token to stand for it.")
        ctx, cont = [tokenizer.eos_token_id], encode(continuation)
    if not cont:
        raise ValueError(f"pairs[{i}]: the continuation {continuation!r} encodes to no tokens.")
    return ctx, cont
