"""Shared helpers for the core correctness tests of ds_hylo.

Everything here is independent of the package's own math: per-sample gradients come from
``torch.func.vmap(torch.func.grad(...))`` on a hook-free copy of the model, output gradients
dL/dz from plain autograd, and the reference step is a dense float64 solve

    v = (F + lam I)^-1 grad,    F = (1/N) sum_i u_i u_i^T

over the flattened [W | b] gradient of one layer (bias as the last column), which is exactly
what HyLo must reproduce at rank_ratio = 1 (docs/design.md section 1.2).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64

# The suite is organised by layer: unit/ (pure math, capture, one process), distributed/ (real gloo
# ranks), integration/ (DeepSpeed, Accelerate, examples, benchmarks), cuda/ (skipped without CUDA).
# Helper modules (this file, distributed.py, the *_workers.py loops) live here, beside the folders.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
_SLOW_FOLDERS = ("distributed", "integration")


def pytest_collection_modifyitems(config, items):
    """distributed/ and integration/ are the slow layers: ``-m "not slow"`` is the fast loop."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS_DIR).parts
        if parts and parts[0] in _SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)

# DeepSpeed picks its accelerator at import; without a GPU it must be told to use the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """Every test leaves the default dtype and the global RNG as it found them."""
    dtype = torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Linear -> tanh -> Linear (a smooth nonlinearity: no dead rows by accident)."""

    def __init__(self, d_in: int = 5, hidden: int = 4, d_out: int = 3, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(nn.Module):
    """conv -> relu -> global average pool -> linear: a small realistic CNN head."""

    def __init__(self, in_channels: int = 2, channels: int = 3, classes: int = 2, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, **conv_kwargs)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


# Conv2d geometries: stride, padding (numbers, per-axis, "same" with an even kernel), dilation, no bias.
CONV_VARIANTS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2, dilation=2, padding=2, bias=False),
    dict(kernel_size=(2, 3), padding="same"),
    dict(kernel_size=3, stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
]


def conv_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()).replace(" ", "")


class TokenMLP(nn.Module):
    """Two Linear layers applied position-wise to (batch, seq, 4) inputs."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))



def strip_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every module hook removed (so HyLo's capture never fires)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._backward_hooks.clear()
        if hasattr(module, "_backward_pre_hooks"):
            module._backward_pre_hooks.clear()
    return clone


def param_matrix(module: nn.Module) -> torch.Tensor:
    """[W | b] of a Linear/Conv2d as a (d_out, d_in) matrix (a detached copy)."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().reshape(-1, 1)], dim=1)
    return w.clone()


def grad_matrix(module: nn.Module) -> torch.Tensor:
    """[dW | db] of a Linear/Conv2d as a (d_out, d_in) matrix (a detached copy)."""
    w = module.weight.grad.detach().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.grad.detach().reshape(-1, 1)], dim=1)
    return w.clone()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------- per-sample gradients


def per_sample_grads(
    model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients u_i = d l_i / d theta with l_i = loss_fn(model(x_i[None]), y_i[None]).

    For a mean-reduced ``loss_fn`` the batch loss is L = (1/N) sum_i l_i. Returns
    name -> (N, *param.shape). Computed on a hook-free copy with torch.func.vmap(grad).
    """
    clone = strip_hooks(model)
    params = {k: v.detach() for k, v in clone.named_parameters()}
    buffers = {k: v.detach() for k, v in clone.named_buffers()}

    def sample_loss(p, x, y):
        out = torch.func.functional_call(clone, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def layer_rows_from_grads(psg: dict[str, torch.Tensor], layer: str, has_bias: bool = True) -> torch.Tensor:
    """Per-sample [W | b] gradients of one layer flattened row-major: (N, d_out * d_in)."""
    w = psg[f"{layer}.weight"]
    n, d_out = w.shape[0], w.shape[1]
    w = w.reshape(n, d_out, -1)
    if has_bias:
        w = torch.cat([w, psg[f"{layer}.bias"].reshape(n, d_out, 1)], dim=2)
    return w.reshape(n, -1)


def layer_io(model: nn.Module, layer: str, run_loss: Callable[[nn.Module], torch.Tensor]):
    """Input x and output gradient dL/dz of ``layer`` on a hook-free copy of ``model``.

    ``run_loss(clone)`` must compute the (mean-reduced) batch loss L with the clone.
    Returns (x, dL/dz, full parameter gradients of the clone).
    """
    clone = strip_hooks(model)
    module = dict(clone.named_modules())[layer]
    store = {}

    def hook(mod, inputs, output):
        store["x"] = inputs[0].detach()
        output.retain_grad()
        store["z"] = output

    handle = module.register_forward_hook(hook)
    loss = run_loss(clone)
    loss.backward()
    handle.remove()
    grads = {name: p.grad.detach().clone() for name, p in clone.named_parameters() if p.grad is not None}
    return store["x"], store["z"].grad.detach(), grads


def outer_rows(g: torch.Tensor, a: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Rows u_i = vec(g_i [a_i, 1]^T): (n, d_out), (n, d) -> (n, d_out * (d + has_bias))."""
    if has_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return torch.einsum("no,ni->noi", g, a).reshape(g.shape[0], -1)


def conv_mean_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Mean over output positions of each sample's input patches, (B, C*kh*kw), without unfold.

    For a probe weight w of shape (1, C, kh, kw), mean_p(conv(x_b, w)_p) = <w, mean_p patch_bp>,
    so the gradient of that mean w.r.t. w is the mean patch, in the (C, kh, kw) order of
    ``conv.weight.reshape(out, -1)``. Padding (numbers or "same"), stride and dilation are all
    handled by conv2d itself.
    """
    probe = torch.zeros((1,) + tuple(conv.weight.shape[1:]), dtype=x.dtype, requires_grad=True)
    rows = []
    for b in range(x.shape[0]):
        out = F.conv2d(x[b : b + 1], probe, None, conv.stride, conv.padding, conv.dilation)
        (grad,) = torch.autograd.grad(out.mean(), probe)
        rows.append(grad.reshape(-1))
    return torch.stack(rows)


def conv_surrogate_rows(conv: nn.Conv2d, x: torch.Tensor, dldz: torch.Tensor) -> torch.Tensor:
    """The "reduce" surrogate per-sample gradients of a Conv2d with a mean-reduced loss.

    a_b = mean over positions of the patches (plus a 1 for the bias); g_b = B * sum over
    positions of dL/dz_b; u_b = vec(g_b a_b^T).
    """
    batch = x.shape[0]
    a = conv_mean_patches(conv, x)
    g = batch * dldz.sum(dim=(2, 3))
    return outer_rows(g, a, conv.bias is not None)


def dense_natural_step(rows: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """Dense float64 (F + lam I)^-1 grad with F = rows^T rows / N: (N, D), (d_out, d_in) -> (d_out, d_in)."""
    rows = rows.to(DT)
    n, dim = rows.shape
    fisher = rows.T @ rows / n
    system = fisher + damping * torch.eye(dim, dtype=DT)
    return torch.linalg.solve(system, grad.to(DT).reshape(-1)).reshape(grad.shape)


def exact_smw(a: torch.Tensor, g: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + lam I)^-1 grad for rows u_i = vec(g_i a_i^T), by a dense solve (small shapes only)."""
    return dense_natural_step(outer_rows(g, a, has_bias=False), grad, damping)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def straight_and_resumed(make_run: Callable, train: Callable, batches: list, split: int, path) -> tuple:
    """Train one run on all ``batches``; train another on ``batches[:split]``, save model and optimizer
    to ``path``, load them into a third run built with other initial weights, and train it on the rest.

    ``make_run()`` -> (model, optimizer); ``train(model, optimizer, batches)``.
    Returns (straight model, straight optimizer, resumed model, resumed optimizer).
    """
    torch.manual_seed(0)
    straight, straight_opt = make_run()
    train(straight, straight_opt, batches)
    torch.manual_seed(0)
    first, first_opt = make_run()
    train(first, first_opt, batches[:split])
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, path)
    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    resumed, resumed_opt = make_run()
    checkpoint = torch.load(path, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, batches[split:])
    return straight, straight_opt, resumed, resumed_opt


class HostReads:
    """Counts Python-level reads of tensor values to the host (``int()``, ``float()``, ``bool()``,
    ``.item()``, ``.tolist()``): on a GPU each one is a host-device synchronisation.

    Counts while ``active`` (from construction unless ``active=False``), or inside ``during(fn)``;
    only the outermost call counts (a torch function mode, e.g. a default device set with
    ``torch.set_default_device``, calls the method again from inside).
    """

    NAMES = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, active: bool = True) -> None:
        self.count = 0
        self.depth = 0
        self.active = active
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            if self.active and not self.depth:
                self.count += 1
            self.depth += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.depth -= 1

        return wrapper

    def during(self, fn: Callable[[], object]) -> int:
        """Reads made by ``fn()``."""
        self.count, self.active = 0, True
        try:
            fn()
        finally:
            self.active = False
        return self.count


def tiny_bert(seed: int) -> nn.Module:
    """A float64 BertForSequenceClassification (hidden 8, 2 layers, 2 heads, vocab 50, 3 labels),
    no dropout, eager attention, weights drawn after ``torch.manual_seed(seed)``."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager", initializer_range=0.5,
    )
    return transformers.BertForSequenceClassification(config).to(DT)


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as the module ``<name>_bench`` (the scripts are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_bench"] = module
    spec.loader.exec_module(module)
    return module
