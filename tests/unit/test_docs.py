"""One truth for defaults and figures: shipped configs, README and --help against HyLoConfig; READMEs against JSON.

* Every HyLo parameter in a shipped DeepSpeed JSON equals ``HyLoConfig``'s default, or is listed in
  ``ALLOWED`` below with the value and the reason it differs.
* The README's option table, its code snippets and the examples' ``--help`` show HyLoConfig's
  defaults.
* The benchmark tables in README.md and benchmarks/README.md equal what
  ``benchmarks/render_readme.py`` renders from ``benchmarks/results/*.json``.
* Code, tests and docs cite the design in ``docs/design.md`` only, and every "docs/design.md
  section N" they cite exists there and talks about the citing file.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "examples"), str(ROOT / "benchmarks"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import render_readme  # noqa: E402

from ds_hylo import HyLoConfig  # noqa: E402

DEFAULTS = HyLoConfig()
CONFIGS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))

# (file glob, HyLo key) -> (the value it has, why it differs from HyLoConfig's default).
# A shipped value that differs from the default and is not listed here fails the test; so does an
# entry here that no shipped file uses any more.
ALLOWED: dict[tuple[str, str], tuple[Any, str]] = {
    ("zero1_kid_*.json", "mode"): ("kid", "the file is the KID variant (its name says so)"),
    ("zero1_sngd_*.json", "mode"): ("sngd", "the file is the exact-SNGD variant (its name says so)"),
    ("zero1_kis_sampled_*.json", "fisher"): ("sampled", "the file is the sampled-Fisher variant (its name says so)"),
    ("zero1_sngd_*.json", "rank_ratio"): (1.0, "exact SNGD keeps every sample by definition"),
    ("finetune_minilm_*.json", "max_global_samples"): (256, "every token is a sample ('expand'): cap the rows "
                                                             "per layer so the kernel stays small"),
    # The HyLo paper's ResNet-32 / CIFAR-10 recipe (authors' public script; examples/launch/README.md).
    ("resnet32_cifar10_hylo*.json", "base"): ("sgd", "paper recipe: momentum SGD on the natural gradient"),
    ("resnet32_cifar10_hylo*.json", "lr"): (0.3, "paper recipe: lr 0.3 at global batch 1024"),
    ("resnet32_cifar10_hylo*.json", "momentum"): (0.9, "paper recipe"),
    ("resnet32_cifar10_hylo*.json", "weight_decay"): (0.0004, "paper recipe"),
    ("resnet32_cifar10_hylo*.json", "mode"): ("hybrid", "paper recipe: KID in critical phases, KIS elsewhere"),
    ("resnet32_cifar10_hylo*.json", "damping"): (1.0, "paper recipe: damping 1"),
    ("resnet32_cifar10_hylo*.json", "damping_target"): (1.0, "paper recipe: constant damping on CIFAR-10"),
    ("resnet32_cifar10_hylo*.json", "damping_decay_steps"): (4320, "90 epochs at 48 steps/epoch on 8 GPUs"),
    ("resnet32_cifar10_hylo*.json", "step_scale"): ("natural", "paper recipe: raw natural gradient + KL clip"),
    ("resnet32_cifar10_hylo*.json", "kl_clip"): (0.01, "paper recipe"),
}


def _hylo_params(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    section = config.get("optimizer", {})
    assert str(section.get("type", "")).lower() == "hylo", f"{path.name}: optimizer type is not HyLo"
    return dict(section.get("params", {}))


def _allowed(name: str, key: str) -> list[tuple[tuple[str, str], tuple[Any, str]]]:
    return [(k, v) for k, v in ALLOWED.items() if k[1] == key and fnmatch.fnmatch(name, k[0])]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_uses_hyloconfig_defaults_or_says_why(path):
    params = _hylo_params(path)
    HyLoConfig(**params)  # every key known and valid
    for key, value in params.items():
        default = getattr(DEFAULTS, key)
        if value == default:
            continue
        entries = _allowed(path.name, key)
        assert entries, (f"{path.name}: {key}={value!r} differs from HyLoConfig's default {default!r}; use the default "
                         f"or add ({path.name!r}, {key!r}) with its reason to ALLOWED in tests/unit/test_docs.py")
        assert entries[0][1][0] == value, f"{path.name}: {key}={value!r}, but ALLOWED lists {entries[0][1][0]!r}"


def test_every_allowlist_entry_is_used():
    used = set()
    for path in CONFIGS:
        for key, value in _hylo_params(path).items():
            if value != getattr(DEFAULTS, key):
                used.update(k for k, _ in _allowed(path.name, key))
    assert set(ALLOWED) - used == set(), "stale ALLOWED entries (no shipped file differs from the default there)"


def test_zero1_configs_use_the_default_damping():
    """The seven MNIST ZeRO-1 configs carry HyLoConfig's damping (they shipped 0.03 against a default of 0.3)."""
    zero1 = [p for p in CONFIGS if p.name.startswith("zero1_")]
    assert len(zero1) == 7
    for path in zero1:
        assert _hylo_params(path).get("damping", DEFAULTS.damping) == DEFAULTS.damping, path.name


# ----------------------------------------------------------------- README against HyLoConfig


def _readme_default_cell(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(format(v, "g") for v in value) + "]`"
    return format(value, "g")


def test_readme_option_table_shows_hyloconfig_defaults():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Options"):]
    section = section[: section.index("\n## ", 1)]
    seen = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, default_cell = (c.strip() for c in line.strip("|").split(" | ")[:2])
        keys = re.findall(r"`(\w+)`", keys_cell)
        cells = [c.strip() for c in re.split(r", (?![^\[]*\])", default_cell)]  # commas inside [...] stay
        if len(cells) == 1:
            cells *= len(keys)  # one value for every key of the row ("none")
        assert len(cells) == len(keys), line
        for key, cell in zip(keys, cells):
            assert cell == _readme_default_cell(getattr(DEFAULTS, key)), f"README option table: {key} shows {cell}"
            seen.add(key)
    fields = {f.name for f in dataclasses.fields(HyLoConfig)}
    assert seen == fields, f"README option table misses {sorted(fields - seen)}"


def _readme_hylo_snippet_kwargs() -> dict[str, Any]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    call = next(node for node in ast.walk(ast.parse(block))
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "ds_hylo.HyLo")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def test_readme_snippets_use_the_default_preconditioner_settings():
    """The README's Python and JSON examples state HyLoConfig's damping, rank_ratio and update_freq."""
    text = (ROOT / "README.md").read_text()
    json_block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    json_params = json.loads("{" + json_block.strip().rstrip(",") + "}")["optimizer"]["params"]
    for where, kwargs in (("python snippet", _readme_hylo_snippet_kwargs()), ("json snippet", json_params)):
        for key in ("damping", "rank_ratio", "update_freq"):
            assert kwargs[key] == getattr(DEFAULTS, key), f"README {where}: {key}={kwargs[key]}"


# ------------------------------------------------------------------ --help against HyLoConfig


def test_train_mnist_flags_default_to_hyloconfig():
    import train_mnist

    parser = train_mnist.build_parser()
    defaults = vars(parser.parse_args([]))
    for key in ("damping", "rank_ratio", "update_freq", "step_scale", "kl_clip", "fisher", "weight_decay", "seed"):
        assert defaults[key] == getattr(DEFAULTS, key), key
    assert train_mnist.DEFAULT_OPTIMIZERS.split(",")[0] == f"hylo-{DEFAULTS.mode}"
    assert train_mnist.DEFAULT_LR[f"hylo-{DEFAULTS.mode}"] == DEFAULTS.lr
    assert defaults["base"] == DEFAULTS.base


def test_train_mnist_help_quotes_only_the_default_damping():
    import train_mnist

    action = next(a for a in train_mnist.build_parser()._actions if "--damping" in a.option_strings)
    shown = train_mnist.build_parser().format_help()
    assert f"(default: {DEFAULTS.damping})" in " ".join(shown.split())
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", action.help or "")]
    assert all(n == DEFAULTS.damping for n in numbers), f"--damping help quotes {numbers}: {action.help!r}"


def test_session_header_says_no_decay():
    from hylo_session import describe_damping

    assert describe_damping(HyLoConfig(damping=0.3)) == "damping=0.3 (no decay)"
    assert describe_damping(HyLoConfig(damping=1.0, damping_target=0.1, damping_decay_steps=100)) == (
        "damping=1->0.1 over 100 steps")
    assert "None" not in describe_damping(DEFAULTS)


@pytest.mark.parametrize("env,prints", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                        ({"LOCAL_RANK": "3"}, False)])
def test_help_prints_on_rank_zero_only(monkeypatch, capsys, env, prints):
    import argparse

    from hylo_session import parse_session_args

    for key in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser(prog="example", description="the help text")
    with pytest.raises(SystemExit) as exit_info:
        parse_session_args(parser, ["--help"])
    assert exit_info.value.code == 0
    assert ("the help text" in capsys.readouterr().out) is prints
    assert parse_session_args(argparse.ArgumentParser(), []) is not None  # no --help: parses on every rank


# ----------------------------------------------------------------- README tables against JSON


@pytest.mark.parametrize("readme", render_readme.READMES, ids=[p.relative_to(ROOT).as_posix() for p in
                                                              render_readme.READMES])
def test_committed_readme_equals_its_rendering(readme):
    text = readme.read_text()
    assert render_readme.marked_tables(text), f"{readme.name}: no rendered tables"
    assert render_readme.render_text(text) == text, (
        f"{readme.relative_to(ROOT)} differs from benchmarks/results/*.json: run python benchmarks/render_readme.py")


def test_rendering_replaces_an_edited_figure():
    """The check can fail: a hand-edited number inside a marked block is put back from the JSON."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| hylo-kis |"))
    edited = text.replace(row, row.replace("| hylo-kis |", "| hylo-kis | 1.0 |", 1))
    assert edited != text and render_readme.render_text(edited) == text


def test_every_benchmark_table_is_rendered():
    """No table with benchmark figures sits outside the markers in benchmarks/README.md."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    outside = render_readme.MARKER.sub("", text)
    headers = [line for line in outside.splitlines() if line.startswith("| optimizer") or line.startswith("| HyLo")]
    assert headers == [], f"unrendered benchmark tables: {headers}"
    assert set(render_readme.marked_tables(text)) >= {"convergence_mnist", "convergence_mnist1d",
                                                      "convergence_mnist_ratios", "convergence_mnist1d_ratios"}


def test_unknown_table_name_is_an_error():
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        render_readme.render_text("<!-- table:nope -->\n<!-- /table -->")


# ------------------------------------------------------- docs/design.md: the one design reference

DESIGN_DOC = ROOT / "docs/design.md"
_DOC_NAME = "design" + ".md"  # built, so this file never carries a bare mention of it
_PRUNED_DIRS = {"__pycache__", "node_modules"}
_CITATION = re.compile(r"docs/design\.md\s+section\s+(\d+(?:\.\d+)*)")
_HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.M)


def _repo_text_files() -> list[Path]:
    """Every .py and .md file of the repository, outside hidden folders (.git, .venv, ...) and virtualenvs."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _PRUNED_DIRS
                         and not (Path(folder) / d / "pyvenv.cfg").exists())
        found += [Path(folder) / f for f in sorted(files) if f.endswith((".py", ".md"))]
    return found


def _design_sections() -> dict[str, str]:
    """Section number -> its text (heading included, subsections included) of docs/design.md."""
    text = DESIGN_DOC.read_text()
    heads = [(m.group(1), m.start()) for m in _HEADING.finditer(text)]
    sections = {}
    for i, (number, start) in enumerate(heads):
        end = next((s for n, s in heads[i + 1:] if not n.startswith(number + ".")), len(text))
        sections[number] = text[start:end]
    return sections


def _names_of(path: Path, all_names: list[str]) -> list[str]:
    """How a section may name ``path``: its repository path, that path without its top folder, and its
    bare file name when no other file of the repository has that name."""
    rel = path.relative_to(ROOT).as_posix()
    names = [rel, rel.split("/", 1)[-1]]
    if all_names.count(path.name) == 1:
        names.append(path.name)
    return names


def test_design_doc_is_the_only_design_reference():
    """No file cites a design document outside the repository: every mention is docs/design.md."""
    assert DESIGN_DOC.is_file(), "docs/design.md is missing"
    bad = []
    for path in _repo_text_files():
        text = path.read_text(errors="replace")
        for match in re.finditer(re.escape(_DOC_NAME), text, re.I):
            if text[max(0, match.start() - 5): match.end()] != "docs/" + _DOC_NAME:
                line = text.count("\n", 0, match.start()) + 1
                bad.append(f"{path.relative_to(ROOT)}:{line}")
    assert bad == [], f"mentions of a design document other than docs/design.md: {bad}"


def test_design_doc_citations_name_sections_that_cover_the_citing_file():
    """Every "docs/design.md section N" names a section of docs/design.md, and that section (with
    its subsections) names the citing file, so a citation cannot drift to an unrelated section."""
    sections = _design_sections()
    assert {"1", "2", "3", "4", "5", "6"} <= set(sections), sorted(sections)
    files = _repo_text_files()
    all_names = [p.name for p in files]
    citations = 0
    for path in files:
        if path == DESIGN_DOC:
            continue
        for match in _CITATION.finditer(path.read_text(errors="replace")):
            citations += 1
            where = f"{path.relative_to(ROOT)} cites docs/design.md section {match.group(1)}"
            assert match.group(1) in sections, f"{where}, which does not exist (sections: {sorted(sections)})"
            body = sections[match.group(1)]
            assert any(name in body for name in _names_of(path, all_names)), (
                f"{where}, but that section never names {path.relative_to(ROOT)}")
    assert citations >= 10, f"only {citations} citations of docs/design.md found"


# ------------------------------------------------------------ first run: README against the examples


def _main_job_paragraphs() -> str:
    text = (ROOT / "README.md").read_text()
    return text[: text.index("## Use it")]


def test_readme_states_the_main_jobs_run_time_as_planned():
    """The first screen's "about N minutes" agrees with the estimate the job prints (train_mnist.plan)."""
    import train_mnist

    match = re.search(r"# 2\. the main job \(about (\d+) minutes? on 2 CPU cores\)", _main_job_paragraphs())
    assert match, "README's first screen does not state the main job's expected run time"
    args = train_mnist.parse_args(["--data-dir", "x"])
    names = train_mnist.parse_optimizers(args.optimizers)
    planned = train_mnist.plan(args, names, train_mnist.parse_lr(None, names, "mnist"))
    assert abs(int(match.group(1)) - planned["expected_seconds"] / 60) <= 0.75
    assert planned["expected_seconds"] < 150, "the main job is planned over 2.5 minutes"


def test_readme_names_the_files_the_main_jobs_lrs_come_from():
    import train_mnist

    results = ROOT / "benchmarks" / "results"
    hylo_file = next(p for p in (results / "convergence_mnist.json", results / "convergence_mnist_ablation.json")
                     if train_mnist._shipped_defaults_lr(p) is not None)
    text = " ".join(_main_job_paragraphs().split())
    assert f"HyLo's from the row of `benchmarks/results/{hylo_file.name}`" in text
    assert "SGD's and AdamW's from `benchmarks/results/convergence_mnist.json`" in text
    lrs = train_mnist.tuned_lrs("mnist")
    summary = json.loads((results / "convergence_mnist.json").read_text())["summary"]
    assert lrs["sgd"] == summary["sgd"]["hp"]["lr"] and lrs["adamw"] == summary["adamw"]["hp"]["lr"]


def test_every_example_writes_its_metrics_under_runs_by_default():
    """Session examples: runs/<example>-<launcher>/metrics.json; the HF example: runs/finetune_hf_trainer/;
    the main job: runs/<dataset>/. runs/ and out/ are ignored by git."""
    from types import SimpleNamespace

    import finetune_hf_trainer
    import finetune_transformer
    import train_cifar10_resnet32
    import train_mnist
    import train_mnist_accelerate
    from hylo_session import RUNS, Session

    assert RUNS == ROOT / "runs"
    names = set()
    for module, argv in ((train_mnist_accelerate, []), (train_cifar10_resnet32, ["--data-dir", "x"]),
                         (finetune_transformer, [])):
        args = module.parse_args(argv)
        assert args.metrics_out is None and args.threads == 1, module.__name__
        path = Session.metrics_path(SimpleNamespace(args=args, launcher="deepspeed"))
        assert path.parent.parent == RUNS and path.name == "metrics.json", (module.__name__, path)
        names.add(path.parent.name)
    assert len(names) == 3, names  # one folder per example
    assert Path(finetune_hf_trainer.parse_args([]).output_dir).parent == ROOT / "runs"
    assert train_mnist.output_paths(train_mnist.parse_args([]), "mnist")[0].parent.parent == ROOT / "runs"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/runs/" in ignored and "/out/" in ignored


def test_readme_snippets_write_under_runs():
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for call in re.findall(r"TrainingArguments\(\s*\"([^\"]+)\"", block):
            assert call.startswith("runs/"), f"README's TrainingArguments writes {call!r} outside runs/"
        for resume in re.findall(r"resume_from_checkpoint=\"([^\"]+)\"", block):
            assert resume.startswith("runs/"), resume


def test_launcher_parity_claim_holds_its_condition():
    """The README says both launchers give the same parameters: its two MNIST commands run with the same
    thread settings, and the examples fix torch's threads (1 per process) on CPU under either launcher."""
    import train_mnist_accelerate

    text = (ROOT / "README.md").read_text()
    assert "give the same parameters under\neither" in text or "give the same parameters under either" in text
    commands = [c for c in re.findall(r"```bash\n(.*?)```", text, re.S) if "train_mnist_" in c]
    ds = next(c for c in commands if "examples/train_mnist_deepspeed.py" in c)
    acc = next(c for c in commands if "examples/train_mnist_accelerate.py" in c)
    env = [re.findall(r"\b([A-Z_]+)=(\S+)", c.split("deepspeed --")[0].split("accelerate launch")[0]) for c in (ds, acc)]
    assert sorted(env[0]) == sorted(env[1]), f"the two launch commands set different environments: {env}"
    assert train_mnist_accelerate.parse_args([]).threads == 1


def test_session_finish_writes_and_prints_its_metrics_path(tmp_path, monkeypatch, capsys):
    """Every Session example ends in Session.finish: rank 0 writes the metrics (with the parameters' hash)
    to the default path under runs/ and prints that path and the wall time."""
    import time
    from types import SimpleNamespace

    import torch

    import hylo_session
    import train_mnist_accelerate

    monkeypatch.setattr(hylo_session, "RUNS", tmp_path / "runs")
    session = object.__new__(hylo_session.Session)
    torch.manual_seed(0)
    session.args = train_mnist_accelerate.parse_args([])
    session.launcher, session.world_size, session.config_name = "accelerate", 1, "x.json"
    session.engine = SimpleNamespace(module=torch.nn.Linear(3, 2), global_steps=7, hylo=None)
    session.accelerator, session.optimizer, session.is_main, session.rank = None, None, True, 0
    session.started = time.perf_counter()
    metrics = session.finish({"final_test_acc": 0.5})
    path = tmp_path / "runs" / "mnist-accelerate" / "metrics.json"
    written = json.loads(path.read_text())
    assert written["steps"] == 7 and written["final_test_acc"] == 0.5 and written["threads"] >= 1
    assert written["parameters_sha256"] == metrics["parameters_sha256"] and len(metrics["parameters_sha256"]) == 64
    printed = capsys.readouterr().out
    assert f"wrote {path}" in printed and "total wall time" in printed
