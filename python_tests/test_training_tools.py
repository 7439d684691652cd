"""Fast CPU tests of the training tools (tools/train_tokenizer.py, tools/train_model.py).

A small corpus is cut from the Shakespeare works in ``<repo>/../shared/data/shakespeare``
(or ``$FASTLLM_SHAKESPEARE_DIR``); the tests skip cleanly when it is absent. A tokenizer
with a 512-token vocabulary and the ``tiny`` model preset are trained for a handful of
steps, then the saved directory is reloaded with transformers and the reported bits per
byte is recomputed independently.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import eval_quality  # noqa: E402
import shakespeare_data as sd  # noqa: E402
import train_model  # noqa: E402
import train_tokenizer  # noqa: E402

DATA = sd.default_data_dir()
pytestmark = pytest.mark.skipif(
    not (DATA / "hamlet.txt").is_file(), reason=f"Shakespeare corpus not found at {DATA} (set ${sd.ENV_DATA_DIR})"
)
TRAIN_SUBSET = ("comedy_of_errors", "hamlet", "sonnets")
VOCAB = 512


def _head(path: Path, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of a file, cut back to the last full line."""
    data = path.read_bytes()[:n_bytes]
    return data[: data.rfind(b"\n") + 1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-train-work / 4-validation-work corpus, each work truncated (same file names)."""
    out = tmp_path_factory.mktemp("corpus")
    for name in TRAIN_SUBSET:
        (out / f"{name}.txt").write_bytes(_head(DATA / f"{name}.txt", 40_000))
    for name in sd.VALIDATION_WORKS:
        (out / f"{name}.txt").write_bytes(_head(DATA / f"{name}.txt", 5_000))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tok")
    info = train_tokenizer.main(["--data", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB), "--quiet"])
    return out, info


@pytest.fixture(scope="module")
def trained(corpus: Path, tokenizer_dir: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("model")
    info = train_model.main([
        "--tokenizer", str(tokenizer_dir[0]), "--data", str(corpus), "--out", str(out), "--preset", "tiny",
        "--max-steps", "40", "--device", "cpu", "--samples", "1", "--sample-tokens", "12", "--quiet",
    ])
    return out, info


# --- data split ---------------------------------------------------------------------------


def test_validation_split_is_whole_disjoint_works() -> None:
    train, val = sd.split_works(DATA)
    train_names, val_names = {p.stem for p in train}, {p.stem for p in val}
    assert val_names == set(sd.VALIDATION_WORKS)
    assert not train_names & val_names
    assert train_names | val_names == set(sd.list_works(DATA))


def test_split_refuses_missing_validation_work(tmp_path: Path) -> None:
    (tmp_path / "hamlet.txt").write_text("To be.\n")
    with pytest.raises(ValueError, match="validation works"):
        sd.split_works(tmp_path)
    with pytest.raises(FileNotFoundError):
        sd.split_works(tmp_path / "nowhere")


def test_document_windows_predict_every_token_once() -> None:
    ids = list(range(100, 100 + 23))  # BOS stand-in + 22 tokens
    x, y = sd.document_windows(ids, seq_len=5, pad_id=7)
    assert x.shape == y.shape and x.shape[1] == 5
    targets = y[y != sd.IGNORE_INDEX].tolist()
    assert targets == ids[1:]  # every token after the first, once, in order
    assert (x[y == sd.IGNORE_INDEX] == 7).all()


def test_lr_schedule_warmup_and_cosine() -> None:
    args = train_model.parse_args(["--tokenizer", "t", "--out", "o", "--preset", "tiny", "--lr", "1e-2", "--warmup-steps", "10"])
    assert train_model.lr_at(0, 0.0, args) == pytest.approx(1e-3)
    assert train_model.lr_at(10, 0.0, args) == pytest.approx(1e-2)
    assert train_model.lr_at(50, 1.0, args) == pytest.approx(1e-2 * args.min_lr_ratio)
    with pytest.raises(SystemExit):
        train_model.parse_args(["--tokenizer", "t", "--out", "o", "--preset", "tiny", "--heads", "3"])


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trip_and_bos(tokenizer_dir: tuple[Path, dict[str, Any]]) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out, info = tokenizer_dir
    assert info["vocab_size"] == VOCAB
    assert set(info["validation_works"]) == set(sd.VALIDATION_WORKS)
    assert not set(info["train_works"]) & set(info["validation_works"])
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(out))
    assert [raw.token_to_id(t) for t in train_tokenizer.SPECIAL_TOKENS] == list(range(7))
    text = "Wherefore art thou, Romeo?\n\n  Deny thy father -- 'tis Ünïcödé\tand 42 € ✓\n"
    ids = raw.encode(text).ids
    assert ids[0] == raw.token_to_id("<|bos|>") == hf.bos_token_id
    assert hf(text)["input_ids"] == ids
    assert raw.decode(ids, skip_special_tokens=True) == text
    assert hf.decode(ids, skip_special_tokens=True) == text
    assert hf.eos_token == "<|eos|>" and hf.pad_token == "<|pad|>"


def test_chat_template_renders(tokenizer_dir: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir[0]))
    messages = [
        {"role": "system", "content": "Speak in verse."},
        {"role": "user", "content": "Who's there?"},
        {"role": "assistant", "content": "Nay, answer me."},
    ]
    full = hf.apply_chat_template(messages, tokenize=False)
    assert full == ("<|bos|><|system|>\nSpeak in verse.<|end|>\n<|user|>\nWho's there?<|end|>\n"
                    "<|assistant|>\nNay, answer me.<|end|>\n")
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWho's there?<|end|>\n<|assistant|>\n")
    ids = hf(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(hf.bos_token_id) == 1 and ids[0] == hf.bos_token_id
    assert hf.convert_tokens_to_ids("<|assistant|>") in ids
    with pytest.raises(Exception):
        hf.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)
    jinja2 = pytest.importorskip("jinja2.sandbox")  # fastllm renders templates in this sandbox
    env = jinja2.ImmutableSandboxedEnvironment()
    rendered = env.from_string(hf.chat_template).render(messages=messages[:2], bos_token="<|bos|>", add_generation_prompt=True)
    assert rendered == prompt


def test_tokenizer_rejects_tiny_vocab(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab-size"):
        train_tokenizer.main(["--data", str(corpus), "--out", str(tmp_path), "--vocab-size", "100", "--quiet"])


# --- model training -----------------------------------------------------------------------


def test_training_reduces_loss(trained: tuple[Path, dict[str, Any]]) -> None:
    _, info = trained
    assert info["initial_val_loss"] == pytest.approx(math.log(VOCAB), abs=0.1)
    assert info["initial_train_loss"] == pytest.approx(math.log(VOCAB), abs=0.1)
    assert info["val_loss"] < info["initial_val_loss"] - 0.5
    assert info["final_train_loss"] < info["initial_train_loss"] - 0.5
    assert info["steps"] == 40 and info["tokens_seen"] == 40 * 8 * 64
    assert not set(info["validation_works"]) & set(info["train_works"])
    assert set(info["validation_works"]) == set(sd.VALIDATION_WORKS)
    assert set(info["train_works"]) == set(TRAIN_SUBSET)
    assert info["samples"] and info["samples"][0]["prompt"]


def test_saved_directory_loads_in_transformers(trained: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = trained
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "training_info.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = model.config
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.vocab_size == VOCAB == len(tok)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 64
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] and tok.eos_token_id in gen["eos_token_id"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bits_per_byte_recomputed_independently(trained: tuple[Path, dict[str, Any]], corpus: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = trained
    model = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    window = model.config.max_position_embeddings
    nats, n_tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for name in info["validation_works"]:
            text = (corpus / f"{name}.txt").read_bytes().decode("utf-8")
            ids = tok(text, verbose=False)["input_ids"]
            assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
            for k in range(0, len(ids) - 1, window):  # non-overlapping windows, BOS never a target
                chunk = torch.tensor(ids[k : k + window + 1])[None]
                logits = model(input_ids=chunk[:, :-1]).logits[0]
                nats += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
                n_tokens += chunk.shape[1] - 1
            n_bytes += len(text.encode("utf-8"))
    assert n_tokens == info["val_tokens"] and n_bytes == info["val_bytes"]
    assert nats / n_tokens == pytest.approx(info["val_loss"], rel=1e-4)
    assert nats / math.log(2) / n_bytes == pytest.approx(info["val_bits_per_byte"], rel=1e-4)


# --- quality under quantization (tools/eval_quality.py) -----------------------------------


def test_eval_quality_matches_training_score_and_orders_settings(trained, corpus: Path, tmp_path: Path) -> None:
    """fastllm's fp32 forward scores the validation works exactly as the training
    script (transformers) did; quantized settings are scored on the same windows."""
    out, info = trained
    report = eval_quality.main(["--model", str(out), "--data", str(corpus), "--dtype", "float32",
                                "--quantization", "none", "int8", "int4-g32", "--new-tokens", "8",
                                "--json", str(tmp_path / "q.json")])
    none, int8, int4 = report["results"]
    assert none["tokens"] == info["val_tokens"] and report["bytes"] == info["val_bytes"]
    assert none["bits_per_byte"] == pytest.approx(info["val_bits_per_byte"], rel=1e-4)
    assert none["perplexity_change"] == 0.0
    assert abs(int8["perplexity_change"]) < 0.01  # int8 per channel: nearly lossless
    assert int4["weight_bytes"] < int8["weight_bytes"] < none["weight_bytes"]
    assert all(isinstance(r["greedy"], str) and r["greedy"] for r in report["results"])
    assert json.loads((tmp_path / "q.json").read_text())["results"][1]["quantization"] == "int8"
