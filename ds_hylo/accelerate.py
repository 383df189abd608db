"""Hugging Face Accelerate glue: one DeepSpeed JSON with ``"optimizer": {"type": "HyLo"}`` for both launchers.

Typical use (launched with ``accelerate launch --config_file configs/accelerate/<setup>.yaml``, whose
``deepspeed_config_file`` names a JSON from ``configs/deepspeed/``)::

    from ds_hylo.accelerate import make_accelerator, prepare

    accelerator = make_accelerator()                       # gloo + no shm_comm build on CPU-only hosts
    model, optimizer, train_loader = prepare(accelerator, model, train_loader)
    for x, y in train_loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)                     # DeepSpeed backward + step (HyLo included)

What ``prepare`` does, in order:

1. Finds the DeepSpeed config dict Accelerate will hand to ``deepspeed.initialize``: it lives in
   ``accelerator.state.deepspeed_plugin.deepspeed_config`` (the same dict as
   ``plugin.hf_ds_config.config``), read from ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` (the yaml's
   ``deepspeed_config_file``) when the ``Accelerator`` was built. ``config=`` replaces it.
2. If its ``optimizer`` section says ``"type": "HyLo"``, builds HyLo from ``params`` through
   ``ds_hylo.deepspeed.split_hylo_config`` (which also refuses ``overlap_comm`` at stages 0-1 and
   offload) and removes the section from the plugin's dict in place: Accelerate refuses a JSON
   ``optimizer`` section next to a real optimizer object.
3. Calls ``accelerator.prepare(model, hylo, *objects)`` with ``hylo.suspended = True`` (and, under
   ZeRO, DeepSpeed's "untested optimizer" warning filtered: HyLo is tested there): DeepSpeed's
   ZeRO/bf16 wrappers call ``optimizer.step()`` on zero gradients while they initialise, which with
   weight decay would move the weights. Accelerate fills the config's ``"auto"`` values here
   (micro batch from the DataLoaders, accumulation steps from the Accelerator, clipping 1.0).
4. Finds the ``DeepSpeedEngine`` (``accelerator.deepspeed_engine_wrapped.engine``, the prepared
   model) and calls ``ds_hylo.deepspeed.attach(engine, hylo)``: HyLo then preconditions the local
   full-shape gradients inside ``engine.allreduce_gradients`` (before DeepSpeed reduces them), and
   ``engine.save_checkpoint`` / ``load_checkpoint`` carry HyLo's state.
5. An ``lr_scheduler`` (a scheduler or a factory ``optimizer -> scheduler``) is installed as
   ``engine.lr_scheduler``, so DeepSpeed steps it once per optimizer step (not on skipped fp16
   steps) and checkpoints it, exactly as ``ds_hylo.initialize(..., lr_scheduler=...)`` does under
   the ``deepspeed`` launcher. (Accelerate's own wrapper for torch schedulers steps
   ``num_processes`` times per optimizer step, which would make a schedule written in optimizer
   steps run ``world_size`` times too fast.) The returned wrapper's ``step()`` is a no-op.

The same JSON also works under the ``deepspeed`` launcher through ``ds_hylo.initialize``. The
shipped JSONs use numbers, not ``"auto"``: DeepSpeed 0.19.8 itself would fail on
``"train_micro_batch_size_per_gpu": "auto"`` with a bare TypeError, read ``"bf16": {"enabled":
"auto"}`` as disabled and keep ``"gradient_clipping": "auto"`` as a string, so ``ds_hylo.initialize``
refuses ``"auto"`` with an error naming the key. ``resolve_auto`` fills them the way Accelerate would; call it on such a
config before ``ds_hylo.initialize`` (the examples do).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
from typing import Any, Callable, Optional, Union

import torch

from . import contract
from .config import ConfigError
from .deepspeed import (
    ConfigLike,
    attach,
    check_options_for_stage,
    check_supported,
    disable_cpu_shm_comm,
    is_hylo_config,
    load_config,
    split_hylo_config,
    untested_optimizer_warning_filtered,
)
from .optimizer import HyLo

logger = logging.getLogger("ds_hylo")

_LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE")
SchedulerLike = Union["torch.optim.lr_scheduler.LRScheduler", Callable[[torch.optim.Optimizer], Any]]

__all__ = [
    "make_accelerator",
    "prepare",
    "build_hylo",
    "deepspeed_config",
    "find_engine",
    "resolve_auto",
    "micro_batch_size",
    "shutdown",
]


def _require_accelerate() -> None:
    """ImportError naming the extra to install when Hugging Face Accelerate is missing."""
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError(
            "ds_hylo.accelerate needs Hugging Face Accelerate, which is not installed. Install the "
            '"deepspeed" extra from the repository: pip install -e ".[deepspeed]"'
        )


# ------------------------------------------------------------------------ accelerator
def make_accelerator(deepspeed_config: Optional[ConfigLike] = None, **kwargs: Any):
    """Build an ``accelerate.Accelerator`` that works on GPU nodes and on CPU-only hosts alike.

    Args:
        deepspeed_config: optional path or dict of a DeepSpeed config. Normally left out: under
            ``accelerate launch`` the yaml's ``deepspeed_config_file`` is used. When given, a
            ``DeepSpeedPlugin`` is built from it (``deepspeed_plugin=`` in kwargs wins).
        **kwargs: passed to ``Accelerator``.

    Without a GPU it: sets ``DS_ACCELERATOR=cpu`` (unless set), disables DeepSpeed's ~70 s JIT
    build of its CPU shared-memory collectives (``disable_cpu_shm_comm``), and adds
    ``InitProcessGroupKwargs(backend="gloo")`` for distributed runs; without it Accelerate's
    DeepSpeed path finds no backend and believes it is one process. When DeepSpeed is used but
    no launcher set ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` (a plain ``python script.py``), a
    one-process environment on 127.0.0.1 is set up so DeepSpeed can initialise.
    """
    _require_accelerate()
    contract.check("accelerate")
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    has_plugin = kwargs.get("deepspeed_plugin") is not None or kwargs.get("deepspeed_plugins") is not None
    if deepspeed_config is not None and not has_plugin:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=load_config(deepspeed_config))
    uses_deepspeed = (
        kwargs.get("deepspeed_plugin") is not None
        or kwargs.get("deepspeed_plugins") is not None
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    )
    if uses_deepspeed and not any(name in os.environ for name in _LAUNCHER_ENV):
        _single_process_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if uses_deepspeed:
            disable_cpu_shm_comm()
        distributed = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        if distributed and not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        kwargs["kwargs_handlers"] = handlers
    return Accelerator(**kwargs)


def _single_process_env() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    defaults = {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


# ------------------------------------------------------------------------------ config
def _plugin(accelerator: Any) -> Any:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        raise ValueError(
            "ds_hylo.accelerate needs Accelerate's DeepSpeed integration, and this Accelerator has none. "
            "Launch with `accelerate launch --config_file configs/accelerate/<setup>.yaml` (distributed_type: "
            "DEEPSPEED with a deepspeed_config_file) or build it with make_accelerator(deepspeed_config=...). "
            "`accelerate launch --cpu` and ACCELERATE_USE_CPU=true make Accelerate bypass DeepSpeed: unset them."
        )
    return plugin


def deepspeed_config(accelerator: Any) -> dict:
    """The DeepSpeed config dict Accelerate will pass to DeepSpeed (live: edits take effect)."""
    return _plugin(accelerator).deepspeed_config


def _install_config(plugin: Any, config: ConfigLike) -> None:
    """Replace the plugin's DeepSpeed config by ``config``, as DeepSpeedPlugin.__post_init__ would set it."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    new = load_config(config)
    if "zero_optimization" not in new:
        raise ConfigError("the DeepSpeed config needs a zero_optimization section (Accelerate requires one)")
    if not isinstance(new["zero_optimization"], dict):
        zero = new["zero_optimization"]
        raise ConfigError(
            f"zero_optimization={zero!r} ({type(zero).__name__}) is not allowed; it must be an object such as "
            '{"stage": 1}'
        )
    old = plugin.deepspeed_config
    for dtype in ("fp16", "bf16"):
        section = new.get(dtype)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            # Accelerate filled these from its mixed_precision setting when it read the first config.
            section["enabled"] = bool((old.get(dtype) or {}).get("enabled", False))
    new.setdefault("gradient_accumulation_steps", 1)
    new["steps_per_print"] = float("inf")  # what Accelerate sets: DeepSpeed's own logging off
    plugin.hf_ds_config = HfDeepSpeedConfig(new)
    plugin.deepspeed_config = plugin.hf_ds_config.config
    plugin.zero_stage = int(new["zero_optimization"].get("stage", 0))
    for attr in ("gradient_accumulation_steps", "gradient_clipping"):
        if new.get(attr, "auto") != "auto":
            setattr(plugin, attr, new[attr])


def micro_batch_size(accelerator: Any, default: Optional[int] = None) -> Optional[int]:
    """``train_micro_batch_size_per_gpu`` of the active config (``default`` if it is "auto" or absent)."""
    value = deepspeed_config(accelerator).get("train_micro_batch_size_per_gpu", "auto")
    return default if value == "auto" else int(value)


def build_hylo(model: torch.nn.Module, config: dict, overrides: Optional[dict] = None) -> tuple[dict, HyLo]:
    """(config for DeepSpeed, HyLo) from a config whose optimizer section says HyLo.

    ``overrides`` replace single ``params`` keys (e.g. ``{"mode": "kis"}``).
    """
    ds_config, params = split_hylo_config(config)
    params.update(overrides or {})
    # DeepSpeed's flat buffers are fixed at initialise: trainable parameters only
    return ds_config, HyLo(model, params=[p for p in model.parameters() if p.requires_grad], **params)


def resolve_auto(
    config: ConfigLike,
    *,
    micro_batch_size: Optional[int] = None,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    gradient_clipping: float = 1.0,
) -> dict:
    """Fill a DeepSpeed config's ``"auto"`` values the way Accelerate does (for the ``deepspeed`` launcher).

    ``train_micro_batch_size_per_gpu`` <- ``micro_batch_size`` (required if "auto");
    ``gradient_accumulation_steps`` <- the argument; ``train_batch_size`` "auto" is removed
    (DeepSpeed derives it); ``gradient_clipping`` <- the argument (Accelerate's default 1.0);
    ``fp16.enabled`` / ``bf16.enabled`` <- ``mixed_precision`` ("no", "fp16", "bf16"). Any other
    "auto" raises ValueError naming the key. Returns a new dict.
    """
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; allowed: 'no', 'fp16', 'bf16'")
    config = load_config(config)
    if config.get("train_micro_batch_size_per_gpu") == "auto":
        if micro_batch_size is None:
            raise ValueError("train_micro_batch_size_per_gpu is 'auto': pass micro_batch_size")
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    if config.get("gradient_accumulation_steps") == "auto":
        config["gradient_accumulation_steps"] = int(gradient_accumulation_steps)
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = float(gradient_clipping)
    for dtype in ("fp16", "bf16"):
        section = config.get(dtype)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = mixed_precision == dtype
    left = sorted(_auto_keys(config))
    if left:
        raise ValueError(f"'auto' left in the DeepSpeed config at {left}; give these keys numbers")
    return config


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


# ----------------------------------------------------------------------------- prepare
def find_engine(accelerator: Any, prepared_model: Any = None) -> Any:
    """The DeepSpeedEngine Accelerate created (the prepared model is the engine itself)."""
    from deepspeed import DeepSpeedEngine

    if isinstance(prepared_model, DeepSpeedEngine):
        return prepared_model
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        return wrapped.engine
    raise RuntimeError("no DeepSpeedEngine found after accelerator.prepare (is distributed_type DEEPSPEED?)")


def prepare(
    accelerator: Any,
    model: torch.nn.Module,
    *objects: Any,
    config: Optional[ConfigLike] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr_scheduler: Optional[SchedulerLike] = None,
    hylo_overrides: Optional[dict] = None,
) -> tuple:
    """``accelerator.prepare`` for a DeepSpeed config whose optimizer section may say HyLo.

    Args:
        accelerator: an ``Accelerator`` using DeepSpeed (see ``make_accelerator``).
        model: the ``nn.Module`` (not yet prepared).
        *objects: DataLoaders and anything else ``accelerator.prepare`` takes (not the optimizer).
        config: optional path or dict replacing the plugin's DeepSpeed config (default: the file
            the Accelerator was built with, e.g. the yaml's ``deepspeed_config_file``).
        optimizer: optional client optimizer (e.g. SGD/AdamW baselines). When given, a HyLo
            section in the JSON is removed and ignored; a HyLo instance given here is hooked in.
        lr_scheduler: optional scheduler, or a callable ``optimizer -> scheduler`` (useful since
            HyLo is built here). It becomes ``engine.lr_scheduler``: stepped by DeepSpeed once per
            optimizer step; the returned wrapper's ``step()`` does nothing.
        hylo_overrides: replace single HyLo ``params`` keys of the JSON (e.g. ``{"mode": "kis"}``).

    Returns:
        ``(engine, optimizer, *prepared_objects)``, plus the scheduler wrapper last when
        ``lr_scheduler`` was given. ``engine.hylo`` is the HyLo instance (when HyLo is used).
    """
    _require_accelerate()
    contract.check("accelerate", "deepspeed")  # every internal ds_hylo hooks into is there
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if any(isinstance(obj, torch.optim.Optimizer) for obj in objects):
        raise ValueError("pass a client optimizer as optimizer=..., not among the objects")
    if getattr(accelerator, "deepspeed_engine_wrapped", None) is not None:
        raise RuntimeError(
            "this Accelerator already holds a DeepSpeed engine; call accelerator.free_memory() before "
            "preparing another model (accelerator.backward would otherwise drive the old engine)"
        )
    plugin = _plugin(accelerator)
    if config is not None:
        _install_config(plugin, config)
    ds_config = plugin.deepspeed_config

    hylo: Optional[HyLo] = None
    if is_hylo_config(ds_config):
        if optimizer is None:
            stripped, hylo = build_hylo(model, ds_config, hylo_overrides)
        else:
            logger.info("ds_hylo: a client optimizer was given; the config's HyLo section is ignored")
            stripped = {k: v for k, v in ds_config.items() if k != "optimizer"}
        ds_config.clear()  # in place: plugin.deepspeed_config is plugin.hf_ds_config.config
        ds_config.update(stripped)
    elif optimizer is None and "optimizer" not in ds_config:
        raise ValueError("the DeepSpeed config has no optimizer section and no optimizer was passed")
    if isinstance(optimizer, HyLo):
        hylo = optimizer
    if hylo is not None:
        check_supported(ds_config)
        check_options_for_stage(hylo, int(ds_config.get("zero_optimization", {}).get("stage", 0)))
        optimizer = hylo
    if optimizer is None:  # a DeepSpeed-native optimizer section (e.g. "AdamW"): DeepSpeed builds it
        from accelerate.utils import DummyOptim

        optimizer = DummyOptim([p for p in model.parameters() if p.requires_grad])

    _warn_batch_mismatch(ds_config, objects)
    if hylo is not None:
        hylo.suspended = True  # DeepSpeed steps the optimizer on zero gradients while it initialises
    # HyLo is tested under ZeRO-0 to 3: DeepSpeed's "untested optimizer" warning for it says nothing true.
    quiet: Any = contextlib.nullcontext()
    if hylo is not None and ds_config.get("zero_optimization", {}).get("stage", 0) != 0:  # checked: a dict, an int
        quiet = untested_optimizer_warning_filtered()
    try:
        with quiet:
            prepared = accelerator.prepare(model, optimizer, *objects)
    finally:
        if hylo is not None:
            hylo.suspended = False
    engine = find_engine(accelerator, prepared[0])
    if hylo is not None:
        attach(engine, hylo)
    if lr_scheduler is None:
        return tuple(prepared)
    return tuple(prepared) + (_install_scheduler(engine, lr_scheduler, prepared[1]),)


def _install_scheduler(engine: Any, lr_scheduler: SchedulerLike, prepared_optimizer: Any) -> Any:
    from accelerate.utils.deepspeed import DeepSpeedSchedulerWrapper

    if isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler = lr_scheduler
    elif callable(lr_scheduler):
        scheduler = lr_scheduler(engine.basic_optimizer if engine.basic_optimizer is not None else engine.optimizer)
    else:
        raise TypeError(f"lr_scheduler must be an LRScheduler or a callable, got {type(lr_scheduler).__name__}")
    if engine.lr_scheduler is not None:
        raise ValueError("the DeepSpeed config already defines a scheduler section; remove it or lr_scheduler=")
    engine.lr_scheduler = scheduler
    return DeepSpeedSchedulerWrapper(scheduler, prepared_optimizer)


def _warn_batch_mismatch(ds_config: dict, objects: tuple) -> None:
    micro = ds_config.get("train_micro_batch_size_per_gpu", "auto")
    loaders = [obj for obj in objects if isinstance(obj, torch.utils.data.DataLoader)]
    if micro == "auto" or not loaders or loaders[0].batch_size is None:
        return
    if int(loaders[0].batch_size) != int(micro):
        logger.warning(
            "ds_hylo: the first DataLoader's batch size (%s) differs from train_micro_batch_size_per_gpu (%s) "
            "in the DeepSpeed config; DeepSpeed's batch bookkeeping will be off", loaders[0].batch_size, micro,
        )


# ----------------------------------------------------------------------------- shutdown
def shutdown(accelerator: Any = None) -> None:
    """End a run cleanly on every rank: barrier, release the engine, destroy the process groups.

    ``destroy_process_group`` only drops torch's own references to the groups; DeepSpeed's engine
    and optimizer keep theirs, so gloo's worker threads can outlive it and abort the process at
    interpreter exit ("terminate called without an active exception", SIGABRT on some rank of a
    2-rank CPU run). Releasing the engine (``accelerator.free_memory()``, which calls
    ``engine.destroy()``) and collecting garbage first lets the groups die while Python is alive.
    Works for both launchers: pass the Accelerator, or nothing after ``ds_hylo.initialize``.
    """
    import gc

    import torch.distributed as dist

    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.free_memory()
    elif dist.is_available() and dist.is_initialized():
        dist.barrier()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
