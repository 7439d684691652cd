"""``fastllm.Model``: load a checkpoint, evaluate, generate, stream, chat."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from fastllm.cache import CachedSequence, KVCache, blocks_needed, device_scope, prepare_step
from fastllm.config import GenerationConfig, GenerationOutput, eos_ids_from_model_dir
from fastllm.cuda_graph import GraphedDecoding
from fastllm.generate import Request, holding, run
from fastllm.model import Transformer, load_network, parse_dtype, save_weights
from fastllm.model.config import ModelConfig
from fastllm.quant import QuantizationConfig
from fastllm.sampling import derive_seed
from fastllm.speculative import MAX_SPECULATIVE_TOKENS, SpecRunners, run_speculative
from fastllm.structured import as_structured_output, matcher_for
from fastllm.tools import plan_tools

DEFAULT_SPECULATIVE_TOKENS = 4
Prompt = Union[str, Sequence[int], Tensor]
Message = dict[str, Any]
# Files copied as they are by save_pretrained.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


SHIPPED_MODELS_DIR = Path(__file__).parent / "assets"


def shipped_model_dirs() -> list[Path]:
    """The model directories shipped in fastllm/assets, by name."""
    return sorted(p.parent for p in SHIPPED_MODELS_DIR.glob("*/config.json"))


def _resolve_model_dir(path: str | Path) -> Path:
    """``path`` if it is a directory, else the shipped model of that name
    (``"shakespeare-15m"``, ``"shakespeare-draft-2m"``)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.is_file():
        raise ValueError(f"{path} is a file; give the model directory (the one holding config.json) "
                         "or a shipped model's name")
    shipped = SHIPPED_MODELS_DIR / str(path)
    if len(p.parts) == 1 and (shipped / "config.json").is_file():
        return shipped
    names = [d.name for d in shipped_model_dirs()]
    raise FileNotFoundError(f"model directory {path} does not exist (shipped models: {', '.join(names) or 'none'})")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
    """fp32 on CPU; on a GPU the checkpoint's 16-bit dtype, else bf16."""
    if device.type == "cpu":
        return torch.float32
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class Model:
    """A decoder-only language model ready to generate.

    >>> m = Model.from_pretrained("path/to/hf-checkpoint")
    >>> m.generate("Hello", max_new_tokens=20).text
    """

    def __init__(
        self,
        network: Transformer,
        tokenizer,
        generation_config: GenerationConfig,
        eos_ids: list[int],
        path: Path | None = None,
        cuda_graphs: bool | None = None,
    ):
        self.network = network
        self.path = path
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.eos_ids = frozenset(eos_ids)
        self._graphs = GraphedDecoding.for_network(network, cuda_graphs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool | None = None,
        quantization: str | QuantizationConfig | None = None,
        cuda_graphs: bool | None = None,
    ) -> "Model":
        """Load a Hugging Face directory (config.json, *.safetensors, tokenizer
        files, generation_config.json), or the name of a shipped model
        ("shakespeare-15m", "shakespeare-draft-2m"). device: default cuda if available else
        cpu; dtype: float32/float16/bfloat16, default fp32 on CPU and the
        checkpoint's 16-bit dtype (else bf16) on a GPU. progress: show a
        loading bar (default: for checkpoints over 64 MB). quantization: "int8"
        (per-channel W8A16) or "int4" / "int4-g32|g64|g128" (group-wise W4A16),
        applied at load time; a checkpoint saved quantized loads as it was saved,
        4-bit GPTQ and AWQ (gemm) checkpoints repacked into fastllm's int4
        (see fastllm.quant_formats). cuda_graphs: replay decode steps from CUDA
        graphs (see fastllm.cuda_graph): None (the default) does on a GPU for
        every model that can (not mixture-of-experts ones), True asks for them
        (an error on the CPU, a warning for MoE models), False never does."""
        path = _resolve_model_dir(path)
        try:
            dev = torch.device(device) if device is not None else default_device()
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"invalid device {device!r}: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {dev} requested but torch sees no CUDA GPU")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} requested but torch sees {torch.cuda.device_count()} GPU(s)")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {dev}; use 'cpu' or 'cuda'")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        if cuda_graphs and dev.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the model goes to {dev}")
        cfg = ModelConfig.from_file(path / "config.json")
        # checked before the weights: a bad file fails fast
        defaults, eos = GenerationConfig.from_model_dir(path), eos_ids_from_model_dir(path)
        if eos is None:
            eos = cfg.eos_token_ids
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from fastllm.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        dt = parse_dtype(dtype) or default_dtype(dev, cfg.torch_dtype)
        network = load_network(path, dev, dt, progress, QuantizationConfig.parse(quantization), cfg)
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        return cls(network, tokenizer, defaults, eos, path, cuda_graphs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a Hugging Face directory: config.json (with ``quantization_config``
        when quantized), model.safetensors in the model's dtype, and the source
        checkpoint's tokenizer and generation files. Unquantized, transformers
        loads it; quantized, fastllm loads it without quantizing again."""
        path = Path(path)
        if self.path is not None and path.resolve() == self.path.resolve():
            raise ValueError("save_pretrained would overwrite the checkpoint it was loaded from; pick another directory")
        path.mkdir(parents=True, exist_ok=True)
        raw = dict(self.config.raw)
        raw["torch_dtype"] = str(self.dtype).replace("torch.", "")
        raw.pop("dtype", None)
        raw.pop("quantization_config", None)
        if self.network.quantization is not None:
            raw["quantization_config"] = self.network.quantization.to_json()
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        save_weights(self.network, path)
        if self.path is not None:
            for name in _SIDE_FILES:
                if (self.path / name).is_file():
                    shutil.copyfile(self.path / name, path / name)

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.network.embed_tokens.weight.device

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay from CUDA graphs."""
        return self._graphs is not None

    def free_cache(self) -> None:
        """Release the KV cache and graphs that graphed decoding keeps between
        calls (sized for the largest call so far); the next call builds them
        again. Raises while a stream still holds them."""
        if self._graphs is not None:
            self._graphs.release()

    @property
    def dtype(self) -> torch.dtype:
        return self.network.embed_tokens.weight.dtype

    # --------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits for every position, no cache: input_ids [B, T] -> [B, T, V] fp32."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D LongTensor [batch, tokens]")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integers, got {input_ids.dtype}")
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        for row in rows:
            self._check_ids(row)
        cache = self._new_cache([t] * b)
        seqs = [CachedSequence() for _ in rows]
        with device_scope(self.device):
            ids, positions, meta, _ = prepare_step(cache, seqs, rows)
            logits = self.network(ids, positions, cache.layers(), meta)
        return logits.view(b, t, -1)

    # --------------------------------------------------------------- generation
    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        draft_model: "Model | None" = None,
        num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
        **params: Any,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Complete a prompt (str or token ids) or a batch of them (a list of
        strs or of id lists, or a 2-D tensor). Parameters: see GenerationConfig.
        draft_model: a smaller Model with the same tokenizer for speculative
        decoding: it proposes ``num_speculative_tokens`` tokens per round and
        this model verifies them in one pass; the output follows this model's
        distribution (greedy: the same tokens as without a draft).
        Returns a GenerationOutput (with ``logprobs`` when asked), or a list of them for a batch."""
        prompts, batched = self._prompts(prompt)
        requests = self._requests(prompts, self._config(config, params))
        self._check_draft(draft_model, num_speculative_tokens, requests)
        for _ in self._run(requests, draft_model, num_speculative_tokens):
            pass
        outputs = [r.output() for r in requests]
        return outputs if batched else outputs[0]

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        draft_model: "Model | None" = None,
        num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
        **params: Any,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces while it is generated.
        Each piece is whole characters; together they equal ``generate(...).text``.
        Text only: ``logprobs`` is accepted but not reported (use generate or LLMEngine).
        draft_model, num_speculative_tokens: as for ``generate``."""
        self._require_tokenizer("streaming text")
        prompts, batched = self._prompts(prompt)
        if batched:
            raise ValueError("stream takes one prompt; use generate for a batch")
        requests = self._requests(prompts, self._config(config, params))
        self._check_draft(draft_model, num_speculative_tokens, requests)
        return self._stream(requests, draft_model, num_speculative_tokens)  # validated above, run lazily below

    def _stream(self, requests: list[Request], draft_model: "Model | None", k: int) -> Iterator[str]:
        (req,) = requests
        for _ in self._run(requests, draft_model, k):
            piece = req.pending_text()
            if piece:
                yield piece

    def _run(self, requests: list[Request], draft_model: "Model | None", k: int) -> Iterator[list[Request]]:
        lease = self._graphs.acquire(_lengths(requests)) if self._graphs is not None else None
        if draft_model is None:
            if lease is not None:
                return holding([lease], run(self.network, lease.cache, requests, self.eos_ids, lease.runner))
            return run(self.network, self._cache_for(requests), requests, self.eos_ids)
        # Each model's passes go through its graphs, when it has them (and a draft that is
        # the model itself finds them in use: it decodes eagerly).
        draft_lease = draft_model._graphs.acquire(_lengths(requests)) if draft_model._graphs is not None else None
        runners = SpecRunners(
            draft=draft_lease.runner if draft_lease else None,
            draft_pair=draft_lease.runner_for(2, last_logits_only=True) if draft_lease else None,
            verify=lease.runner_for(k + 1) if lease else None,
        )
        cache = lease.cache if lease else self._cache_for(requests)
        draft_cache = draft_lease.cache if draft_lease else draft_model._cache_for(requests)
        return holding([lease, draft_lease], run_speculative(self.network, cache, draft_model.network, draft_cache,
                                                             requests, self.eos_ids, k, runners))

    def _check_draft(self, draft_model: "Model | None", k: int, requests: Sequence[Request] = ()) -> None:
        """A draft must be a Model on the same device with the same vocabulary
        (and the requests must not constrain their output)."""
        if draft_model is None:
            return
        if any(r.matcher is not None for r in requests):
            raise ValueError("structured_output does not work with a draft model (speculative decoding)")
        if not isinstance(draft_model, Model):
            raise TypeError(f"draft_model must be a fastllm.Model, got {type(draft_model).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an int in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if draft_model.device != self.device:
            raise ValueError(f"draft_model is on {draft_model.device} but the model is on {self.device}")
        mine, theirs = self.config.vocab_size, draft_model.config.vocab_size
        same_tokens = (
            self.tokenizer is None
            or draft_model.tokenizer is None
            or self.tokenizer.vocab == draft_model.tokenizer.vocab
        )
        if mine != theirs or not same_tokens:
            raise ValueError(
                f"draft_model must share the model's tokenizer and vocabulary (vocab sizes {theirs} and {mine}"
                f"{'' if same_tokens else ', different tokens'})"
            )

    def chat(
        self,
        messages: list[Message],
        config: GenerationConfig | None = None,
        stream: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        tool_parser: str = "auto",
        parallel_tool_calls: bool = True,
        **params: Any,
    ) -> GenerationOutput | Iterator[str]:
        """Reply to a conversation ``[{"role": ..., "content": ...}, ...]`` using the
        checkpoint's chat template (rendered in a jinja2 sandbox). With
        ``stream=True`` returns an iterator of text pieces. chat_template_kwargs:
        extra variables for the template (e.g. ``{"enable_thinking": False}`` for
        Qwen3's). tools, tool_choice ("auto", "none", "required" or
        ``{"type": "function", "function": {"name": ...}}``), tool_parser
        ("auto" or a name in ``fastllm.tools.PARSERS``), parallel_tool_calls:
        OpenAI's function calling (see fastllm.tools); the output's
        ``tool_calls`` holds the calls. Other keywords (sampling parameters,
        draft_model, num_speculative_tokens): as for ``generate``."""
        variables = _template_kwargs(chat_template_kwargs)
        plan = None
        if tools is not None or tool_choice is not None:
            self._require_tokenizer("chat")
            if "tools" in variables:
                raise ValueError("give tools as chat(tools=...), not in chat_template_kwargs")
            forced = params.get("structured_output", config.structured_output if config is not None else None)
            plan = plan_tools(tools, tool_choice, self.tokenizer.template_for(tools), tool_parser,
                              has_structured_output=forced is not None, parallel_tool_calls=parallel_tool_calls)
        if plan is not None:
            if stream and plan.mode != "none":
                raise ValueError("chat(stream=True) with tools is not supported (the calls are parsed from the "
                                 "whole output); use stream=False, tool_choice='none', or the server's streaming")
            variables = {**variables, "tools": plan.tools}
            params = {**params, **plan.params()}
        ids = self.apply_chat_template(messages, **variables)
        if stream:
            return self.stream(ids, config, **params)
        out = self.generate(ids, config, **params)
        return plan.apply(out) if plan is not None else out

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """The token ids of a conversation rendered with the chat template;
        ``template_kwargs`` become template variables (as in transformers)."""
        text = self.render_chat(messages, add_generation_prompt, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The text of a conversation rendered with the chat template (sandboxed)."""
        self._require_tokenizer("chat")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  **template_kwargs)

    # ------------------------------------------------------------------ helpers
    def _config(self, config: GenerationConfig | None, params: dict[str, Any]) -> GenerationConfig:
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        cfg = (config or self.generation_config).replace(**params)
        if isinstance(cfg.structured_output, dict):
            cfg = cfg.replace(structured_output=as_structured_output(cfg.structured_output))
        cfg.validate(self.config.vocab_size)
        if cfg.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, but {self._no_tokenizer()}")
        return cfg

    def _require_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, but {self._no_tokenizer()}")

    def _no_tokenizer(self) -> str:
        where = f"the checkpoint {self.path}" if self.path is not None else "this model"
        return (f"{where} has no tokenizer.json: copy tokenizer.json and tokenizer_config.json from the model's "
                "original directory into it, or give token ids")

    def _prompts(self, prompt: Any) -> tuple[list[list[int]], bool]:
        """Normalise a prompt or batch into token id lists; validate them."""
        if isinstance(prompt, (Tensor, np.ndarray)):
            integer = (prompt.dtype != torch.bool and not prompt.is_floating_point() and not prompt.is_complex()
                       if isinstance(prompt, Tensor) else np.issubdtype(prompt.dtype, np.integer))
            if prompt.ndim not in (1, 2) or not integer:
                raise ValueError(f"a {type(prompt).__name__} prompt must be 1-D or 2-D integer token ids, "
                                 f"got {prompt.ndim}-D {prompt.dtype}")
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            items, batched = [prompt], False
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, int) for p in prompt):
            items, batched = [list(prompt)], False
        elif isinstance(prompt, (list, tuple)) and prompt:
            items, batched = list(prompt), True
        elif isinstance(prompt, (list, tuple)):
            raise ValueError("prompt is empty")
        else:
            raise TypeError(f"prompt must be a str, token ids or a list of them, got {type(prompt).__name__}")
        out = []
        for item in items:
            if isinstance(item, str):
                self._require_tokenizer("a text prompt")
                if not item:
                    raise ValueError("prompt is an empty string")
                ids = self.tokenizer.encode(item)
            elif isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                ids = list(item)
            elif batched:
                raise TypeError("each prompt of a batch must be a str or a list of int token ids")
            else:
                raise TypeError(f"token ids must be ints, got {[t for t in item if isinstance(t, bool)][:3]}")
            self._check_ids(ids)
            out.append(ids)
        return out, batched

    def _check_ids(self, ids: list[int]) -> None:
        cfg = self.config
        if not ids:
            raise ValueError("prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
        if len(ids) > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {cfg.max_position_embeddings} tokens"
            )

    def _requests(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[Request]:
        ctx = self.config.max_position_embeddings
        reqs = []
        for i, ids in enumerate(prompts):
            if len(ids) >= ctx:
                raise ValueError(
                    f"prompt has {len(ids)} tokens, which leaves no room to generate in the "
                    f"model's {ctx}-token context"
                )
            decoder = None
            if self.tokenizer is not None:
                decoder = self.tokenizer.incremental_decoder(cfg.skip_special_tokens, prompt_ids=ids)
            reqs.append(
                Request(
                    prompt_ids=ids,
                    config=cfg,
                    seed=derive_seed(cfg.seed, i),
                    max_new_tokens=min(cfg.max_new_tokens, ctx - len(ids)),
                    decoder=decoder,
                    eos_ids=self.eos_ids,
                    matcher=matcher_for(cfg, self.tokenizer, self.config.vocab_size, self.eos_ids),
                )
            )
        return reqs

    def _cache_for(self, requests: list[Request]) -> KVCache:
        return self._new_cache(_lengths(requests))

    def _new_cache(self, lengths: list[int]) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, blocks_needed(lengths), cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)


def _lengths(requests: list[Request]) -> list[int]:
    """The most tokens each request can hold in the cache."""
    return [len(r.prompt_ids) + r.max_new_tokens for r in requests]


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"chat_template_kwargs must be a dict with str keys, got {kwargs!r}")
    return kwargs
