"""DeepSpeed glue: build HyLo from the JSON ``optimizer`` section and hook it into the engine.

``ds_hylo.initialize`` takes the same arguments and returns the same values as
``deepspeed.initialize``. Where the config says ``"optimizer": {"type": "HyLo", "params": {...}}``
it builds HyLo from ``params``, removes the section (DeepSpeed has no registry for custom names),
and passes HyLo as the client optimizer. Any other optimizer type passes through untouched.

Where the preconditioner acts (DESIGN.md section 3): (*) is linear in the gradient and identical
on every rank once (A_S, G_S, C) are shared, so preconditioning each rank's local gradient before
DeepSpeed averages it equals preconditioning the average. The engine's ``allreduce_gradients``
runs at the end of every backward, before any reduction and after BF16_Optimizer has accumulated
the micro-batch into its fp32 buffers; at accumulation boundaries HyLo preconditions there. The
inner ``step()`` then only does the elementwise SGD update, on ZeRO-1's flat partitions too.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .comm import default_communicator
from .optimizer import HyLo

logger = logging.getLogger("ds_hylo")

HYLO_TYPE = "hylo"
STATE_FILE = "hylo_state_rank{rank:05d}.pt"
ConfigLike = Union[str, os.PathLike, dict]


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
    section = config.get("optimizer")
    return isinstance(section, dict) and str(section.get("type", "")).lower() == HYLO_TYPE


def check_supported(config: dict) -> None:
    """Refuse DeepSpeed settings under which layer-wise preconditioning cannot be correct.

    Raises ValueError naming the key and the reason.
    """
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ValueError(f"zero_optimization.stage={stage!r}: give the ZeRO stage as an integer, 0 or 1 for HyLo")
    if stage >= 2:
        raise ValueError(
            f"zero_optimization.stage={stage} is not supported by HyLo: stages 2 and 3 reduce and "
            "partition gradients during backward, before the full-shape gradient HyLo preconditions "
            "exists on any rank. Use stage 0 or 1."
        )
    if zero.get("overlap_comm", False):
        raise ValueError(
            "zero_optimization.overlap_comm=true is not supported by HyLo: buckets are reduced during "
            "backward, before HyLo can precondition the local gradients. Set it to false."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if str(device).lower() not in ("none", ""):
            raise ValueError(
                f"zero_optimization.{key}.device={device!r} is not supported by HyLo: offloaded "
                "optimizers step on the CPU copy, which HyLo's hooks never see. Remove the offload."
            )
    if zero.get("cpu_offload", False):
        raise ValueError("zero_optimization.cpu_offload=true is not supported by HyLo (optimizer offload).")


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
    """
    check_supported(config)
    section = config["optimizer"]
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the HyLo optimizer section; allowed: ['type', 'params']")
    params = dict(section.get("params", {}) or {})
    ds_config = {k: v for k, v in config.items() if k != "optimizer"}
    if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    return ds_config, params


def disable_cpu_shm_comm() -> None:
    """Skip DeepSpeed's ~70 s JIT build of its CPU shared-memory collectives (gloo is used instead)."""
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

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` like DeepSpeed.
    """
    import deepspeed

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
    _refuse_auto(config)
    ds_config, params = split_hylo_config(config)
    hylo = HyLo(model, params=kwargs.pop("model_parameters", None), **params)
    if _accelerator_name() == "cpu":
        disable_cpu_shm_comm()
    hylo.suspended = True
    try:
        engine, engine_optimizer, dataloader, scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=hylo, config=ds_config, **kwargs
        )
    finally:
        hylo.suspended = False
    attach(engine, hylo)
    return engine, engine_optimizer, dataloader, scheduler


def _accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


# ------------------------------------------------------------------- engine hooks
def attach(engine: Any, hylo: HyLo) -> None:
    """Make ``engine`` precondition local gradients with ``hylo`` before it reduces them.

    Also makes ``engine.save_checkpoint`` / ``engine.load_checkpoint`` carry HyLo's state, one
    file per rank (the KIS random generator differs between ranks).
    """
    zero_stage = engine.zero_optimization_stage()
    if zero_stage >= 2:
        raise ValueError(f"zero_optimization.stage={zero_stage} is not supported by HyLo; use 0 or 1")
    if not engine.enable_backward_allreduce:
        raise ValueError("HyLo needs DeepSpeed to reduce gradients in backward (enable_backward_allreduce)")
    hylo.precondition_in_step = False
    hylo.preconditioner._comm = default_communicator()
    grad_of = _gradient_accessor(engine)
    original_allreduce = engine.allreduce_gradients

    def allreduce_gradients(*args: Any, **kwargs: Any) -> Any:
        if engine.is_gradient_accumulation_boundary():
            hylo.preconditioner.precondition(
                lr=hylo.param_groups[0]["lr"],
                grad_scale=1.0 / _loss_scale(engine),
                grads_are_local=True,
                grad_of=grad_of,
            )
        return original_allreduce(*args, **kwargs)

    engine.allreduce_gradients = allreduce_gradients
    _guard_backward_prologue(engine, hylo)
    _wrap_checkpointing(engine, hylo)
    engine.hylo = hylo


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


def _loss_scale(engine: Any) -> float:
    """The fp16 dynamic/static loss scale currently applied to the gradients (1 otherwise)."""
    opt = engine.optimizer
    for owner, name in ((opt, "cur_scale"), (getattr(opt, "loss_scale_config", None), "cur_scale")):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
        if torch.is_tensor(value):
            return float(value)
    return 1.0


def _wrap_checkpointing(engine: Any, hylo: HyLo) -> None:
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        result = original_save(save_dir, tag, *args, **kwargs)
        path = Path(save_dir) / str(tag) / STATE_FILE.format(rank=engine.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(hylo.preconditioner.state_dict(), tmp)
        os.replace(tmp, path)  # never leave a half-written state file
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's file exists when save_checkpoint returns
        return result

    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        load_path, client_state = original_load(load_dir, tag, *args, **kwargs)
        load_optimizer_states = kwargs.get("load_optimizer_states", True)
        if load_path is None or not load_optimizer_states or kwargs.get("load_module_only", False):
            return load_path, client_state
        path = Path(load_path).parent / STATE_FILE.format(rank=engine.global_rank)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint has no HyLo state for rank {engine.global_rank}. "
                "Load it with load_optimizer_states=False to start HyLo afresh."
            )
        hylo.preconditioner.load_state_dict(torch.load(path, weights_only=True))
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
