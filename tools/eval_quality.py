#!/usr/bin/env python3
"""Quality of a model under fastllm's quantization: perplexity and greedy text.

    python tools/eval_quality.py --model DIR [--quantization none int8 int4-g128 ...]
                                 [--data DIR] [--device cpu] [--dtype bfloat16] [--json OUT]

For each setting the model is loaded with ``fastllm.Model.from_pretrained(...,
quantization=...)`` and scored on the held-out works of the Shakespeare corpus
(``shakespeare_data.VALIDATION_WORKS``), with the definition train_model.py
reports: every work is ``[BOS] + text tokens``, cut into non-overlapping windows
of ``--seq-len`` tokens (BOS given, every text token predicted exactly once);

    nats/token = sum of -ln p(t_i | t_<i) / number of text tokens
    perplexity = exp(nats/token)
    bits/byte  = sum of -ln p / ln 2 / UTF-8 bytes of the works

With ``--max-windows N`` only N evenly spaced windows are scored, and the bytes
are those of the text their target tokens decode to.

Then greedy continuations of a fixed prompt, for a side-by-side comparison.
Prints a Markdown table (relative change of perplexity against the first
setting) and writes the numbers as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shakespeare_data as sd  # noqa: E402

DEFAULT_SETTINGS = ("none", "int8", "int4-g32", "int4-g64", "int4-g128")
PROMPT = "ROMEO:\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--quantization", nargs="+", default=list(DEFAULT_SETTINGS),
                   help="settings to compare: none, int8, int4, int4-g32, int4-g64, int4-g128")
    p.add_argument("--data", type=Path, default=None, help="corpus directory (default: the shared Shakespeare corpus)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="activation/weight dtype (default: the model's 16-bit type)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=0, help="score only this many windows (0 = all)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.data = args.data or sd.default_data_dir()
    try:  # the corpus is read after the first model loads: check it now
        sd.split_works(args.data)
    except (OSError, ValueError) as e:
        p.error(str(e) if "--data" in str(e) else f"{e}; pass --data DIR (the directory of the Shakespeare works)")
    return args


def decoded_bytes(tokenizer: Any, ids: list[int], start: int, end: int) -> int:
    """UTF-8 bytes of the text ``ids[start:end]`` add to the decoded ``ids[:start]`` (decoding the
    prefixes keeps spaces and multi-byte characters at the cut where the whole text has them, so
    the bytes of consecutive spans add up to those of the whole)."""
    def size(n: int) -> int:
        return len(tokenizer.decode(ids[:n]).encode("utf-8")) if n else 0

    return size(end) - size(start)


def validation_windows(tokenizer: Any, data_dir: Path, seq_len: int, max_windows: int) -> dict[str, Any]:
    """Token windows x, y [W, L] of the validation works (``max_windows`` of them
    when > 0), the works' names and the UTF-8 bytes of the windows' targets."""
    _, val_paths = sd.split_works(data_dir)
    texts = [sd.read_text(p) for p in val_paths]
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; the score is defined for [BOS] + text")
    pad = bos if pad is None else pad
    docs = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    xs, ys, spans = [], [], []  # spans: (work, first target token) of every window
    for d, ids in enumerate(docs):
        x, y = sd.document_windows([bos, *ids], seq_len, pad)
        xs.append(x)
        ys.append(y)
        spans += [(d, k * seq_len) for k in range(x.shape[0])]
    every = torch.arange(len(spans))[:, None]
    keep = sd.subset_windows(every, every, max_windows)[0][:, 0]  # the windows subset_windows keeps
    if len(keep) == len(spans):
        n_bytes = sd.utf8_bytes(texts)  # exactly the works, as train_model.py counts them
    else:
        kept = [spans[i] for i in keep.tolist()]
        n_bytes = sum(decoded_bytes(tokenizer, docs[d], k, k + seq_len) for d, k in kept)
    return dict(x=torch.cat(xs)[keep], y=torch.cat(ys)[keep], works=[p.stem for p in val_paths], bytes=n_bytes)


def score(model: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int, label: str) -> tuple[float, int]:
    """Summed next-token nats and the number of targets (IGNORE_INDEX skipped)."""
    nats, count = 0.0, 0
    for i in tqdm(range(0, x.shape[0], batch_size), desc=label, unit="batch", leave=False):
        xb, yb = x[i : i + batch_size].to(model.device), y[i : i + batch_size].to(model.device)
        logits = model.forward(xb)  # [b, L, V] fp32
        nats += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), ignore_index=sd.IGNORE_INDEX, reduction="sum").item()
        count += int((yb != sd.IGNORE_INDEX).sum())
    return nats, count


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from fastllm import Model

    data_dir = args.data
    results: list[dict[str, Any]] = []
    windows = None
    for setting in args.quantization:
        quant = None if setting == "none" else setting
        t0 = time.time()
        model = Model.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantization=quant)
        if windows is None:
            seq_len = args.seq_len or model.config.max_position_embeddings
            windows = validation_windows(model.tokenizer, data_dir, seq_len, args.max_windows)
        nats, count = score(model, windows["x"], windows["y"], args.batch_size, setting)
        text = model.generate(args.prompt, max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True).text
        weights = sum(t.numel() * t.element_size() for t in model.network.state_dict().values())
        results.append(dict(quantization=setting, nats_per_token=nats / count, perplexity=math.exp(nats / count),
                            bits_per_byte=nats / math.log(2) / windows["bytes"], tokens=count,
                            weight_bytes=weights, greedy=text, seconds=time.time() - t0))
        del model
    base = results[0]["perplexity"]
    for r in results:
        r["perplexity_change"] = r["perplexity"] / base - 1.0
    return dict(model=str(args.model), device=args.device, dtype=args.dtype, works=windows["works"],
                bytes=windows["bytes"], windows=int(windows["x"].shape[0]), seq_len=int(windows["x"].shape[1]),
                prompt=args.prompt, results=results)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| weights | perplexity | vs first | bits/byte | weight MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(f"| {r['quantization']} | {r['perplexity']:.3f} | {100 * r['perplexity_change']:+.2f}% | "
                     f"{r['bits_per_byte']:.4f} | {r['weight_bytes'] / 1e6:.1f} |")
    lines.append("")
    lines.append(f"Greedy continuations of {report['prompt']!r}:")
    for r in report["results"]:
        lines.append(f"\n{r['quantization']}:\n```\n{report['prompt']}{r['greedy']}\n```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = evaluate(args)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
