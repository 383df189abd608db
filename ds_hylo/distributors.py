"""Where HyLo's apply runs under each DeepSpeed ZeRO stage: one small distributor per strategy.

The refresh lifecycle (capture -> exchange -> invert -> commit) is the preconditioner's; what
differs between ZeRO stages is *when* a rank's local gradient exists in full shape before
DeepSpeed reduces it (docs/design.md section 3.5):

- ``AtReduction`` (stages 0 and 1): DeepSpeed reduces at the end of the backward, in
  ``engine.allreduce_gradients``. HyLo preconditions every layer there, at accumulation
  boundaries, with ``Preconditioner.precondition``.
- ``InGradientHooks`` (stages 2 and 3): DeepSpeed reduces bucket by bucket inside the backward,
  from a post-accumulate-grad hook per parameter that calls ``optimizer.process_gradients(param, i)``
  (stage 2) or ``optimizer.reduce_ready_partitions_and_remove_grads(param)`` (stage 3).
  HyLo preconditions a layer in that call, once its weight and bias gradients of the micro-batch
  are complete and before either enters a bucket (``Preconditioner.precondition_layer``, the
  committed factors: the delayed refresh); at the end of the backward, at accumulation
  boundaries, ``finish_layerwise_step`` reads the step's statistics once and refreshes.

Both hand the elementwise base update to HyLo's ``step()`` on ZeRO's flat partitions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .config import ConfigError, HyLoConfig
from .optimizer import HyLo

GradAccessor = Callable[[torch.nn.Parameter], Optional[torch.Tensor]]
LossScale = Callable[[], float]

SUSPENDED_ERROR = (
    "a training backward reached DeepSpeed's gradient reduction while HyLo is still suspended "
    "(hylo.suspended=True): its step() would skip every update silently. ds_hylo suspends HyLo "
    "only while DeepSpeed initialises; set hylo.suspended = False once the engine is built "
    "(ds_hylo.initialize, ds_hylo.accelerate.prepare and HyLoTrainer.create_scheduler do)"
)


class Distributor:
    """Hooks one DeepSpeed engine so that HyLo preconditions each rank's local gradients before
    DeepSpeed reduces them. ``install`` rebinds the engine's (and optimizer's) methods it needs."""

    stage_names: tuple[int, ...] = ()

    def __init__(self, engine: Any, hylo: HyLo, grad_of: GradAccessor, loss_scale: LossScale) -> None:
        self.engine = engine
        self.hylo = hylo
        self.grad_of = grad_of
        self.loss_scale = loss_scale

    def install(self) -> None:
        raise NotImplementedError

    def _check_not_suspended(self) -> None:
        if self.hylo.suspended:
            raise RuntimeError(SUSPENDED_ERROR)


class AtReduction(Distributor):
    """ZeRO-0/1: precondition every layer where the engine reduces, at accumulation boundaries."""

    stage_names = (0, 1)

    def install(self) -> None:
        engine, hylo = self.engine, self.hylo
        original_allreduce = engine.allreduce_gradients

        def allreduce_gradients(*args: Any, **kwargs: Any) -> Any:
            self._check_not_suspended()
            if engine.is_gradient_accumulation_boundary():
                hylo.preconditioner.precondition(
                    lr=hylo.param_groups[0]["lr"],
                    grad_scale=1.0 / self.loss_scale(),
                    grads_are_local=True,
                    grad_of=self.grad_of,
                )
            return original_allreduce(*args, **kwargs)

        engine.allreduce_gradients = allreduce_gradients


class InGradientHooks(Distributor):
    """ZeRO-2/3: precondition each layer in DeepSpeed's per-parameter gradient hook, refresh at the end.

    ``HOOK_METHODS[stage]`` is what DeepSpeed's hook calls for every parameter whose gradient was
    just accumulated; it copies the gradient into a reduction bucket. The
    rebound version holds a preconditioned layer's first parameter until the layer's other one
    (weight and bias) arrives, preconditions the layer's gradient in place, then lets DeepSpeed
    take both, in arrival order. Other parameters pass straight through.
    """

    stage_names = (2, 3)
    # the method each stage's per-parameter gradient hook calls, looked up at call time
    HOOK_METHODS = {2: "process_gradients", 3: "reduce_ready_partitions_and_remove_grads"}

    def __init__(self, engine: Any, hylo: HyLo, grad_of: GradAccessor, loss_scale: LossScale) -> None:
        super().__init__(engine, hylo, grad_of, loss_scale)
        self._waiting: dict[str, list[tuple[torch.nn.Parameter, tuple]]] = {}
        self._layer_of: dict[int, str] = {}
        self._layers_seen = -1

    @staticmethod
    def check_options(config: HyLoConfig, stage: int) -> None:
        """Refuse options whose statistics are not linear in the gradient (they need the reduced
        gradient of every layer at once, which no rank holds under ZeRO-2/3), and resolve
        ``delayed_refresh=None`` to True (in ``config``, in place)."""
        if config.kl_clip is not None:
            raise ConfigError(
                f"kl_clip={config.kl_clip!r} is not supported by HyLo under ZeRO stage {stage}: the KL clip needs "
                f"v . g summed over the reduced gradients of all layers, and ZeRO-{stage} reduces each layer's gradient "
                "during backward. Use kl_clip=null (the default) or ZeRO stage 1"
            )
        if config.graft != "none":
            raise ConfigError(
                f"graft={config.graft!r} is not supported by HyLo under ZeRO stage {stage}: grafting needs each "
                f"layer's reduced gradient and direction together, which ZeRO-{stage} never holds. Use graft=\"none\" "
                "(the default) or ZeRO stage 1"
            )
        if config.delayed_refresh is False:
            raise ConfigError(
                f"delayed_refresh=false is not supported by HyLo under ZeRO stage {stage}: ZeRO-{stage} reduces each "
                "layer's gradient during backward, so the factors must exist before the backward starts. Set "
                "delayed_refresh=true, or leave it out (null, the default, means true under ZeRO-2 and 3)"
            )
        config.delayed_refresh = True

    def install(self) -> None:
        engine, hylo = self.engine, self.hylo
        optimizer = engine.optimizer
        method = self.HOOK_METHODS[engine.zero_optimization_stage()]
        original_process = getattr(optimizer, method)
        original_allreduce = engine.allreduce_gradients
        preconditioner = hylo.preconditioner

        def process_gradients(param: torch.nn.Parameter, *rest: Any) -> Any:
            name = self._layer_name(param)
            if name is None or hylo.suspended or name in preconditioner.inactive_layers:
                return original_process(param, *rest)  # not preconditioned now (e.g. half frozen)
            arrived = self._waiting.setdefault(name, [])
            arrived.append((param, rest))
            if len(arrived) < sum(p.requires_grad for p in preconditioner.layers[name].adapter.params()):
                return None
            release(name)
            return None

        def release(name: str) -> None:
            """Precondition the layer's held gradients, then let DeepSpeed take them in arrival order."""
            arrived = self._waiting.pop(name)
            preconditioner.precondition_layer(name, self.grad_of)
            for held, held_rest in arrived:
                original_process(held, *held_rest)

        def allreduce_gradients(*args: Any, **kwargs: Any) -> Any:
            self._check_not_suspended()
            for name in list(self._waiting):  # a layer whose bias got no gradient (never for Linear/Conv)
                release(name)
            if engine.is_gradient_accumulation_boundary():
                preconditioner.finish_layerwise_step(lr=hylo.param_groups[0]["lr"], grad_scale=1.0 / self.loss_scale())
            return original_allreduce(*args, **kwargs)

        setattr(optimizer, method, process_gradients)
        engine.allreduce_gradients = allreduce_gradients

    def _layer_name(self, param: torch.nn.Parameter) -> Optional[str]:
        """The preconditioned layer ``param`` belongs to (weight or bias), or None. The map follows
        layers that join later (unfrozen): it is rebuilt when the number of layers changes."""
        layers = self.hylo.preconditioner.layers
        if len(layers) != self._layers_seen:
            self._layer_of = {id(p): name for name, layer in layers.items() for p in layer.adapter.params()}
            self._layers_seen = len(layers)
        return self._layer_of.get(id(param))


DISTRIBUTORS: tuple[type[Distributor], ...] = (AtReduction, InGradientHooks)


def distributor_for(stage: int) -> type[Distributor]:
    """The distributor of a ZeRO stage; ValueError naming the stages HyLo supports otherwise."""
    for cls in DISTRIBUTORS:
        if stage in cls.stage_names:
            return cls
    supported = sorted(s for cls in DISTRIBUTORS for s in cls.stage_names)
    raise ValueError(f"zero_optimization.stage={stage} is not supported by HyLo; supported stages: {supported}")
