"""What is measured: a fixed, tokenized probe set and which of its tokens are scored.

A :class:`ProbeSet` is a list of token sequences. Token ``t`` of a sequence is *scored* when the model's
next-token loss for it (predicted from tokens ``0..t-1``) belongs to the probe's loss vector; the scored
tokens, in sequence order, are the ``n_tokens`` coordinates a salience vector weights.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ._checks import is_integer_tensor, require_int, require_str

FORMAT = "csv_callback.probe/1"
_TENSORS = ("input_ids", "offsets", "score_mask", "answer_mask")
NAME_MAX = 255  # bytes in a file name on the usual filesystems (ext4, xfs, btrfs, tmpfs, NFS)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
_FOREIGN_TEMP_AGE = 86400.0  # seconds; no write of a csv-callback file takes this long


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
            raise ValueError("ProbeSet: offsets must start at 0, end at len(input_ids) and give sequences of >= 2 tokens.")
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
            raise ValueError(f"ProbeSet: a sequence has {int(lengths.max())} tokens, more than max_length={self.max_length}.")

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
    ) -> "ProbeSet":
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
    ) -> "ProbeSet":
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
    def _build(cls, seqs, masks, answer, tok_hash: str, max_length: int) -> "ProbeSet":
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
    def concat(cls, probes: Sequence["ProbeSet"]) -> "ProbeSet":
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
            offsets=torch.cat([torch.zeros(1, dtype=torch.int64)] + [p.offsets[1:] + s for p, s in zip(probes, shifts)]),
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
        """int64 ``[num_sequences + 1]``; sequence ``i``'s losses are ``losses[score_offsets[i]:score_offsets[i+1]]``."""
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
    def load(cls, path: str | os.PathLike) -> "ProbeSet":
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


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> None:
    """Save ``tensors`` with string ``metadata`` as one .safetensors file at ``path``, atomically (see
    :func:`atomic_write`, which also says what a failed write raises)."""
    atomic_write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata), path)


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temporary file next to it and ``os.replace``: a crash or a full disk
    leaves the old file (or none), never a part of the new one.

    The file gets the permissions an ordinary new file gets (0666 less the umask: 0644 under umask 0022), so
    teammates can read probes, vectors and stores. A failed write removes its temporary file and raises an
    OSError (of the subclass its errno gives) naming ``path``, that starts with "disk full" when the
    filesystem or quota is full.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a file path, e.g. {path / 'name.safetensors'}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory; create it first.")
    tmp = path.with_name(_temp_name(path.name))
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a dead process that had our PID; O_EXCL below never follows a link
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise OSError(e.errno, f"disk full: cannot write {path} ({e.strerror}); nothing of it was written and an "
                                   "earlier version of it, if any, is intact. Free space on that filesystem (or raise "
                                   "the quota) and write it again.") from e
        raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}); nothing of it was written and an earlier "
                               "version of it, if any, is intact.") from e
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(name: str) -> str:
    """The temporary file :func:`atomic_write` writes ``name`` through: ``.<name>.tmp-<host>-<pid>``, or
    ``.<hash of name>.tmp-<host>-<pid>`` where that would be longer than a file name may be."""
    tail = f".tmp-{socket.gethostname()}-{os.getpid()}"
    full = f".{name}{tail}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}{tail}"


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed between writing and renaming them left in ``directory``
    (``.<name>.tmp-<host>-<pid>``, or ``.<name>.tmp-<pid>`` as written before the host was recorded); return
    them.

    A temporary file is stale when its writer ran on this host and its process is gone. A writer on another
    host (a shared filesystem) cannot be asked, so its temporary file is deleted only once it is a day old. A
    file that cannot be deleted (a read-only store) is left: readers need no write access.
    """
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows instead of probing it
        return []
    host, removed = socket.gethostname(), []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no such directory, or not readable: nothing to clean
        return []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if m["host"] in (None, host):
                stale = not _alive(int(m["pid"]))
            else:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _FOREIGN_TEMP_AGE
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # deleted by another reader meanwhile, or no write access
            continue
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 only checks that it could be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no process can have such a PID
        return False
    return True


def require_regular_file(path: str | os.PathLike) -> Path:
    """``path``, if it is a regular file (or a symlink to one); found by ``stat``, without opening it, because
    opening a FIFO blocks until something writes to it.

    Raises FileNotFoundError if nothing is there and ValueError naming ``path`` for a FIFO, a directory, a
    device or a socket.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file.") from None
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode), "not a file")
        raise ValueError(f"{path} is {kind}, not a regular file, so it was not read; replace it with the file it "
                         "stands for, or remove it.")
    return path


def read_safetensors(
    path: str | os.PathLike, fmt: str, keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors ``keys`` and the metadata of a csv-callback safetensors file of format ``fmt`` (a regular
    file: see :func:`require_regular_file`)."""
    path = require_regular_file(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); it may be truncated or of another format.") from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is a safetensors file but not a {fmt!r} file (format={meta.get('format')!r}).")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; the file is corrupt or was written by another tool.")
    return tensors, meta


@contextmanager
def malformed_file(path: str | os.PathLike, kind: str, fix: str) -> Iterator[None]:
    """Turn an error raised while building an object from ``path``'s contents into one ValueError that names
    the file, says it is not a valid ``kind`` file and gives the ``fix``."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid csv_callback {kind} file: {str(e).rstrip('.')}; {fix}.") from e


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
