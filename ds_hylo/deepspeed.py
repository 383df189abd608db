"""DeepSpeed glue: build HyLo from the JSON ``optimizer`` section and hook it into the engine.

``ds_hylo.initialize`` takes the same arguments and returns the same values as
``deepspeed.initialize``. Where the config says ``"optimizer": {"type": "HyLo", "params": {...}}``
it builds HyLo from ``params``, removes the section (DeepSpeed has no registry for custom names),
and passes HyLo as the client optimizer. Any other optimizer type passes through untouched.

Where the preconditioner acts (docs/design.md section 3.2): (*) is linear in the gradient and identical
on every rank once (A_S, G_S, C) are shared, so preconditioning each rank's local gradient before
DeepSpeed averages it equals preconditioning the average. The engine's ``allreduce_gradients``
runs at the end of every backward, before any reduction and after BF16_Optimizer has accumulated
the micro-batch into its fp32 buffers; at accumulation boundaries HyLo preconditions there. The
inner ``step()`` then only does the elementwise base update (SGD or AdamW), on ZeRO-1's flat
partitions too.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from . import contract
from .exchange import Exchange, default_exchange, group_exchange
from .config import ConfigError, HyLoConfig
from .distributors import InGradientHooks, distributor_for
from .optimizer import HyLo

logger = logging.getLogger("ds_hylo")

MISSING_DEEPSPEED = (
    "ds_hylo's DeepSpeed integration needs DeepSpeed, which is not installed. Install the "
    '"deepspeed" extra from the repository: pip install -e ".[deepspeed]" (it brings deepspeed, '
    "accelerate and transformers at the tested versions)"
)
if importlib.util.find_spec("deepspeed") is None:  # cheap: deepspeed itself is imported only when used
    raise ImportError(MISSING_DEEPSPEED)

HYLO_TYPE = "hylo"
STATE_FILE = "hylo_state_rank{rank:05d}.pt"
STATE_FORMAT = 1
UNTESTED_OPTIMIZER_WARNING = "You are using ZeRO with an untested optimizer"
ConfigLike = Union[str, os.PathLike, dict]


class CheckpointError(RuntimeError):
    """HyLo's per-rank checkpoint file is unreadable or does not belong with DeepSpeed's files beside it."""


def _import_deepspeed() -> Any:
    """``import deepspeed``, or an ImportError that says which extra to install."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(MISSING_DEEPSPEED) from exc
    return deepspeed


# --------------------------------------------------------------------------- config
def load_config(config: ConfigLike) -> dict:
    """Read a DeepSpeed config from a path or a dict (returns a deep copy)."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as handle:
            return json.load(handle)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise TypeError(f"config must be a path or a dict, got {type(config).__name__}")


def is_hylo_config(config: dict) -> bool:
    """Whether the config's ``optimizer`` section says ``"type": "HyLo"`` (any case).

    Raises ConfigError if the section (or its ``type``) has the wrong type, e.g. ``"optimizer": "HyLo"``.
    """
    section = config.get("optimizer")
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ConfigError(
            f"optimizer={_describe(section)} is not allowed; it must be an object such as "
            '{"type": "HyLo", "params": {...}}'
        )
    kind = section.get("type")
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f'optimizer.type={_describe(kind)} is not allowed; it must be a string such as "HyLo"')
    return kind is not None and kind.lower() == HYLO_TYPE


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _zero_section(config: dict) -> dict:
    """The ``zero_optimization`` section ({} when absent); ConfigError if it is not an object."""
    if "zero_optimization" not in config:
        return {}
    zero = config["zero_optimization"]
    if not isinstance(zero, dict):
        raise ConfigError(
            f"zero_optimization={_describe(zero)} is not allowed; it must be an object such as "
            '{"stage": 1} (or left out)'
        )
    return zero


def _zero_bool(zero: dict, key: str) -> bool:
    value = zero.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"zero_optimization.{key}={_describe(value)} is not allowed; it must be true or false")
    return value


def _offload_device(zero: dict, key: str) -> str:
    """``zero_optimization.<key>.device`` ("none" when the section or the device is absent or null)."""
    section = zero.get(key)
    if section is None:
        return "none"
    if not isinstance(section, dict):
        raise ConfigError(
            f"zero_optimization.{key}={_describe(section)} is not allowed; it must be an object such as "
            '{"device": "none"}, or null'
        )
    device = section.get("device")
    if device is None:
        return "none"
    if not isinstance(device, str):
        raise ConfigError(
            f"zero_optimization.{key}.device={_describe(device)} is not allowed; it must be a string "
            '("none" for HyLo)'
        )
    return device


def check_supported(config: dict) -> None:
    """Refuse DeepSpeed settings under which layer-wise preconditioning cannot be correct.

    Raises ConfigError (a ValueError) naming the key, the value and the reason, also where a
    section HyLo reads has the wrong type.
    """
    zero = _zero_section(config)
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise ConfigError(
            f"zero_optimization.stage={_describe(stage)} is not allowed; give the ZeRO stage as an integer, "
            "0, 1, 2 or 3"
        )
    if stage >= 4:
        raise ConfigError(f"zero_optimization.stage={stage} is not a ZeRO stage; HyLo supports stages 0, 1, 2 and 3")
    if _zero_bool(zero, "overlap_comm") and stage < 2:
        raise ConfigError(
            f"zero_optimization.overlap_comm=true is not supported by HyLo at stage {stage}: buckets are reduced "
            "during backward, before HyLo can precondition the local gradients. Set it to false, or use stage 2 "
            "(HyLo preconditions each layer in the gradient hook there, overlap_comm on or off)."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero, key)
        if device.lower() not in ("none", "") and stage < 2:
            raise ConfigError(
                f"zero_optimization.{key}.device={device!r} is not supported by HyLo at stage {stage}: the "
                "offloaded step works on a CPU copy of gradients HyLo has not preconditioned yet. Use stage 2 or "
                "3 (HyLo preconditions in the gradient hook there, before the copy), or remove the offload."
            )
    if _zero_bool(zero, "cpu_offload"):
        raise ConfigError(
            "zero_optimization.cpu_offload=true (the old spelling of optimizer offload) is not supported by HyLo; "
            'use "offload_optimizer": {"device": "cpu"} at stage 2 or 3'
        )


def _refuse_auto(config: dict, prefix: str = "") -> None:
    """``"auto"`` values are Accelerate's; DeepSpeed's own launcher would misread them silently."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_auto(value, name + ".")
        elif value == "auto":
            raise ValueError(
                f'{name}="auto" is only filled in by Accelerate; with ds_hylo.initialize give a value '
                "(or fill the config with ds_hylo.accelerate.resolve_auto first)"
            )


def split_hylo_config(config: dict) -> tuple[dict, dict]:
    """Split a HyLo DeepSpeed config into (config for DeepSpeed, HyLo params).

    The ``optimizer`` section is removed, ``zero_allow_untested_optimizer`` is set (DeepSpeed
    requires it for client optimizers under ZeRO), and unsupported settings are refused.
    Raises ConfigError naming the key for a malformed ``optimizer`` or ``zero_optimization``
    section; the values inside ``params`` are checked when HyLo is built from them.
    """
    check_supported(config)
    if not is_hylo_config(config):
        raise ConfigError(
            f"optimizer={config.get('optimizer')!r} is not a HyLo section; it must be "
            '{"type": "HyLo", "params": {...}}'
        )
    section = config["optimizer"]
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in the HyLo optimizer section; allowed: ['type', 'params']")
    params = section.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(
            f"optimizer.params={_describe(params)} is not allowed; it must be an object of HyLo options such as "
            '{"lr": 0.1, "mode": "kis"}'
        )
    params = dict(params)
    ds_config = {k: v for k, v in config.items() if k != "optimizer"}
    if _zero_stage(ds_config) > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    if _offload_device(_zero_section(ds_config), "offload_optimizer").lower() not in ("none", ""):
        # DeepSpeed requires its own CPU Adam with optimizer offload unless told otherwise; HyLo's
        # elementwise base update runs on the offloaded fp32 partitions (docs/design.md section 3.5).
        ds_config["zero_force_ds_cpu_optimizer"] = False
    return ds_config, params


def check_options_for_stage(hylo: Union[HyLo, HyLoConfig], stage: int) -> None:
    """Refuse HyLo options the ZeRO stage cannot honour (ConfigError naming the option) and resolve
    ``delayed_refresh=None``: under ZeRO-2/3 HyLo preconditions inside the backward, which needs the
    delayed refresh and no statistic over every layer's reduced gradient (kl_clip, graft)."""
    if stage in InGradientHooks.stage_names:
        InGradientHooks.check_options(hylo.config if isinstance(hylo, HyLo) else hylo, stage)


def _zero_stage(config: dict) -> int:
    return int(_zero_section(config).get("stage", 0))


def disable_cpu_shm_comm() -> None:
    """Skip DeepSpeed's ~70 s JIT build of its CPU shared-memory collectives (gloo is used instead)."""
    _import_deepspeed()
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ------------------------------------------------------------------- initialize
def initialize(
    args: Any = None,
    model: Optional[torch.nn.Module] = None,
    optimizer: Any = None,
    config: Optional[ConfigLike] = None,
    config_params: Optional[ConfigLike] = None,
    **kwargs: Any,
):
    """Drop-in for ``deepspeed.initialize`` that understands ``"optimizer": {"type": "HyLo"}``.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` like DeepSpeed. Raises
    ConfigError for malformed or unsupported settings (before DeepSpeed starts), and ImportError
    naming the extra to install when DeepSpeed is missing. Under ZeRO, DeepSpeed's "untested
    optimizer" warning for HyLo is filtered (HyLo is tested under ZeRO-1); one INFO line on the
    ``ds_hylo`` logger says HyLo is in charge instead.
    """
    deepspeed = _import_deepspeed()

    config = config if config is not None else config_params
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None  # DeepSpeed refuses a config given twice
    if config is None:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, **kwargs)
    config = load_config(config)
    if not is_hylo_config(config):
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=config, **kwargs)
    if optimizer is not None:
        raise ValueError(
            "the config's optimizer section says HyLo and a client optimizer was passed too; give one of them"
        )
    if model is None:
        raise ValueError("ds_hylo.initialize needs the model to build HyLo from the config")
    contract.check("deepspeed")  # before DeepSpeed starts: every internal ds_hylo hooks into is there
    _refuse_auto(config)
    ds_config, params = split_hylo_config(config)
    model_parameters = kwargs.pop("model_parameters", None)
    if model_parameters is None:  # DeepSpeed's flat buffers are fixed at initialise: trainable ones only
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    hylo = HyLo(model, params=model_parameters, **params)
    check_options_for_stage(hylo, _zero_stage(ds_config))  # before DeepSpeed starts
    if _accelerator_name() == "cpu":
        disable_cpu_shm_comm()
    hylo.suspended = True
    quiet = untested_optimizer_warning_filtered() if _zero_stage(ds_config) > 0 else contextlib.nullcontext()
    try:
        with quiet:
            engine, engine_optimizer, dataloader, scheduler = deepspeed.initialize(
                args=args, model=model, optimizer=hylo, config=ds_config, **kwargs
            )
    finally:
        hylo.suspended = False
    attach(engine, hylo)
    return engine, engine_optimizer, dataloader, scheduler


class _DropMessage(logging.Filter):
    """Drops the records whose message contains ``text``; lets every other record through."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def untested_optimizer_warning_filtered() -> Iterator[None]:
    """Within the block, drop exactly DeepSpeed's "You are using ZeRO with an untested optimizer" warning.

    For the ``deepspeed.initialize`` call that hands HyLo to DeepSpeed with
    ``zero_allow_untested_optimizer`` set by ds_hylo: HyLo is tested under ZeRO-0 to 3, so the
    warning says nothing true. The filter sits on DeepSpeed's own logger only while the block runs;
    every other DeepSpeed message passes.
    """
    from deepspeed.utils import logger as deepspeed_logger

    drop = _DropMessage(UNTESTED_OPTIMIZER_WARNING)
    deepspeed_logger.addFilter(drop)
    try:
        yield
    finally:
        deepspeed_logger.removeFilter(drop)


def _accelerator_name() -> str:
    _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


# ------------------------------------------------------------------- engine hooks
def data_parallel_exchange(engine: Any) -> Exchange:
    """HyLo's collectives over the engine's data-parallel group (the ranks whose gradients DeepSpeed
    averages), refusing the parallelism HyLo does not support under DeepSpeed.

    Rows of the same layer are only exchanged between ranks that hold the same parameters, so the
    group is ``engine.data_parallel_group``, never the world. Tensor (model) parallelism, pipeline
    parallelism and Ulysses sequence parallelism are refused with a ConfigError naming the setting:
    a tensor-parallel rank holds a shard of each layer, a pipeline stage a subset of the layers, and
    a sequence-parallel rank a slice of each sample's tokens, and none of those is tested with HyLo
    under DeepSpeed (standalone ``HyLo(model, process_group=...)`` takes any data-parallel group).
    """
    refused = []
    if getattr(engine, "pipeline_parallelism", False):
        refused.append("pipeline parallelism (a PipelineModule)")
    mp_world = int(getattr(engine, "mp_world_size", 1) or 1)
    autotp = engine.autotp_size() if callable(getattr(engine, "autotp_size", None)) else 0
    if mp_world > 1 or (autotp or 0) > 1:
        refused.append(f"tensor/model parallelism (mp_world_size={mp_world}, autotp_size={autotp})")
    sequence = int(getattr(engine, "sequence_parallel_size", 1) or 1)
    if sequence > 1:
        refused.append(f"sequence parallelism (sequence_parallel_size={sequence})")
    if refused:
        raise ConfigError(
            f"HyLo under DeepSpeed supports data parallelism only; this engine uses {', '.join(refused)}. "
            "Run HyLo with data parallelism (ZeRO 0-3) alone."
        )
    group = getattr(engine, "data_parallel_group", None)
    if group is None:
        return default_exchange()
    return group_exchange(group)


def attach(engine: Any, hylo: HyLo) -> None:
    """Make ``engine`` precondition local gradients with ``hylo`` before it reduces them.

    Also makes ``engine.save_checkpoint`` / ``engine.load_checkpoint`` carry HyLo's state, one
    file per rank (the KIS random generator differs between ranks). Raises
    ``ds_hylo.contract.ContractError`` if a DeepSpeed internal this relies on is missing.
    """
    contract.check("deepspeed")
    zero_stage = engine.zero_optimization_stage()
    distributor = distributor_for(zero_stage)  # ValueError naming the supported stages
    if not engine.enable_backward_allreduce:
        raise ValueError("HyLo needs DeepSpeed to reduce gradients in backward (enable_backward_allreduce)")
    check_options_for_stage(hylo, zero_stage)
    hylo.precondition_in_step = False
    hylo.preconditioner._comm = data_parallel_exchange(engine)
    distributor(engine, hylo, _gradient_accessor(engine), lambda: _loss_scale(engine)).install()
    _guard_backward_prologue(engine, hylo)
    _wrap_checkpointing(engine, hylo)
    engine.hylo = hylo
    if engine.global_rank == 0:
        logger.info(
            "ds_hylo: HyLo (mode=%s) preconditions the gradients under DeepSpeed ZeRO stage %d, a tested "
            "setting (DeepSpeed's 'untested optimizer' warning for it is filtered)%s",
            hylo.config.mode, zero_stage,
            "; each layer in DeepSpeed's gradient hook, before its bucket is reduced, with the delayed refresh "
            "(a refresh's factors used from the next step on)" if distributor is InGradientHooks else "",
        )


def _guard_backward_prologue(engine: Any, hylo: HyLo) -> None:
    """Refuse to start DeepSpeed's backward from HyLo's sampled-label backward.

    ``sample_fisher`` suspends the hooks on the tensor it is given; if that tensor was computed
    from the engine's output (e.g. ``engine(x).float()`` under bf16), the engine's output hooks
    would fire anyway and reduce gradients mid-step. The engine looks ``_backward_prologue`` up at
    backward time, so wrapping the attribute catches it.
    """
    original_prologue = engine._backward_prologue

    def backward_prologue(*args: Any, **kwargs: Any) -> Any:
        if hylo.preconditioner.fisher_backward_active:
            raise RuntimeError(
                "HyLo.sample_fisher(logits): pass the DeepSpeed engine's output tensor itself (e.g. "
                "engine(x) or engine(**batch).logits), not a tensor computed from it such as .float(); "
                "the sampled-label backward reached the engine's output hooks"
            )
        return original_prologue(*args, **kwargs)

    engine._backward_prologue = backward_prologue


def _gradient_accessor(engine: Any) -> Callable[[torch.nn.Parameter], Optional[torch.Tensor]]:
    """Where the full-shape local gradient of a model parameter lives at the reduction point."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if isinstance(engine.optimizer, BF16_Optimizer):
        # bf16 params with fp32 accumulation: gradients were accumulated into fp32 buffers.
        def hp_grad(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
            grad = getattr(p, "_hp_grad", None)
            return None if grad is None else grad.view(p.shape)

        return hp_grad
    return lambda p: p.grad


LOSS_SCALE_ATTRIBUTES = ("engine.optimizer.cur_scale", "engine.optimizer.loss_scale_config.cur_scale")


def _loss_scale(engine: Any) -> float:
    """The fp16 dynamic/static loss scale currently applied to the gradients (1 otherwise).

    Read from ``engine.optimizer.cur_scale`` (ZeRO-1) or ``engine.optimizer.loss_scale_config
    .cur_scale`` (ZeRO-0's FP16_Optimizer). Under fp16 a scale must be found: without it the
    captured rows would carry the loss scale into the curvature silently, so RuntimeError names the
    attributes looked for and the DeepSpeed version. Without fp16 no scale found means 1.
    """
    opt = engine.optimizer
    for owner, name in ((opt, "cur_scale"), (getattr(opt, "loss_scale_config", None), "cur_scale")):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        if torch.is_tensor(value):
            return float(value)
    if engine.fp16_enabled():
        raise RuntimeError(
            f"HyLo under DeepSpeed fp16 needs the loss scale the gradients carry, and found none (a number > 0): "
            f"it looked for {' and '.join(LOSS_SCALE_ATTRIBUTES)} on the engine's {type(opt).__name__}. Without it the "
            f"curvature rows would keep the loss scale. {contract.version_note('deepspeed')}"
        )
    return 1.0


def _wrap_checkpointing(engine: Any, hylo: HyLo) -> None:
    """Make the engine's save/load_checkpoint carry HyLo's state, one file per rank, crash-safely.

    Save writes HyLo's file first (temporary file, fsync, rename), stamped with the engine's
    ``global_steps`` and the tag, and only then runs DeepSpeed's save, which starts with a barrier
    and moves ``latest`` last: a crash can never leave ``latest`` on a tag without HyLo files.
    Load refuses a HyLo file whose step differs from the global step DeepSpeed restored (files of
    two saves mixed under a re-used tag), a missing file, and an empty, truncated or corrupt file,
    each with an error naming the file.
    """
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
        path = Path(save_dir) / tag / STATE_FILE.format(rank=engine.global_rank)
        state = {
            "format": STATE_FORMAT,
            "global_steps": int(engine.global_steps),
            "tag": tag,
            "hylo": hylo.preconditioner.state_dict(),
        }
        _atomic_save(state, path)
        # DeepSpeed's save begins with a barrier, so every rank's HyLo file exists before it writes `latest`.
        return original_save(save_dir, tag, *args, **kwargs)

    def load_checkpoint(load_dir: str, *args: Any, **kwargs: Any) -> Any:
        load_optimizer_states, load_module_only = _load_options(original_load, load_dir, args, kwargs)
        load_path, client_state = original_load(load_dir, *args, **kwargs)
        if load_path is None or not load_optimizer_states or load_module_only:
            return load_path, client_state
        path = Path(load_path).parent / STATE_FILE.format(rank=engine.global_rank)
        state = read_state_file(path, engine.global_rank)
        if state["global_steps"] != engine.global_steps:
            raise CheckpointError(
                f"{path} holds HyLo's state at DeepSpeed global step {state['global_steps']}, but DeepSpeed's "
                f"checkpoint files beside it are at global step {engine.global_steps}: they come from different "
                "saves (e.g. a crash while a re-used tag was being overwritten). Refusing to mix them: load "
                "another checkpoint, or this one with load_optimizer_states=False to start HyLo afresh."
            )
        hylo.preconditioner.load_state_dict(state["hylo"])
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _load_options(original_load: Callable, load_dir: str, args: tuple, kwargs: dict) -> tuple[bool, bool]:
    """(load_optimizer_states, load_module_only) of a ``load_checkpoint`` call, positional or keyword."""
    import inspect

    try:
        bound = inspect.signature(original_load).bind(load_dir, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
    except (TypeError, ValueError):  # a wrapper without DeepSpeed's signature: keywords only
        arguments = kwargs
    return bool(arguments.get("load_optimizer_states", True)), bool(arguments.get("load_module_only", False))


def read_state_file(path: Path, rank: int) -> dict:
    """Read and check one rank's HyLo checkpoint file: ``{"format", "global_steps", "tag", "hylo"}``.

    Raises FileNotFoundError for a missing file and CheckpointError for an empty, truncated,
    corrupt or foreign one; every message names the file.
    """
    path = Path(path)
    afresh = "Load the checkpoint with load_optimizer_states=False to start HyLo afresh, or use another checkpoint."
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint has no HyLo state for rank {rank}. "
            "Load it with load_optimizer_states=False to start HyLo afresh."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"HyLo state file {path} is empty (0 bytes). {afresh}")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file: all name the file
        raise CheckpointError(
            f"HyLo state file {path} cannot be read ({_load_failure(exc)}): it is corrupt or truncated. {afresh}"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(
            f"HyLo state file {path} has no format stamp: it was written by an older ds_hylo (without the "
            f"global step) or by something else. {afresh}"
        )
    if state["format"] != STATE_FORMAT or not isinstance(state.get("global_steps"), int) or "hylo" not in state:
        raise CheckpointError(
            f"HyLo state file {path} has format {state['format']!r} and keys {sorted(state)}; this ds_hylo reads "
            f"format {STATE_FORMAT} with keys ['format', 'global_steps', 'hylo', 'tag']. {afresh}"
        )
    return state


def _load_failure(exc: BaseException) -> str:
    """A short description of a torch.load failure (without torch's advice to load untrusted pickles,
    and without the bare ``[Errno 22] Invalid argument`` a read past a truncated file's end gives)."""
    if isinstance(exc, OSError):
        return type(exc).__name__
    text = str(exc).strip()
    first_sentence = text.splitlines()[0].split(". ")[0] if text else ""
    if not first_sentence or "weights_only" in first_sentence or len(first_sentence) > 160:
        return type(exc).__name__
    return f"{type(exc).__name__}: {first_sentence}"


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a unique temporary file beside ``path``, fsync it, rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial one (at worst a stray
    ``.<name>.*.tmp`` file); the directory is fsync'd so the rename survives a power loss.
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name, so the handle (and any error about it) names the file
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
