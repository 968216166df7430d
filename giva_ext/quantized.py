"""Quantized frozen bases (bitsandbytes 4-bit / 8-bit layers, torchao-quantized weights): recognised
and, for now, refused by name.

A quantized layer's weight is packed integers plus scales: wrapping it as if it were the float
weight would compute a wrong output without an error (bitsandbytes' Linear4bit subclasses
nn.Linear, so "all-linear" finds it), and a torchao weight fails deep inside the op. Until GiVA
runs on such bases (the base's own quantized kernel plus the adapter term), every entry point that
wraps layers refuses them first, naming the layer and its quantization.
"""
from __future__ import annotations

from torch import nn


def quantization_of(module: nn.Module) -> str | None:
    """What quantizes ``module``'s weight ("bitsandbytes Linear4bit (nf4)", "torchao Int8Tensor",
    "int8 weight", ...), or None for a float layer. Needs neither library installed: it reads the
    module's and the weight's classes and the weight's dtype."""
    weight = getattr(module, "weight", None)
    for owner in (module, weight):
        package = type(owner).__module__.split(".")[0]
        if package == "bitsandbytes":
            quant_state = getattr(weight, "quant_state", None)
            quant_type = getattr(weight, "quant_type", None) or getattr(quant_state, "quant_type", None)
            return f"bitsandbytes {type(module).__name__}" + (f" ({quant_type})" if quant_type else "")
        if package == "torchao":
            return f"torchao {type(weight).__name__}"
    if weight is not None and not weight.is_floating_point():
        return f"{str(weight.dtype).removeprefix('torch.')} weight"
    return None


def check_not_quantized(targets: dict[str, nn.Module]) -> None:
    """ValueError naming the first quantized target, before anything changes."""
    for name, module in targets.items():
        kind = quantization_of(module)
        if kind is not None:
            raise ValueError(
                f"target {name!r} is a quantized layer ({kind}); GiVA does not adapt quantized bases "
                "yet: apply it to the model in float32, bfloat16 or float16, or leave that layer out "
                "of target_modules")
