"""HyLoConfig: every knob of the optimizer, its default, and its validation.

The same names are used by the ``HyLo`` constructor and by the ``params`` of a DeepSpeed JSON
``"optimizer": {"type": "HyLo", "params": {...}}`` section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

MODES = ("sngd", "kis", "kid", "hybrid")
STEP_SCALES = ("sgd", "natural")
SEQUENCE_CONVENTIONS = ("expand", "reduce")
LOSS_REDUCTIONS = ("mean", "sum")
SWITCH_SCOPES = ("layer", "global")
FISHER_TYPES = ("empirical", "sampled")
BASES = ("sgd", "adamw")
GRAFTS = ("none", "sgd", "adamw")
APPLY_PRECISIONS = ("auto", "float32", "float64")

DampingSpec = Union[float, Callable[[int], float]]


class ConfigError(ValueError):
    """A HyLo option, or a DeepSpeed config key HyLo reads, has a value of the wrong type or out of range.

    One class for wrong types and wrong values alike (a ValueError, so ``except ValueError`` keeps
    working); the message names the key, the value and what is allowed.
    """


@dataclass
class HyLoConfig:
    """All HyLo options. Validated on construction (see ``validate``): a wrong type and a wrong value
    alike raise ``ConfigError`` (a ValueError) naming the option, the value and what is allowed.

    Attributes:
        lr: learning rate (> 0 is not required; >= 0), in ``param_groups`` so LR schedulers drive it.
        momentum, dampening, nesterov: as in ``torch.optim.SGD``, applied to the preconditioned
            gradient (``base="sgd"`` only). weight_decay: SGD's coupled or AdamW's decoupled decay.
        mode: "sngd" (exact SMW over all samples), "kis", "kid" or "hybrid" (KID in critical
            phases, KIS elsewhere).
        rank_ratio: fraction of each worker's samples kept per layer, in (0, 1]; at least one.
        max_global_samples: cap on the rows kept over all workers per layer, the row budget s
            (r = max(1, max_global_samples // world_size) per worker; None: no cap). The default,
            512, keeps the refresh's memory and time a function of the layer's shape, not of the
            tokens per step or the number of ranks: rank_ratio 0.1 keeps fewer rows up to 5,120
            rows (tokens) per step, the cap beyond. Does not apply to mode "sngd" (every row).
        contributing_ranks: optional number k of ranks whose rows form each refresh; the k ranks
            rotate from refresh to refresh (every rank contributes once per ceil(P / k)
            refreshes) and broadcast their rows, so the bytes per refresh stay bounded whatever
            the number of ranks P. None: every rank contributes (one all-gather).
        update_freq: capture activations and refresh (A_S, G_S, C) every this many steps.
        damping: lambda, a float > 0 or a callable step -> float.
        damping_target, damping_decay_steps: if set, lambda decays geometrically from ``damping``
            to ``damping_target`` over ``damping_decay_steps`` optimizer steps (the paper's decay).
        step_scale: "sgd" (default) multiplies the natural-gradient step by lambda, so the update
            equals the plain gradient outside the sampled span and is never larger than it; the
            learning rate then keeps SGD's scale. "natural" is the raw (F + lam I)^-1 grad.
        kl_clip: optional KL-clipping of the update (as in K-FAC); None disables it.
        sequence_convention: per-sample vectors of Linear layers on (batch, seq, features):
            "expand" (every position is a sample) or "reduce" (mean inputs, summed output grads).
        loss_reduction: whether the training loss is the "mean" or the "sum" over samples.
        fisher: which per-sample gradients form the kernel. "empirical" (the paper's): gradients of
            the training loss, captured from its backward. "sampled": gradients of the
            cross-entropy at labels drawn from the model's own predictive distribution (the true
            Fisher's Monte-Carlo estimate), from one extra backward per refresh step that the
            training loop starts with ``HyLo.sample_fisher(logits)`` after the forward pass.
        skip_layers: glob patterns (fnmatch) of module names that keep their plain gradient.
        seed: seed of the generator used by KIS sampling.
        switch_window, switch_threshold, switch_scope, kid_schedule: hybrid-mode policy; with
            another mode, a value other than the default raises ConfigError (it would be ignored).
        max_captured_mib: bound on the rows one layer holds between steps (inputs and output
            gradients, MiB of float32); passes past it are not captured, with a warning. Keeps
            memory bounded when ``step()`` is never called.
        base: the elementwise update applied to the preconditioned gradient: "adamw" (default:
            ``torch.optim.AdamW``: betas, eps, decoupled weight_decay, bias correction; every
            parameter HyLo does not precondition gets plain AdamW, so ``lr`` is AdamW's) or "sgd"
            (``torch.optim.SGD``: momentum, dampening, nesterov, weight_decay).

    The defaults (base="adamw", lr 1e-3, damping 0.1, mode "kis", rank_ratio 0.1, update_freq
    10) are the setting ``benchmarks/convergence.py --ablation`` and ``benchmarks/finetune.py``
    chose on their validation splits: see ``benchmarks/README.md``.
        betas, eps: AdamW's moment coefficients (two floats in [0, 1)) and denominator term
            (> 0); used by base="adamw" and graft="adamw" only.
        graft: per-layer step length from another method ("none", "sgd": the raw gradient's
            norm, "adamw": the norm of Adam's direction on the raw gradient) with HyLo's direction.
        apply_precision: the dtype of the per-step products of (*). "auto" (default): float32
            (the model's dtype for float64 models) for every layer whose refresh finds the
            cancellation factor small enough (``kernels.smw_amplification`` <=
            ``kernels.FLOAT32_APPLY_MAX_AMPLIFICATION``: the float32 step is then within ~4e-4
            of the float64 one), float64 for the others, which ``stats()["apply_dtypes"]``
            lists and a one-time warning names. "float32" / "float64" force one dtype for all.
            The s x s work of the refresh is float64 in every case.
        delayed_refresh: None (default): False, except where HyLo preconditions inside the
            backward (DeepSpeed ZeRO-2/3), which needs True and resolves None to it, saying so
            in the log. False: a refresh step's factors are built from its own rows and used
            on that same step. True: they are built from its rows and used from the next
            step on (the refresh step itself, and the steps before the first refresh, use the
            previous factors or the plain gradient), so the refresh does not stand between the
            backward and the update: on CUDA it runs on a side stream, overlapping the work that
            follows, and ZeRO-2/3 can precondition each layer in DeepSpeed's gradient hook, before
            its bucket is reduced (docs/design.md sections 1.9 and 3.5).
    """

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    mode: str = "kis"
    rank_ratio: float = 0.1
    max_global_samples: Optional[int] = 512
    contributing_ranks: Optional[int] = None
    update_freq: int = 10
    damping: DampingSpec = 0.1
    damping_target: Optional[float] = None
    damping_decay_steps: Optional[int] = None
    step_scale: str = "sgd"
    kl_clip: Optional[float] = None
    sequence_convention: str = "expand"
    loss_reduction: str = "mean"
    fisher: str = "empirical"
    skip_layers: Sequence[str] = field(default_factory=tuple)
    seed: int = 0
    switch_window: int = 100
    switch_threshold: float = 0.5
    switch_scope: str = "layer"
    kid_schedule: Optional[Sequence[Sequence[int]]] = None
    max_captured_mib: float = 512.0
    base: str = "adamw"
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    graft: str = "none"
    apply_precision: str = "auto"
    delayed_refresh: Optional[bool] = None

    def __post_init__(self) -> None:
        self.validate()
        self.skip_layers = tuple(self.skip_layers)

    def validate(self) -> None:
        """Raise ``ConfigError`` (a ValueError) naming the first offending option, its value and what is allowed.

        Types are checked strictly, with no truthiness and no conversions: bools must be ``bool``;
        integers ``int`` (not ``bool``); numbers ``int`` or ``float`` (not ``bool``), finite;
        choices ``str``; optional options ``None`` or their type; ``skip_layers`` a list or tuple
        of strings (a single string is refused, not split into characters); ``kid_schedule``
        ``None`` or a list of ``[start, end]`` pairs of ints.
        """
        _require_choice("mode", self.mode, MODES)
        _require_choice("step_scale", self.step_scale, STEP_SCALES)
        _require_choice("sequence_convention", self.sequence_convention, SEQUENCE_CONVENTIONS)
        _require_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _require_choice("switch_scope", self.switch_scope, SWITCH_SCOPES)
        _require_choice("fisher", self.fisher, FISHER_TYPES)
        _require_choice("apply_precision", self.apply_precision, APPLY_PRECISIONS)
        if self.delayed_refresh is not None:
            _require_bool("delayed_refresh", self.delayed_refresh)
        _require_number("lr", self.lr, low=0.0, low_inclusive=True)
        _require_number("momentum", self.momentum, low=0.0, low_inclusive=True, high=1.0, high_inclusive=False)
        _require_number("dampening", self.dampening, low=0.0, low_inclusive=True, high=1.0, high_inclusive=True)
        _require_bool("nesterov", self.nesterov)
        _require_number("weight_decay", self.weight_decay, low=0.0, low_inclusive=True)
        _require_number("rank_ratio", self.rank_ratio, low=0.0, low_inclusive=False, high=1.0, high_inclusive=True)
        _require_int("update_freq", self.update_freq, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        _require_int("switch_window", self.switch_window, minimum=1)
        _require_number("switch_threshold", self.switch_threshold, low=0.0, low_inclusive=False)
        _require_number("max_captured_mib", self.max_captured_mib, low=0.0, low_inclusive=False)
        if self.max_global_samples is not None:
            _require_int("max_global_samples", self.max_global_samples, minimum=1, optional=True)
        if self.contributing_ranks is not None:
            _require_int("contributing_ranks", self.contributing_ranks, minimum=1, optional=True)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError(
                f"nesterov=True requires momentum > 0 and dampening = 0; got momentum={self.momentum!r}, "
                f"dampening={self.dampening!r}"
            )
        if not callable(self.damping):
            _require_number("damping", self.damping, low=0.0, low_inclusive=False, what="a callable step -> float or")
        if (self.damping_target is None) != (self.damping_decay_steps is None):
            raise ConfigError(
                "damping_target and damping_decay_steps must be given together (or neither); got "
                f"damping_target={self.damping_target!r}, damping_decay_steps={self.damping_decay_steps!r}"
            )
        if self.damping_target is not None:
            if callable(self.damping):
                raise ConfigError("damping_target cannot be combined with a callable damping")
            _require_number("damping_target", self.damping_target, low=0.0, low_inclusive=False, what="None or")
            _require_int("damping_decay_steps", self.damping_decay_steps, minimum=1, optional=True)
        if self.kl_clip is not None:
            _require_number("kl_clip", self.kl_clip, low=0.0, low_inclusive=False, what="None (no clipping) or")
        _require_patterns("skip_layers", self.skip_layers)
        if self.kid_schedule is not None:
            _require_schedule("kid_schedule", self.kid_schedule)
        _refuse_unused_hybrid_options(self)
        _validate_base_options(self)

    def damping_at(self, step: int) -> float:
        """Damping lambda at optimizer step ``step`` (0-based)."""
        if callable(self.damping):
            value = float(self.damping(step))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"damping callable returned {value} at step {step}; it must be a finite value > 0")
            return value
        if self.damping_target is None:
            return float(self.damping)
        progress = min(step, self.damping_decay_steps) / self.damping_decay_steps
        return float(self.damping) * (self.damping_target / float(self.damping)) ** progress

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], where: str = "HyLo params") -> "HyLoConfig":
        """Build from a mapping (e.g. a DeepSpeed JSON ``optimizer.params``); unknown keys raise ``ConfigError``."""
        if not isinstance(params, Mapping):
            raise ConfigError(
                f"{where}={params!r} ({type(params).__name__}) is not allowed; it must be a mapping of option "
                f"names to values, e.g. {{\"lr\": 0.1, \"mode\": \"kis\"}}"
            )
        not_strings = [key for key in params if not isinstance(key, str)]
        if not_strings:
            raise ConfigError(f"key(s) {not_strings!r} in {where} are not allowed; option names must be strings")
        known = set(cls.option_names())
        unknown = sorted(set(params) - known)
        if unknown:
            hints = "".join(f"; {key!r}: did you mean {match!r}?" for key in unknown
                            if (match := closest_option(key)) is not None)
            raise ConfigError(
                f"unknown key(s) {unknown} in {where}{hints}; allowed keys: {sorted(known)}"
            )
        return cls(**dict(params))


def closest_option(name: str) -> Optional[str]:
    """The HyLo option name closest to a misspelt ``name`` (difflib, case-insensitive), or None."""
    names = HyLoConfig.option_names()
    by_lower = {n.lower(): n for n in names}
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[matches[0]] if matches else None


def _describe(value: Any) -> str:
    """``value!r`` with its type, for errors about values of the wrong type."""
    return f"{value!r} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={_describe(value)} is not allowed; it must be true or false (a bool)")


def _require_number(
    name: str,
    value: Any,
    low: Optional[float] = None,
    low_inclusive: bool = True,
    high: Optional[float] = None,
    high_inclusive: bool = True,
    what: str = "",
) -> None:
    """A finite int or float (not a bool) in the given interval; ``what`` names other allowed forms."""
    lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low}"
    hi = "inf)" if high is None else f"{high}" + ("]" if high_inclusive else ")")
    also = f"{what} " if what else ""
    if not _is_number(value):
        raise ConfigError(
            f"{name}={_describe(value)} is not allowed; it must be {also}a number (int or float, not bool) "
            f"in {lo}, {hi}{_quoted_number_hint(name, value)}"
        )
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {also}{lo}, {hi}")


def _require_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        also = "None or " if optional else ""
        raise ConfigError(
            f"{name}={_describe(value)} is not allowed; it must be {also}an integer >= {minimum} (int, not bool)"
            f"{_quoted_number_hint(name, value)}"
        )


def _quoted_number_hint(name: str, value: Any) -> str:
    """For a number written as a string (``"0.001"``, e.g. quoted in a JSON file): advice to drop the quotes."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value.strip())
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    return f"; {value!r} is a string: remove the quotes ({name}={value.strip()})"


def _require_patterns(name: str, value: Any) -> None:
    """A list or tuple of strings (glob patterns); a single string is refused, never split."""
    if isinstance(value, str):
        raise ConfigError(
            f"{name}={value!r} is a single string; it must be a list of glob patterns: give [{value!r}]"
        )
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={_describe(value)} is not allowed; it must be a list of glob patterns (strings)")
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(
                f"{name}={value!r} holds {_describe(item)}; it must be a list of glob patterns (strings)"
            )


def _require_schedule(name: str, value: Any) -> None:
    """A list (or tuple) of [start_step, end_step) pairs of ints with 0 <= start <= end."""
    allowed = "it must be None or a list of [start_step, end_step] pairs of ints with 0 <= start <= end"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={_describe(value)} is not allowed; {allowed}")
    for item in value:
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            and 0 <= item[0] <= item[1]
        )
        if not ok:
            raise ConfigError(f"{name} entry {item!r} is not allowed; {allowed}")


HYBRID_OPTIONS = ("switch_window", "switch_threshold", "switch_scope", "kid_schedule")


def _refuse_unused_hybrid_options(cfg: HyLoConfig) -> None:
    """The hybrid-mode policy options, set to anything but their defaults, need ``mode="hybrid"``.

    Every other mode ignores them, so a non-default value there is a mistake (e.g. a KID schedule
    given with ``mode="kid"``), not a setting; their defaults pass, so configs that spell all
    options out keep working.
    """
    if cfg.mode == "hybrid":
        return
    for name in HYBRID_OPTIONS:
        value = getattr(cfg, name)
        if value != _FIELD_DEFAULTS[name]:
            raise ConfigError(
                f"{name}={value!r} is a hybrid-mode option and needs mode='hybrid'; this config has "
                f"mode={cfg.mode!r}, which ignores it. Set mode='hybrid', or leave {name} out "
                f"(allowed with mode={cfg.mode!r}: the default {_FIELD_DEFAULTS[name]!r})"
            )


def _validate_base_options(cfg: HyLoConfig) -> None:
    """base, betas, eps, graft; options of the other base must stay at their defaults (else ignored)."""
    _require_choice("base", cfg.base, BASES)
    _require_choice("graft", cfg.graft, GRAFTS)
    betas = cfg.betas
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ConfigError(f"betas={betas!r} is not allowed; give a list of two floats in [0, 1), e.g. [0.9, 0.999]")
    for i, beta in enumerate(betas):
        _require_number(f"betas[{i}]", beta, low=0.0, low_inclusive=True, high=1.0, high_inclusive=False)
    _require_number("eps", cfg.eps, low=0.0, low_inclusive=False)
    if cfg.base != "sgd":
        for name in ("momentum", "dampening", "nesterov"):
            if getattr(cfg, name) != _FIELD_DEFAULTS[name]:
                raise ConfigError(
                    f"{name}={getattr(cfg, name)!r} applies to base='sgd' only; base={cfg.base!r} (allowed for "
                    f"{name} there: the default {_FIELD_DEFAULTS[name]!r}) uses betas and eps. Use base='sgd' "
                    f"for HyLo on momentum SGD, or leave {name} out for AdamW"
                )
    if "adamw" not in (cfg.base, cfg.graft):
        for name, differs in (("betas", tuple(betas) != _FIELD_DEFAULTS["betas"]),
                              ("eps", cfg.eps != _FIELD_DEFAULTS["eps"])):
            if differs:
                raise ConfigError(
                    f"{name}={getattr(cfg, name)!r} is used only by base='adamw' or graft='adamw'; "
                    f"this config has base={cfg.base!r}, graft={cfg.graft!r}"
                )


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HyLoConfig) if f.default is not dataclasses.MISSING}
