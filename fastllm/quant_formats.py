"""Reading 4-bit GPTQ and AWQ checkpoints, repacked into fastllm's int4 layout.

fastllm's int4 layout (``fastllm.quant``): ``qweight`` uint8 [N, K/2] (low
nibble = even input column), ``zeros`` uint8 [N, K/g], ``scales`` [N, K/g],
``w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]``. Both foreign
formats store the same asymmetric per-group quantization, transposed and
packed eight 4-bit values to an int32 (value i in bits 4i..4i+3), so the
conversion is exact: unpack, transpose, repack; the integers do not change.
The fp16 scales take the model's dtype (exact in fp16 and fp32; bf16 rounds
them to 8 mantissa bits, a relative error up to 2^-9).

GPTQ (AutoGPTQ / GPTQModel / optimum; ``quant_method: "gptq"``), per layer:
  ``qweight`` int32 [K/8, N]   packed along K: nibble i of word [r, n] is q[k = 8r + i, n]
  ``qzeros``  int32 [K/g, N/8] packed along N: nibble i of word [j, c] is the zero of column 8c + i
  ``scales``  fp16  [K/g, N],  ``g_idx`` int32 [K] (group of each input row), optional ``bias``
  ``w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]`` where z is the
  stored nibble + 1 in the classic "gptq" (v1) format and the stored nibble in
  "gptq_v2". Sources: AutoGPTQ/AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py
  (``pack``: ``qweight[row] |= intweight[j] << 4 (j - i)``, ``zeros -= 1`` before
  packing qzeros column-wise; ``forward``: ``zeros + 1`` per nibble, then
  ``scales * (weight - zeros)``) and ModelCloud/GPTQModel gptqmodel/utils/model.py
  (``convert_gptq_v1_to_v2_format_module``: v2 = v1 + 1 in every nibble).
  GPTQModel adds 0x11111111 to the whole int32, which carries into the next
  nibble where a stored nibble is 15; we follow AutoGPTQ's (and vLLM's) per-nibble
  +1, so such a zero reads as 16 — the two only differ for v1 files whose real
  zero point was 0, which v1 cannot represent anyway.

AWQ (AutoAWQ ``version: "gemm"``; ``quant_method: "awq"``), per layer:
  ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [K/g, N/8], both packed along N
  in AutoAWQ's interleaved order: nibble i of a word holds column 8c + AWQ_ORDER[i]
  with AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; ``scales`` fp16 [K/g, N]; optional ``bias``.
  ``w[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n]`` (no +1). Sources:
  casper-hansen/AutoAWQ awq/modules/linear/gemm.py (``WQLinear_GEMM.from_linear``:
  ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``, ``qweight[:, col] |= intweight[:, col * 8 +
  order_map[i]] << 4 i``) and awq/utils/packing_utils.py (``AWQ_REVERSE_ORDER =
  [0, 4, 1, 5, 2, 6, 3, 7]``, ``dequantize_gemm``: ``(iweight - izeros) * scales``),
  as vllm-project/vllm vllm/model_executor/layers/quantization/awq_triton.py.

Which projections are quantized is read from the tensors: a projection stored
as ``<prefix>.qweight`` is quantized, one stored as ``<prefix>.weight`` (what
``modules_to_not_convert`` and GPTQ's unquantized modules produce) is not. A
fastllm module becomes int4 when every projection it fuses is quantized (q/k/v
into qkv_proj, gate/up into gate_up_proj, Qwen2-MoE's shared expert's too);
otherwise it stays 16-bit, and so do routed MoE experts: quantized parts that
land in a 16-bit tensor are dequantized (``(q - z) * s`` in fp32, then the
model dtype) at load.

Refused with a ValueError: bits other than 4, group sizes other than 32/64/128
(per-channel -1 included), GPTQ act-order (a g_idx other than ``k // g``),
GPTQ formats other than gptq/gptq_v2, GPTQModel ``dynamic`` per-module
overrides, AWQ versions other than gemm, AWQ without zero points, and layers
whose tensors do not have the shapes and dtypes the config implies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastllm.model.config import ModelConfig
from fastllm.model.transformer import Transformer
from fastllm.model.weights import CheckpointReader, linear_parts
from fastllm.ops.reference import dequantize_int4
from fastllm.quant import GROUP_SIZES, QuantizationConfig, projection_slots

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7): nibble of column c
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class ExternalQuantization:
    """A validated GPTQ/AWQ ``quantization_config``."""

    method: str  # "gptq" | "awq"
    group_size: int
    checkpoint_format: str  # "gptq" | "gptq_v2" | "gemm"
    desc_act: bool = False

    @property
    def name(self) -> str:
        return "GPTQ" if self.method == "gptq" else "AWQ"

    @property
    def zero_offset(self) -> int:
        """Added to every stored zero: 1 for GPTQ v1, else 0."""
        return 1 if self.checkpoint_format == "gptq" else 0

    @property
    def packed_names(self) -> tuple[str, ...]:
        """The per-layer tensors (besides the bias) that belong to one quantized projection."""
        return ("qweight", "qzeros", "scales", "g_idx") if self.method == "gptq" else ("qweight", "qzeros", "scales")


def parse_external(raw: dict[str, Any]) -> ExternalQuantization | None:
    """Validate config.json's ``quantization_config``; None unless it is GPTQ or AWQ."""
    method = str(raw.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        return None
    name = method.upper()
    where = f"config.json quantization_config ({name})"
    bits = raw.get("bits", 4)
    if bits != 4:
        raise ValueError(f"{where}: bits={bits!r} is not supported; fastllm reads 4-bit {name} checkpoints only")
    group = raw.get("group_size", 128)
    if group not in GROUP_SIZES:
        what = "per-channel quantization (group_size -1)" if group == -1 else f"group_size={group!r}"
        raise ValueError(f"{where}: {what} is not supported; fastllm's int4 needs group_size 32, 64 or 128")
    if method == "gptq":
        # transformers >= 5 writes "format" and keeps the legacy "checkpoint_format" (which wins).
        fmt = str(raw.get("checkpoint_format") or raw.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise ValueError(f"{where}: checkpoint_format={fmt!r} is not supported; fastllm reads {GPTQ_FORMATS}")
        if raw.get("dynamic"):
            raise ValueError(f"{where}: per-module overrides ('dynamic') are not supported")
        return ExternalQuantization("gptq", int(group), fmt, bool(raw.get("desc_act", False)))
    # AutoAWQ writes "version"; transformers >= 5 "format" too (the legacy "version" wins).
    fmt = str(raw.get("version") or raw.get("format") or "gemm").lower()
    if fmt != "gemm":
        raise ValueError(f"{where}: version={fmt!r} is not supported; fastllm reads AWQ 'gemm' checkpoints only")
    if not raw.get("zero_point", True):
        raise ValueError(f"{where}: zero_point=false is not supported; fastllm reads AWQ with zero points only")
    return ExternalQuantization("awq", int(group), fmt)


def plan_quantization(ext: ExternalQuantization, cfg: ModelConfig, names: list[str]) -> QuantizationConfig:
    """The fastllm int4 config that holds the checkpoint with tensor ``names``:
    int4 for every projection whose parts are all stored packed, 16-bit
    (``skip_modules``) for the others; the LM head is int4 if stored packed."""
    packed = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
    if not packed:
        raise ValueError(
            f"config.json says the checkpoint is {ext.name}-quantized, but it holds no *.qweight tensors; "
            "is quantization_config right for these weights?"
        )
    with torch.device("meta"):
        net = Transformer(cfg, torch.float16)
    parts = linear_parts(cfg)
    skip, lm_head = [], False
    for path, _, _ in projection_slots(net, lm_head=True):
        quantized = all(prefix in packed for prefix, _, _ in parts[path])
        if path == "lm_head":
            lm_head = quantized
        elif not quantized:
            skip.append(path)
    for path, _, _ in projection_slots(net, lm_head=lm_head):
        k = net.get_submodule(path).in_features
        if path not in skip and k % ext.group_size:
            raise ValueError(
                f"{ext.name} checkpoint: {parts[path][0][0]} has {k} input features, not a multiple of "
                f"group_size {ext.group_size}; fastllm's int4 needs whole groups"
            )
    return QuantizationConfig("int4", ext.group_size, lm_head, tuple(skip))


# --------------------------------------------------------------------------- #
# Unpacking
# --------------------------------------------------------------------------- #
def _nibble(packed: Tensor, i: int) -> Tensor:
    """Nibble i (bits 4i..4i+3) of every int32 word, as uint8."""
    return ((packed >> (4 * i)) & 0xF).to(torch.uint8)


def unpack_int32_rows(packed: Tensor) -> Tensor:
    """int32 [R, C] packed along rows -> uint8 [8R, C]: out[8r + i, c] = nibble i of packed[r, c]."""
    r, c = packed.shape
    out = torch.empty(r, 8, c, dtype=torch.uint8)
    for i in range(8):  # one nibble plane at a time: temporaries of 1/8 of the layer
        out[:, i] = _nibble(packed, i)
    return out.view(8 * r, c)


def unpack_int32_cols(packed: Tensor, order: tuple[int, ...] = tuple(range(8))) -> Tensor:
    """int32 [R, C] packed along columns -> uint8 [R, 8C]: out[r, 8c + j] = nibble
    ``order[j]`` of packed[r, c] (nibble j in the plain order)."""
    r, c = packed.shape
    out = torch.empty(r, c, 8, dtype=torch.uint8)
    for j in range(8):
        out[..., j] = _nibble(packed, order[j])
    return out.view(r, 8 * c)


def _expect(t: Tensor, name: str, where: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{where}: {name} has dtype {t.dtype}; 4-bit GPTQ/AWQ store it as {dtype}")
    if dtype is None and not t.is_floating_point():
        raise ValueError(f"{where}: {name} has dtype {t.dtype}; expected floating-point scales")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{where}: {name} has shape {tuple(t.shape)}, but config.json and the quantization_config imply {shape}"
        )


def unpack_layer(
    ext: ExternalQuantization, tensors: dict[str, Tensor], n: int, k: int, where: str
) -> tuple[Tensor, Tensor, Tensor]:
    """One projection's packed tensors (``qweight``, ``qzeros``, ``scales`` and
    GPTQ's optional ``g_idx``) for a [N, K] weight -> fastllm's unpacked ints:
    ``q`` uint8 [N, K] in [0, 15], ``zeros`` uint8 [N, K/g], ``scales`` [N, K/g]."""
    g = ext.group_size
    if n % 8 or k % g:
        raise ValueError(f"{where}: a [{n}, {k}] weight cannot be packed by {ext.name} with group_size {g}")
    groups = k // g
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    _expect(qzeros, "qzeros", where, (groups, n // 8), torch.int32)
    _expect(scales, "scales", where, (groups, n), None)
    if ext.method == "gptq":
        _expect(qweight, "qweight", where, (k // 8, n), torch.int32)
        g_idx = tensors.get("g_idx")
        if g_idx is not None:
            if tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
                raise ValueError(
                    f"{where}: g_idx has shape {tuple(g_idx.shape)} and dtype {g_idx.dtype}, expected int [{k}]"
                )
            if not torch.equal(g_idx.long(), torch.arange(k) // g):
                act = "desc_act=true (act-order)" if ext.desc_act else "a g_idx other than k // group_size"
                raise ValueError(
                    f"{where}: GPTQ {act} reorders input rows across groups, which fastllm's int4 layout "
                    "(consecutive columns per group) cannot hold; re-quantize with desc_act=false"
                )
        q = unpack_int32_rows(qweight).T  # [K, N] -> [N, K]
        z = unpack_int32_cols(qzeros) + ext.zero_offset  # [K/g, N], 0..16 for v1
    else:
        _expect(qweight, "qweight", where, (k, n // 8), torch.int32)
        q = unpack_int32_cols(qweight, AWQ_REVERSE_ORDER).T  # [K, N] -> [N, K]
        z = unpack_int32_cols(qzeros, AWQ_REVERSE_ORDER)  # [K/g, N]
    return q.contiguous(), z.T.contiguous(), scales.T.contiguous()


def pack_int4(q: Tensor) -> Tensor:
    """uint8 [N, K] in [0, 15] -> fastllm's packed uint8 [N, K/2] (low nibble = even column)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


# --------------------------------------------------------------------------- #
# The converter for load_weights
# --------------------------------------------------------------------------- #
def make_converter(ext: ExternalQuantization):
    """A ``fastllm.model.weights.Converter`` for ``ext``'s checkpoints: each
    packed projection becomes fastllm's ``qweight``/``scales``/``zeros`` (int4
    targets) or a dequantized ``weight`` (16-bit targets); other tensors pass."""

    def convert(reader: CheckpointReader, targets: dict[str, Tensor]) -> Iterator[tuple[str, Tensor | None, int]]:
        packed = {n[: -len(".qweight")] for n in reader.names if n.endswith(".qweight")}
        companions = {f"{p}.{s}" for p in packed for s in ext.packed_names}
        for name in reader.names:
            if name in companions:
                if name.endswith(".qweight"):
                    yield from _convert_layer(ext, name[: -len(".qweight")], reader, targets)
                continue
            if name not in targets:
                yield name, None, 0
                continue
            tensor = reader.read(name)
            yield name, tensor, tensor.numel() * tensor.element_size()

    return convert


def _convert_layer(
    ext: ExternalQuantization, prefix: str, reader: CheckpointReader, targets: dict[str, Tensor]
) -> Iterator[tuple[str, Tensor | None, int]]:
    int4_target, weight_target = targets.get(prefix + ".qweight"), targets.get(prefix + ".weight")
    if int4_target is not None and int4_target.dtype == torch.uint8:
        n, k = int4_target.shape[0], int4_target.shape[1] * 2
    elif weight_target is not None:
        n, k = weight_target.shape
    else:
        yield prefix + ".qweight", None, 0  # nothing loads it: reported as unexpected
        return
    where = f"{reader.file(prefix + '.qweight')}: {ext.name} layer {prefix}"
    tensors, nbytes = {}, 0
    for part in ext.packed_names:
        name = f"{prefix}.{part}"
        if name in reader:
            tensors[part] = reader.read(name)
            nbytes += tensors[part].numel() * tensors[part].element_size()
        elif part != "g_idx":
            raise ValueError(f"{where}: has qweight but no {part} ({name} is missing from the checkpoint)")
    q, zeros, scales = unpack_layer(ext, tensors, n, k, where)
    packed = pack_int4(q)  # [N, K/2]
    if int4_target is not None and int4_target.dtype == torch.uint8:
        yield prefix + ".qweight", packed, nbytes
        yield prefix + ".scales", scales, 0
        yield prefix + ".zeros", zeros, 0
    else:  # a 16-bit tensor (MoE expert, router, partly quantized fused projection)
        yield prefix + ".weight", dequantize_int4(packed, scales, zeros, ext.group_size), nbytes
