"""Tiny BERT, random token data and the 2-rank DeepSpeed run for tests/test_hf.py (importable by spawned ranks)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

VOCAB, CLASSES, SEQ, N_EXAMPLES = 100, 3, 12, 64
HYLO = {"mode": "kis", "base": "sgd", "rank_ratio": 0.5, "update_freq": 2, "damping": 0.1}
LR = 0.05
SHIPPED_JSON = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero1_kis_fp32.json"


def make_model(seed: int = 0) -> torch.nn.Module:
    """BertForSequenceClassification, hidden 32, 2 layers, 2 heads, no dropout (runs are deterministic)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class RandomTokens(torch.utils.data.Dataset):
    """``N_EXAMPLES`` dicts of input_ids (SEQ,), attention_mask (SEQ,) with padded tails, labels ()."""

    def __init__(self, n: int = N_EXAMPLES, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
        self.mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = torch.randint(0, CLASSES, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def training_args(output_dir: str, max_steps: int = 4, **overrides: Any):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, learning_rate=LR,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1,
        seed=42, use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------ DeepSpeed, 2 ranks
def ds_json(**hylo: Any) -> dict:
    """The JSON a Trainer user writes: HyLo by name, "auto" where TrainingArguments owns the value."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "HyLo", "params": {"lr": "auto", "weight_decay": "auto", "seed": "auto", **hylo}},
        "zero_optimization": {"stage": 1, "overlap_comm": False},
        "steps_per_print": 10**9,
    }


def _ds_args(output_dir: str, max_steps: int, **overrides: Any):
    from ds_hylo.hf import init_cpu_deepspeed

    overrides.setdefault("per_device_train_batch_size", 4)
    return training_args(
        output_dir, max_steps=max_steps, use_cpu=False,
        accelerator_config=init_cpu_deepspeed(), average_tokens_across_devices=False, **overrides,
    )


def engine_params(engine: Any) -> list[torch.Tensor]:
    """The engine's parameters at full shape (gathered under ZeRO-3, which keeps (0,) placeholders)."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def _trainer_class():
    from ds_hylo.hf import HyLoTrainer

    class RecordingTrainer(HyLoTrainer):
        """Keeps every training batch this rank saw and the loss, to replay them without Trainer."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.batches.append({k: v.detach().clone() for k, v in inputs.items()})
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    return RecordingTrainer


def _train(out: str, config: dict, max_steps: int, resume: Optional[str] = None, examples: int = N_EXAMPLES,
           **overrides: Any) -> dict[str, Any]:
    cls = _trainer_class()
    model = make_model()
    args = _ds_args(out, max_steps, deepspeed=copy.deepcopy(config), **overrides)
    trainer = cls(model=model, args=args, train_dataset=RandomTokens(examples))
    trainer.batches, trainer.losses = [], []
    trainer.train(resume_from_checkpoint=resume)
    engine = trainer.model_wrapped
    result = {
        "losses": trainer.losses,
        "batches": trainer.batches,
        "params": engine_params(engine),
        "stats": {k: trainer.hylo.stats()[k] for k in ("step", "refreshes")},
        "engine_hylo": getattr(engine, "hylo", None) is trainer.hylo,
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": type(engine.basic_optimizer).__name__,
        "decay_names": sorted(trainer.get_decay_parameter_names(model)),
    }
    engine.destroy()
    return result


def _replay_with_initialize(config: dict, batches: list[dict], decay: Optional[tuple[list[str], float]] = None
                            ) -> list[torch.Tensor]:
    """The same per-rank batches through ds_hylo.initialize (JSON with numbers instead of "auto").

    ``decay``: (names, weight decay) to build Trainer's two param groups (no decay on biases and norms).
    """
    import ds_hylo

    model = make_model()
    groups = None
    if decay is not None:
        names, weight_decay = decay
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if n in names], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n not in names], "weight_decay": 0.0}]
    engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config), model_parameters=groups)
    for batch in batches:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    params = engine_params(engine)
    engine.destroy()
    return params


def deepspeed_suite(tmp: str) -> dict[str, Any]:
    """One spawn, several runs on 2 gloo ranks (ZeRO-1) under HyLoTrainer; returns what the test checks."""
    import transformers

    transformers.logging.set_verbosity_error()
    rank = torch.distributed.get_rank()
    config = ds_json(**HYLO)
    out: dict[str, Any] = {"rank": rank}

    straight = _train(os.path.join(tmp, "straight"), config, 4, save_strategy="steps", save_steps=2)
    out["straight"] = {k: v for k, v in straight.items() if k != "batches"}
    checkpoint = os.path.join(tmp, "straight", "checkpoint-2")
    out["hylo_files"] = sorted(p.name for p in Path(checkpoint).glob("global_step*/hylo_state_rank*.pt"))

    resumed = _train(os.path.join(tmp, "resumed"), config, 4, resume=checkpoint)
    out["resumed"] = {k: v for k, v in resumed.items() if k != "batches"}

    sgd_like = _train(os.path.join(tmp, "sgd_like"), ds_json(**{**HYLO, "damping": 1e8}), 4)
    out["sgd_like_losses"] = sgd_like["losses"]

    numbers = ds_json(**HYLO)  # what the deepspeed launcher takes: the values HF filled in
    numbers.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, gradient_clipping=1.0)
    del numbers["train_batch_size"]
    numbers["optimizer"]["params"].update(lr=LR, weight_decay=0.0, seed=42)
    out["initialize_params"] = _replay_with_initialize(numbers, straight["batches"])

    # A shipped JSON file as it is (numbers, no "auto"): the file tests/integration/test_accelerate.py
    # runs under `accelerate launch` and the deepspeed launcher, here under HyLoTrainer with
    # TrainingArguments that carry the same numbers; replayed through ds_hylo.initialize.
    from ds_hylo.deepspeed import load_config

    shipped = load_config(SHIPPED_JSON)
    hylo = shipped["optimizer"]["params"]
    run = _train(os.path.join(tmp, "shipped"), shipped, 3, examples=2 * 3 * shipped["train_micro_batch_size_per_gpu"],
                 per_device_train_batch_size=shipped["train_micro_batch_size_per_gpu"],
                 gradient_accumulation_steps=shipped["gradient_accumulation_steps"],
                 max_grad_norm=shipped["gradient_clipping"], learning_rate=hylo["lr"],
                 weight_decay=hylo.get("weight_decay", 0.0))
    out["shipped"] = {k: v for k, v in run.items() if k != "batches"}
    out["shipped_initialize_params"] = _replay_with_initialize(
        load_config(SHIPPED_JSON), run["batches"], decay=(run["decay_names"], hylo.get("weight_decay", 0.0)))
    out["initial_params"] = params_of(make_model())

    # The same JSON at ZeRO-2 and 3: HyLoTrainer equals ds_hylo.initialize on the same batches there too.
    for stage in (2, 3):
        staged = ds_json(**HYLO)
        staged["zero_optimization"]["stage"] = stage
        run = _train(os.path.join(tmp, f"stage{stage}"), staged, 4)
        out[f"stage{stage}"] = {k: v for k, v in run.items() if k != "batches"}
        replay = copy.deepcopy(numbers)
        replay["zero_optimization"]["stage"] = stage
        out[f"stage{stage}_initialize_params"] = _replay_with_initialize(replay, run["batches"])
    return out


def _refusal(make) -> str:
    """The message of the exception ``make()`` raises ("" if it raises none)."""
    try:
        make()
    except (ValueError, TypeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def deepspeed_refusals(tmp: str) -> dict[str, str]:
    """Routes that would train with something other than HyLo, or not precondition, must raise."""
    from transformers import Trainer

    from ds_hylo.hf import HyLoFactory, HyLoTrainer

    def trainer(config: dict, cls=HyLoTrainer, **kwargs: Any):
        args = _ds_args(os.path.join(tmp, "refused"), 2, deepspeed=copy.deepcopy(config))
        return cls(model=make_model(), args=args, train_dataset=RandomTokens(), **kwargs)

    adamw = ds_json()
    adamw["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    stage3 = ds_json(kl_clip=0.001)
    stage3["zero_optimization"]["stage"] = 3
    explicit_lr = ds_json(lr=0.1)
    no_section = {k: v for k, v in ds_json().items() if k != "optimizer"}

    def plain_trainer_with_factory():
        model = make_model()
        args = _ds_args(os.path.join(tmp, "refused"), 2, deepspeed=copy.deepcopy(no_section))
        Trainer(model=model, args=args, train_dataset=RandomTokens(),
                optimizer_cls_and_kwargs=(HyLoFactory, {"lr": LR})).train()

    return {
        "adamw_section": _refusal(lambda: trainer(adamw)),
        "section_and_options": _refusal(lambda: trainer(ds_json(), hylo_options={"mode": "kis"})),
        "stage3_kl_clip": _refusal(lambda: trainer(stage3)),
        "explicit_lr": _refusal(lambda: trainer(explicit_lr)),
        "plain_trainer_factory": _refusal(plain_trainer_with_factory),
    }


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def deepspeed_given_hylo(tmp: str) -> dict[str, Any]:
    """JSON without an optimizer section + optimizers=(HyLo, None): plain Trainer builds AdamW here.

    Also records DeepSpeed's log messages (``log_level="info"``: HF's deepspeed_init sets DeepSpeed's
    logger to it on rank 0) and whether a filter is left on DeepSpeed's logger after training."""
    from deepspeed.utils import logger as deepspeed_logger

    from ds_hylo import HyLo
    from ds_hylo.hf import HyLoTrainer

    no_section = {k: v for k, v in ds_json().items() if k != "optimizer"}
    model = make_model()
    hylo = HyLo(model, lr=LR, **HYLO)
    args = _ds_args(os.path.join(tmp, "given"), 2, deepspeed=no_section, log_level="info")
    trainer = HyLoTrainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=(hylo, None))
    records, level, filters = _Messages(), deepspeed_logger.level, list(deepspeed_logger.filters)
    deepspeed_logger.addHandler(records)
    try:
        trainer.train()
    finally:
        deepspeed_logger.removeHandler(records)
        deepspeed_logger.setLevel(level)
    engine = trainer.model_wrapped
    result = {"basic_is_hylo": engine.basic_optimizer is hylo, "attached": getattr(engine, "hylo", None) is hylo,
              "refreshes": hylo.stats()["refreshes"]}
    logs = {"deepspeed": records.messages, "filters_left": list(deepspeed_logger.filters) != filters}
    engine.destroy()
    return {"run": result, "logs": logs}


def deepspeed_all(tmp: str) -> dict[str, Any]:
    """Everything the 2-rank test checks, in one spawn."""
    import transformers

    transformers.logging.set_verbosity_error()
    out = deepspeed_suite(tmp)
    out["refusals"] = deepspeed_refusals(tmp)
    given = deepspeed_given_hylo(tmp)
    out["given_hylo"], out["given_hylo_logs"] = given["run"], given["logs"]
    return out
