"""BatchNorm over the global batch under DDP: torch's SyncBatchNorm on GPUs, and on CPUs
(where torch's SyncBatchNorm refuses to run: "expected input tensor to be on GPU") the same
computation with a differentiable all-reduce.

Forward: the per-channel sum and then the sum of squared deviations are all-reduced, so
every rank normalises with the mean and (biased) variance of the whole global batch, exactly
what one process holding the whole batch computes. Backward: autograd runs the all-reduce's
backward (an all-reduce of the incoming gradients), so each rank's gradient includes the
paths through the other ranks' statistics; DDP's gradient average then gives the gradient of
the global-batch loss. Running statistics are updated as BatchNorm does (unbiased variance).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum over ranks
    of the incoming gradients (torch.distributed.nn.functional.all_reduce, now deprecated)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics span every rank of ``process_group``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: object | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synced(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        if not self._synced():
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()  # statistics in fp32 whatever autocast hands us
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count, group=self.process_group)
        n = float(count.item())
        mean = _AllReduceSum.apply(x.sum(dims), self.process_group) / n
        diff = x - mean.view(shape)
        var = _AllReduceSum.apply((diff * diff).sum(dims), self.process_group) / n
        y = diff * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group: object | None = None) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised across ranks (parameters, buffers
    and names kept, so checkpoints load either way): torch's SyncBatchNorm on CUDA, CPUSyncBatchNorm
    elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        with torch.no_grad():
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
            if module.track_running_stats:
                new.running_mean = module.running_mean
                new.running_var = module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return module
