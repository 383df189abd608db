"""The DeepSpeed / Accelerate / transformers internals ds_hylo relies on, checked where it attaches.

ds_hylo rebinds engine methods (``allreduce_gradients``, ``_backward_prologue``, the checkpoint
methods), reads private state (``BF16_Optimizer``'s ``_hp_grad``, the fp16 ``cur_scale``), filters
one DeepSpeed log line and overrides ``Trainer`` hooks. Each of these is a version-specific contract:
if a release renames one, ds_hylo would otherwise keep running and precondition nothing, or with the
wrong scale, without a word. ``check(package)`` verifies every entry of ``INTERNALS`` for that package
and raises ``ContractError`` naming the missing piece, what ds_hylo uses it for, the supported
version range (``SUPPORTED``, the ranges of pyproject's ``deepspeed`` extra) and the installed version.

The checks look at classes and modules, not at live objects, so they are cheap (run once per
process and package) and can run before DeepSpeed builds anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["ContractError", "Internal", "INTERNALS", "SUPPORTED", "check", "installed_version", "version_note"]

# The versions ds_hylo is tested with: pyproject.toml's "deepspeed" extra (a unit test keeps them equal).
SUPPORTED: dict[str, str] = {
    "deepspeed": ">=0.19.8,<0.20",
    "accelerate": ">=1.15,<1.16",
    "transformers": ">=5.24,<5.25",
}

KINDS = ("callable", "class", "property", "attribute", "field", "parameter", "text")


class ContractError(RuntimeError):
    """An internal of DeepSpeed, Accelerate or transformers that ds_hylo relies on is missing or changed."""


@dataclass(frozen=True)
class Internal:
    """One internal ds_hylo touches.

    Attributes:
        package: the distribution (a key of ``SUPPORTED``).
        owner: dotted path of the module, class or function that holds it, e.g.
            ``"deepspeed.runtime.engine.DeepSpeedEngine"``.
        attribute: the name looked up on ``owner`` (for "parameter": a parameter name of the
            callable ``owner``; for "text": a string its source must contain).
        kind: "callable" (a function or method), "class", "property", "attribute" (present on
            ``owner``), "field" (a dataclass field of ``owner``), "parameter" (of the callable
            ``owner``'s signature) or "text" (``owner``'s source code contains ``attribute``:
            a call ds_hylo's rebinding relies on, or a log line it filters).
        used_for: what ds_hylo does with it (for the error message).
    """

    package: str
    owner: str
    attribute: str
    kind: str
    used_for: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Internal.kind={self.kind!r}; choose one of {list(KINDS)}")
        if self.package not in SUPPORTED:
            raise ValueError(f"Internal.package={self.package!r}; choose one of {sorted(SUPPORTED)}")


_ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
_TRAINER = "transformers.trainer.Trainer"

INTERNALS: tuple[Internal, ...] = (
    # ---------------------------------------------------------------- DeepSpeed (ds_hylo/deepspeed.py)
    Internal("deepspeed", "deepspeed", "initialize", "callable", "ds_hylo.initialize builds the engine"),
    Internal("deepspeed", "deepspeed", "DeepSpeedEngine", "class", "finding the engine Accelerate built"),
    Internal("deepspeed", "deepspeed.ops", '"__compatible_ops__"', "text",
             "skipping the CPU shared-memory collectives build (deepspeed.ops.__compatible_ops__)"),
    Internal("deepspeed", "deepspeed.accelerator", "get_accelerator", "callable", "telling a CPU run"),
    Internal("deepspeed", "deepspeed.utils", "logger", "attribute", "filtering the 'untested optimizer' warning"),
    Internal("deepspeed", _ENGINE, "self.data_parallel_group = ", "text",
             "HyLo's collectives on the engine's data-parallel group (data_parallel_exchange)"),
    Internal("deepspeed", _ENGINE, "self.mp_world_size = ", "text", "refusing tensor/model parallelism"),
    Internal("deepspeed", _ENGINE, "self.sequence_parallel_size = ", "text", "refusing sequence parallelism"),
    Internal("deepspeed", _ENGINE, "self.pipeline_parallelism = ", "text", "refusing pipeline parallelism"),
    Internal("deepspeed", _ENGINE, "autotp_size", "callable", "refusing automatic tensor parallelism"),
    Internal("deepspeed", f"{_ENGINE}._do_optimizer_sanity_check", "You are using ZeRO with an untested optimizer",
             "text", "the warning ds_hylo filters for HyLo"),
    Internal("deepspeed", _ENGINE, "zero_optimization_stage", "callable",
             "choosing where HyLo preconditions (ds_hylo.distributors) and refusing ZeRO-3 at attach"),
    Internal("deepspeed", "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "process_gradients",
             "callable", "preconditioning each layer in ZeRO-2's per-parameter gradient hook (rebound)"),
    Internal("deepspeed", "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.create_gradient_handling_hooks",
             "self.process_gradients(param, i)", "text",
             "ZeRO-2's gradient hook calling the rebound process_gradients before the bucket takes the gradient"),
    Internal("deepspeed", "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
             "reduce_ready_partitions_and_remove_grads", "callable",
             "preconditioning each layer in ZeRO-3's per-parameter gradient hook (rebound)"),
    Internal("deepspeed", "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.create_reduce_and_remove_grad_hooks",
             "self.reduce_ready_partitions_and_remove_grads(param)", "text",
             "ZeRO-3's gradient hook calling the rebound method before the bucket takes the gradient"),
    Internal("deepspeed", _ENGINE, "allreduce_gradients", "callable",
             "preconditioning before the reduction (rebound on the engine)"),
    Internal("deepspeed", f"{_ENGINE}._backward_epilogue", "self.allreduce_gradients(", "text",
             "the engine calling the rebound allreduce_gradients at the end of backward"),
    Internal("deepspeed", _ENGINE, "is_gradient_accumulation_boundary", "callable",
             "preconditioning once per optimizer step"),
    Internal("deepspeed", _ENGINE, "_backward_prologue", "callable", "guarding sample_fisher (rebound)"),
    Internal("deepspeed", f"{_ENGINE}.forward", "self._backward_prologue(", "text",
             "the engine calling the rebound _backward_prologue at backward time"),
    Internal("deepspeed", _ENGINE, "save_checkpoint", "callable", "saving HyLo's state (rebound)"),
    Internal("deepspeed", _ENGINE, "load_checkpoint", "callable", "loading HyLo's state (rebound)"),
    Internal("deepspeed", f"{_ENGINE}.load_checkpoint", "load_optimizer_states", "parameter",
             "loading HyLo's state only with the optimizer states"),
    Internal("deepspeed", f"{_ENGINE}.load_checkpoint", "load_module_only", "parameter",
             "loading HyLo's state only with the optimizer states"),
    Internal("deepspeed", _ENGINE, "fp16_enabled", "callable", "requiring the fp16 loss scale"),
    Internal("deepspeed", f"{_ENGINE}.__init__", "self.enable_backward_allreduce", "text",
             "checking gradients are reduced in backward"),
    Internal("deepspeed", "deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "class",
             "finding bf16 runs' fp32 gradients"),
    Internal("deepspeed", "deepspeed.runtime.bf16_optimizer.BF16_Optimizer._update_hp_grad", "._hp_grad =", "text",
             "bf16 runs' fp32 gradients, read at the reduction point (param._hp_grad)"),
    Internal("deepspeed", "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "cur_scale", "property",
             "the fp16 loss scale under ZeRO-1 and ZeRO-2"),
    Internal("deepspeed", "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3", "cur_scale", "property",
             "the fp16 loss scale under ZeRO-3"),
    Internal("deepspeed", "deepspeed.runtime.fp16.fused_optimizer.FP16_Optimizer.__init__",
             "self.loss_scale_config =", "text", "the fp16 loss scale under ZeRO-0"),
    Internal("deepspeed", "deepspeed.runtime.fp16.loss_scaler.LossScaleConfig.__init__", "self.cur_scale", "text",
             "the fp16 loss scale under ZeRO-0"),
    # --------------------------------------------------------------- Accelerate (ds_hylo/accelerate.py)
    Internal("accelerate", "accelerate", "Accelerator", "class", "make_accelerator"),
    Internal("accelerate", "accelerate.Accelerator", "prepare", "callable", "building the engine with HyLo"),
    Internal("accelerate", "accelerate.Accelerator", "free_memory", "callable", "shutdown"),
    Internal("accelerate", "accelerate.Accelerator", "wait_for_everyone", "callable", "shutdown"),
    Internal("accelerate", "accelerate.Accelerator._prepare_deepspeed", "self.deepspeed_engine_wrapped", "text",
             "finding the engine (accelerator.deepspeed_engine_wrapped.engine)"),
    Internal("accelerate", "accelerate.utils", "DeepSpeedPlugin", "class", "the live DeepSpeed config"),
    Internal("accelerate", "accelerate.utils.DeepSpeedPlugin", "hf_ds_config", "field", "the live DeepSpeed config"),
    Internal("accelerate", "accelerate.utils.DeepSpeedPlugin", "zero_stage", "field", "replacing the config"),
    Internal("accelerate", "accelerate.utils.DeepSpeedPlugin", "gradient_accumulation_steps", "field",
             "replacing the config"),
    Internal("accelerate", "accelerate.utils.DeepSpeedPlugin", "gradient_clipping", "field", "replacing the config"),
    Internal("accelerate", "accelerate.utils.DeepSpeedPlugin.__post_init__", "self.deepspeed_config =", "text",
             "the live DeepSpeed config (plugin.deepspeed_config)"),
    Internal("accelerate", "accelerate.utils", "InitProcessGroupKwargs", "class", "gloo on CPU-only hosts"),
    Internal("accelerate", "accelerate.utils", "DummyOptim", "class", "DeepSpeed-native optimizer sections"),
    Internal("accelerate", "accelerate.utils.deepspeed", "HfDeepSpeedConfig", "class", "replacing the config"),
    Internal("accelerate", "accelerate.utils.deepspeed", "DeepSpeedSchedulerWrapper", "class",
             "the returned scheduler wrapper"),
    Internal("accelerate", "accelerate.state.AcceleratorState", "_reset_state", "callable", "init_cpu_deepspeed"),
    Internal("accelerate", "accelerate.state", "PartialState", "class", "init_cpu_deepspeed"),
    # ---------------------------------------------------------------- transformers (ds_hylo/hf.py)
    Internal("transformers", _TRAINER, "create_optimizer", "callable", "HyLoTrainer builds HyLo (override)"),
    Internal("transformers", _TRAINER, "create_scheduler", "callable",
             "HyLoTrainer attaches HyLo to the engine (override)"),
    Internal("transformers", _TRAINER, "compute_loss", "callable", "sample_fisher after the forward (override)"),
    Internal("transformers", _TRAINER, "get_decay_parameter_names", "callable", "Trainer's two param groups"),
    Internal("transformers", f"{_TRAINER}.__init__", "optimizers", "parameter", "a given HyLo"),
    Internal("transformers", f"{_TRAINER}.__init__", "optimizer_cls_and_kwargs", "parameter", "HyLo's options"),
    Internal("transformers", "transformers.integrations.deepspeed", "deepspeed_config", "callable",
             "HyLoFactory refusing DeepSpeed"),
    Internal("transformers", "transformers.integrations.deepspeed.deepspeed_optim_sched", "create_optimizer", "text",
             "HF's deepspeed_init building HyLo through Trainer.create_optimizer"),
    Internal("transformers", "transformers.TrainingArguments", "learning_rate", "field", "HyLo's lr"),
    Internal("transformers", "transformers.TrainingArguments", "weight_decay", "field", "HyLo's weight_decay"),
    Internal("transformers", "transformers.TrainingArguments", "adam_beta1", "field", "HyLo's betas"),
    Internal("transformers", "transformers.TrainingArguments", "adam_beta2", "field", "HyLo's betas"),
    Internal("transformers", "transformers.TrainingArguments", "adam_epsilon", "field", "HyLo's eps"),
    Internal("transformers", "transformers.TrainingArguments", "seed", "field", "HyLo's seed"),
    Internal("transformers", "transformers.TrainingArguments", "accelerator_config", "field", "init_cpu_deepspeed"),
)

_checked: set[str] = set()


def installed_version(package: str) -> str:
    """The installed version of ``package`` ("not installed" when absent)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def version_note(package: str) -> str:
    """``"ds_hylo supports deepspeed>=0.19.8,<0.20; installed: deepspeed 0.19.8"``."""
    return f"ds_hylo supports {package}{SUPPORTED[package]}; installed: {package} {installed_version(package)}"


def _resolve(path: str) -> Any:
    """Import the longest importable module prefix of ``path``, then getattr the rest."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)  # AttributeError: reported by the caller
        return obj
    raise ImportError(f"no module of {path!r} can be imported")


def _source(obj: Any) -> str:
    """Source of ``obj``, and of the functions a decorator without functools.wraps closes over
    (DeepSpeed's ``instrument_w_nvtx`` wraps ``DeepSpeedEngine.forward`` that way)."""
    obj = inspect.unwrap(obj)
    parts = [inspect.getsource(obj)]
    for cell in getattr(obj, "__closure__", None) or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner):
            parts.append(inspect.getsource(inspect.unwrap(inner)))
    return "\n".join(parts)


def _problem(entry: Internal) -> str:
    """What is wrong with ``entry`` ("" when it holds)."""
    try:
        owner = _resolve(entry.owner)
    except (ImportError, AttributeError) as exc:
        return f"{entry.owner} is missing ({type(exc).__name__}: {exc})"
    where = f"{entry.owner}.{entry.attribute}"
    if entry.kind == "text":
        try:
            source = _source(owner)
        except (OSError, TypeError) as exc:
            return f"the source of {entry.owner} cannot be read ({type(exc).__name__}: {exc})"
        return "" if entry.attribute in source else f"{entry.owner} no longer contains {entry.attribute!r}"
    if entry.kind == "parameter":
        try:
            parameters = inspect.signature(owner).parameters
        except (TypeError, ValueError) as exc:
            return f"the signature of {entry.owner} cannot be read ({exc})"
        return "" if entry.attribute in parameters else f"{entry.owner} has no parameter {entry.attribute!r}"
    if entry.kind == "field":
        names = {f.name for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else set()
        return "" if entry.attribute in names else f"{where} is not a dataclass field"
    try:
        value = inspect.getattr_static(owner, entry.attribute)
    except AttributeError:
        return f"{where} is missing"
    if entry.kind == "attribute":
        return ""
    if entry.kind == "property":
        return "" if isinstance(value, property) else f"{where} is a {type(value).__name__}, not a property"
    if entry.kind == "class":
        return "" if inspect.isclass(value) else f"{where} is a {type(value).__name__}, not a class"
    callable_value = callable(value) or isinstance(value, (staticmethod, classmethod))
    return "" if callable_value else f"{where} is a {type(value).__name__}, not callable"


def check(*packages: str, force: bool = False) -> None:
    """Verify every ``INTERNALS`` entry of ``packages``; raise ContractError naming the first broken one.

    Each package is checked once per process (``force=True`` checks again). The message names the
    missing piece, what ds_hylo uses it for, the supported version range and the installed version.
    """
    for package in packages:
        if package not in SUPPORTED:
            raise ValueError(f"package={package!r}; ds_hylo checks {sorted(SUPPORTED)}")
        if package in _checked and not force:
            continue
        broken = [(entry, problem) for entry in INTERNALS if entry.package == package
                  if (problem := _problem(entry))]
        if broken:
            entry, problem = broken[0]
            more = f" (and {len(broken) - 1} more internal(s))" if len(broken) > 1 else ""
            raise ContractError(
                f"ds_hylo relies on {entry.owner} -> {entry.attribute!r} ({entry.kind}) for {entry.used_for}, "
                f"and {problem}{more}. {version_note(package)}. Install a supported version: "
                f'pip install "{package}{SUPPORTED[package]}" (or pip install -e ".[deepspeed]")'
            )
        _checked.add(package)
