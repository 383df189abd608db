"""Hugging Face ``Trainer`` glue: ``HyLoTrainer`` trains with HyLo, with or without DeepSpeed.

Use it where you would use ``transformers.Trainer``::

    from transformers import TrainingArguments
    from ds_hylo.hf import HyLoTrainer

    args = TrainingArguments("out", learning_rate=1e-3, per_device_train_batch_size=16,
                             deepspeed="configs/deepspeed/finetune_minilm_hylo.json")  # or no deepspeed=
    trainer = HyLoTrainer(model=model, args=args, train_dataset=train_set,
                          hylo_options={"mode": "kis", "damping": 0.1})     # without a HyLo JSON section
    trainer.train()                                                         # resume_from_checkpoint=... works
    trainer.hylo.stats()                                                    # refreshes, modes, timers

On a host without a GPU, DeepSpeed needs ``TrainingArguments(..., accelerator_config=init_cpu_deepspeed())``
(gloo; see ``init_cpu_deepspeed``). Launch several ranks with ``torchrun`` or ``deepspeed``.

Where HyLo's options come from (exactly one of these; none means HyLo's defaults):

* the DeepSpeed JSON's ``"optimizer": {"type": "HyLo", "params": {...}}`` section (the same JSON the
  ``deepspeed`` launcher and ``accelerate launch`` take through ``ds_hylo.initialize`` /
  ``ds_hylo.accelerate.prepare``);
* ``hylo_options={...}``, or ``optimizer_cls_and_kwargs=(HyLo, {...})``;
* a ready ``HyLo(model, ...)`` instance: ``optimizers=(hylo, scheduler_or_None)``.

Values owned by ``TrainingArguments`` (``TRAINING_ARGUMENT_OPTIONS``: ``lr`` <- ``learning_rate``,
``weight_decay`` <- ``weight_decay``, and, with ``base`` or ``graft`` "adamw", ``betas`` / ``eps`` <- ``adam_beta1, adam_beta2`` /
``adam_epsilon`` where HyLo has such options) may be ``"auto"``, absent (both mean: take the
``TrainingArguments`` value) or equal to it; a different number raises ValueError naming both, as
HF's own DeepSpeed check does. ``"seed": "auto"`` takes ``TrainingArguments.seed``. Any other
``"auto"`` raises. As in ``Trainer``'s own optimizer, biases and LayerNorm weights get no weight
decay (two param groups). ``args.optim`` is not used.

What ``HyLoTrainer`` does at each stage (transformers 5.x, DeepSpeed 0.19):

1. ``__init__``: after ``Trainer.__init__`` (which already ran HF's ``trainer_config_process``, filling
   the JSON's ``"auto"`` values from ``TrainingArguments``), a HyLo ``optimizer`` section is taken
   out of the live DeepSpeed config (``ds_hylo.deepspeed.split_hylo_config``: also refuses
   ``overlap_comm`` and offload at stages 0-1, and options the stage cannot honour, such as
   ``kl_clip`` at stages 2-3). Without that, HF hands DeepSpeed a ``DummyOptim`` and DeepSpeed
   fails on the unknown type ``HyLo``. A JSON whose optimizer section names another optimizer is
   refused (DeepSpeed would train with it, not HyLo).
2. ``create_optimizer`` (called by HF's ``deepspeed_init`` when the config has no optimizer section,
   and by ``Trainer`` without DeepSpeed): builds HyLo (or returns the given one). Under DeepSpeed
   it is suspended while ZeRO initialises (ZeRO steps the optimizer on zero gradients), and
   DeepSpeed's "ZeRO with an untested optimizer" warning is filtered until step 3 (HyLo is tested
   under ZeRO-0 to 3).
3. ``create_scheduler`` (called right after ``accelerator.prepare`` created the ``DeepSpeedEngine``
   and before a checkpoint is resumed): ``ds_hylo.deepspeed.attach(engine, hylo)``, so HyLo
   preconditions each rank's full-shape gradients before DeepSpeed reduces them, and
   ``engine.save_checkpoint`` / ``load_checkpoint`` (which ``Trainer`` uses to save and resume under
   DeepSpeed) carry HyLo's state, one file per rank. Without DeepSpeed, ``Trainer`` saves
   ``optimizer.state_dict()``, which holds HyLo's state under ``"hylo"``. It also checks that the
   optimizer actually in use is this HyLo: anything that silently replaced it raises.
4. ``compute_loss``: with ``fisher="sampled"`` calls ``hylo.sample_fisher(logits, mask)`` after the
   forward pass of every training step (the logits come from ``fisher_logits``, which you may
   override; ``attention_mask`` marks the positions that count when its shape matches).

Gradient clipping (``max_grad_norm``): without DeepSpeed ``Trainer`` clips the raw gradients before
``optimizer.step()`` (so before HyLo preconditions them); under DeepSpeed the engine clips the
preconditioned, reduced gradients. Both are valid clippings of the update, not the same one.

Loss scale on several ranks: with ``average_tokens_across_devices=True`` (the default) and
``num_items_in_batch`` known, ``Trainer`` multiplies the loss by the number of processes for models
whose ``forward`` takes ``**kwargs``, expecting the model to divide by the global item count. Models
whose loss is a per-batch mean anyway (e.g. ``BertForSequenceClassification``) then train on
world_size x the loss: SGD-type updates (HyLo's included) take world_size x larger steps than in
one process. Pass ``average_tokens_across_devices=False`` for such models.

Plain ``transformers.Trainer`` with a HyLo built by hand works without DeepSpeed only with
``fisher="empirical"`` (``optimizer_cls_and_kwargs=(HyLoFactory, options)`` builds one).
Under DeepSpeed it does not: ``Trainer`` drops the optimizer you pass and builds AdamW, or keeps
HyLo without hooking it into the engine so that nothing is preconditioned. Use ``HyLoTrainer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn
from transformers import Trainer

from . import contract
from .config import HyLoConfig
from .deepspeed import (
    attach,
    check_options_for_stage,
    check_supported,
    is_hylo_config,
    split_hylo_config,
    untested_optimizer_warning_filtered,
)

_DEFAULTS = HyLoConfig()
from .optimizer import HyLo

logger = logging.getLogger("ds_hylo")

__all__ = ["HyLoTrainer", "HyLoFactory", "init_cpu_deepspeed", "resolve_trainer_options", "TRAINING_ARGUMENT_OPTIONS"]

# HyLo option -> (TrainingArguments field(s) as HF names them, how to read the value).
TRAINING_ARGUMENT_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "lr": ("learning_rate", lambda args: args.learning_rate),
    "weight_decay": ("weight_decay", lambda args: args.weight_decay),
    "betas": ("adam_beta1+adam_beta2", lambda args: [args.adam_beta1, args.adam_beta2]),
    "eps": ("adam_epsilon", lambda args: args.adam_epsilon),
}
# HyLo option -> TrainingArguments field, filled only where the value is "auto".
AUTO_ONLY_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "seed": ("seed", lambda args: args.seed),
}


def _hylo_option_names() -> set[str]:
    return {f.name for f in dataclasses.fields(HyLoConfig)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def resolve_trainer_options(options: Mapping[str, Any], args: Any, where: str = "hylo_options") -> dict[str, Any]:
    """HyLo options with the values ``TrainingArguments`` owns filled in or checked.

    Args:
        options: HyLo options (the JSON section's ``params``, or ``hylo_options``).
        args: the ``TrainingArguments``.
        where: how the error messages name ``options`` (e.g. ``"optimizer.params"``).

    Returns:
        A new dict: each ``TRAINING_ARGUMENT_OPTIONS`` key HyLo knows set from ``args`` where it
        was absent or ``"auto"``; ``"seed": "auto"`` set to ``args.seed``.

    Raises:
        ValueError: a value differs from the ``TrainingArguments`` value that owns it, or an
            ``"auto"`` is left that nothing fills.
    """
    known = _hylo_option_names()
    resolved = dict(options)
    for key, (hf_name, read) in TRAINING_ARGUMENT_OPTIONS.items():
        if key not in known:
            continue  # HyLoConfig itself refuses an unknown option given here
        uses_adam = "adamw" in (resolved.get("base", _DEFAULTS.base), resolved.get("graft", _DEFAULTS.graft))
        if key in ("betas", "eps") and key not in resolved and not uses_adam:
            continue  # only an AdamW base or AdamW grafting reads them (HyLoConfig refuses them otherwise)
        hf_value = read(args)
        value = resolved.get(key, "auto")
        if value == "auto":
            resolved[key] = list(hf_value) if isinstance(hf_value, (list, tuple)) else hf_value
        elif not _same(value, hf_value):
            raise ValueError(
                f"{where}.{key}={value!r} differs from TrainingArguments {hf_name}={hf_value!r}; under "
                f'HyLoTrainer TrainingArguments owns it: set {where}.{key} to "auto" (or leave it out), '
                f"or give TrainingArguments {hf_name}={value!r}"
            )
    for key, (hf_name, read) in AUTO_ONLY_OPTIONS.items():
        if resolved.get(key) == "auto":
            resolved[key] = read(args)
    left = sorted(key for key, value in resolved.items() if value == "auto")
    if left:
        fillable = sorted(k for k in TRAINING_ARGUMENT_OPTIONS if k in known) + sorted(AUTO_ONLY_OPTIONS)
        raise ValueError(
            f'{where}: "auto" for {[f"{where}.{k}" for k in left]}, which nothing fills; HyLoTrainer fills '
            f'"auto" only for {fillable}. Give numbers.'
        )
    return resolved


def _decay_groups(trainer: Trainer, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer's two param groups (decay / no decay for biases and norms), empty ones left out."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _deepspeed_active() -> bool:
    """Whether transformers holds a DeepSpeed config (TrainingArguments(deepspeed=...) or accelerate launch)."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return deepspeed_config() is not None


class HyLoTrainer(Trainer):
    """``transformers.Trainer`` that trains with HyLo, with or without DeepSpeed (see the module doc).

    Args:
        *args, **kwargs: as ``transformers.Trainer``. ``optimizers=(hylo, scheduler)`` takes a
            ``HyLo`` instance (built on this trainer's model); ``optimizer_cls_and_kwargs=(HyLo,
            options)`` takes HyLo's options. Any other optimizer raises TypeError.
        hylo_options: HyLo's options (``ds_hylo.HyLoConfig`` fields), e.g. ``{"mode": "kis",
            "damping": 0.1}``. Not together with a HyLo section in the DeepSpeed JSON.

    Attributes:
        hylo: the HyLo optimizer once built (``create_optimizer``), else None.
    """

    def __init__(self, *args: Any, hylo_options: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        contract.check("transformers", "accelerate")  # every Trainer internal HyLoTrainer relies on is there
        bound = inspect.signature(Trainer.__init__).bind(None, *args, **kwargs)
        arguments = bound.arguments
        optimizer, scheduler = arguments.get("optimizers", (None, None))
        cls_and_kwargs = arguments.pop("optimizer_cls_and_kwargs", None)
        sources = [
            name
            for name, given in (("hylo_options", hylo_options is not None), ("optimizers", optimizer is not None),
                                ("optimizer_cls_and_kwargs", cls_and_kwargs is not None))
            if given
        ]
        if len(sources) > 1:
            raise ValueError(f"HyLoTrainer: give HyLo's options in one place, got {sources}")
        if optimizer is not None and not isinstance(optimizer, HyLo):
            raise TypeError(
                f"HyLoTrainer trains with HyLo; optimizers[0] is a {type(optimizer).__name__}. Pass a HyLo, "
                "or use transformers.Trainer for other optimizers"
            )
        if cls_and_kwargs is not None:
            hylo_options = self._options_from_cls_and_kwargs(cls_and_kwargs)
        # Trainer keeps optimizers[0]; HF's deepspeed_init later resets it, so HyLoTrainer keeps its own.
        self.hylo: Optional[HyLo] = optimizer
        self._given_scheduler = scheduler
        self._hylo_options: Optional[dict[str, Any]] = None
        self._attached_engine: Any = None
        # DeepSpeed's "untested optimizer" warning is filtered from create_optimizer (just before
        # accelerator.prepare builds the engine) until HyLo is attached, or train() ends.
        self._quiet_deepspeed = contextlib.ExitStack()
        super().__init__(*bound.args[1:], **bound.kwargs)
        if optimizer is not None:
            self._check_owns_model(optimizer)
        else:
            self._hylo_options = resolve_trainer_options(hylo_options or {}, self.args)
        if self.is_deepspeed_enabled:
            contract.check("deepspeed")
            self._take_deepspeed_section(from_elsewhere=sources)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _options_from_cls_and_kwargs(cls_and_kwargs: Any) -> dict[str, Any]:
        try:
            cls, options = cls_and_kwargs
        except (TypeError, ValueError):
            raise TypeError(
                f"optimizer_cls_and_kwargs must be (HyLo, {{options}}), got {cls_and_kwargs!r}"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, HyLo)):
            raise TypeError(
                f"HyLoTrainer trains with HyLo; optimizer_cls_and_kwargs[0] is {cls!r}. Give (HyLo, options), "
                "or use transformers.Trainer for other optimizers"
            )
        if not isinstance(options, Mapping):
            raise TypeError(f"optimizer_cls_and_kwargs[1] must be a dict of HyLo options, got {type(options).__name__}")
        return dict(options)

    def _check_owns_model(self, hylo: HyLo) -> None:
        model_params = {id(p) for p in self.model.parameters()}
        foreign = sum(id(p) not in model_params for g in hylo.param_groups for p in g["params"])
        if foreign:
            raise ValueError(
                f"HyLoTrainer: the HyLo passed in optimizers steps {foreign} parameter(s) that are not this "
                "trainer's model's; build it as HyLo(model, ...) on the model given to the trainer"
            )

    def _take_deepspeed_section(self, from_elsewhere: list[str]) -> None:
        """Take a HyLo optimizer section out of the live DeepSpeed config (see module doc, step 1)."""
        config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        section = config.get("optimizer")
        if section is None:
            check_supported(config)
            return
        if not is_hylo_config(config):
            kind = section.get("type") if isinstance(section, dict) else section
            raise ValueError(
                f"the DeepSpeed config's optimizer section says type={kind!r}: DeepSpeed would build and train "
                'with it, not HyLo. Use "type": "HyLo" (or remove the section) with HyLoTrainer, or use '
                "transformers.Trainer"
            )
        if from_elsewhere:
            raise ValueError(
                f"the DeepSpeed config has a HyLo optimizer section and {from_elsewhere[0]} was given too; "
                "give HyLo's options in one place"
            )
        stripped, params = split_hylo_config(config)
        self._hylo_options = resolve_trainer_options(params, self.args, where="optimizer.params")
        options = HyLoConfig.from_dict(dict(self._hylo_options), where="optimizer.params")  # fail now, not at train()
        check_options_for_stage(options, int(stripped.get("zero_optimization", {}).get("stage", 0)))
        config.clear()  # in place: this dict is the one HF's deepspeed_init and Accelerate read
        config.update(stripped)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build HyLo (or take the one given); Trainer and HF's ``deepspeed_init`` call this."""
        if self.optimizer is None:
            if self.hylo is None:
                opt_model = self.model if model is None else model
                options = dict(self._hylo_options or {})
                groups = _decay_groups(self, opt_model, float(options.get("weight_decay", 0.0)))
                self.hylo = HyLo(opt_model, params=groups, **options)
            elif self._attached_engine is not None:
                raise RuntimeError(
                    "HyLoTrainer.train() runs once under DeepSpeed: ZeRO has rewritten HyLo's param groups "
                    "into its partitions. Build a new HyLoTrainer (resume_from_checkpoint=... continues a run)"
                )
            self.optimizer = self.hylo
            if self.is_deepspeed_enabled:
                zero = self.accelerator.state.deepspeed_plugin.hf_ds_config.config.get("zero_optimization", {})
                check_options_for_stage(self.hylo, int(zero.get("stage", 0)))
                self.hylo.suspended = True  # ZeRO steps the optimizer on zero gradients while it initialises
                # HyLo is tested under ZeRO-0 to 3: DeepSpeed's "untested
                # optimizer" warning, printed while Trainer's accelerator.prepare builds the engine, says
                # nothing true. Filtered until _hook_in attaches HyLo (or train() ends).
                self._quiet_deepspeed.close()
                self._quiet_deepspeed.enter_context(untested_optimizer_warning_filtered())
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
        """Trainer's scheduler (or the one given); then hook HyLo into the DeepSpeed engine (step 3)."""
        if self.lr_scheduler is None and self._given_scheduler is not None:
            self.lr_scheduler = self._given_scheduler  # HF's deepspeed_init dropped it
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self._hook_in()
        return scheduler

    def _hook_in(self) -> None:
        if self.hylo is None:
            return
        if not self.is_deepspeed_enabled:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's AcceleratedOptimizer
            if inner is not self.hylo:
                raise RuntimeError(f"HyLoTrainer: Trainer's optimizer is a {type(inner).__name__}, not HyLo")
            return
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is None:
            return  # called before the engine exists (HF's scheduler factory): nothing to hook yet
        engine = wrapped.engine
        if engine is self._attached_engine:
            return
        if engine.basic_optimizer is not self.hylo:
            raise RuntimeError(
                f"HyLoTrainer: the DeepSpeed engine trains with {type(engine.basic_optimizer).__name__}, not HyLo"
            )
        self._quiet_deepspeed.close()  # the engine exists: DeepSpeed's sanity check has run
        attach(engine, self.hylo)
        self.hylo.suspended = False
        self._attached_engine = engine

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; also drops the filter on DeepSpeed's logger should training fail before
        HyLo was attached (see ``create_optimizer``)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._quiet_deepspeed.close()

    # ------------------------------------------------------------------ training step
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Any] = None,
    ) -> Any:
        """Trainer's loss; with ``fisher="sampled"`` also HyLo's sampled-label pass on training steps."""
        hylo = self.hylo
        if hylo is None or hylo.config.fisher != "sampled" or not model.training or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        attention_mask = inputs.get("attention_mask")  # compute_loss may pop entries from inputs
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        logits, mask = self.fisher_logits(outputs, attention_mask)
        hylo.sample_fisher(logits, mask)
        return (loss, outputs) if return_outputs else loss

    def fisher_logits(
        self, outputs: Any, attention_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logits (..., C), mask (...) or None) for ``sample_fisher`` from the model's outputs.

        Default: ``outputs["logits"]`` (the tensor itself, as DeepSpeed needs), masked by
        ``attention_mask`` where its shape is the logits' leading shape (token-level outputs).
        Override for models whose output has no ``logits`` entry.
        """
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if not torch.is_tensor(logits):
            raise ValueError(
                f"HyLoTrainer with fisher='sampled' needs the model's logits: its output "
                f"({type(outputs).__name__}) has no 'logits' tensor. Return a ModelOutput/dict with 'logits' "
                "or override HyLoTrainer.fisher_logits"
            )
        mask = None
        if torch.is_tensor(attention_mask) and tuple(attention_mask.shape) == tuple(logits.shape[:-1]):
            mask = attention_mask.bool()
        return logits, mask


def init_cpu_deepspeed() -> dict[str, Any]:
    """On a host without a GPU, make ``TrainingArguments(deepspeed=...)`` run DeepSpeed on the CPU (gloo).

    Call it before building each ``TrainingArguments`` and pass what it returns as
    ``TrainingArguments(..., accelerator_config=init_cpu_deepspeed())``. With a GPU it does nothing
    and returns ``{}``. Without one, ``TrainingArguments`` would set Accelerate up with no
    distributed backend and a world of one process on every rank (DeepSpeed then fails on its
    batch-size check), so this: sets ``DS_ACCELERATOR=cpu`` unless set, skips DeepSpeed's ~70 s
    build of its CPU shared-memory collectives, sets up a one-process environment when no launcher
    did, and builds Accelerate's DeepSpeed state on gloo; it returns ``{"use_configured_state":
    True}`` so that ``TrainingArguments`` uses that state.
    """
    if torch.cuda.is_available():
        return {}
    contract.check("accelerate", "deepspeed")
    import os

    from accelerate.state import AcceleratorState, PartialState

    from .accelerate import _LAUNCHER_ENV, _single_process_env
    from .deepspeed import disable_cpu_shm_comm

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    disable_cpu_shm_comm()
    if not any(name in os.environ for name in _LAUNCHER_ENV):
        _single_process_env()
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it builds the state
    try:
        AcceleratorState._reset_state(reset_partial_state=True)  # as TrainingArguments does; a second
        # Trainer in the same process otherwise finds the first one's DeepSpeed plugin
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return {"use_configured_state": True}


class HyLoFactory:
    """For plain ``transformers.Trainer`` without DeepSpeed: ``optimizer_cls_and_kwargs=(HyLoFactory, options)``.

    ``Trainer`` treats a class that is not a ``torch.optim.Optimizer`` as an optimizer factory and
    calls ``HyLoFactory()(model, **options)``, which gives HyLo the model it needs (``(HyLo,
    options)`` itself fails there: Trainer passes param groups where HyLo takes the model). All
    trainable parameters form one group; ``options`` must give ``lr`` (Trainer does not add it).
    Refuses DeepSpeed (HyLo would not be hooked into the engine and nothing would be
    preconditioned) and ``fisher="sampled"`` (plain Trainer never calls ``sample_fisher``): use
    ``HyLoTrainer`` for those.
    """

    def __call__(self, model: nn.Module, **options: Any) -> HyLo:
        if _deepspeed_active():
            raise RuntimeError(
                "HyLoFactory: transformers.Trainer under DeepSpeed would not hook HyLo into the engine "
                "(nothing would be preconditioned); use ds_hylo.hf.HyLoTrainer"
            )
        if options.get("fisher") == "sampled":
            raise ValueError(
                "HyLoFactory: fisher='sampled' needs sample_fisher(logits) after every forward pass, "
                "which transformers.Trainer never calls; use ds_hylo.hf.HyLoTrainer"
            )
        return HyLo(model, **options)
