#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of fastllm's shipped Shakespeare models.

    python tools/train_tokenizer.py --data DIR --out DIR [--vocab-size 8192]

Fits a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer with the GPT-2 split
regex, no prefix space, ByteLevel decoder, so ``decode(encode(text)) == text`` for
any UTF-8 text) on the TRAINING works only (the validation works listed in
``shakespeare_data.VALIDATION_WORKS`` are never seen).

Special tokens (always the first ids, in this order):

    0 <|bos|>        start of a document; the post-processor prepends it
    1 <|eos|>        end of a document (training separates works with EOS, BOS)
    2 <|pad|>        padding only, never trained on
    3 <|system|>  4 <|user|>  5 <|assistant|>    chat role headers
    6 <|end|>        end of a chat turn (generation_config stops on it too)

Chat template (ChatML-like, jinja)::

    <|bos|><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n

``add_generation_prompt`` appends ``<|assistant|>\\n``; roles other than
system/user/assistant raise. The rendered text already starts with BOS, so encode
it with ``add_special_tokens=False``. The chat tokens are reserved for a later
chat fine-tune: pre-training never sees them.

Output (the layout ``transformers`` writes, portable across transformers 4.x and
5.x): ``tokenizer.json`` (loads with ``tokenizers.Tokenizer.from_file``) and
``tokenizer_config.json`` (tokenizer_class PreTrainedTokenizerFast, bos/eos/pad,
additional_special_tokens, chat_template, model_max_length). The script reloads
the directory with both libraries and checks a round trip before it returns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shakespeare_data as sd  # noqa: E402

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_TOKENS)
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "{{- raise_exception('chat roles are system, user and assistant, got ' ~ message['role']) }}\n"
    "{%- endif %}\n"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|assistant|>\\n' }}\n"
    "{%- endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2, progress: bool = True) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (whole documents).

    The vocabulary holds the special tokens (ids 0..6), the 256 byte symbols and
    ``vocab_size - 263`` merges (fewer if the corpus runs out of pairs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size <= minimum:
        raise ValueError(f"--vocab-size must exceed {minimum} (special tokens + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def portable_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json readable by transformers 4.x and 5.x alike."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(CHAT_TOKENS),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: Any, out: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out`` via transformers."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend" and chat_template.jinja, which
    # 4.x cannot read; keep one portable config with the template inside instead.
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (out / extra).unlink(missing_ok=True)
    config = portable_tokenizer_config(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def verify_tokenizer_dir(out: Path, sample: str) -> dict[str, Any]:
    """Reload ``out`` with tokenizers and transformers; check BOS, round trip and chat template."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(out))
    bos_id = raw.token_to_id(BOS)
    ids = raw.encode(sample).ids
    if ids[0] != bos_id or hf(sample)["input_ids"] != ids:
        raise RuntimeError(f"{out}: BOS is not prepended or the two libraries disagree")
    if raw.decode(ids, skip_special_tokens=True) != sample or hf.decode(ids, skip_special_tokens=True) != sample:
        raise RuntimeError(f"{out}: decode(encode(text)) != text")
    chat = hf.apply_chat_template([{"role": "user", "content": "Hail!"}], tokenize=False, add_generation_prompt=True)
    if chat != f"{BOS}<|user|>\nHail!<|end|>\n<|assistant|>\n":
        raise RuntimeError(f"{out}: unexpected chat rendering {chat!r}")
    return {"vocab_size": raw.get_vocab_size(), "special_ids": {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}}


def train_tokenizer(
    data_dir: Path, out: Path, vocab_size: int = 8192, model_max_length: int = 512, progress: bool = True
) -> dict[str, Any]:
    """Train on the training works of ``data_dir``, save to ``out``, verify; return a summary."""
    train_paths, val_paths = sd.split_works(data_dir)
    texts = [sd.read_text(p) for p in train_paths]
    t0 = time.time()
    tok = build_tokenizer(texts, vocab_size, progress=progress)
    save_tokenizer(tok, out, model_max_length)
    info = verify_tokenizer_dir(out, texts[0][:1000])
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    n_bytes = sd.utf8_bytes(texts)
    info.update(
        train_works=[p.stem for p in train_paths],
        validation_works=[p.stem for p in val_paths],
        train_bytes=n_bytes,
        train_tokens=n_tokens,
        bytes_per_token=n_bytes / n_tokens,
        seconds=time.time() - t0,
    )
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help=f"corpus directory (default ${sd.ENV_DATA_DIR} or <repo>/../shared/data/shakespeare)")
    p.add_argument("--out", type=Path, required=True, help="output directory for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary incl. 7 special tokens (default 8192)")
    p.add_argument("--model-max-length", type=int, default=512, help="model_max_length written to tokenizer_config.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the summary it prints."""
    args = parse_args(argv)
    data = args.data or sd.default_data_dir()
    info = train_tokenizer(data, args.out, args.vocab_size, args.model_max_length, progress=not args.quiet)
    print(
        f"tokenizer: vocab {info['vocab_size']}, {len(info['train_works'])} training works, "
        f"{info['train_tokens']:,} tokens ({info['bytes_per_token']:.2f} bytes/token), "
        f"validation works {info['validation_works']} held out -> {args.out}"
    )
    return info


if __name__ == "__main__":
    main()
