"""Shared data helpers for training fastllm's shipped Shakespeare models.

The corpus is a directory of plain-text works, one ``<name>.txt`` file each
(see ``<repo>/../shared/data/shakespeare/README.md``). It is split by WHOLE
WORKS, never by lines, so validation measures generalisation to unseen works:

    VALIDATION_WORKS = julius_caesar           (Roman tragedy, prose and verse)
                       much_ado_about_nothing  (comedy, mostly prose)
                       richard_ii              (history play, entirely verse)
                       lovers_complaint        (narrative poem, rhyme royal)

Those four files (383,251 bytes, ~8% of the corpus) are validation; every other
``*.txt`` file in the directory is training data. ``train_tokenizer.py`` fits the
tokenizer on the training works only, and ``train_model.py`` trains on them and
reports validation loss and bits per byte on the four works above.

Texts are read as the exact bytes of each file decoded as UTF-8 (no newline
translation), so the byte count used for bits per byte is the files' size.

Token streams:
  * training: every training work becomes ``[BOS] + ids + [EOS]``; the works are
    concatenated in sorted file-name order and random windows of ``seq_len + 1``
    tokens are cut from that stream (``sample_batch``).
  * validation: every validation work becomes ``[BOS] + ids`` and is cut into
    consecutive, non-overlapping windows (``document_windows``): window k feeds
    ``s[kL : kL+L]`` and predicts ``s[kL+1 : kL+L+1]``, so every text token is
    predicted exactly once and the BOS is never a target.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # torch is imported lazily: train_tokenizer.py does not need it
    import torch

VALIDATION_WORKS: tuple[str, ...] = (
    "julius_caesar",
    "lovers_complaint",
    "much_ado_about_nothing",
    "richard_ii",
)
ENV_DATA_DIR = "FASTLLM_SHAKESPEARE_DIR"
IGNORE_INDEX = -100  # label value that cross-entropy skips (padding of the last window)


def repo_root() -> Path:
    """The repository root (this file lives in ``<repo>/tools``)."""
    return Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """HEAD of the repository (with '+dirty' for uncommitted changes), None outside git."""
    try:
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "-C", str(repo_root()), *args], capture_output=True, text=True, timeout=10)

        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def default_data_dir() -> Path:
    """``$FASTLLM_SHAKESPEARE_DIR`` if set, else ``<repo>/../shared/data/shakespeare``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env)
    return repo_root().parent / "shared" / "data" / "shakespeare"


def list_works(data_dir: str | Path) -> dict[str, Path]:
    """Map work name (file stem) -> path for every ``*.txt`` in ``data_dir``, sorted by name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"corpus directory {data_dir} does not exist; pass --data DIR or set ${ENV_DATA_DIR}"
        )
    works = {p.stem: p for p in sorted(data_dir.glob("*.txt"))}
    if not works:
        raise FileNotFoundError(f"no *.txt works found in {data_dir}")
    return works


def split_works(
    data_dir: str | Path, validation: Sequence[str] = VALIDATION_WORKS
) -> tuple[list[Path], list[Path]]:
    """Split the corpus by whole works: (training paths, validation paths), each sorted.

    Raises ValueError if a validation work is missing (a silent change of the
    split would make runs incomparable) or if no training work is left.
    """
    works = list_works(data_dir)
    missing = [name for name in validation if name not in works]
    if missing:
        raise ValueError(
            f"validation works {missing} not found in {data_dir}; the split expects "
            f"{list(validation)} (found {sorted(works)})"
        )
    val = [works[name] for name in sorted(validation)]
    train = [path for name, path in works.items() if name not in set(validation)]
    if not train:
        raise ValueError(f"no training works left in {data_dir} after removing the validation works")
    return train, val


def read_text(path: str | Path) -> str:
    """The file's exact bytes decoded as UTF-8 (no newline translation)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: {e}") from e


def utf8_bytes(texts: Iterable[str]) -> int:
    """Total number of UTF-8 bytes of ``texts`` (the denominator of bits per byte)."""
    return sum(len(t.encode("utf-8")) for t in texts)


def pack_documents(docs: Sequence[Sequence[int]], bos_id: int, eos_id: int) -> "torch.Tensor":
    """Concatenate ``[BOS] + doc + [EOS]`` for every doc into one int64 stream: [N]."""
    import torch

    out: list[int] = []
    for doc in docs:
        out.append(bos_id)
        out.extend(doc)
        out.append(eos_id)
    return torch.tensor(out, dtype=torch.long)


def sample_batch(
    stream: "torch.Tensor", batch_size: int, seq_len: int, generator: "torch.Generator"
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Random windows of the packed stream: inputs x and next-token targets y, both [B, L].

    Start positions are drawn on the CPU from ``generator`` (so runs are
    reproducible from the seed on any device); the gather runs where ``stream`` is.
    """
    import torch

    n = stream.numel()
    if n < seq_len + 2:
        raise ValueError(f"training stream has {n} tokens, too few for windows of seq_len={seq_len}")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1, device=stream.device)
    idx = starts.to(stream.device)[:, None] + offsets  # [B, L+1]
    chunk = stream[idx]
    return chunk[:, :-1], chunk[:, 1:]


def document_windows(
    ids: Sequence[int], seq_len: int, pad_id: int
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Cut one document ``s = [BOS] + text ids`` into non-overlapping evaluation windows.

    Window k holds inputs ``s[kL : kL+L]`` and targets ``s[kL+1 : kL+L+1]``; the last
    window is right-padded (inputs with ``pad_id``, targets with IGNORE_INDEX; causal
    attention means the padding never influences real positions). Every token of
    ``s`` except the leading BOS is a target exactly once. Returns x, y: [W, L].
    """
    import torch

    if len(ids) < 2:
        raise ValueError("a validation document needs at least one token after BOS")
    xs, ys = [], []
    for k in range(0, len(ids) - 1, seq_len):
        chunk = list(ids[k : k + seq_len + 1])
        x, y = chunk[:-1], chunk[1:]
        pad = seq_len - len(x)
        xs.append(x + [pad_id] * pad)
        ys.append(y + [IGNORE_INDEX] * pad)
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


def subset_windows(x: "torch.Tensor", y: "torch.Tensor", n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """n evenly spaced windows of x, y: [W, L] (all of them when n <= 0 or n >= W)."""
    import torch

    if n <= 0 or n >= x.shape[0]:
        return x, y
    idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
    return x[idx], y[idx]
