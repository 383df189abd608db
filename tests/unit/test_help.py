"""help(ds_hylo.HyLo) teaches: every option with its real default, a runnable example, documented returns.

The defaults shown come from HyLoConfig (one source of truth); these tests fail if an option is
added without a description, if the docstring's example uses a number that is not a default, or
if a documented return key disappears (or an undocumented one appears).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import textwrap

import pytest
import torch

import ds_hylo
from ds_hylo import HyLo, HyLoConfig
from ds_hylo import optimizer as optimizer_module


def _defaults() -> dict:
    out = {}
    for f in dataclasses.fields(HyLoConfig):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def _example_code() -> str:
    doc = HyLo.__doc__
    start = doc.index("Example")
    block = doc[doc.index("::\n", start) + 3:]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith(" " * 8):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


@pytest.mark.parametrize("name", list(_defaults()))
def test_every_option_is_listed_with_its_default_and_a_description(name):
    default = _defaults()[name]
    doc = HyLo.__doc__
    line = re.search(rf"^\s+{re.escape(name)}={re.escape(repr(default))}\n(?P<text>(\s{{12}}.+\n)+)", doc, re.M)
    assert line, f"HyLo.__doc__ does not list {name}={default!r}"
    assert "not documented yet" not in line.group("text"), f"option {name} has no description"
    assert name in optimizer_module._OPTION_HELP


def test_no_help_for_options_that_do_not_exist():
    assert set(optimizer_module._OPTION_HELP) <= set(_defaults())


def test_help_names_every_option_value_choice():
    """Choice-valued options list the values the config accepts."""
    from ds_hylo import config

    doc = HyLo.__doc__
    for name, choices in (("mode", config.MODES), ("step_scale", config.STEP_SCALES),
                          ("sequence_convention", config.SEQUENCE_CONVENTIONS),
                          ("loss_reduction", config.LOSS_REDUCTIONS), ("fisher", config.FISHER_TYPES),
                          ("switch_scope", config.SWITCH_SCOPES)):
        text = optimizer_module._OPTION_HELP[name]
        assert str(list(choices)) in text, name
        assert str(list(choices)) in " ".join(doc.split()), name


def test_example_uses_only_real_defaults():
    defaults = _defaults()
    calls = [node for node in ast.walk(ast.parse(_example_code()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HyLo"]
    assert len(calls) == 1 and calls[0].keywords, "the example builds one HyLo with explicit options"
    for keyword in calls[0].keywords:
        assert keyword.arg in defaults, keyword.arg
        assert ast.literal_eval(keyword.value) == defaults[keyword.arg], (
            f"the example sets {keyword.arg}={ast.literal_eval(keyword.value)!r}, the default is "
            f"{defaults[keyword.arg]!r}"
        )


def test_example_runs_and_has_every_step_of_the_loop():
    code = _example_code()
    for call in ("model(x)", "opt.sample_fisher(logits)", "loss.backward()", "opt.step()", "opt.zero_grad()"):
        assert call in code, call
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "<HyLo docstring example>", "exec"), namespace)
    opt = namespace["opt"]
    assert opt.stats()["step"] == 20 and opt.stats()["refreshes"] == 2


def test_public_methods_have_docstrings():
    for name in ("step", "stats", "timing_summary", "layer_modes", "sample_fisher", "zero_grad",
                 "no_capture", "state_dict", "load_state_dict"):
        method = getattr(HyLo, name)
        assert method.__doc__ and method.__doc__ is not getattr(torch.optim.SGD, name, None).__doc__, name
    assert HyLo.damping.__doc__


def _trained_small():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = HyLo(model, mode="hybrid", update_freq=2)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_stats_and_timing_docstrings_name_every_key():
    opt = _trained_small()
    stats = opt.stats()
    stats_doc = HyLo.stats.__doc__
    for key in stats:
        assert f'"{key}"' in stats_doc, f"stats() key {key!r} is not documented"
    documented = set(re.findall(r'"(\w+)":', stats_doc))
    assert documented <= set(stats), f"stats() docstring names keys it does not return: {documented - set(stats)}"
    for switch in stats["switches"]:
        assert set(switch) == {"step", "layer", "mode", "reason"}
    timing_doc = HyLo.timing_summary.__doc__
    for phase, entry in opt.timing_summary().items():
        assert f'"{phase}"' in timing_doc, f"timing phase {phase!r} is not documented"
        for key in entry:
            assert f'"{key}"' in timing_doc, key
    assert set(opt.layer_modes().values()) <= {"sngd", "kis", "kid"}


def test_help_renders():
    text = ds_hylo.HyLo.__doc__
    defaults = _defaults()
    assert f"damping={defaults['damping']!r}" in text and f"fisher={defaults['fisher']!r}" in text
    import pydoc

    rendered = pydoc.render_doc(ds_hylo.HyLo, renderer=pydoc.plaintext)
    assert "Options (" in rendered and "zero_grad" in rendered
