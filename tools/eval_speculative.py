#!/usr/bin/env python3
"""Speculative decoding on a target/draft pair: acceptance and speed.

    python tools/eval_speculative.py [--model DIR] [--draft DIR] [--k 2 4 6]
                                     [--device cpu] [--new-tokens 128] [--json OUT]

Defaults to the models shipped in fastllm/assets. For each prompt (opening
lines of held-out works by default) and each setting (greedy, and sampling at
temperature 0.8 with a fixed seed) it generates ``--new-tokens`` tokens
without a draft and with ``k`` proposals per round, and reports

    acceptance     = accepted draft tokens / proposed draft tokens
    tokens/round   = generated tokens / target passes (1 without a draft)
    speed-up       = wall-clock time without draft / with draft

Greedy outputs with a draft must equal those without (checked; a mismatch is
an error). Prints a Markdown table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

PROMPTS = (
    "ROMEO:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "KING HENRY:\nOnce more unto the breach, dear friends,",
    "Enter HAMLET.\n\nHAMLET:\n",
)
SETTINGS = {"greedy": dict(temperature=0.0), "T=0.8": dict(temperature=0.8, seed=0)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="target model (default: the shipped target)")
    p.add_argument("--draft", type=Path, default=None, help="draft model (default: the shipped draft)")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6], help="proposals per round to try")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def _timed(model: Any, prompt: str, params: dict[str, Any], **spec: Any) -> tuple[Any, float]:
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate(prompt, **params, **spec)
    sync()
    return out, time.perf_counter() - t0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from fastllm import Model
    from fastllm.cli import default_model_path, shipped_draft_path

    target_dir = args.model or default_model_path()
    draft_dir = args.draft or shipped_draft_path()
    if target_dir is None or draft_dir is None:
        raise SystemExit("no target/draft given and none shipped; pass --model and --draft")
    target = Model.from_pretrained(target_dir, device=args.device, dtype=args.dtype)
    draft = Model.from_pretrained(draft_dir, device=target.device, dtype=target.dtype)
    base = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    _timed(target, PROMPTS[0], {**base, "max_new_tokens": 8}, draft_model=draft)  # warm-up
    rows = []
    for name, setting in SETTINGS.items():
        params = {**base, **setting}
        plain = [_timed(target, p, params) for p in tqdm(PROMPTS, desc=f"{name} plain", leave=False)]
        t_plain = sum(t for _, t in plain)
        for k in args.k:
            runs = [_timed(target, p, params, draft_model=draft, num_speculative_tokens=k)
                    for p in tqdm(PROMPTS, desc=f"{name} k={k}", leave=False)]
            if name == "greedy":
                for (a, _), (b, _) in zip(plain, runs):
                    if a.token_ids != b.token_ids:
                        raise RuntimeError(f"greedy output with k={k} differs from the target's own")
            proposed = sum(o.num_draft_tokens for o, _ in runs)
            accepted = sum(o.num_accepted_draft_tokens for o, _ in runs)
            tokens = sum(len(o.token_ids) for o, _ in runs)
            passes = tokens - accepted  # each round commits its accepted drafts plus one token
            t_spec = sum(t for _, t in runs)
            rows.append(dict(setting=name, k=k, acceptance=accepted / max(proposed, 1), tokens_per_pass=tokens / passes,
                             plain_tok_s=sum(len(o.token_ids) for o, _ in plain) / t_plain,
                             spec_tok_s=tokens / t_spec, speedup=t_plain / t_spec))
    return dict(model=str(target_dir), draft=str(draft_dir), device=str(target.device), dtype=str(target.dtype),
                new_tokens=args.new_tokens, prompts=len(PROMPTS), results=rows)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{Path(report['model']).name} with draft {Path(report['draft']).name} on {report['device']} "
        f"({report['dtype']}), {report['prompts']} prompts x {report['new_tokens']} tokens:",
        "",
        "| sampling | k | acceptance | tokens / target pass | tok/s plain | tok/s speculative | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(f"| {r['setting']} | {r['k']} | {100 * r['acceptance']:.1f}% | {r['tokens_per_pass']:.2f} | "
                     f"{r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if min(args.k) < 1 or args.new_tokens < 1:
        raise SystemExit("--k values and --new-tokens must be >= 1")
    report = evaluate(args)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
