"""The one training loop of lad: the VQ-GAN, the diffusion model, the priors segmenter and the in-domain
feature network all train through :class:`Trainer`.

A model contributes a step object (a :class:`TrainStep` subclass): the batch of a step, the forward pass that
gives the loss, the optimiser to step on it, and hooks (a second optimiser such as the VQ-GAN's discriminators,
the EMA, images, the final save). The trainer owns what each trainer used to repeat. Step ``s`` is

1. the learning rate ``step.lr(s)`` on every optimiser (a function of the step alone, so a resume continues it);
2. ``seed_step`` / ``step_generator`` from ``(seed, s, part)``: the global torch RNG and the step's generator;
3. ``step.batch(s, indices)`` with the batch's dataset indices (``batch_indices``, this rank's part under
   torchrun), timed as data loading;
4. ``loss, logs = step.forward(batch, s, generator)``;
5. :func:`optimizer_step` on ``step.update``: backward (through the fp16 ``GradScaler``), gradient clipping, the
   non-finite guard (:class:`~lad.training.common.NonFiniteGuard`: a skipped step, an error after
   ``max_nonfinite_steps`` in a row), the optimiser step;
6. healthy: ``step.after_update`` (discriminators, EMA, extra logs) and the logs are accumulated; skipped:
   ``step.on_skip`` (undo what the forward pass changed);
7. every ``log_every`` steps: the scalars' means, the learning rate, steps/s, samples/s, step time, the data
   loading share and the skipped-step count to ``jsonl`` and TensorBoard (``common.Logger``), and the progress bar;
8. every ``image_every`` steps: ``step.images`` (rank 0);
9. every ``checkpoint_every`` steps and at the last: a resume checkpoint (rank 0; the others wait) of
   ``step.modules``, ``step.optimizers`` (optimisers and grad scalers), the RNG states and the data position,
   only when the step was healthy (never from inside a run of skipped steps).

``run(resume=True)`` first loads the newest checkpoint (modules, optimisers, scalers, RNG states) and continues
at its step: since batches and draws are functions of ``(seed, s)``, the weights equal those of an
uninterrupted run bit for bit (CPU). ``stop_after`` ends the call after that many steps, as a killed job would.
When the last step is done, ``step.finish()`` runs on rank 0 (the final save).

Not a framework: the model's own code (DDP wrapping, autocast, the losses) stays in its step object.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad.training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from lad.training.common import (Logger, NonFiniteGuard, batch_indices, data_state, load_latest_checkpoint,
                                 resolve_device, save_checkpoint, seed_step, step_generator)
from lad.training.parallel import check_global_batch, shard_batch
from lad.utils.distributed import init_distributed
from lad.utils.log import is_main_process, progress

__all__ = ["Update", "optimizer_step", "TrainStep", "Trainer", "training_device"]


def training_device(device: str, precision: str = "fp32", batch_size: int | None = None, what: str = "batch_size") -> torch.device:
    """The device of a trainer (under torchrun: the process group is set up and cuda becomes cuda:LOCAL_RANK);
    refuses fp16 off CUDA and a global ``batch_size`` that does not split over the ranks."""
    dev = init_distributed(resolve_device(device))
    if batch_size is not None:
        check_global_batch(batch_size, what)
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use fp32 (or bf16, slow on CPU) with --device cpu")
    return dev


@dataclasses.dataclass
class Update:
    """One optimiser and how to step it: through ``scaler`` (fp16 loss scaling; None: plain backward) with the
    gradient norm of the optimiser's parameters clipped to ``clip`` (None: no clipping)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    clip: float | None = None


def optimizer_step(loss: torch.Tensor, update: Update, guard: NonFiniteGuard, step: int) -> tuple[bool, torch.Tensor | None]:
    """``zero_grad``, (scaled) backward, unscale, clip, then ``guard``: the optimiser steps only on a finite loss
    and gradient norm (an enabled fp16 scaler skips non-finite gradients itself, so only the loss is checked then);
    the scaler's scale is updated either way. Returns (healthy, gradient norm before clipping or None)."""
    opt, scaler = update.optimizer, update.scaler
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    norm = None
    if update.clip is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, update.clip, foreach=True)
    ok = guard.ok(loss, step, None if scaler is not None and scaler.is_enabled() else norm)
    if ok:
        opt.step() if scaler is None else scaler.step(opt)
    else:
        opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return ok, norm


class TrainStep:
    """What a model contributes to :class:`Trainer` (subclass it; ``batch`` and ``forward`` are required).

    Attributes: ``modules`` (name -> module, saved in resume checkpoints as safetensors), ``optimizers`` (name ->
    optimiser or ``GradScaler``, saved as ``weights_only`` state dicts), ``update`` (the :class:`Update` the
    loop takes on ``forward``'s loss), ``metric`` (the log key whose running mean ranks checkpoints for
    ``best/``; the progress bar shows it).
    """

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, Any]
    update: Update
    metric: str = "loss"

    def lr(self, step: int) -> float | None:
        """The learning rate of ``step`` for every optimiser; None leaves them as they are."""
        return None

    def batch(self, step: int, indices: np.ndarray | None) -> Any:
        """The batch of ``step``: ``indices`` are its dataset indices (this rank's part), None without a data order."""
        raise NotImplementedError

    def forward(self, batch: Any, step: int, generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs): the loss to step ``update`` on and the scalars to log (tensors, read back once per interval)."""
        raise NotImplementedError

    def after_update(self, step: int, generator: torch.Generator | None, logs: dict[str, torch.Tensor]) -> None:
        """After a healthy optimiser step: further optimisers, EMA, more ``logs``."""

    def on_skip(self, step: int) -> None:
        """After a skipped (non-finite) step: undo what the forward pass changed (e.g. running statistics)."""

    def postfix(self, means: dict[str, float]) -> dict[str, str]:
        """The progress bar's postfix from the logged means."""
        return {"loss": f"{means.get(self.metric, math.nan):.4f}"}

    def images(self, step: int, generator: torch.Generator | None, logger: Logger) -> None:
        """Every ``image_every`` steps on rank 0: pictures for TensorBoard (``logger.image``)."""

    def finish(self) -> None:
        """On rank 0 after the last step: save the trained model."""


class Trainer:
    """Runs a :class:`TrainStep` for ``steps`` steps (module docstring: what one step does).

    ``part``: the name of the seeds' stream, the TensorBoard prefix and the progress bar. ``seed``: per-step seeds
    and the data order (None: neither; the step draws its own batches and gets no generator). ``num_samples``:
    the dataset's length, with ``batch_size`` (the global batch) the data order ``batch_indices``; without it
    ``batch`` gets ``indices=None``. ``checkpoints``: the resume checkpoint folder (None: none are written and
    ``resume`` does nothing). ``tensorboard`` / ``jsonl``: where scalars go (None: not there).
    """

    def __init__(self, step: TrainStep, *, steps: int, part: str, device: torch.device | str = "cpu", seed: int | None = None,
                 num_samples: int | None = None, batch_size: int = 1, checkpoints: str | Path | None = None, keep_last: int = 3,
                 checkpoint_every: int = 1000, tensorboard: str | Path | None = None, jsonl: str | Path | None = None,
                 log_every: int = 50, image_every: int = 0, max_nonfinite_steps: int = 5, progress_bar: bool = True):
        if steps < 1 or log_every < 1 or checkpoint_every < 1 or max_nonfinite_steps < 1 or batch_size < 1:
            raise ValueError(f"{part}: steps, log_every, checkpoint_every, max_nonfinite_steps and batch_size must be at least 1 "
                             f"(got {steps}, {log_every}, {checkpoint_every}, {max_nonfinite_steps}, {batch_size})")
        if num_samples is not None and seed is None:
            raise ValueError(f"{part}: a data order (num_samples) needs a seed")
        self.step, self.steps, self.part, self.device, self.seed = step, int(steps), part, torch.device(device), seed
        self.num_samples, self.batch_size = num_samples, int(batch_size)
        self.ckpt = None if checkpoints is None else CheckpointManager(checkpoints, keep_last)
        self.checkpoint_every, self.log_every, self.image_every = int(checkpoint_every), int(log_every), int(image_every)
        self.tensorboard, self.jsonl = tensorboard, None if jsonl is None else Path(jsonl)
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.progress_bar = progress_bar
        self.start = 0

    @classmethod
    def from_logging(cls, step: TrainStep, logging, **kwargs) -> Trainer:
        """A trainer with ``log_every``, ``image_every``, ``checkpoint_every``, ``keep_last`` and
        ``max_nonfinite_steps`` from a ``LoggingConfig`` (``TrainConfig.logging``)."""
        names = ("log_every", "image_every", "checkpoint_every", "keep_last", "max_nonfinite_steps")
        return cls(step, **{k: getattr(logging, k) for k in names}, **kwargs)

    def _optimizers(self):
        return [o for o in self.step.optimizers.values() if isinstance(o, torch.optim.Optimizer)]

    def _resume(self) -> int:
        s = self.step
        if self.ckpt is None or (state := load_latest_checkpoint(self.ckpt, s.modules, s.optimizers, self.device)) is None:
            return 0
        if "rng" in state:  # (checkpoints of the segmenter from before the shared loop hold the step only)
            restore_rng_state(state["rng"])
        return int(state["step"])

    def _trainer_state(self, done: int) -> dict[str, Any]:
        state = {"rng": capture_rng_state()}
        if self.num_samples is not None:
            state["data"] = data_state(done, self.batch_size, self.num_samples, self.seed)
        return state

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> bool:
        """Train from step 0, or with ``resume`` from the newest checkpoint; True when the last step was reached
        (``step.finish()`` has then run on rank 0), False when ``stop_after`` ended the call first."""
        s, guard = self.step, self.guard
        start = self.start = self._resume() if resume else 0
        if start > self.steps:
            raise ValueError(f"{self.ckpt.root if self.ckpt else self.part}: the newest checkpoint is at step {start}, beyond "
                             f"the configured {self.steps} steps; resume with at least that many steps")
        end = self.steps if stop_after is None else min(self.steps, start + stop_after)
        logger = Logger(Path(self.tensorboard) if self.tensorboard is not None else Path("."), enabled=self.tensorboard is not None,
                        jsonl=self.jsonl, device=self.device)
        opts = self._optimizers()
        bar = progress(range(start, end), total=end - start, desc=self.part, unit="step", disable=not self.progress_bar)
        t_last, n_last, t_data, running = time.perf_counter(), start, 0.0, float("nan")
        try:
            for step in bar:
                lr = s.lr(step)
                if lr is not None:
                    for opt in opts:
                        for group in opt.param_groups:
                            group["lr"] = lr
                gen = None
                if self.seed is not None:
                    seed_step(self.seed, step, self.part)
                    gen = step_generator(self.seed, step, self.part)
                t0 = time.perf_counter()
                indices = None
                if self.num_samples is not None:
                    indices = shard_batch(batch_indices(step, self.batch_size, self.num_samples, self.seed))
                batch = s.batch(step, indices)
                t_data += time.perf_counter() - t0
                loss, logs = s.forward(batch, step, gen)
                ok, norm = optimizer_step(loss, s.update, guard, step)
                if ok:
                    s.after_update(step, gen, logs)
                    if norm is not None:
                        logs["grad_norm"] = norm.detach()
                    logger.accumulate(logs)
                else:
                    s.on_skip(step)
                done = step + 1
                if done % self.log_every == 0 or done == end:
                    now = time.perf_counter()
                    rate = (done - n_last) / max(now - t_last, 1e-9)
                    means = logger.flush(done, self.part, {"lr": s.update.optimizer.param_groups[0]["lr"], "steps_per_s": rate,
                                                           "samples_per_s": rate * self.batch_size, "step_time_s": 1 / max(rate, 1e-9),
                                                           "data_share": t_data / max(now - t_last, 1e-9),
                                                           "skipped_steps": guard.skipped})
                    running = means.get(s.metric, running)
                    t_last, n_last, t_data = now, done, 0.0
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(**s.postfix(means))
                if self.image_every and done % self.image_every == 0 and is_main_process():
                    s.images(done, gen, logger)
                # no checkpoint during a run of skipped (non-finite) steps: a resume starts from the last healthy one
                if self.ckpt is not None and (done % self.checkpoint_every == 0 or done == self.steps) and guard.in_a_row == 0:
                    save_checkpoint(self.ckpt, done, s.modules, s.optimizers, self._trainer_state(done), metric=running)
        finally:
            logger.close()
        finished = end == self.steps
        if finished and is_main_process():
            s.finish()
        return finished
