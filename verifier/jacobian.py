"""Exact per-sample Jacobians of the logits and gradients of each loss, batched with torch.func.

Samples never interact in an eval-mode classifier, so per-sample Jacobians come from one big
batch: each sample replicated per class (reverse mode) when there are fewer classes than input
coordinates, per coordinate (forward mode, `torch.func.jvp`) otherwise. Work is chunked to stay
under a memory budget. A module that keeps a fixed batch B (`ConvertedModel.module_batch`: one
whose fixed batch could not be rewritten to a dynamic one) is run in chunks of B instead, a short
last chunk padded by repeating its last sample (padding dropped); its Jacobians are those of the
chunk's summed outputs (`torch.func.jacrev`/`jacfwd`: samples do not interact).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from verifier.convert import ConvertedModel, pad_rows
from verifier.convert.batch import FixedBatchModule
from verifier.deadline import NEVER, Deadline
from verifier.device import resolve_device
from verifier.losses import DIFFERENTIABLE_LOSSES, check_loss, loss_values
from verifier.errors import UsageError

DEFAULT_MEMORY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class LogitJacobians:
    """Logits `z` (N, C) and exact Jacobians `dz/dx` (N, C, *input shape) at a batch of inputs."""

    logits: torch.Tensor
    jacobian: torch.Tensor


@dataclass(frozen=True)
class LossGradients:
    """Per-sample loss values (N), their input gradients (N, *input shape) and the logits."""

    loss: str
    values: torch.Tensor
    gradients: torch.Tensor
    logits: torch.Tensor


def prepared_module(model: ConvertedModel, device: str | torch.device = "auto",
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of the logits module on `device` in `dtype` (the cached module is never mutated); a
    module that keeps a fixed batch is wrapped to take any number of samples (`FixedBatchModule`)."""
    target = device if isinstance(device, torch.device) else resolve_device(device)
    module: torch.nn.Module = copy.deepcopy(model.logits_module)
    if model.module_batch is not None:
        module = FixedBatchModule(module, model.module_batch)
    return module.to(device=target, dtype=dtype).eval()


def as_module_input(x: torch.Tensor | np.ndarray, module: torch.nn.Module) -> torch.Tensor:
    """`x` on the module's device, float input in its dtype (that of its first float weight:
    integer buffers such as Squeeze axes or shapes keep their dtype under `.to()`)."""
    tensors = [*module.parameters(), *module.buffers()]
    reference = next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else torch.empty(0))
    tensor = torch.as_tensor(x)
    return tensor.to(device=reference.device, dtype=reference.dtype if tensor.is_floating_point() else None)


def _chunks(count: int, per_sample_bytes: int, fixed_batch: int | None, budget: int) -> Iterator[slice]:
    if fixed_batch:
        step = fixed_batch
    else:
        step = max(1, min(count, budget // max(per_sample_bytes, 1)))
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def autograd_bytes(module: torch.nn.Module, sample: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one sample (measured on a forward of `sample`,
    one row): what every replicated row of a Jacobian or gradient pass costs besides its output."""
    kept = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(sample.detach().clone().requires_grad_(True))
    return kept[0]


def forward_bytes(module: torch.nn.Module, sample: torch.Tensor) -> int:
    """Bytes one row of a forward pass of `module` can hold at once (measured on `sample`, one row):
    autograd's saved tensors (every activation a pass may keep) plus the largest unfolded input of
    a convolution (CPU convolutions without a oneDNN kernel, float64 ones included, build the
    im2col matrix of the whole batch: C_in / groups x kernel taps x output positions per row)."""
    unfolded = [0]

    def note(conv: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
        taps = math.prod(conv.kernel_size) * conv.in_channels // conv.groups
        unfolded[0] = max(unfolded[0], taps * math.prod(output.shape[2:]) * output.element_size())

    hooks = [m.register_forward_hook(note) for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    try:
        kept = autograd_bytes(module, sample)
    finally:
        for hook in hooks:
            hook.remove()
    return kept + unfolded[0]


def chunked_logits(module: torch.nn.Module, x: torch.Tensor, memory_bytes: int,
                   fixed_batch: int | None = None, deadline: Deadline = NEVER) -> torch.Tensor:
    """`module(x)` without autograd, in chunks of the rows whose `forward_bytes` fit in `memory_bytes`
    (chunks of `fixed_batch` for a module that keeps one); samples do not interact, so the rows are
    those of one pass over all of `x` (`deadline`: per chunk)."""
    if len(x) == 0:
        with torch.no_grad():
            return module(x)
    parts = []
    with torch.no_grad():
        for part in _chunks(len(x), forward_bytes(module, x[:1]), fixed_batch, memory_bytes):
            deadline.check("the clean forward pass")
            parts.append(module(x[part]))
    return torch.cat(parts)


def _fixed_batch(model: ConvertedModel) -> int | None:
    return model.module_batch


def batched_jacobian(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, outputs: int,
                     fixed_batch: int | None = None) -> torch.Tensor:
    """Per-sample Jacobians (N, outputs, *x.shape[1:]) of a sample-wise `function` (N, ...) -> (N, outputs).

    Samples do not interact, so each sample is replicated once per output (reverse mode: one
    backward pass of the selected outputs) or once per input coordinate (forward mode: one
    jvp with the identity as tangents); a single large batch is far faster than vmap
    (measured 40-70x on the shipped models). A module with a fixed batch (`fixed_batch`) gets the
    Jacobian of its summed outputs instead, `x` padded to that batch.
    """
    count, shape = x.shape[0], x.shape[1:]
    inputs = math.prod(shape)
    if fixed_batch:
        return _vmapped_jacobian(function, pad_rows(x, fixed_batch), outputs)[:count]
    if outputs <= inputs:
        repeated = x.detach().repeat_interleave(outputs, 0).requires_grad_(True)
        with torch.enable_grad():
            values = function(repeated).reshape(count, outputs, outputs)
            chosen = values.diagonal(dim1=1, dim2=2).sum()
            if not chosen.requires_grad:  # outputs that depend on x only through integer casts (held inputs)
                return torch.zeros(count, outputs, *shape, dtype=x.dtype, device=x.device)
            (grad,) = torch.autograd.grad(chosen, repeated)
        return grad.reshape(count, outputs, *shape)
    repeated = x.detach().repeat_interleave(inputs, 0)
    basis = torch.eye(inputs, dtype=x.dtype, device=x.device).repeat(count, 1).reshape(count * inputs, *shape)
    _, tangents = torch.func.jvp(function, (repeated,), (basis,))
    return tangents.reshape(count, inputs, outputs).transpose(1, 2).reshape(count, outputs, *shape)


def _vmapped_jacobian(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, outputs: int):
    def summed(v: torch.Tensor) -> torch.Tensor:
        return function(v).reshape(v.shape[0], outputs).sum(0)

    jacobian = torch.func.jacrev if outputs <= math.prod(x.shape[1:]) else torch.func.jacfwd
    return jacobian(summed)(x).movedim(0, 1)


def logits_jacobian(model: ConvertedModel, x: torch.Tensor | np.ndarray, device: str | torch.device = "auto",
                    dtype: torch.dtype | None = None,
                    memory_bytes: int = DEFAULT_MEMORY_BYTES, deadline: Deadline = NEVER) -> LogitJacobians:
    """Exact Jacobians of the logits for every sample, chunked under `memory_bytes` (`deadline`: per chunk)."""
    module = prepared_module(model, device, dtype)
    inputs = as_module_input(x, module)
    fixed = _fixed_batch(model)
    with torch.no_grad():
        probe = module(inputs[:1])  # a kept fixed batch: `prepared_module` pads
    classes = probe.shape[-1]
    replicas = min(classes, math.prod(inputs.shape[1:]))
    per_sample = replicas * (max(classes, math.prod(inputs.shape[1:])) * inputs.element_size() * 8
                             + autograd_bytes(module, inputs[:1]))
    logits_parts, jac_parts = [], []
    for part in _chunks(len(inputs), per_sample, _fixed_batch(model), memory_bytes):
        deadline.check("Jacobians")
        chunk = inputs[part]
        jac_parts.append(batched_jacobian(module, chunk, classes, fixed).detach())
        with torch.no_grad():
            logits_parts.append(module(chunk))
    return LogitJacobians(logits=torch.cat(logits_parts), jacobian=torch.cat(jac_parts))


def loss_gradients(model: ConvertedModel, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                   loss: str, device: str | torch.device = "auto", dtype: torch.dtype | None = None,
                   memory_bytes: int = DEFAULT_MEMORY_BYTES, deadline: Deadline = NEVER) -> LossGradients:
    """Per-sample loss values and exact input gradients (one backward pass of the summed loss per chunk;
    `deadline`: per chunk)."""
    if check_loss(loss) not in DIFFERENTIABLE_LOSSES:
        raise UsageError(f"the {loss} loss has no gradient; choose one of {', '.join(DIFFERENTIABLE_LOSSES)}")
    module = prepared_module(model, device, dtype)
    inputs = as_module_input(x, module)
    labels = torch.as_tensor(y, dtype=torch.long, device=inputs.device)
    per_sample = math.prod(inputs.shape[1:]) * inputs.element_size() * 8 + autograd_bytes(module, inputs[:1])
    values, grads, logits = [], [], []
    fixed = _fixed_batch(model)
    for part in _chunks(len(inputs), per_sample, fixed, memory_bytes):
        deadline.check("loss gradients")
        chunk = inputs[part].detach().requires_grad_(True)
        out = module(chunk)
        per_sample_loss = loss_values(out, labels[part], loss)
        (grad,) = torch.autograd.grad(per_sample_loss.sum(), chunk)
        values.append(per_sample_loss.detach())
        grads.append(grad.detach())
        logits.append(out.detach())
    return LossGradients(loss=loss, values=torch.cat(values), gradients=torch.cat(grads), logits=torch.cat(logits))
