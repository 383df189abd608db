"""ds_hylo.hf: HyLo under Hugging Face Trainer, without DeepSpeed (in process) and with ZeRO-1 on 2 CPU ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_workers as hw  # noqa: E402
from distributed import run_distributed  # noqa: E402

from ds_hylo import HyLo  # noqa: E402
from ds_hylo.hf import HyLoTrainer, HyLoFactory, resolve_trainer_options  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _hylo_trainer(tmp_path, max_steps: int = 4, hylo_options=None, **args):
    model = hw.make_model()
    trainer = HyLoTrainer(model=model, args=hw.training_args(str(tmp_path / "out"), max_steps, **args),
                          train_dataset=hw.RandomTokens(), hylo_options=hylo_options)
    return trainer, model


# ----------------------------------------------------------------------------- no DeepSpeed
def test_hylo_trainer_preconditions_and_huge_damping_equals_sgd(tmp_path):
    """HyLoTrainer keeps Trainer's lr/grouping (== plain Trainer + SGD as damping -> inf) and preconditions."""
    model = hw.make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=hw.LR)
    from transformers import Trainer

    Trainer(model=model, args=hw.training_args(str(tmp_path / "sgd")), train_dataset=hw.RandomTokens(),
            optimizers=(sgd, None)).train()
    sgd_params = hw.params_of(model)

    flat, flat_model = _hylo_trainer(tmp_path, hylo_options={**hw.HYLO, "damping": 1e8})
    flat.train()
    hylo, hylo_model = _hylo_trainer(tmp_path, hylo_options=hw.HYLO)
    hylo.train()

    assert isinstance(hylo.hylo, HyLo) and hylo.hylo.param_groups[0]["lr"] == hw.LR
    assert hylo.hylo.stats()["refreshes"] == 2 and hylo.hylo.stats()["step"] == 4
    assert _max_diff(hw.params_of(flat_model), sgd_params) < 1e-5
    assert _max_diff(hw.params_of(hylo_model), sgd_params) > 1e-3


def test_sampled_fisher_is_drawn_by_compute_loss(tmp_path):
    """fisher="sampled": HyLoTrainer calls sample_fisher after forward (a refresh would raise otherwise)."""
    trainer, _ = _hylo_trainer(tmp_path, hylo_options={**hw.HYLO, "fisher": "sampled"})
    trainer.train()
    assert trainer.hylo.stats()["refreshes"] == 2


def test_fisher_logits_masks_token_level_outputs(tmp_path):
    trainer, _ = _hylo_trainer(tmp_path)
    logits, mask = torch.zeros(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got, got_mask = trainer.fisher_logits({"logits": logits}, mask)
    assert got is logits and got_mask.dtype == torch.bool and torch.equal(got_mask, mask.bool())
    assert trainer.fisher_logits({"logits": torch.zeros(2, 3)}, mask)[1] is None  # sequence-level logits
    with pytest.raises(ValueError, match="no 'logits' tensor"):
        trainer.fisher_logits((torch.zeros(2, 3),), mask)


def test_save_and_resume_equals_straight_run(tmp_path):
    """Trainer's checkpoint carries HyLo's state: resuming at step 3 ends where the straight run does."""
    straight, straight_model = _hylo_trainer(tmp_path, 6, hw.HYLO, save_strategy="steps", save_steps=3)
    straight.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["hylo"]["steps"] == 3 and saved["hylo"]["factors"]  # Trainer saved HyLo's state

    resumed, resumed_model = _hylo_trainer(tmp_path, 6, hw.HYLO)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.hylo.stats()["step"] == 6  # 3 restored + 3 run (3 if HyLo's state were not restored)
    assert resumed.hylo.stats()["refreshes"] == straight.hylo.stats()["refreshes"] == 3
    assert _max_diff(hw.params_of(resumed_model), hw.params_of(straight_model)) <= 1e-6


def test_optimizer_cls_and_kwargs_and_given_hylo(tmp_path):
    model = hw.make_model()
    args = hw.training_args(str(tmp_path / "out"), 2)
    trainer = HyLoTrainer(model=model, args=args, train_dataset=hw.RandomTokens(),
                          optimizer_cls_and_kwargs=(HyLo, {"mode": "sngd", "update_freq": 1}))
    trainer.train()
    assert trainer.hylo.config.mode == "sngd" and trainer.hylo.config.lr == hw.LR
    assert trainer.hylo.stats()["refreshes"] == 2
    # Trainer's param groups: biases and LayerNorm weights without weight decay
    assert len(trainer.hylo.param_groups) == 2 and trainer.hylo.param_groups[1]["weight_decay"] == 0.0

    given = HyLo(model, lr=0.01, update_freq=1)
    trainer = HyLoTrainer(model=model, args=args, train_dataset=hw.RandomTokens(), optimizers=(given, None))
    trainer.train()
    assert trainer.hylo is given and given.stats()["step"] == 2


def test_refusals_without_deepspeed(tmp_path):
    model = hw.make_model()
    args = hw.training_args(str(tmp_path / "out"), 2)
    data = hw.RandomTokens()
    with pytest.raises(TypeError, match="HyLoTrainer trains with HyLo; optimizers\\[0\\] is a SGD"):
        HyLoTrainer(model=model, args=args, train_dataset=data,
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs\\[0\\]"):
        HyLoTrainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
    with pytest.raises(ValueError, match="in one place"):
        HyLoTrainer(model=model, args=args, train_dataset=data, hylo_options={},
                    optimizer_cls_and_kwargs=(HyLo, {}))
    with pytest.raises(ValueError, match="not this trainer's model"):
        HyLoTrainer(model=model, args=args, train_dataset=data, optimizers=(HyLo(hw.make_model(1)), None))
    with pytest.raises(ValueError, match=r"hylo_options.lr=0.1 differs from TrainingArguments learning_rate=0.05"):
        HyLoTrainer(model=model, args=args, train_dataset=data, hylo_options={"lr": 0.1})
    with pytest.raises(ValueError, match=r"hylo_options.momentum"):
        HyLoTrainer(model=model, args=args, train_dataset=data, hylo_options={"base": "sgd", "momentum": "auto"})


def test_resolve_trainer_options_fills_and_checks():
    args = hw.training_args("unused", 1, learning_rate=0.02, weight_decay=0.01, seed=7)
    got = resolve_trainer_options({"lr": "auto", "seed": "auto", "mode": "kid", "base": "sgd"}, args)
    assert got == {"lr": 0.02, "weight_decay": 0.01, "seed": 7, "mode": "kid", "base": "sgd"}
    for options in ({"base": "adamw"}, {}):  # an AdamW base (the default) also takes betas and eps
        adam = resolve_trainer_options(options, args)
        assert adam["betas"] == [args.adam_beta1, args.adam_beta2] and adam["eps"] == args.adam_epsilon
    assert resolve_trainer_options({"lr": 0.02, "weight_decay": 0.01}, args)["lr"] == 0.02
    with pytest.raises(ValueError, match=r"optimizer.params.weight_decay=0.5 differs .* weight_decay=0.01"):
        resolve_trainer_options({"weight_decay": 0.5}, args, where="optimizer.params")


def test_plain_trainer_factory_without_deepspeed(tmp_path):
    from transformers import Trainer

    model = hw.make_model()
    args = hw.training_args(str(tmp_path / "out"), 2)
    with pytest.raises(TypeError, match="HyLo needs the model"):  # why the factory exists
        Trainer(model=model, args=args, train_dataset=hw.RandomTokens(),
                optimizer_cls_and_kwargs=(HyLo, {"lr": hw.LR})).train()
    trainer = Trainer(model=model, args=args, train_dataset=hw.RandomTokens(),
                      optimizer_cls_and_kwargs=(HyLoFactory, {"lr": hw.LR, "update_freq": 1}))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, HyLo) and trainer.optimizer.optimizer.stats()["refreshes"] == 2
    with pytest.raises(ValueError, match="fisher='sampled'"):
        HyLoFactory()(model, fisher="sampled")


# ------------------------------------------------------------------- DeepSpeed ZeRO-1, 2 CPU ranks
@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_distributed(hw.deepspeed_all, str(tmp_path_factory.mktemp("hf_ds")))


def test_deepspeed_json_with_auto_trains_with_hylo(deepspeed_results):
    for rank in deepspeed_results:
        run = rank["straight"]
        assert run["optimizer"] == "HyLo" and run["engine_hylo"] and run["zero_stage"] == 1
        assert run["stats"] == {"step": 4, "refreshes": 2}
        # preconditioned: the losses after the first update differ from the SGD-equivalent (huge damping) run
        assert run["losses"][0] == rank["sgd_like_losses"][0]
        assert max(abs(a - b) for a, b in zip(run["losses"][1:], rank["sgd_like_losses"][1:])) > 1e-4
    assert _max_diff(deepspeed_results[0]["straight"]["params"], deepspeed_results[1]["straight"]["params"]) == 0.0


def test_deepspeed_trainer_equals_ds_hylo_initialize(deepspeed_results):
    """The same JSON (numbers for "auto") and the same per-rank batches through ds_hylo.initialize."""
    for rank in deepspeed_results:
        assert _max_diff(rank["straight"]["params"], rank["initialize_params"]) <= 1e-6


def test_shipped_json_file_under_trainer_equals_initialize(deepspeed_results):
    """One JSON for the three launch paths: the shipped file that test_accelerate.py runs under
    `accelerate launch` and the deepspeed launcher, as is, under HyLoTrainer + ZeRO-1 (TrainingArguments
    carry its numbers), equals the same batches through ds_hylo.initialize with Trainer's param groups."""
    for rank in deepspeed_results:
        run = rank["shipped"]
        assert run["optimizer"] == "HyLo" and run["engine_hylo"] and run["zero_stage"] == 1
        assert run["stats"]["step"] == 3 and run["stats"]["refreshes"] >= 1
        assert _max_diff(run["params"], rank["shipped_initialize_params"]) <= 1e-6
        assert _max_diff(run["params"], rank["initial_params"]) > 1e-4  # it trained
    assert _max_diff(deepspeed_results[0]["shipped"]["params"], deepspeed_results[1]["shipped"]["params"]) == 0.0


@pytest.mark.parametrize("stage", (2, 3))
def test_deepspeed_partitioned_stage_trainer_equals_ds_hylo_initialize(deepspeed_results, stage):
    """The same JSON at ZeRO-2 and ZeRO-3 under HyLoTrainer: it preconditions (2 refreshes, it trains),
    the ranks agree, and ds_hylo.initialize on the same batches gives the same parameters."""
    key = f"stage{stage}"
    for rank in deepspeed_results:
        run = rank[key]
        assert run["optimizer"] == "HyLo" and run["engine_hylo"] and run["zero_stage"] == stage
        assert run["stats"] == {"step": 4, "refreshes": 2}
        assert _max_diff(run["params"], rank[f"{key}_initialize_params"]) <= 1e-6
        assert _max_diff(run["params"], rank["initial_params"]) > 1e-4
    assert _max_diff(deepspeed_results[0][key]["params"], deepspeed_results[1][key]["params"]) == 0.0


def test_deepspeed_checkpoint_resume(deepspeed_results):
    """Trainer saves through engine.save_checkpoint (HyLo state per rank) and resumes bit-identically."""
    for rank in deepspeed_results:
        assert rank["hylo_files"] == ["hylo_state_rank00000.pt", "hylo_state_rank00001.pt"]
        assert rank["resumed"]["stats"] == {"step": 4, "refreshes": 2}
        assert rank["resumed"]["losses"] == rank["straight"]["losses"][2:]
        assert _max_diff(rank["resumed"]["params"], rank["straight"]["params"]) <= 1e-6


def test_deepspeed_given_hylo_is_hooked_in(deepspeed_results):
    """JSON without optimizer section + optimizers=(hylo, None): plain Trainer silently builds AdamW here."""
    for rank in deepspeed_results:
        assert rank["given_hylo"] == {"basic_is_hylo": True, "attached": True, "refreshes": 1}


@pytest.mark.parametrize("case, message", [
    ("adamw_section", "optimizer section says type='AdamW'"),
    ("section_and_options", "HyLo optimizer section and hylo_options was given too"),
    ("stage3_kl_clip", "kl_clip=0.001 is not supported by HyLo under ZeRO stage 3"),
    ("explicit_lr", "optimizer.params.lr=0.1 differs from TrainingArguments learning_rate=0.05"),
    ("plain_trainer_factory", "use ds_hylo.hf.HyLoTrainer"),
])
def test_deepspeed_refusals(deepspeed_results, case, message):
    for rank in deepspeed_results:
        assert message in rank["refusals"][case]


def test_deepspeed_no_untested_optimizer_warning(deepspeed_results):
    """HyLoTrainer under ZeRO-1 hands DeepSpeed HyLo as a client optimizer: DeepSpeed's "ZeRO with an
    untested optimizer" warning (rank 0) is filtered as under ds_hylo.initialize, and no filter stays."""
    rank0 = deepspeed_results[0]["given_hylo_logs"]
    # the capture works: DeepSpeed's INFO line just before the warning, from the same sanity check
    assert any("Checking ZeRO support for optimizer=HyLo" in m for m in rank0["deepspeed"]), rank0["deepspeed"]
    for rank in deepspeed_results:
        logs = rank["given_hylo_logs"]
        assert not any("untested optimizer" in m for m in logs["deepspeed"]), logs["deepspeed"]
        assert not logs["filters_left"]
