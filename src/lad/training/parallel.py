"""Data-parallel training (``torchrun``): DDP wrappers, batch sharding, batch statistics over all ranks.

The configured ``batch_size`` is the GLOBAL batch: rank ``r`` of ``w`` takes ``batch_indices(...)[r::w]``
(:func:`shard_batch`) and every per-sample random draw is made for the global batch and sliced the
same way, so ``w`` processes compute the gradient of the very batch one process would (DDP averages
the ranks' gradients; every loss is a mean over equally many samples per rank, or renormalised by a
global count: ``lad.training.losses.locality_loss``). The learning rate is therefore used as
configured (no linear scaling with the number of GPUs).

BatchNorm in the PatchGAN discriminators must see the global batch's statistics as well. On CUDA
that is :class:`torch.nn.SyncBatchNorm`; torch 2.13's SyncBatchNorm refuses CPU tensors ("expected
input tensor to be on GPU"), so on CPU (Gloo) :class:`GlobalBatchNorm` computes the same statistics
with the differentiable all-reduce of ``torch.distributed.nn`` (autograd then carries the cross-rank
terms of the gradient, as SyncBatchNorm's backward does). Both keep BatchNorm's parameter and buffer
names, so checkpoints are interchangeable with single-process ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from lad.utils.distributed import get_rank, get_world_size, is_distributed

__all__ = ["shard_batch", "GlobalBatchNorm", "sync_batchnorm", "wrap_ddp", "check_global_batch"]


def check_global_batch(batch_size: int, what: str) -> None:
    """The global batch must split evenly over the ranks (every rank's mean then weighs samples equally)."""
    world = get_world_size()
    if batch_size % world:
        raise ValueError(f"{what}={batch_size} is the global batch and must be divisible by the number of processes "
                         f"({world}); use e.g. --set {what}={max(world, batch_size // world * world)}")


def shard_batch(indices: np.ndarray | torch.Tensor):
    """This rank's part ``[rank::world]`` of a global batch's indices (everything outside torchrun)."""
    return indices[get_rank() :: get_world_size()]


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (backward: the sum of the ranks' gradients), torch's functional collective."""
    from torch.distributed._functional_collectives import all_reduce, wait_tensor

    return wait_tensor(all_reduce(t, "sum", dist.group.WORLD))


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks (CPU / Gloo).

    Outside a process group (or in eval mode) it is exactly ``nn.BatchNorm{1,2,3}d``. In training under
    torch.distributed: mean and (biased) variance per channel from two differentiable sum all-reduces
    (two-pass, as stable as BatchNorm's own), running statistics updated with the unbiased global
    variance, as BatchNorm / SyncBatchNorm do.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        local_n = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        stats = _all_reduce_sum(torch.cat([x.sum(dims), local_n]))
        n = stats[-1].detach()
        mean = stats[:-1] / n
        xc = x - mean.view(shape)
        var = _all_reduce_sum((xc * xc).sum(dims)) / n
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=factor)
        return y.to(input.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``module`` by one with global-batch statistics: ``nn.SyncBatchNorm`` on
    CUDA, :class:`GlobalBatchNorm` elsewhere. Parameters and buffers are kept (the same tensors)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                              device=module.running_mean.device if module.running_mean is not None else None)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, sync_batchnorm(child, device))
    return out


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` under torch.distributed, ``module`` itself otherwise.

    Buffers are broadcast from rank 0 once (at construction), not at every forward: the only buffers that change in training
    (EMA codebook, BatchNorm statistics) are kept equal by global collectives already.
    """
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)

