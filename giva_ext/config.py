"""GiVAConfig: what to adapt and how to initialise it."""
from __future__ import annotations

import dataclasses
import numbers
import re

try:  # the parser behind re.compile: public as sre_parse before Python 3.11
    from re import _parser as _regex_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _regex_parser
from dataclasses import dataclass, field

from .precondition import PRECONDITIONERS

INIT_MODES = ("VrU2r", "VrUr", "Vr", "random")


@dataclass
class GiVAConfig:
    """Settings of a GiVA adapter.

    r: rank of the frozen bases (A is r x in, B is out x r).
    target_modules: module names (a name matches a module whose qualified name equals it or ends
        with "." + name), a regular expression (full match on the qualified name), or "all-linear"
        (every nn.Linear and transformers Conv1D except the output head: get_output_embeddings(),
        modules named lm_head, classifier, score or qa_outputs, and modules_to_save).
    init_mode: how init_bases picks A and B from the gradient's SVD G = U S V^T:
        "VrU2r" (A = V[:, :r]^T, B = U[:, r:2r]), "VrUr" (B = U[:, :r]), "Vr" (B random
        orthonormal) or "random" (both random orthonormal, no gradient needed).
    precondition: "none" (the paper's: the SVD of the gradient G) or "rms" (the SVD of
        D_g^-1 G D_x^-1, every input feature and output-gradient feature divided by its RMS over
        the first gradient batch: the step an Adam-style optimiser takes first, no longer
        dominated by a few outlier features; see giva_ext.precondition and docs/accuracy.md).
    grad_batches: how many batches init_bases averages the gradient over.
    dropout: dropout on the adapter's input during training (the base layer sees x unchanged).
    modules_to_save: modules that train fully and are saved with the adapter (e.g. a new head).
    seed: seeds the random bases and the randomized SVD, so init is deterministic.
    autocast_adapter_dtype: on a float16 / bfloat16 model, keep the trainable vectors in float32
        (as PEFT does by default): their optimizer updates and gradients keep float32 precision.
        False: the vectors take the base weights' dtype.
    input_scale: also train a per-input-feature scale lambda_i (in values per layer, starting at 1):
        delta W = diag(lambda_o) B diag(lambda_s) A diag(lambda_i), so the update's row space is no
        longer fixed to span(A). The layer then saves its input x for backward (as LoRA does).
        False (the paper's adapter) by default: docs/accuracy.md has what it measured.
    fused_chunks: {target name: n} for fused projections whose output is n equal chunks (GPT-2's
        c_attn is q, k, v: {"c_attn": 3}). Each chunk gets its own rank-r adapter with bases from
        its own rows of the gradient, so the layer has rank n * r and a block-diagonal B. Names
        match like target_modules names.
    """

    r: int = 8
    target_modules: list[str] | str = "all-linear"
    init_mode: str = "VrU2r"
    grad_batches: int = 1
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    seed: int = 0
    fused_chunks: dict[str, int] = field(default_factory=dict)
    autocast_adapter_dtype: bool = True
    input_scale: bool = False
    precondition: str = "none"

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"GiVAConfig.r must be a positive int, got {self.r!r}")
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"GiVAConfig.init_mode must be one of {INIT_MODES}, got {self.init_mode!r}")
        if not isinstance(self.grad_batches, int) or isinstance(self.grad_batches, bool) or self.grad_batches <= 0:
            raise ValueError(f"GiVAConfig.grad_batches must be a positive int, got {self.grad_batches!r}")
        if (not isinstance(self.dropout, numbers.Real) or isinstance(self.dropout, bool)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GiVAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError("GiVAConfig.target_modules must be a non-empty list of names, "
                                 f"a regex or 'all-linear', got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("GiVAConfig.target_modules must be a list of names, a regex or "
                             f"'all-linear', got {self.target_modules!r}")
        if isinstance(self.modules_to_save, str):
            raise ValueError("GiVAConfig.modules_to_save must be a list of module names, got the string "
                             f"{self.modules_to_save!r} (write [{self.modules_to_save!r}])")
        self.modules_to_save = list(self.modules_to_save or [])
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError("GiVAConfig.modules_to_save must be a list of module names, got "
                             f"{self.modules_to_save!r}")
        # torch.Generator.manual_seed takes [-2**63, 2**64): refuse here what would fail there later.
        if (not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool)
                or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"GiVAConfig.seed must be an int in [-2**63, 2**64), got {self.seed!r}")
        chunks = dict(self.fused_chunks or {})
        if not all(isinstance(k, str) and k and isinstance(n, int) and not isinstance(n, bool) and n > 0
                   for k, n in chunks.items()):
            raise ValueError("GiVAConfig.fused_chunks must map module names to positive ints, "
                             f"got {self.fused_chunks!r}")
        self.fused_chunks = chunks
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"GiVAConfig.precondition must be one of {PRECONDITIONERS}, got {self.precondition!r}")
        if not isinstance(self.input_scale, bool):
            raise ValueError(f"GiVAConfig.input_scale must be a bool, got {self.input_scale!r}")
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise ValueError(f"GiVAConfig.autocast_adapter_dtype must be a bool, got {self.autocast_adapter_dtype!r}")

    def rank_needed(self, init_mode: str | None = None) -> int:
        """Singular directions the init needs: 2r for VrU2r, r otherwise."""
        return 2 * self.r if (init_mode or self.init_mode) == "VrU2r" else self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GiVAConfig":
        """The config a file holds. A target_modules regex from a file is refused if it can
        backtrack exponentially (check_regex_from_file): it is matched against every module name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GiVAConfig fields {unknown}")
        config = cls(**data)
        if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
            check_regex_from_file(config.target_modules)
        return config


_REPEATS = {_regex_parser.MAX_REPEAT, _regex_parser.MIN_REPEAT,
            getattr(_regex_parser, "POSSESSIVE_REPEAT", _regex_parser.MAX_REPEAT)}  # 3.11+

# A target_modules regex from a file may hold at most this many repeats (.*, \d+, x{2,}).
MAX_REGEX_REPEATS = 4


def _regex_nodes(items, inside_repeat: bool = False):
    """Every node of a parsed regex as (op, inside a repeat, whether it is a repeat that can match
    more than once)."""
    for op, arg in items:
        repeats = op in _REPEATS and (arg[1] is _regex_parser.MAXREPEAT or arg[1] > 1)
        yield op, inside_repeat, repeats
        if op in _REPEATS:
            yield from _regex_nodes(arg[2], inside_repeat or repeats)
        elif op is _regex_parser.BRANCH:
            for branch in arg[1]:
                yield from _regex_nodes(branch, inside_repeat)
        elif op is _regex_parser.SUBPATTERN:
            yield from _regex_nodes(arg[-1], inside_repeat)
        elif op in (_regex_parser.ASSERT, _regex_parser.ASSERT_NOT):
            yield from _regex_nodes(arg[1], inside_repeat)


def check_regex_from_file(pattern: str) -> None:
    """ValueError for a regex that repeats something which itself repeats or alternates, e.g.
    (a+)+ or (.|.)*: Python's re backtracks through such patterns in time exponential in the
    length of the name (seconds at 26 characters). Patterns users write for target_modules, like
    .*\\.(q|v)_proj, have no such nesting; the few that do can be written as a list of names."""
    try:
        nodes = list(_regex_nodes(_regex_parser.parse(pattern)))
    except (re.error, RecursionError) as exc:
        raise ValueError(f"target_modules regex {pattern!r} is invalid: {exc}") from exc
    repeats = [inside for _, inside, repeats in nodes if repeats]
    problem = None
    if any(repeats):
        problem = "a repeat inside a repeat"
    elif any(inside for op, inside, _ in nodes if op is _regex_parser.BRANCH):
        problem = "an alternation inside a repeat"
    elif len(repeats) > MAX_REGEX_REPEATS:
        problem = f"more than {MAX_REGEX_REPEATS} repeats"
    if problem:
        raise ValueError(f"target_modules regex {pattern!r}, read from a file, has {problem}: matching it "
                         "against a module name can take time exponential in (or a high power of) the "
                         "name's length (catastrophic backtracking), so it is refused; save the adapter "
                         "with a simpler pattern or a list of names")
