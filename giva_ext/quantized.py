"""GiVA on a quantized frozen base (QLoRA-style): bitsandbytes Linear4bit (NF4 / FP4, with or
without double quantization) and Linear8bitLt, and nn.Linear layers whose weight torchao quantized
weight-only (int8, int4).

Such a layer is wrapped in a QuantizedGiVALinear: the base runs its own quantized forward (no
dequantized copy of its weight is kept) and the adapter is added by the adapter-only op
(giva_adapter: s = x A^T saved, the expand onto the base's output, the vector gradients through
M = g^T s), so the adapter saves T x r activations as on a float base. init_bases works unchanged:
it needs only each layer's input and output gradient, never the weight's gradient. The adapter
file's fingerprint covers the quantized weight's packed data and quantization state, so an adapter
trained on one quantization is refused on another. Merging into packed integers is refused;
merge_and_unload(model, dequantize=True) gives float layers holding dequantize(W) + delta W.

Everything here reads classes and attributes; neither library is imported unless a layer of it
is in the model.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .functional import giva_adapter
from .layer import PER_THREAD, GiVALinear

# torchao weight classes that are weight-only quantized (the layer's forward runs on float
# activations and is differentiable in them); dynamic-activation configs are refused (their int8
# activations have no gradient).
_TORCHAO_WEIGHT_ONLY = ("Int8Tensor", "IntxUnpackedToInt8Tensor", "Int4Tensor", "Int4TilePackedTo4dTensor",
                        "Int4PlainInt32Tensor", "Int4PreshuffledTensor")


def _package(obj) -> str:
    return type(obj).__module__.split(".")[0]


def quantization_of(module: nn.Module) -> str | None:
    """What quantizes ``module``'s weight ("bitsandbytes Linear4bit (nf4)", "torchao Int8Tensor",
    "int8 weight", ...), or None for a float layer. Needs neither library installed: it reads the
    module's and the weight's classes and the weight's dtype."""
    weight = getattr(module, "weight", None)
    for owner in (module, weight):
        if _package(owner) == "bitsandbytes":
            quant_state = getattr(weight, "quant_state", None)
            quant_type = getattr(weight, "quant_type", None) or getattr(quant_state, "quant_type", None)
            return f"bitsandbytes {type(module).__name__}" + (f" ({quant_type})" if quant_type else "")
        if _package(owner) == "torchao":
            return f"torchao {type(weight).__name__}"
    if weight is not None and not weight.is_floating_point():
        return f"{str(weight.dtype).removeprefix('torch.')} weight"
    return None


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a quantized ``module`` cannot be a GiVA base, or None if it can (or is not quantized)."""
    weight = getattr(module, "weight", None)
    if quantization_of(module) is None:
        return None
    if _package(module) == "bitsandbytes" or _package(weight) == "bitsandbytes":
        name = type(weight).__name__
        if name == "Params4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
            return ("bitsandbytes repacked its weight for CPU inference (an eval-mode call without "
                    "grad), after which the layer no longer trains; load the model again and apply "
                    "GiVA before running it")
        if name == "Params4bit" and getattr(weight, "quant_state", None) is not None:
            return None
        if name == "Int8Params" and not getattr(weight, "has_fp16_weights", True) \
                and weight.dtype == torch.int8:
            return None
        return ("only bitsandbytes Linear4bit and Linear8bitLt (has_fp16_weights=False) layers whose "
                "weight is quantized (moved to the device) are supported")
    if _package(weight) == "torchao":
        if type(weight).__name__ not in _TORCHAO_WEIGHT_ONLY:
            return f"torchao weight-only int8 / int4 ({', '.join(_TORCHAO_WEIGHT_ONLY)}) is supported"
        # Int8Tensor's act_quant_kwargs, IntxUnpackedToInt8Tensor's activation_quantization
        if any(getattr(weight, a, None) is not None for a in ("act_quant_kwargs", "activation_quantization")):
            return ("its activations are quantized too (a dynamic-activation config), which has no "
                    "gradient for the input; use a weight-only config")
        return None
    return "a weight of integer dtype outside bitsandbytes and torchao"


def check_supported(targets: dict[str, nn.Module]) -> None:
    """ValueError naming the first target whose quantization GiVA does not run on, before anything
    changes (a float layer or a GiVALinear passes)."""
    for name, module in targets.items():
        base = module.base if isinstance(module, GiVALinear) else module
        reason = _unsupported_reason(base)
        if reason is not None:
            raise ValueError(f"target {name!r} is a quantized layer ({quantization_of(base)}) that GiVA "
                             f"does not adapt: {reason}; or leave it out of target_modules")


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype of a quantized layer's weight before quantization: what its bases are kept
    in (the op casts them to the input's dtype at each call)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit records it
        return quant_state.dtype
    if _package(weight) == "torchao":
        return weight.dtype  # torchao's tensor subclasses report their float dtype
    bias = getattr(module, "bias", None)  # bitsandbytes 8-bit keeps no record of it
    return bias.dtype if bias is not None else torch.float32


def _quantized_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors that define the quantized weight, the metadata beside them)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        packed = quant_state.as_dict(packed=True)
        tensors = {"data": weight.data, **{k: v for k, v in packed.items() if torch.is_tensor(v)}}
        return tensors, {k: str(v) for k, v in packed.items() if not torch.is_tensor(v)}
    if _package(weight) == "torchao":
        names, ctx = weight.__tensor_flatten__()
        return {n: getattr(weight, n) for n in names}, {"ctx": str(ctx)}
    return {"data": weight.data, "SCB": _int8_row_scales(module)}, {}  # bitsandbytes 8-bit


def _int8_row_scales(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear8bitLt's per-row absmax (SCB): on the weight until the first forward,
    then on the layer's matmul state."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def fingerprint(name: str, module: nn.Module) -> dict:
    """A quantized base's fingerprint entry: name, logical shape (out, in), compute dtype, what
    quantizes it, and the SHA-256 of its packed data, scales and quantization metadata."""
    tensors, meta = _quantized_tensors(module)
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(sorted(meta.items())).encode())
    return {"name": name, "shape": [module.out_features, module.in_features],
            "dtype": str(compute_dtype(module)).removeprefix("torch."),
            "quantization": quantization_of(module), "sha256": digest.hexdigest()}


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The quantized layer's weight as a float (out, in) tensor in its compute dtype (a new tensor)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional
        w = bnb_functional.dequantize_4bit(weight.data, quant_state)
    elif _package(weight) == "torchao":
        w = weight.dequantize()
    else:  # bitsandbytes 8-bit: int8 rows times their absmax / 127
        w = weight.data.float() * (_int8_row_scales(module).float()[:, None] / 127.0)
    return w.to(compute_dtype(module)).reshape(module.out_features, module.in_features)


def merge_refusal(layer: str, kind: str) -> str:
    """Why ``layer`` (a description: "GiVA layer 'x.y'") cannot merge, and how to merge instead."""
    return (f"{layer} has a quantized base ({kind}): an update cannot be folded "
            "into its packed weight. To merge, dequantize, merge and requantize: "
            "merge_and_unload(model, dequantize=True) gives float layers holding dequantize(W) + "
            "delta W, which you can quantize again with your library; or serve the adapter unmerged "
            "(or as LoRA: export_lora)")


class QuantizedGiVALinear(GiVALinear):
    """A GiVALinear on a quantized base (see the module docstring): base(x) runs the base's own
    quantized kernel and the adapter adds to it through giva_adapter. Bases and vectors are kept
    in the base's compute dtype (vectors in float32 beside a half one, as on a float base)."""

    def __init__(self, *args, base: nn.Module, **kwargs):
        super().__init__(*args, base=base, **kwargs)
        self.quantization = quantization_of(base)
        if hasattr(base, "support_avx512bf16_for_cpu"):
            # bitsandbytes' Linear4bit repacks its weight in place for a CPU kernel at its first
            # eval-mode call without grad (init_bases makes such calls); after that its training
            # forward fails and its packed data and scales (bfloat16) differ. Off for wrapped layers.
            base.support_avx512bf16_for_cpu = False

    @staticmethod
    def base_dtype(base: nn.Module) -> torch.dtype:
        return compute_dtype(base)

    def weight_out_in(self) -> torch.Tensor:
        raise RuntimeError(f"this GiVA layer's base is quantized ({self.quantization}); its weight is "
                           "packed, not an (out, in) float tensor (quantized.dequantized_weight gives one)")

    def merge(self, keep_fingerprint: bool = True) -> None:
        raise RuntimeError(merge_refusal("this layer", self.quantization))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (mixed_adapters refuses quantized layers at its start, so no mixed state reaches here)
        y = self.base(x)
        if self.active_adapter is None or (PER_THREAD.bare and id(self) in PER_THREAD.bare):
            return y
        a = self.adapter
        return giva_adapter(x, y, a.A, a.B, a.lambda_s, a.lambda_o, a.dropout, self.training, a.lambda_i)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", quantization={self.quantization!r}"


def layer_class(module: nn.Module) -> type[GiVALinear]:
    """The GiVA layer class that wraps ``module``: QuantizedGiVALinear for a quantized base."""
    return QuantizedGiVALinear if quantization_of(module) is not None else GiVALinear
