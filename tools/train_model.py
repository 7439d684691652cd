#!/usr/bin/env python3
"""Pre-train fastllm's shipped Shakespeare models (transformers LlamaForCausalLM, random init).

    python tools/train_model.py --tokenizer DIR --data DIR --out DIR --preset target [--max-minutes M]

Objective: next-token cross-entropy on random windows of ``--seq-len`` tokens cut
from the packed training stream (each training work is ``[BOS] ids [EOS]``; see
shakespeare_data.py). AdamW (betas 0.9/0.95, weight decay on matrices only), linear
warmup then cosine decay to ``lr * min_lr_ratio``, gradient clipping, bf16 autocast
on GPU (fp32 on CPU), optional residual/embedding dropout (forward hooks, training
only: the saved model is a plain Llama). The run stops at ``--max-steps`` or
``--max-minutes``, whichever comes first; the cosine follows whichever budget is
further along, so a time-capped run still anneals. Bitwise reproducible from
``--seed`` when the step budget binds (on CPU; GPU kernels add tiny noise).

Validation = the whole works in ``shakespeare_data.VALIDATION_WORKS`` (julius_caesar,
lovers_complaint, much_ado_about_nothing, richard_ii), evaluated every
``--eval-every`` steps; ``--keep best`` (default) exports the weights with the lowest
validation loss (mild early stopping: the reported score is then slightly optimistic).

Bits per byte (``val_bits_per_byte`` in training_info.json), measured on the saved
weights (rounded to ``--dtype``) reloaded in fp32:
    sum over validation works of -ln p(t_i | t_<i) over every text token (each work is
    [BOS] + text tokens, cut into non-overlapping windows of seq_len, BOS given, no EOS)
    / ln 2 / total UTF-8 bytes of the validation files.

Output: config.json, model.safetensors (--dtype, tied embeddings), generation_config.json
(do_sample, temperature 0.8, top_k 50, stops at <|eos|> or <|end|>), the tokenizer files,
training_info.json. Presets (vocab 8192): target 15.15M params, draft 1.84M, tiny for tests.
H100 estimate (bf16, eager, sdpa, launch-bound at these sizes): target ~0.8M tokens/s
(~20 ms per 16k-token step), draft ~1.6M tokens/s; with start-up, evaluation and sampling
each preset's default run takes well under a minute (--max-minutes caps it regardless).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shakespeare_data as sd  # noqa: E402

# The corpus is small (~1.29M training tokens with the 8192 vocabulary), so runs are sized in
# epochs, not minutes: scaled-down CPU runs (1.8M params on 126k tokens, a similar params per
# token ratio as target) had their best validation loss after ~6-7 annealed epochs; 10 epochs
# with dropout 0.2 and 7 epochs with dropout 0.1 were both worse than without dropout.
PRESETS: dict[str, dict[str, Any]] = {
    # 8 layers x (attn 393k + mlp 1.11M) + 3.15M tied embedding = 15.15M params.
    # 600 steps x 16,384 tokens = 9.8M tokens = 7.6 epochs; H100 estimate ~0.8M tok/s -> ~15 s.
    "target": dict(hidden_size=384, layers=8, heads=6, kv_heads=2, intermediate_size=960, seq_len=512,
                   batch_size=32, lr=1.5e-3, warmup_steps=50, max_steps=600, max_minutes=6.0,
                   eval_every=50, dropout=0.0),
    # 4 layers x 197k + 1.05M tied embedding = 1.84M params; head_dim 64 like the target.
    # 1200 steps x 16,384 tokens = 19.7M tokens = 15 epochs; H100 estimate ~1.6M tok/s -> ~15 s.
    "draft": dict(hidden_size=128, layers=4, heads=2, kv_heads=1, intermediate_size=384, seq_len=512,
                  batch_size=32, lr=3e-3, warmup_steps=50, max_steps=1200, max_minutes=3.0,
                  eval_every=100, dropout=0.0),
    "tiny": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, seq_len=64,
                 batch_size=8, lr=3e-3, warmup_steps=5, max_steps=40, max_minutes=0.0,
                 eval_every=20, dropout=0.0),
}
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAMPLE_PROMPTS = ("KING.\n", "To be, or not to be", "O Romeo, Romeo!")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True, help="directory written by train_tokenizer.py")
    p.add_argument("--data", type=Path, default=None, help="corpus directory (default $FASTLLM_SHAKESPEARE_DIR or <repo>/../shared/data/shakespeare)")
    p.add_argument("--out", type=Path, required=True, help="output Hugging Face model directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="target")
    for key, value in PRESETS["target"].items():  # every preset value can be overridden
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"preset override ({key})")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * ratio")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-windows", type=int, default=0, help="validation windows per periodic eval (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--keep", choices=("best", "last"), default="best", help="export the best-validation or the last weights")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="bf16", help="dtype of model.safetensors")
    p.add_argument("--compile", action="store_true", help="torch.compile the training model")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="write last.pt/best.pt here at every eval")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/last.pt")
    p.add_argument("--samples", type=int, default=len(SAMPLE_PROMPTS), help="sample generations at the end")
    p.add_argument("--sample-tokens", type=int, default=120)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.hidden_size % args.heads or args.heads % args.kv_heads:
        p.error(f"hidden-size ({args.hidden_size}) must divide by heads ({args.heads}) and heads by kv-heads ({args.kv_heads})")
    if (args.hidden_size // args.heads) % 2:
        p.error("head dim (hidden-size / heads) must be even for rotary embeddings")
    if min(args.seq_len, args.batch_size, args.max_steps, args.eval_every, args.layers) < 1 or not 0 <= args.dropout < 1:
        p.error("seq-len, batch-size, max-steps, eval-every and layers must be >= 1 and 0 <= dropout < 1")
    if args.resume and args.ckpt_dir is None:
        p.error("--resume needs --ckpt-dir")
    return args


def load_tokenizer(tok_dir: Path) -> tuple[Any, dict[str, int]]:
    """The ``tokenizers.Tokenizer`` of ``tok_dir`` and the ids of its bos/eos/pad tokens."""
    from tokenizers import Tokenizer

    cfg_path, tok_path = tok_dir / "tokenizer_config.json", tok_dir / "tokenizer.json"
    if not tok_path.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"{tok_dir} lacks tokenizer.json/tokenizer_config.json; run tools/train_tokenizer.py first")
    tok = Tokenizer.from_file(str(tok_path))
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    ids = {}
    for role in ("bos", "eos", "pad"):
        name = cfg.get(f"{role}_token")
        ids[role] = tok.token_to_id(name) if isinstance(name, str) else None
        if ids[role] is None:
            raise ValueError(f"{cfg_path}: {role}_token {name!r} is missing from the vocabulary")
    end = tok.token_to_id("<|end|>")
    ids["end"] = end if end is not None else ids["eos"]
    return tok, ids


def build_model(args: argparse.Namespace, vocab_size: int, ids: dict[str, int]) -> torch.nn.Module:
    """Random-initialised LlamaForCausalLM (sdpa attention, tied embeddings), seeded on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads, max_position_embeddings=args.seq_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    if args.dropout > 0:  # GPT-2 style dropout on the embedding and on each residual branch output
        def drop(module: torch.nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return F.dropout(out, args.dropout, module.training)

        model.model.embed_tokens.register_forward_hook(drop)
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(drop)
            layer.mlp.down_proj.register_forward_hook(drop)
    return model


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on >= 2-D tensors (matrices, embedding), none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from lr to lr*min_lr_ratio over ``progress`` in [0, 1]."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    low = args.lr * args.min_lr_ratio
    return low + 0.5 * (args.lr - low) * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA, a no-op elsewhere (CPU trains in fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
             amp: bool = True) -> tuple[float, int]:
    """Summed next-token cross-entropy in nats and the number of targets over windows x, y: [W, L]."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with autocast(device, amp):
            logits = model(input_ids=xb, use_cache=False).logits  # [b, L, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), ignore_index=sd.IGNORE_INDEX, reduction="sum")
        nats += loss.item()
        count += int((yb != sd.IGNORE_INDEX).sum())
    model.train(was_training)
    return nats, count


def prepare_data(args: argparse.Namespace, tok: Any, ids: dict[str, int]) -> dict[str, Any]:
    """Tokenize the split: packed training stream, validation windows, fixed train-eval windows."""
    train_paths, val_paths = sd.split_works(args.data)
    train_texts = [sd.read_text(p) for p in train_paths]
    val_texts = [sd.read_text(p) for p in val_paths]
    train_ids = [e.ids for e in tok.encode_batch(train_texts, add_special_tokens=False)]
    val_ids = [e.ids for e in tok.encode_batch(val_texts, add_special_tokens=False)]
    stream = sd.pack_documents(train_ids, ids["bos"], ids["eos"])
    windows = [sd.document_windows([ids["bos"], *doc], args.seq_len, ids["pad"]) for doc in val_ids]
    val_x, val_y = torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows])
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_train_eval = min(64, max(8, val_x.shape[0]))
    train_x, train_y = sd.sample_batch(stream, n_train_eval, args.seq_len, gen)
    return dict(train_works=[p.stem for p in train_paths], val_works=[p.stem for p in val_paths], stream=stream,
                val_x=val_x, val_y=val_y, train_x=train_x, train_y=train_y, val_bytes=sd.utf8_bytes(val_texts),
                val_tokens=sum(len(d) for d in val_ids), train_bytes=sd.utf8_bytes(train_texts))


def save_checkpoint(args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator, st: dict[str, Any]) -> None:
    """``ckpt_dir/last.pt``: weights, optimizer, batch RNG and loop state (incl. the best weights)."""
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = args.ckpt_dir / "last.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "batch_rng": gen.get_state(),
                "state": st, "args": {k: str(v) for k, v in vars(args).items()}}, tmp)
    tmp.replace(args.ckpt_dir / "last.pt")


def train(args: argparse.Namespace, model: torch.nn.Module, data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The optimisation loop. Returns its state: step, tokens, timings, eval history, best weights."""
    net = torch.compile(model) if args.compile else model
    opt = make_optimizer(model, args, device)
    stream, gen = data["stream"].to(device), torch.Generator().manual_seed(args.seed)
    val_x, val_y = sd.subset_windows(data["val_x"], data["val_y"], args.eval_windows)
    bpb_scale = data["val_tokens"] / (math.log(2) * data["val_bytes"])  # mean nats/token -> bits/byte
    st: dict[str, Any] = dict(step=0, tokens=0, elapsed=0.0, eval_time=0.0, best_val=math.inf, best_step=0,
                              best_state=None, history=[], recent_losses=[])
    if args.resume:
        ck = torch.load(args.ckpt_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["batch_rng"])
        st.update(ck["state"])

    def run_eval() -> dict[str, float]:
        t = time.time()
        vn, vc = evaluate(model, val_x, val_y, args.eval_batch_size, device)
        tn, tc = evaluate(model, data["train_x"], data["train_y"], args.eval_batch_size, device)
        rec = dict(step=st["step"], tokens=st["tokens"], train_loss=tn / tc, val_loss=vn / vc, val_bpb=vn / vc * bpb_scale)
        st["history"].append(rec)
        if rec["val_loss"] < st["best_val"]:
            st.update(best_val=rec["val_loss"], best_step=st["step"],
                      best_state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        st["eval_time"] += time.time() - t
        if args.ckpt_dir is not None:
            st["elapsed"] = time.time() - t0
            save_checkpoint(args, model, opt, gen, st)
        tqdm.write(f"step {rec['step']:>6}  tokens {rec['tokens']:>12,}  train(eval) {rec['train_loss']:.4f}  "
                   f"val {rec['val_loss']:.4f}  val bpb~{rec['val_bpb']:.4f}")
        return rec

    B, L, max_s, log_every = args.batch_size, args.seq_len, args.max_minutes * 60.0, 10
    t0 = time.time() - st["elapsed"]
    if st["step"] == 0:
        st["initial_val_loss"] = run_eval()["val_loss"]
    pbar = tqdm(total=args.max_steps, initial=st["step"], disable=args.quiet, unit="step", dynamic_ncols=True)
    loss_acc, n_acc, tick = torch.zeros((), device=device), 0, (time.time(), st["tokens"])
    net.train()
    while True:
        elapsed = time.time() - t0
        if st["step"] >= args.max_steps or (max_s > 0 and elapsed >= max_s):
            break
        by_steps = (st["step"] - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        lr = lr_at(st["step"], max(by_steps, elapsed / max_s if max_s > 0 else 0.0), args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = sd.sample_batch(stream, B, L, gen)  # [B, L] each
        with autocast(device):
            logits = net(input_ids=x, use_cache=False).logits  # [B, L, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        st["step"] += 1
        st["tokens"] += B * L
        loss_acc += loss.detach()
        n_acc += 1
        if st["step"] == 1:
            st["initial_train_loss"] = loss.item()
        if n_acc == log_every or st["step"] == args.max_steps:  # one host sync per log_every steps
            mean = (loss_acc / n_acc).item()
            st["recent_losses"] = (st["recent_losses"] + [mean])[-5:]
            now = time.time()
            tps = (st["tokens"] - tick[1]) / max(now - tick[0], 1e-9)
            pbar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            loss_acc.zero_()
            n_acc, tick = 0, (now, st["tokens"])
        pbar.update(1)
        if st["step"] % args.eval_every == 0:
            run_eval()
            tick = (time.time(), st["tokens"])
    pbar.close()
    if not st["history"] or st["history"][-1]["step"] != st["step"]:
        run_eval()
    st["elapsed"] = time.time() - t0
    return st


def export(args: argparse.Namespace, model: torch.nn.Module, state: dict[str, torch.Tensor], ids: dict[str, int]) -> None:
    """Write the Hugging Face directory: config, weights in --dtype, generation config, tokenizer files."""
    from transformers import GenerationConfig

    model = model.to("cpu")
    model.load_state_dict(state)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=sorted({ids["eos"], ids["end"]}), pad_token_id=ids["pad"],
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=256,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(SAVE_DTYPES[args.dtype]).save_pretrained(str(args.out), safe_serialization=True)
    model.float()
    for name in TOKENIZER_FILES:
        shutil.copy2(args.tokenizer / name, args.out / name)
    cfg_path = args.out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["model_max_length"] = args.seq_len
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name in ("config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES):
        (args.out / name).chmod(0o644)  # safetensors writes 0600; shipped assets must be world-readable


def generate_samples(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> list[dict[str, str]]:
    """Sample completions of a few prompts with transformers ``generate`` (seeded, saved generation config)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.out))
    torch.manual_seed(args.seed)
    samples = []
    for i in range(args.samples):
        prompt = SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]
        enc = tok(prompt, return_tensors="pt").to(device)
        n_new = max(1, min(args.sample_tokens, args.seq_len - enc["input_ids"].shape[1]))
        config = copy.deepcopy(model.generation_config)
        config.max_new_tokens = n_new
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config)
        samples.append({"prompt": prompt, "completion": tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return samples


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: train, export, evaluate the saved weights, sample; returns training_info."""
    from transformers import AutoModelForCausalLM
    import transformers

    start = time.time()
    args = parse_args(argv)
    args.data = args.data or sd.default_data_dir()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA, but torch sees no GPU")
    torch.set_float32_matmul_precision("high")
    tok, ids = load_tokenizer(args.tokenizer)
    data = prepare_data(args, tok, ids)
    model = build_model(args, tok.get_vocab_size(), ids).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel()
    print(f"{args.preset}: {n_params:,} params ({n_params - n_embed:,} non-embedding) on {device}; "
          f"{data['stream'].numel():,} training tokens, {data['val_x'].shape[0]} validation windows of {args.seq_len}")
    st = train(args, model, data, device)
    keep = st["best_state"] if args.keep == "best" and st["best_state"] is not None else model.state_dict()
    kept_step = st["best_step"] if keep is st["best_state"] else st["step"]
    export(args, model, keep, ids)

    torch.set_float32_matmul_precision("highest")  # the reported score is exact fp32 on the saved weights
    saved = AutoModelForCausalLM.from_pretrained(str(args.out)).float().to(device).eval()
    vn, vc = evaluate(saved, data["val_x"], data["val_y"], args.eval_batch_size, device, amp=False)
    tn, tc = evaluate(saved, data["train_x"], data["train_y"], args.eval_batch_size, device, amp=False)
    samples = generate_samples(saved, args, device) if args.samples > 0 else []
    info = {
        "preset": args.preset,
        "model": {k: getattr(args, k) for k in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "seq_len")},
        "parameters": n_params, "non_embedding_parameters": n_params - n_embed, "vocab_size": tok.get_vocab_size(),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": st["step"], "tokens_seen": st["tokens"], "epochs": st["tokens"] / data["stream"].numel(),
        "kept": args.keep, "kept_step": kept_step,
        "train_time_s": st["elapsed"], "wall_time_s": time.time() - start,
        "train_tokens_per_s": st["tokens"] / max(st["elapsed"] - st["eval_time"], 1e-9),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "initial_train_loss": st.get("initial_train_loss"), "initial_val_loss": st.get("initial_val_loss"),
        "final_train_loss": sum(st["recent_losses"]) / max(1, len(st["recent_losses"])),
        "train_eval_loss": tn / tc, "val_loss": vn / vc,
        "val_bits_per_byte": vn / math.log(2) / data["val_bytes"],
        "val_tokens": vc, "val_bytes": data["val_bytes"], "train_tokens": data["stream"].numel(),
        "train_bytes": data["train_bytes"], "validation_works": data["val_works"], "train_works": data["train_works"],
        "bits_per_byte_definition": "sum of next-token nats over every text token of each validation work "
                                    "([BOS]+tokens, non-overlapping seq_len windows, fp32, saved weights) / ln 2 / "
                                    "UTF-8 bytes of the validation files",
        "seed": args.seed, "git_commit": sd.git_commit(), "eval_history": st["history"], "samples": samples,
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    for s in samples:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
    print(f"done: val loss {info['val_loss']:.4f}, val bits/byte {info['val_bits_per_byte']:.4f}, "
          f"{st['tokens']:,} tokens ({info['epochs']:.1f} epochs) in {st['elapsed']:.0f} s "
          f"({info['train_tokens_per_s']:,.0f} tok/s) -> {args.out}")
    return info


if __name__ == "__main__":
    main()
