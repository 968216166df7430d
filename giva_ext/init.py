"""Gradient-informed init: the bases A, B from the SVD of each target layer's loss gradient.

The gradient G = sum over batches of g^T x (out x in) of each layer is never formed by default:
the init streams its sketches G Omega and Psi G (giva_ext.rsvd.GradientSketch, docs/design.md
§2) from the layer's input x and output gradient g, and takes the singular vectors from them
(with precondition="rms", of D_g^-1 G D_x^-1: giva_ext.precondition). svd="dense"
keeps the exact dense gradient instead (the oracle; also used for any layer too small for a sketch
to save memory). Under torch.distributed every process sketches its own batches and one
all_reduce sums the sketches. A cache file lets an interrupted or repeated init resume.
"""
from __future__ import annotations

import itertools
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checks import maybe_non_finite
from .config import INIT_MODES
from .distributed import check_not_sharded, rank_and_world
from .layer import GiVALinear, block_bases, random_orthonormal
from .model import adapted_module, check_unmerged, get_config, giva_layers
from .precondition import PRECONDITIONERS, FeatureScales
from .rsvd import GradientSketch, randomized_svd
from .serialization import (_atomic_write, base_fingerprint, check_fingerprint_schema, pack,
                            read_regular_file, unpack)

logger = logging.getLogger(__name__)

# A singular value below this fraction of the largest one counts as "no information"; for a layer
# whose dtype is coarser (bf16, fp16), below that dtype's eps (round-off of the gradient's entries).
RANK_DEFICIENT_RTOL = 1e-6
SVD_METHODS = ("sketch", "dense")
CACHE_FORMAT = 2  # 2: with the checksum record of serialization.pack
CACHE_KEY = "giva_init_cache"
# The progress record of a cache and the type of each field.
PROGRESS_TYPES = {"pass": int, "batches": int, "losses": list, "total": (int, type(None)), "zero": list,
                  "complete": bool}
# A later pass must see the batches of pass 1 again: their losses must agree to this tolerance.
PASS_LOSS_RTOL = 1e-4
# Cache keys of the preconditioner's feature scales (a "/" never appears in a module name).
SCALES_PREFIX = "feature_scales/"


def model_loss(model: nn.Module, batch):
    """The loss of a Hugging Face style model: model(**batch).loss, model(*batch).loss or model(batch).loss."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if getattr(out, "loss", None) is None:
        raise TypeError(f"the model's output ({type(out).__name__}) has no .loss; pass "
                        "loss_fn=lambda model, batch: ... to init_bases")
    return out.loss


@contextmanager
def _frozen_eval(model: nn.Module, layers: dict[str, GiVALinear]):
    """Eval mode, no parameter requiring grad, adapters at zero; everything restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    vectors = [(vector, vector.detach().clone()) for layer in layers.values()
               for vector in layer.adapter.vectors()]
    model.eval()
    model.requires_grad_(False)
    for layer in layers.values():
        layer.reset_vectors()
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for vector, saved in vectors:
                vector.copy_(saved)


class DenseGradient:
    """The exact sum of g^T x (out x in, float32) and its randomized SVD: svd="dense", and any layer
    whose sketch would not be smaller than its gradient."""

    passes = 1

    def __init__(self, out_features: int, in_features: int, k: int, oversample: int, device,
                 generator: torch.Generator, niter: int):
        self.k, self.oversample, self.generator, self.niter = k, oversample, generator, niter
        self.G = torch.zeros(out_features, in_features, dtype=torch.float32, device=device)

    def test_matrices(self):
        return None

    def update(self, x: torch.Tensor, g: torch.Tensor, test_matrices=None) -> None:
        self.G.addmm_(g.t().float(), x.float())

    def is_zero(self) -> bool:
        return not self.G.any()

    def sums(self) -> list[torch.Tensor]:
        return [self.G]

    def state(self) -> dict[str, torch.Tensor]:
        return {"G": self.G}

    def load_state(self, pass_index: int, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            setattr(self, key, value.to(self.G))

    def svd(self):
        return randomized_svd(self.G, self.k, self.oversample, self.niter, self.generator)


@dataclass
class _Unit:
    """What one set of bases comes from: a layer, or one output chunk of a fused layer."""
    name: str        # the layer's name, or "<layer>[c]" for chunk c
    layer: str
    rows: slice      # the layer's outputs this unit covers
    r: int
    needed: int      # singular directions the init mode uses: 2r (VrU2r) or r
    acc: DenseGradient | GradientSketch | None = None


def _units(layers: dict[str, GiVALinear], mode: str) -> list[_Unit]:
    units = []
    for name, layer in layers.items():
        chunks = getattr(layer, "chunks", 1)
        out, r = layer.out_features // chunks, layer.r // chunks
        needed = 2 * r if mode == "VrU2r" else r
        if needed > min(layer.in_features, out):
            raise ValueError(f"init mode {mode} needs rank {needed} but layer {name!r} is "
                             f"{out}x{layer.in_features}" + (" per chunk" if chunks > 1 else ""))
        for c in range(chunks):
            units.append(_Unit(name if chunks == 1 else f"{name}[{c}]", name,
                               slice(c * out, (c + 1) * out), r, needed))
    return units


def _make_accumulator(unit: _Unit, layer: GiVALinear, svd: str, passes: int, oversample: int | None,
                      seed: int, generator: torch.Generator, niter: int):
    out, n_in = unit.rows.stop - unit.rows.start, layer.in_features
    device = layer.base.weight.device
    # Default k = 2 * needed + 1: Tropp et al.'s choice for a one-pass reconstruction of rank needed.
    k = min(unit.needed + (unit.needed + 1 if oversample is None else oversample), out, n_in)
    if svd == "sketch" and GradientSketch.floats(out, n_in, k) < out * n_in:
        dtype = torch.float64 if layer.base.weight.dtype == torch.float64 else torch.float32
        return GradientSketch(unit.name, out, n_in, k, passes, seed, device, dtype)
    return DenseGradient(out, n_in, unit.needed, 8 if oversample is None else oversample, device,
                         generator, niter)


def _all_reduce_sum(tensors: list[torch.Tensor], op=dist.ReduceOp.SUM) -> None:
    """Sum (or reduce by ``op``) each tensor over all processes, in place: one all_reduce per
    (device, dtype)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=op)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class _Cache:
    """The accumulators and progress of an init, in one safetensors file written atomically.

    The header records what the sketches are of (settings and base-weight fingerprint) and how far
    the init got (pass, batches of that pass, pass-1 losses); a file from another model or other
    settings is refused. Under torch.distributed each process keeps its own file, <name>.rank<i>.
    """

    def __init__(self, path, settings: dict, layers: dict[str, GiVALinear], rank: int, world: int):
        path = Path(path)
        if world > 1:
            path = path.with_name(f"{path.name}.rank{rank}")
        self.path = path
        self.settings = settings
        self.fingerprint = [base_fingerprint(n, layer) for n, layer in layers.items()]

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if not self.path.exists():
            return None
        try:
            _, header, tensors, verified = unpack(read_regular_file(self.path), CACHE_KEY)
            if header.get("format") != CACHE_FORMAT:
                raise ValueError(f"it has format {header.get('format')!r}, this version reads "
                                 f"{CACHE_FORMAT}")
            if not verified:
                raise ValueError("its checksum record is missing")
            progress, settings, fingerprint = header["progress"], header["settings"], header["fingerprint"]
            check_fingerprint_schema(fingerprint)
            wrong = [k for k, kind in PROGRESS_TYPES.items() if not isinstance(progress.get(k), kind)]
            if wrong or not isinstance(settings, dict):
                raise ValueError(f"its header has a wrong schema (progress fields {wrong}, settings "
                                 f"{type(settings).__name__})")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"init cache {self.path} is not a usable giva_ext init cache ({exc}); "
                             "delete it or pass another cache path") from exc
        for key, now in self.settings.items():
            saved = settings.get(key)
            if saved != now:
                raise ValueError(f"init cache {self.path} was made with {key}={saved!r} but this init "
                                 f"has {key}={now!r}; delete it or pass another cache path")
        saved_fp = {e["name"]: e for e in fingerprint}
        now_fp = {e["name"]: e for e in self.fingerprint}
        if set(saved_fp) != set(now_fp):
            raise ValueError(f"init cache {self.path} was made for other layers: missing here "
                             f"{sorted(set(saved_fp) - set(now_fp))[:3]}, not in the cache "
                             f"{sorted(set(now_fp) - set(saved_fp))[:3]}")
        for name, entry in now_fp.items():
            for key in ("shape", "dtype", "sha256"):
                if entry[key] != saved_fp[name][key]:
                    raise ValueError(f"init cache {self.path} was made for another model: layer "
                                     f"{name!r} has {key} {entry[key]} here but {saved_fp[name][key]} "
                                     "in the cache")
        return progress, tensors

    def save(self, progress: dict, units: list[_Unit], scales: dict[str, FeatureScales] | None) -> None:
        tensors = {f"{u.name}.{key}": t.detach().cpu().contiguous()
                   for u in units for key, t in u.acc.state().items()}
        if scales is not None and _scales_ready(scales):
            tensors.update({f"{SCALES_PREFIX}{name}.{key}": t.detach().cpu().contiguous()
                            for name, sc in scales.items() for key, t in sc.state().items()})
        header = {"library": "giva_ext", "format": CACHE_FORMAT, "settings": self.settings,
                  "fingerprint": self.fingerprint, "progress": progress}
        _atomic_write(self.path, pack(tensors, CACHE_KEY, header)[0])


def _restore(path: Path, units: list[_Unit], progress: dict, tensors: dict[str, torch.Tensor],
             scales: dict[str, FeatureScales] | None) -> None:
    if scales is not None and any(key.startswith(SCALES_PREFIX) for key in tensors):
        for name, sc in scales.items():
            keys = {k: f"{SCALES_PREFIX}{name}.{k}" for k in ("inv_in", "inv_out")}
            missing = [key for key in keys.values() if key not in tensors]
            if missing:
                raise ValueError(f"init cache {path}: the feature scales of {name!r} are missing")
            sc.load_state({k: tensors[key] for k, key in keys.items()})
    tensors = {key: t for key, t in tensors.items() if not key.startswith(SCALES_PREFIX)}
    for u in units:
        prefix = f"{u.name}."
        state = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
        u.acc.load_state(min(progress["pass"], u.acc.passes - 1), state)
        if set(state) != set(u.acc.state()):
            raise ValueError(f"init cache {path}: the tensors of {u.name!r} are {sorted(state)}, "
                             f"expected {sorted(u.acc.state())}")


def _batch_loss(model, batch, loss_fn, index: int):
    loss = loss_fn(model, batch) if loss_fn is not None else model_loss(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape} (batch {index})")
    if not loss.requires_grad:
        raise ValueError(f"the loss of batch {index} has no grad: it does not depend on any "
                         "GiVA target layer (or was computed under torch.no_grad)")
    return loss


def _check_finite_forward(records, loss: torch.Tensor, index: int) -> None:
    """FloatingPointError naming the first layer (in forward order) whose input holds NaN or Inf,
    else saying the loss does."""
    if not maybe_non_finite([x for _, x, _ in records] + [loss]):
        return
    for name, x, _ in records:
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite input to layer {name!r} (batch {index}): NaN or Inf "
                                     "comes from the batch or a module before this layer")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss of batch {index} is {loss.item()} (every layer's input is "
                                 "finite: the model's head or the loss function produced it)")


def _run_pass(model, layers, units, batches, count: int, loss_fn, pass_index: int, passes: int,
              progress_state: dict, cache: _Cache | None, cache_every: int, show: bool,
              scales: dict[str, FeatureScales] | None, world: int) -> int:
    """One pass over the first ``count`` batches: forward hooks keep each target's input x, a
    zero probe on its output gives g = dL/dy, and every unit of the layer adds g^T x to its
    accumulator (D_g^-1 g^T x D_x^-1 with ``scales``, which the first batch sets). No parameter
    requires grad, so no weight gradient or .grad is ever made. Returns the number of batches of
    the pass; skips those the cache already holds."""
    by_layer: dict[str, list[_Unit]] = {}
    for u in units:
        if pass_index < u.acc.passes:
            by_layer.setdefault(u.layer, []).append(u)
    records: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook_for(name):
        def hook(module, inputs, output):
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            output = output + probe
            records.append((name, inputs[0].detach(), output))
            return output
        return hook

    skip = progress_state["batches"]
    losses = progress_state["losses"]
    handles = [layers[name].register_forward_hook(hook_for(name)) for name in by_layer]
    seen = 0
    desc = "giva init: gradients" if passes == 1 else f"giva init: pass {pass_index + 1}/{passes}"
    try:
        bar = tqdm(itertools.islice(batches, count), total=count, desc=desc, disable=not show)
        for seen, batch in enumerate(bar, start=1):
            if seen <= skip:
                continue  # already in the cache's sketches
            records.clear()
            with torch.enable_grad():
                loss = _batch_loss(model, batch, loss_fn, seen)
                _check_finite_forward(records, loss, seen)
                dys = torch.autograd.grad(loss, [out for _, _, out in records], allow_unused=True)
            # In backward order, so the error names the layer where a NaN or Inf first appears.
            if maybe_non_finite(dys):
                for (name, _, _), dy in reversed(list(zip(records, dys))):
                    if dy is not None and not torch.isfinite(dy).all():
                        raise FloatingPointError(f"non-finite gradient at the output of layer {name!r} "
                                                 f"(batch {seen}; the loss and every layer's input are finite)")
            value = loss.item()
            if pass_index == 0:
                losses.append(value)
            elif seen > len(losses) or not math.isclose(value, losses[seen - 1], rel_tol=PASS_LOSS_RTOL,
                                                        abs_tol=1e-12):
                first = losses[seen - 1] if seen <= len(losses) else "none"
                raise ValueError(f"batch {seen} has loss {value:.6g} in pass {pass_index + 1} but "
                                 f"{first} in pass 1: with passes > 1 the batches must be the same "
                                 "in every pass (a list, or a DataLoader without shuffling)")
            flat = [(name, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
                    for (name, x, _), dy in zip(records, dys) if dy is not None]
            if scales is not None and not _scales_ready(scales):
                for name, x2, dy2 in flat:
                    scales[name].add(x2, dy2)
                if _finish_scales(scales, world, failed=False):
                    raise RuntimeError("init_bases failed in another process (see its error)")
            if scales is not None:  # once per layer, not per unit of a fused layer
                flat = [(name, *scales[name].apply(x2, dy2)) for name, x2, dy2 in flat]
            test_matrices = {}
            for name, x2, dy2 in flat:
                for u in by_layer[name]:
                    if u.name not in test_matrices:  # drawn once per batch, even for shared layers
                        test_matrices[u.name] = u.acc.test_matrices()
                    u.acc.update(x2, dy2[:, u.rows], test_matrices[u.name])
            active = [u for u in units if pass_index < u.acc.passes]
            if maybe_non_finite([t for u in active for t in u.acc.sums()]):
                for u in active:
                    sums = u.acc.sums()
                    if not all(torch.isfinite(t).all() for t in sums):
                        raise FloatingPointError(f"the gradient sum of layer {u.name!r} overflowed "
                                                 f"{sums[0].dtype} at batch {seen}; scale the loss down")
            records.clear()
            progress_state["batches"] = seen
            if cache is not None and seen % cache_every == 0:
                cache.save(progress_state, units, scales)
    finally:
        for handle in handles:
            handle.remove()
    if pass_index > 0 and seen != len(losses):
        raise ValueError(f"pass {pass_index + 1} saw {seen} batches but pass 1 saw {len(losses)}: "
                         "with passes > 1 the batches must be the same in every pass")
    return seen


def _scales_ready(scales: dict[str, FeatureScales]) -> bool:
    return all(sc.inv_in is not None for sc in scales.values())


def _finish_scales(scales: dict[str, FeatureScales], world: int, failed: bool) -> bool:
    """Sum the first batch's feature statistics over all processes and set the scales; returns
    whether another process reported a failure instead (a process without batches, or one that
    failed before its first batch's statistics, still takes part, so none waits forever)."""
    others_failed = False
    if world > 1:
        sums = [sc.sums for sc in scales.values()]
        flag = torch.tensor([float(failed)], dtype=sums[0].dtype, device=sums[0].device)
        _all_reduce_sum(sums + [flag])
        others_failed = flag.item() > float(failed)
    for sc in scales.values():
        sc.finish()
    return others_failed


def _share_restored_scales(scales: dict[str, FeatureScales]) -> None:
    """Give the feature scales a process restored from its cache to the processes whose cache did
    not hold them (interrupted before its first save), so that all of them skip the first batch's
    all-reduce alike. Set scales are positive and equal in every process: a max over the
    processes, with zeros where unset, hands them on."""
    ready = _scales_ready(scales)
    sides = []
    for sc in scales.values():
        if not ready:
            sc.inv_in = torch.zeros_like(sc.sums[:sc.in_features])
            sc.inv_out = torch.zeros_like(sc.sums[sc.in_features:-1])
        sides += [sc.inv_in, sc.inv_out]
    anyone = torch.full((1,), float(ready), dtype=sides[0].dtype, device=sides[0].device)
    _all_reduce_sum(sides + [anyone], op=dist.ReduceOp.MAX)
    if anyone.item() == 0:  # no cache held them: the first batch sets them
        for sc in scales.values():
            sc.inv_in = sc.inv_out = None


def _sum_over_processes(units: list[_Unit], seen: int, failed: bool, world: int) -> int:
    """Sum the accumulators and batch counts of all processes (a no-op without a process group).
    A failure flag rides along, so every process stops together instead of waiting forever."""
    if world == 1:
        return seen
    sums = [t for u in units for t in u.acc.sums()]
    ref = sums[0]
    counts = torch.tensor([float(seen), float(failed)], dtype=ref.dtype, device=ref.device)
    _all_reduce_sum(sums + [counts])
    if not failed and counts[1].item() > 0:
        raise RuntimeError("init_bases failed in another process (see its error)")
    return int(counts[0].item())


def _random_unit_bases(unit: _Unit, n_in: int, generator: torch.Generator):
    out = unit.rows.stop - unit.rows.start
    return random_orthonormal(unit.r, n_in, generator), random_orthonormal(out, unit.r, generator), None


def _unit_bases(unit: _Unit, u, s, v, mode: str, generator: torch.Generator, dtype: torch.dtype,
                deficient: list):
    """A (r, in) and B (out, r) from G ~ U S V^T as the init mode says; a layer whose gradient has
    fewer informative directions than the mode uses is added to ``deficient`` (name, count, needed).

    U and V are orthonormal even where S is zero (the SVD completes them), so the directions past
    the gradient's rank are an orthonormal completion, orthogonal to the informative ones."""
    r, needed = unit.r, unit.needed
    s_used = s[:needed]
    rtol = max(RANK_DEFICIENT_RTOL, torch.finfo(dtype).eps)
    informative = int((s_used > s_used[0] * rtol).sum())
    if informative < needed:
        deficient.append((unit.name, informative, needed))
    A = v[:, :r].t()
    if mode == "VrU2r":
        B = u[:, r:2 * r]
    elif mode == "VrUr":
        B = u[:, :r]
    else:  # "Vr"
        B = random_orthonormal(u.shape[0], r, generator, u.dtype, u.device)
    return A, B, s_used


def _warn_rank_deficient(deficient: list, mode: str, count: int) -> None:
    """One warning for every layer of one init_bases call whose gradient had too few directions."""
    if not deficient:
        return
    worst = sorted(deficient, key=lambda d: d[1] / d[2])
    shown = ", ".join(f"{name!r} {found} of {needed}" for name, found, needed in worst[:5])
    more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
    _warn_at_caller(
        f"giva init: {len(deficient)} of {count} layers have a gradient with fewer informative "
        f"directions (singular values above {RANK_DEFICIENT_RTOL:g} of the largest, or the dtype's eps) "
        f"than {mode} uses; the fewest: {shown}{more}. Each of those bases is completed by arbitrary "
        "orthonormal directions, orthogonal to the informative ones. It happens when the gradient "
        "batches hold few tokens or a layer's gradient has low rank (the layer before a freshly "
        "initialised head); more gradient batches help, or a smaller r. init_bases returns every "
        "layer's singular values.")


def _warn_at_caller(message: str, every_process: bool = False) -> None:
    """A RuntimeWarning that points at the user's code: the first frame outside giva_ext and the
    libraries that call into it (transformers' Trainer running the init callback, accelerate).
    Under torch.distributed only process 0 warns about what all processes share (the summed
    gradient); ``every_process`` for what is each process's own (its batches)."""
    if not every_process and rank_and_world()[0] != 0:
        return
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL_PACKAGES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


_INTERNAL_PACKAGES = {"giva_ext", "transformers", "accelerate", "torch"}


def _summary(unit: _Unit, s: torch.Tensor) -> str:
    acc = unit.acc
    how = (f"sketch k={acc.k}, k'={acc.k_co}, {acc.passes} pass(es)" if isinstance(acc, GradientSketch)
           else "dense gradient")
    top = s[0].item()
    decay = ", ".join(f"sigma_{i}/sigma_1={s[i - 1].item() / top:.3g}" for i in sorted({unit.needed, len(s)}))
    return f"{unit.name}: rank {unit.needed} used ({how}); {decay}"


def init_bases(model: nn.Module, batches: Iterable | None = None, loss_fn=None, *,
               num_batches: int | None = None, init_mode: str | None = None,
               precondition: str | None = None,
               on_zero_grad: str = "error", niter: int = 4, progress: bool = True,
               svd: str = "sketch", passes: int = 1, oversample: int | None = None,
               cache: str | Path | None = None, cache_every: int = 1) -> dict:
    """Set every GiVA layer's bases from the loss gradient at the current (pretrained) weights.

    Runs ``num_batches`` (default: config.grad_batches) batches from ``batches`` (a warning says
    so when a list or tuple holds more and num_batches was not given) with the adapters at zero
    and sets A, B from the truncated SVD of each target's mean gradient G = dL/dW, as the init mode
    says (default: config.init_mode; "random" needs no batches). The loss is
    ``loss_fn(model, batch)`` or the model's own ``.loss``, so ``model`` may be a head or wrapper
    around the module apply_giva adapted (whose layer names the result and the cache use).
    Finally lambda_s = 1, lambda_o = 0 (and lambda_i = 1).

    ``precondition`` (default: config.precondition): "none" takes the SVD of G, "rms" of
    D_g^-1 G D_x^-1, each input feature and each output-gradient feature divided by its RMS over
    the tokens of the first batch (giva_ext.precondition: the step an Adam-style optimiser takes
    first, no longer dominated by a few outlier features).

    svd="sketch" (default) never forms G: each layer keeps the sketches G Omega (out x k) and
    Psi G (k' x in) with k = d + oversample, d the directions the mode uses (2r for VrU2r, else
    r), oversample d + 1 by default (k = 2d + 1) and k' = 2k + 1, built from the layer's input and
    output gradient (see giva_ext.rsvd.GradientSketch). A layer so small that its sketch would not
    be smaller than G keeps G. ``passes`` > 1 runs the batches
    again to sharpen the subspace (subspace iteration); then ``batches`` must be re-iterable (a
    list, or a DataLoader without shuffling, not a generator) and yield the same batches each
    time (checked through the losses). svd="dense" keeps the exact gradient of every layer and
    takes its randomized SVD with ``niter`` power iterations and ``oversample`` (default 8) extra
    columns.

    Under torch.distributed (any backend) each process runs its own batches and one all_reduce
    sums the accumulators and batch counts, so every process gets the bases of all processes' data;
    only rank 0 shows progress. ``cache`` names a file (per process under torch.distributed:
    <cache>.rank<i>) where the accumulators are saved every ``cache_every`` batches and at the end
    of each pass; an init given the same file resumes where it stopped (a finished one needs no
    batches). A cache made for another model or other settings is refused.

    A layer whose gradient is exactly zero (not reached by the loss) is an error unless
    ``on_zero_grad="random"``, which gives it random orthonormal bases with a warning. NaN or Inf in
    a layer's input, the loss or a layer's output gradient, and a gradient sum that overflows its
    accumulator, are FloatingPointErrors naming the layer (the first where it appears) and batch. A
    gradient with fewer informative directions than the mode uses warns and gets an orthonormal
    completion. Nothing in
    the model changes unless every layer succeeds. Returns {layer name: the singular values of the
    mean gradient used (2r for VrU2r, else r; of the preconditioned one with precondition="rms")};
    a fused layer (chunks > 1) maps to a
    (chunks, ...) tensor. A per-layer summary (rank used, spectrum decay) is logged at INFO level.
    """
    # The layers of the adapted module (named as in its adapter files and cache), the loss from
    # ``model``, which may be a head or wrapper around it.
    config = get_config(model)
    layers = giva_layers(adapted_module(model))
    if init_mode is not None and init_mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES} (or None for the config's), got {init_mode!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                    or num_batches <= 0):
        raise ValueError(f"num_batches must be a positive int (or None for the config's grad_batches), "
                         f"got {num_batches!r}")
    if precondition is not None and precondition not in PRECONDITIONERS:
        raise ValueError(f"precondition must be one of {PRECONDITIONERS} (or None for the config's), "
                         f"got {precondition!r}")
    mode = init_mode or config.init_mode
    precondition = precondition or config.precondition
    if on_zero_grad not in ("error", "random"):
        raise ValueError(f"on_zero_grad must be 'error' or 'random', got {on_zero_grad!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    for arg, value, least in (("passes", passes, 1), ("oversample", 0 if oversample is None else oversample, 0),
                              ("cache_every", cache_every, 1), ("niter", niter, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{arg} must be an int >= {least}, got {value!r}")
    if passes > 1 and svd != "sketch":
        raise ValueError("passes > 1 applies to svd='sketch' only (svd='dense' is exact)")
    if passes > 1 and batches is not None and iter(batches) is batches:
        raise ValueError(f"passes={passes} runs the batches {passes} times, but batches is a one-shot "
                         f"iterator ({type(batches).__name__}); pass a list or a DataLoader")
    check_unmerged(layers, "init_bases")
    check_not_sharded(layers, "call init_bases")
    units = _units(layers, mode)
    generator = torch.Generator().manual_seed(config.seed)
    rank, world = rank_and_world()
    results: dict[str, tuple] = {}
    if mode == "random":
        results = {u.name: _random_unit_bases(u, layers[u.layer].in_features, generator) for u in units}
    else:
        count = num_batches or config.grad_batches
        if (num_batches is None and isinstance(batches, Sequence) and not isinstance(batches, (str, bytes))
                and len(batches) > count):
            _warn_at_caller(f"init_bases: using the first {count} of the {len(batches)} batches given "
                            f"(the config's grad_batches is {count}); pass num_batches={len(batches)} "
                            "to average the gradient over all of them", every_process=True)
        for u in units:
            u.acc = _make_accumulator(u, layers[u.layer], svd, passes, oversample, config.seed,
                                      generator, niter)
        scales = None
        if precondition == "rms":
            scales = {name: FeatureScales(layer.in_features, layer.out_features, layer.base.weight.device)
                      for name, layer in layers.items()}
        store = None
        if cache is not None:
            settings = {"svd": svd, "init_mode": mode, "precondition": precondition, "r": config.r,
                        "seed": config.seed, "passes": passes, "num_batches": count, "oversample": oversample,
                        "niter": niter, "world_size": world, "rank": rank,
                        "units": {u.name: [type(u.acc).__name__, u.acc.k] for u in units}}
            store = _Cache(cache, settings, layers, rank, world)
        state = {"pass": 0, "batches": 0, "losses": [], "total": None, "zero": [], "complete": False}
        loaded = store.load() if store is not None else None
        if loaded is not None:
            state, tensors = loaded
            _restore(store.path, units, state, tensors, scales)
        if store is not None and scales is not None and world > 1:
            _share_restored_scales(scales)
        if not state["complete"] and batches is None:
            raise ValueError(f"init mode {mode} needs batches to take the gradient from")
        passes_needed = max(u.acc.passes for u in units)  # dense layers need one
        with _frozen_eval(model, layers):
            while not state["complete"]:
                p = state["pass"]
                seen, failure = 0, None
                try:
                    seen = _run_pass(model, layers, units, batches, count, loss_fn, p, passes_needed,
                                     state, store, cache_every, progress and rank == 0, scales, world)
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes know
                    if world == 1:
                        raise
                    failure = exc
                if scales is not None and not _scales_ready(scales) and world > 1:
                    # No first batch here (none at all, or a failure before it): the others wait
                    # for this process's share of the feature statistics.
                    if _finish_scales(scales, world, failed=failure is not None) and failure is None:
                        failure = RuntimeError("init_bases failed in another process (see its error)")
                total = _sum_over_processes([u for u in units if p < u.acc.passes], seen,
                                            failure is not None, world)
                if failure is not None:
                    raise failure
                if p == 0:
                    if total == 0:
                        raise ValueError("init_bases got an empty batch iterable")
                    if total < count * world:
                        _warn_at_caller(f"init_bases: the batches ran out after {total} of the "
                                        f"{count * world} asked for ({count} per process, num_batches or "
                                        "the config's grad_batches); the gradient is their mean")
                    state["total"] = total
                    state["zero"] = [u.name for u in units if u.acc.is_zero()]
                    if state["zero"] and on_zero_grad == "error":
                        raise ValueError(f"layer {state['zero'][0]!r} got an all-zero gradient (the "
                                         "loss does not reach it); pass on_zero_grad='random' to give "
                                         "it random bases")
                if p + 1 < passes_needed:
                    for u in units:
                        if p + 1 < u.acc.passes:
                            u.acc.next_pass()
                    state.update({"pass": p + 1, "batches": 0})
                else:
                    state["complete"] = True
                if store is not None:
                    store.save(state, units, scales)
        zero = set(state["zero"])
        deficient = []
        for u in units:
            if u.name in zero:
                _warn_at_caller(f"giva init: layer {u.name!r} got an all-zero gradient; using random "
                                "orthonormal bases")
                results[u.name] = _random_unit_bases(u, layers[u.layer].in_features, generator)
                continue
            left, s, right = u.acc.svd()
            s = s / state["total"]  # singular values of the mean gradient
            if rank == 0:
                logger.info("giva init: %s", _summary(u, s))
            results[u.name] = _unit_bases(u, left, s, right, mode, generator,
                                          layers[u.layer].A.dtype, deficient)
        _warn_rank_deficient(deficient, mode, len(units))
    spectra = {}
    for name, layer in layers.items():
        parts = [results[u.name] for u in units if u.layer == name]
        A, B = block_bases([(a.to(layer.A), b.to(layer.B)) for a, b, _ in parts])
        layer.set_bases(A, B)
        values = [s for _, _, s in parts]
        spectra[name] = values[0] if len(values) == 1 else (
            None if values[0] is None else torch.stack(values))
    return spectra
