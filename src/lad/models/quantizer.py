"""EMA vector quantiser (VQ-VAE-2 style) with data initialisation and dead-code restarts.

MONAI's ``EMAQuantizer`` has the EMA update but neither data initialisation nor restarts of dead
codes, and it computes the full (N x K) distance matrix at once: at the paper's shape that is
65,536 latent vectors x 16,384 codes = 4 GiB of float32. Here the nearest-code search is chunked
(at most 2^25 distances, 128 MiB, at a time) and uses ``||a||^2 - 2 a.b + ||b||^2`` with addmm.
Under ``torch.distributed`` (data-parallel training, ``lad.training``) the code counts and sums are
all-reduced before the EMA update, and the rows for data initialisation / dead-code restarts are
drawn as ONE process would draw them from the global batch: rank 0 draws global row indices, every
rank contributes the rows it holds and a sum all-reduce assembles them. Every rank therefore keeps
the same codebook, equal (up to float summation order) to a single process given the global batch.
The global batch is laid out as the trainers shard it: rank ``r`` of ``w`` holds the global batch's
samples ``r::w``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["EMAQuantizer", "QuantizerOutput", "nearest_codes"]

_MAX_DISTANCES = 1 << 25


@dataclasses.dataclass
class QuantizerOutput:
    """``z_q`` straight-through quantised latent (B, C, *S); ``indices`` (B, *S) long; scalars as 0-d tensors."""

    z_q: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    indices: torch.Tensor


def nearest_codes(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (L2) for each row of ``flat`` (N, C); chunked over N."""
    k = codebook.shape[0]
    e2 = (codebook * codebook).sum(1)
    rows = max(1, _MAX_DISTANCES // k)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for s in range(0, flat.shape[0], rows):
        x = flat[s : s + rows]
        d = torch.addmm(e2, x, codebook.t(), beta=1.0, alpha=-2.0)  # ||x||^2 is constant per row
        out[s : s + rows] = d.argmin(1)
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMAQuantizer(nn.Module):
    """Codebook of ``num_embeddings`` codes of size ``embedding_dim`` updated by exponential moving averages."""

    def __init__(self, *, num_embeddings: int, embedding_dim: int, decay: float = 0.99, commitment_cost: float = 0.25,
                 epsilon: float = 1e-5, dead_code_threshold: float = 1e-3, restart_dead_codes: bool = True):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.decay, self.commitment_cost, self.epsilon = decay, commitment_cost, epsilon
        self.dead_code_threshold, self.restart_dead_codes = dead_code_threshold, restart_dead_codes
        self.register_buffer("embedding", torch.randn(num_embeddings, embedding_dim) * 0.01)
        self.register_buffer("cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # `initialized` is read back once, then trusted while the buffer is not written again (its
        # version counter is unchanged): no host-device sync per training step on a GPU
        self._initialized_seen: tuple[bool, int] = (False, -1)

    def _random_rows(self, flat: torch.Tensor, n: int, samples: int) -> torch.Tensor:
        """``n`` random rows (with replacement) of the GLOBAL ``flat`` (N, C), drawn from the global torch RNG.

        ``flat`` holds ``samples`` samples' vectors, sample-major. Under torch.distributed the indices
        range over the global batch (``world`` x this rank's rows, as one process with the global batch
        draws them), rank 0's draw is broadcast, and the rows are gathered by a sum all-reduce (each
        global row lives on exactly one rank: sample ``s`` of the global batch on rank ``s % world``).
        """
        if not _distributed():
            idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
            return flat[idx].detach().clone()
        world, rank = dist.get_world_size(), dist.get_rank()
        per = flat.shape[0] // samples  # vectors per sample
        idx = torch.randint(0, flat.shape[0] * world, (n,), device=flat.device)
        dist.broadcast(idx, src=0)
        sample, pos = idx // per, idx % per
        mine = sample % world == rank
        local = ((sample // world) * per + pos).clamp(max=flat.shape[0] - 1)
        rows = torch.where(mine[:, None], flat.detach()[local], torch.zeros((), dtype=flat.dtype, device=flat.device))
        dist.all_reduce(rows)
        return rows

    @torch.no_grad()
    def _data_init(self, flat: torch.Tensor, samples: int) -> None:
        codes = self._random_rows(flat, self.num_embeddings, samples)
        self.embedding.copy_(codes)
        self.embed_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, samples: int) -> None:
        """EMA step; ``counts`` are the (already all-reduced, under torch.distributed) code counts."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat.detach())
        if _distributed():
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.copy_(self.embed_sum / size.unsqueeze(1))
        if self.restart_dead_codes:
            dead = self.cluster_size < self.dead_code_threshold
            # replace dead codes by random current encoder outputs (same draw on every rank)
            new = self._random_rows(flat, self.num_embeddings, samples)
            self.embedding.copy_(torch.where(dead[:, None], new, self.embedding))
            self.embed_sum.copy_(torch.where(dead[:, None], new, self.embed_sum))
            self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))

    def _is_initialized(self) -> bool:
        seen, version = self._initialized_seen
        if seen and version == self.initialized._version:
            return True
        value = bool(self.initialized)  # the one host read; repeated only after the buffer was written
        self._initialized_seen = (value, self.initialized._version)
        return value

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z_e`` (B, C, *S); in training mode update the codebook first."""
        c = z_e.shape[1]
        flat = z_e.movedim(1, -1).reshape(-1, c)
        if self.training and not self._is_initialized():
            self._data_init(flat.float(), z_e.shape[0])
            self._initialized_seen = (True, self.initialized._version)
        indices = nearest_codes(flat.detach().float(), self.embedding)
        # index_add_ has a static output size; bincount reads max(indices) back to the host on CUDA
        counts = torch.zeros(self.num_embeddings, device=indices.device).index_add_(
            0, indices, torch.ones(indices.shape[0], device=indices.device))
        if self.training and _distributed():
            dist.all_reduce(counts)  # global counts: the EMA update and the logged perplexity / usage
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        z_q = F.embedding(indices, self.embedding).to(z_e.dtype)  # the codes before this step's update
        if self.training:
            self._ema_update(flat.float(), indices, counts.clone(), z_e.shape[0])
        z_q = z_q.view(*z_e.shape[:1], *z_e.shape[2:], c).movedim(-1, 1)
        commitment = self.commitment_cost * F.mse_loss(z_e, z_q.detach())
        z_q = z_e + (z_q - z_e).detach()  # straight-through estimator
        return QuantizerOutput(z_q=z_q, commitment_loss=commitment, perplexity=perplexity, usage=usage,
                               indices=indices.view(z_e.shape[0], *z_e.shape[2:]))
