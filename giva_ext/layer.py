"""GiVALinear: a frozen linear layer plus the GiVA adapter diag(lambda_o) B diag(lambda_s) A."""
from __future__ import annotations

import hashlib
import sys
import threading

import torch
from torch import nn

from . import reference
from .functional import HALF_DTYPES, giva_linear, mixed_giva_linear


class _PerThread(threading.local):
    """What layers run in this thread only, set by the mixed_adapters and disable_adapters blocks:
    serving threads share one model, so a block one thread enters must not change what the others
    compute. Keyed by id(layer); a block removes its entries when it ends."""

    def __init__(self):
        # A mixed batch's per-row choice: the model's row ids (-1 for none), read at every call; the
        # lookup from the model's adapter ids to the layer's (None when they are the same); and the
        # adapters' (A, B, lambda_s, lambda_o) lists, gathered once per block rather than per call.
        self.mixed: dict[int, tuple] = {}
        self.bare: set[int] = set()  # layers that run without adapter (disable_adapters)


PER_THREAD = _PerThread()


def random_orthonormal(rows: int, cols: int, generator: torch.Generator | None = None,
                       dtype=torch.float32, device=None) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    tall = rows >= cols
    g = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # unique Q: a fixed seed gives one answer on every LAPACK
    q = q if tall else q.t()
    return q.to(dtype=dtype, device=device).contiguous()


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D (GPT-2 style: weight stored (in, out), y = x W + b)."""
    # A Conv1D exists only once transformers has imported it, so this never imports transformers.
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear, a transformers Conv1D or a GiVALinear; else None."""
    if isinstance(module, (nn.Linear, GiVALinear)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    return None


def weight_digests(weight: torch.Tensor, cast: bool = False) -> dict[str, str]:
    """The fingerprint digests of a base weight: "sha256" of its bytes and, with ``cast`` for a
    float32 weight, "sha256_bfloat16" / "sha256_float16" of its bytes cast to those dtypes (what a
    float32 base is commonly cast to for serving).

    The weight's bytes are hashed at every call: nothing certifies bytes it has not hashed (a
    write through ``weight.data`` changes neither the version counter nor the storage, so no
    cheaper test proves a weight unchanged). What depends only on those bytes is remembered on
    the tensor under their SHA-256: the cast digests, and the digests from before merge() that
    GiVALinear.unmerge() leaves for the unmerged bytes, so that the rounding of a merge/unmerge
    round trip (W + dW - dW differs from W in the last bit) does not make the layer look like
    another base model."""
    w = weight.detach()
    sha = _sha256(w)
    remembered = getattr(weight, "_giva_digests", None)
    digests = dict(remembered[1]) if remembered is not None and remembered[0] == sha else {"sha256": sha}
    wanted = ["sha256"]
    if cast and w.dtype == torch.float32:
        for dtype in HALF_DTYPES:
            name = f"sha256_{str(dtype).removeprefix('torch.')}"
            wanted.append(name)
            if name not in digests:
                digests[name] = _sha256(w.to(dtype))
    _remember_digests(weight, sha, digests)
    return {name: digests[name] for name in wanted}


def _remember_digests(weight: torch.Tensor, sha: str, digests: dict[str, str]) -> None:
    try:
        weight._giva_digests = (sha, dict(digests))
    except RuntimeError:  # an inference tensor takes no attributes: nothing is remembered
        pass


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def block_bases(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's bases from per-chunk bases [(A_c (r_c, in), B_c (out_c, r_c)), ...]:
    A stacks the A_c, B is block-diagonal, so chunk c's outputs see only chunk c's adapter."""
    return torch.cat([A for A, _ in parts]), torch.block_diag(*[B for _, B in parts])


def vector_dtype_for(weight_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of the trainable vectors beside a base weight of ``weight_dtype``: float32 for a
    float16 / bfloat16 base when ``autocast_adapter_dtype`` (as PEFT keeps its adapters: the
    optimizer updates and their gradients stay in float32; the fused op takes them so), else the
    weight's dtype."""
    if autocast_adapter_dtype and weight_dtype in HALF_DTYPES:
        return torch.float32
    return weight_dtype


class GiVAAdapter(nn.Module):
    """One named adapter of a GiVALinear: frozen bases A (r, in) and B (out, r), trainable
    lambda_s (r,) and lambda_o (out,), and with ``input_scale`` a trainable lambda_i (in,):
    delta W = diag(lambda_o) B diag(lambda_s) A diag(lambda_i). Starts at lambda_s = 1,
    lambda_o = 0, lambda_i = 1 (adds exactly zero) with random orthonormal bases (block-diagonal B
    with ``chunks`` > 1). The bases are in ``dtype`` (the base layer's), the vectors in
    ``vector_dtype`` (default: the same; see vector_dtype_for)."""

    def __init__(self, in_features: int, out_features: int, r: int, chunks: int = 1,
                 dropout: float = 0.0, generator: torch.Generator | None = None, dtype=None, device=None,
                 vector_dtype=None, input_scale: bool = False):
        super().__init__()
        check_rank(r, in_features, out_features, needed=1)  # a positive int; the bound comes next
        if not isinstance(chunks, int) or chunks <= 0 or out_features % chunks or r % chunks:
            raise ValueError(f"chunks must be a positive int dividing out_features ({out_features}) "
                             f"and r ({r}), got {chunks!r}")
        check_rank(r // chunks, in_features, out_features // chunks)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.chunks, self.dropout = r, chunks, dropout
        parts = [(random_orthonormal(r // chunks, in_features, generator, dtype, device),
                  random_orthonormal(out_features // chunks, r // chunks, generator, dtype, device))
                 for _ in range(chunks)]
        A, B = block_bases(parts)
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        vector_dtype = vector_dtype or dtype
        self.lambda_s = nn.Parameter(torch.ones(r, dtype=vector_dtype, device=device))
        self.lambda_o = nn.Parameter(torch.zeros(out_features, dtype=vector_dtype, device=device))
        self.lambda_i = (nn.Parameter(torch.ones(in_features, dtype=vector_dtype, device=device))
                         if input_scale else None)

    @property
    def vector_names(self) -> tuple[str, ...]:
        """The trainable vectors this adapter has: lambda_s, lambda_o (and lambda_i)."""
        return ("lambda_s", "lambda_o") + (("lambda_i",) if self.lambda_i is not None else ())

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Everything that defines the adapter (what an adapter file stores): A, B and the vectors."""
        return ("A", "B") + self.vector_names

    def vectors(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self.vector_names]

    def scaled_A(self) -> torch.Tensor:
        """A diag(lambda_i) (A itself without an input scale), detached, in A's dtype: the A the
        layer applies, for merging, exports and inference-only paths."""
        if self.lambda_i is None:
            return self.A
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return (self.A.to(acc) * self.lambda_i.detach().to(acc)).to(self.A.dtype)

    def extra_repr(self) -> str:
        return (f"r={self.r}, dropout={self.dropout}" + (f", chunks={self.chunks}" if self.chunks > 1 else "")
                + (", input_scale=True" if self.lambda_i is not None else ""))


class UnknownAdapterError(KeyError):
    """A KeyError for an adapter the model or layer does not have. Its message prints as written
    (a plain KeyError shows it in quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Names an nn.ModuleDict cannot take as keys: its own attributes ("forward", "keys", "training", ...).
_MODULE_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name) -> None:
    """Adapter names key module dicts and file folders: a non-empty str without '.', '/', '\\',
    control characters (NUL included) or surrounding spaces, and not an attribute of nn.ModuleDict."""
    if (not isinstance(name, str) or not name or any(c in name for c in "./\\") or name != name.strip()
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ValueError(f"adapter name must be a non-empty str without '.', '/', '\\', control "
                         f"characters or surrounding spaces, got {name!r}")
    if name in _MODULE_DICT_ATTRIBUTES:
        raise ValueError(f"adapter name {name!r} is taken: the layers keep their adapters in an "
                         "nn.ModuleDict, whose own attributes (forward, keys, training, ...) cannot be keys")


class GiVALinear(nn.Module):
    """Drop-in for nn.Linear (or transformers' Conv1D) with GiVA adapters.

    ``y = base(x) + lambda_o * (B (lambda_s * (A x)))`` for the active adapter.  ``base`` is a frozen
    nn.Linear or Conv1D; A (r, in) and B (out, r) are frozen buffers (random orthonormal until
    ``init_bases`` sets them from the gradient); lambda_s (r, ones) and lambda_o (out, zeros) are the
    only parameters that train, so a new layer computes exactly what ``base`` computes. A, B and
    ``delta_weight()`` are in the (out, in) layout for both base kinds; only merge touches Conv1D's
    transposed weight.

    ``chunks=n`` is for fused projections (GPT-2's c_attn holds q, k and v): the output splits into n
    equal chunks, each with its own adapter of rank r / n, so B is block-diagonal (``block_bases``).

    A layer holds named adapters (``adapters``, a ModuleDict of GiVAAdapter; the first is
    ``adapter_name``, "default"). One is active (``active_adapter``, or None: the bare base layer);
    ``A``, ``B``, ``lambda_s``, ``lambda_o``, ``r``, ``chunks`` and ``dropout`` are the active one's.

    Build it standalone, ``GiVALinear(in_features, out_features, r, bias=True)``, or around an
    existing layer, ``GiVALinear.from_linear(linear, r)``. On a float16 / bfloat16 base the vectors
    are float32 unless ``autocast_adapter_dtype=False`` (see vector_dtype_for).
    """

    def __init__(self, in_features: int, out_features: int, r: int, bias: bool = True,
                 dropout: float = 0.0, device=None, dtype=None, *, base: nn.Module | None = None,
                 generator: torch.Generator | None = None, chunks: int = 1,
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True,
                 input_scale: bool = False):
        super().__init__()
        check_adapter_name(adapter_name)
        if base is not None and linear_shape(base) is None:
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        if base is not None and linear_shape(base) != (in_features, out_features):
            got_in, got_out = linear_shape(base)
            raise ValueError(f"base is {got_out}x{got_in}, expected {out_features}x{in_features}")
        w = base.weight if base is not None else torch.empty(0, dtype=dtype, device=device)
        w_dtype = self.base_dtype(base) if base is not None else w.dtype
        self.autocast_adapter_dtype = autocast_adapter_dtype
        first = GiVAAdapter(in_features, out_features, r, chunks, dropout, generator, w_dtype, w.device,
                            vector_dtype_for(w_dtype, autocast_adapter_dtype), input_scale)
        if base is None:
            base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        base.requires_grad_(False)
        self.base = base
        self.fan_in_fan_out = is_conv1d(base)
        self.in_features, self.out_features = in_features, out_features
        self.merged = False
        self._premerge_digests: dict | None = None  # weight_digests of the base before merge()
        self._merged_factors: tuple | None = None  # copies of what merge() folded in
        self.adapters = nn.ModuleDict({adapter_name: first})
        self.active_adapter: str | None = adapter_name

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int, dropout: float = 0.0,
                    generator: torch.Generator | None = None, chunks: int = 1,
                    adapter_name: str = "default", autocast_adapter_dtype: bool = True,
                    input_scale: bool = False) -> "GiVALinear":
        """Wrap ``linear`` (an nn.Linear or Conv1D; frozen, not copied) in a GiVA layer of rank ``r``."""
        shape = linear_shape(linear)
        if shape is None:
            raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        return cls(*shape, r, dropout=dropout, base=linear, generator=generator, chunks=chunks,
                   adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                   input_scale=input_scale)

    # ---- named adapters
    def add_adapter(self, name: str, r: int, chunks: int = 1, dropout: float = 0.0,
                    generator: torch.Generator | None = None,
                    autocast_adapter_dtype: bool | None = None, input_scale: bool = False) -> GiVAAdapter:
        """Add a new adapter (random orthonormal bases, adding zero); the active one is unchanged.
        autocast_adapter_dtype: as for the layer's first adapter unless given."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        w_dtype = self.base_dtype(self.base)
        adapter = GiVAAdapter(self.in_features, self.out_features, r, chunks, dropout, generator,
                              w_dtype, self.base.weight.device, vector_dtype_for(
                                  w_dtype, self.autocast_adapter_dtype if autocast_adapter_dtype is None
                                  else autocast_adapter_dtype), input_scale)
        self.adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; deleting the active one leaves the layer with none active."""
        if name not in self.adapters:
            raise UnknownAdapterError(f"no adapter named {name!r} (this layer has {list(self.adapters)})")
        if self.merged and name == self.active_adapter:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge it first")
        del self.adapters[name]
        if name == self.active_adapter:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter, or None to run the bare base layer."""
        if name is not None and name not in self.adapters:
            raise UnknownAdapterError(f"no adapter named {name!r} (this layer has {list(self.adapters)})")
        if self.merged and name != self.active_adapter:
            raise RuntimeError(f"adapter {self.active_adapter!r} is merged; unmerge before switching")
        self.active_adapter = name

    @property
    def adapter(self) -> GiVAAdapter:
        """The active adapter; RuntimeError if none is active."""
        if self.active_adapter is None:
            raise RuntimeError(f"no active adapter on this layer (it has {list(self.adapters)}); "
                               "set_adapter(name) first")
        return self.adapters[self.active_adapter]

    A = property(lambda self: self.adapter.A, doc="The active adapter's A (r, in).")
    B = property(lambda self: self.adapter.B, doc="The active adapter's B (out, r).")
    lambda_s = property(lambda self: self.adapter.lambda_s, doc="The active adapter's lambda_s (r,).")
    lambda_o = property(lambda self: self.adapter.lambda_o, doc="The active adapter's lambda_o (out,).")
    lambda_i = property(lambda self: self.adapter.lambda_i,
                        doc="The active adapter's input scale lambda_i (in,), or None.")
    r = property(lambda self: self.adapter.r, doc="The active adapter's rank.")
    chunks = property(lambda self: self.adapter.chunks, doc="The active adapter's chunk count.")
    dropout = property(lambda self: self.adapter.dropout, doc="The active adapter's input dropout.")

    # ---- base weight
    @staticmethod
    def base_dtype(base: nn.Module) -> torch.dtype:
        """The float dtype of ``base``'s weight: what the bases are kept in and the update is
        formed in (a quantized base overrides this with its compute dtype)."""
        return base.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as the base layer stores it ((in, out) for a Conv1D)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in): a transposed view for Conv1D, never a copy."""
        return self.base.weight.t() if self.fan_in_fan_out else self.base.weight

    # ---- the active adapter
    def reset_vectors(self) -> None:
        """lambda_s = 1, lambda_o = 0 (lambda_i = 1): the active adapter adds exactly zero."""
        with torch.no_grad():
            self.lambda_s.fill_(1.0)
            self.lambda_o.zero_()
            if self.lambda_i is not None:
                self.lambda_i.fill_(1.0)

    def set_bases(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replace the active adapter's frozen bases (shapes (r, in) and (out, r)), reset its vectors.

        With chunks > 1, B must be block-diagonal (build it with ``block_bases``)."""
        if tuple(A.shape) != tuple(self.A.shape) or tuple(B.shape) != tuple(self.B.shape):
            raise ValueError(f"bases must be A {tuple(self.A.shape)} and B {tuple(self.B.shape)}, "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        if self.chunks > 1:
            rows, cols = self.out_features // self.chunks, self.r // self.chunks
            blocks = [B[c * rows:(c + 1) * rows, c * cols:(c + 1) * cols] for c in range(self.chunks)]
            if not torch.equal(B, torch.block_diag(*blocks)):
                raise ValueError(f"this layer has {self.chunks} chunks: B must be block-diagonal with "
                                 f"{self.chunks} blocks of {rows}x{cols} (one basis per chunk)")
        if self.merged:
            raise RuntimeError("cannot change the bases of a merged layer; unmerge it first")
        with torch.no_grad():
            self.A.copy_(A)
            self.B.copy_(B)
        self.reset_vectors()

    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_o) B diag(lambda_s) A diag(lambda_i) as (out, in) in the weight's dtype,
        computed in fp32 (float64 for a float64 weight)."""
        return self._delta_of(self._factors())

    def _factors(self) -> tuple:
        return tuple(None if t is None else t.detach()
                     for t in (self.A, self.B, self.lambda_s, self.lambda_o, self.lambda_i))

    def _delta_of(self, factors: tuple) -> torch.Tensor:
        dtype = self.base_dtype(self.base)
        acc = torch.promote_types(dtype, torch.float32)
        *factors, lambda_i = factors
        delta = reference.delta_weight(*(t.to(acc) for t in factors))
        if lambda_i is not None:
            delta = delta * lambda_i.to(acc)
        return delta.to(dtype)

    def merge(self, keep_fingerprint: bool = True) -> None:
        """Fold the active adapter into base.weight; forward then runs the plain base layer.
        The adapter's tensors are copied (r * (in + out) + in + out values), so that unmerge()
        subtracts exactly what was added even if they are changed while merged (such changes take
        effect after unmerge). keep_fingerprint: remember the base weight's fingerprint
        (weight_digests) for unmerge(); merge_and_unload, which never unmerges, skips hashing."""
        if self.merged:
            raise RuntimeError("layer is already merged")
        factors = tuple(None if t is None else t.clone() for t in self._factors())
        delta = self._delta_of(factors)
        self._premerge_digests = (weight_digests(self.base.weight, cast=True) if keep_fingerprint
                                  else None)
        with torch.no_grad():
            self.weight_out_in().add_(delta)  # in place through the view
        self._merged_factors = factors
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge: subtracts the update merge() added (from its copies of the adapter's
        tensors), so W is back up to the weight dtype's rounding, and the weight keeps the
        fingerprint it had before merge() (see weight_digests)."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        with torch.no_grad():
            self.weight_out_in().sub_(self._delta_of(self._merged_factors))
        if self._premerge_digests is not None:
            _remember_digests(self.base.weight, _sha256(self.base.weight.detach()), self._premerge_digests)
        self._premerge_digests = self._merged_factors = None
        self.merged = False

    def mixed_state(self) -> tuple | None:
        """This thread's mixed-batch state of the layer (row ids, lookup, tensors), or None."""
        return PER_THREAD.mixed.get(id(self)) if PER_THREAD.mixed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixed_state()
        if mixed is not None:
            if self.merged:
                raise RuntimeError(f"adapter {self.active_adapter!r} is merged into this layer; "
                                   "unmerge before running a mixed-adapter batch")
            ids, lookup, tensors = mixed
            if lookup is not None:  # per call, so that ids changed in place take effect
                ids = lookup[ids + 1]
            return mixed_giva_linear(x, self.weight_out_in(), self.base.bias, *tensors, ids)
        if self.merged or self.active_adapter is None or (PER_THREAD.bare and id(self) in PER_THREAD.bare):
            return self.base(x)
        a = self.adapter
        return giva_linear(x, self.weight_out_in(), self.base.bias, a.A, a.B, a.lambda_s,
                           a.lambda_o, a.dropout, self.training, a.lambda_i)

    def extra_repr(self) -> str:
        extra = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.base.bias is not None}, active_adapter={self.active_adapter!r}, "
                f"merged={self.merged}{extra}")


def check_rank(r: int, in_features: int, out_features: int, needed: int | None = None,
               where: str = "layer") -> None:
    """Raise ValueError unless 0 < r and ``needed`` (default r) <= min(in, out)."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{where}: rank r must be a positive int, got {r!r}")
    needed = r if needed is None else needed
    if needed > min(in_features, out_features):
        raise ValueError(f"{where}: needs rank {needed} but the layer is {out_features}x{in_features} "
                         f"(rank at most {min(in_features, out_features)})")
