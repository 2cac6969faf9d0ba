"""The shared training loop (``lad.training.loop``) on a toy step: resume equals an uninterrupted run, the
non-finite guard skips and stops, checkpoints only after healthy steps, ``stop_after``, logs (hand-computed
means, learning rates), hooks; ``changed_keys``; the data layer's ``open_dataset`` / ``describe_dataset``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from lad.training.checkpoint import CheckpointManager
from lad.training.common import changed_keys, data_state
from lad.training.loop import Trainer, TrainStep, Update, optimizer_step


class Toy(TrainStep):
    """A linear regression on 10 fixed samples; its loss draws from the step's generator and from the global
    torch RNG (both seeded per step by the loop); ``nan_at`` / ``inf_grad_at``: steps made non-finite."""

    def __init__(self, nan_at=(), inf_grad_at=(), lr_of=None):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 1)
        self.bn = torch.nn.BatchNorm1d(3)  # running statistics: a forward-pass side effect to undo on a skip
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(10, 3, generator=g), torch.randn(10, 1, generator=g)
        opt = torch.optim.Adam(self.net.parameters(), lr=0.05)
        self.modules, self.optimizers, self.update = {"net": self.net, "bn": self.bn}, {"opt": opt}, Update(opt, clip=10.0)
        self.nan_at, self.inf_grad_at, self.lr_of = set(nan_at), set(inf_grad_at), lr_of
        self.losses, self.seen, self.skipped, self.images_at, self.finished = {}, [], [], [], 0

    def lr(self, step):
        return None if self.lr_of is None else self.lr_of(step)

    def batch(self, step, indices):
        self.seen.append((step, indices.tolist()))
        return self.x[torch.from_numpy(indices)], self.y[torch.from_numpy(indices)]

    def forward(self, batch, step, generator):
        x, y = batch
        self.saved = [b.clone() for b in self.bn.buffers()]
        x = self.bn(x) + 0.1 * torch.randn(x.shape, generator=generator) + 0.01 * torch.randn(x.shape)
        loss = (self.net(x) - y).square().mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        if step in self.inf_grad_at:  # a finite loss (+ sqrt(0)) with an infinite gradient
            loss = loss + (self.net.weight.sum() - self.net.weight.sum().detach()).sqrt()
        self.losses[step] = float(loss.detach())
        return loss, {"loss": loss.detach(), "twice": 2 * loss.detach()}

    def on_skip(self, step):
        self.skipped.append(step)
        for b, copy in zip(self.bn.buffers(), self.saved):
            b.copy_(copy)

    def images(self, step, generator, logger):
        self.images_at.append(step)

    def finish(self):
        self.finished += 1


def _trainer(step, tmp, **kw):
    args = dict(steps=10, part="toy", seed=3, num_samples=10, batch_size=4, checkpoints=tmp / "ck", keep_last=5,
                checkpoint_every=3, jsonl=tmp / "log.jsonl", log_every=2, image_every=4, max_nonfinite_steps=3,
                progress_bar=False)
    return Trainer(step, **{**args, **kw})


def _state(step):
    return {f"{name}.{k}": v.clone() for name, m in (("net", step.net), ("bn", step.bn)) for k, v in m.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path):
    a = Toy()
    assert _trainer(a, tmp_path / "a").run() is True and a.finished == 1
    b = Toy()
    assert _trainer(b, tmp_path / "b").run(stop_after=5) is False and b.finished == 0  # killed after 5 steps
    assert CheckpointManager(tmp_path / "b" / "ck").steps() == [3]
    b2 = Toy()  # a new process: fresh weights, resumed from step 3
    t = _trainer(b2, tmp_path / "b")
    assert t.run(resume=True) is True and t.start == 3 and b2.finished == 1
    assert [s for s, _ in b2.seen] == list(range(3, 10))
    sa, sb = _state(a), _state(b2)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizers["opt"].state_dict()["state"], b2.optimizers["opt"].state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    assert a.losses == {**b.losses, **b2.losses}  # every step's loss (generator and global draws) as uninterrupted
    # the data position: after 9 steps of 4 of 10 samples, epoch 3, position 6 (and the batches of a pure function)
    state = torch.load(tmp_path / "a" / "ck" / "step_0000009" / "trainer_state.pt", weights_only=True)
    assert state["data"] == data_state(9, 4, 10, 3) == {"seed": 3, "epoch": 3, "position": 6, "batch_size": 4, "num_windows": 10}
    assert CheckpointManager(tmp_path / "a" / "ck").steps() == [3, 6, 9, 10]  # every 3 steps and the last


def test_logs_hand_computed_means_lr_and_images(tmp_path):
    s = Toy(lr_of=lambda step: 0.01 * (step + 1))
    _trainer(s, tmp_path, steps=5, image_every=2).run()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every log_every steps and the last
    for r, steps in zip(rows, ([0, 1], [2, 3], [4])):
        assert r["loss"] == pytest.approx(np.mean([s.losses[i] for i in steps]), rel=1e-6)
        assert r["twice"] == pytest.approx(2 * r["loss"], rel=1e-6)
        assert r["lr"] == pytest.approx(0.01 * steps[-1] + 0.01)  # the lr of the interval's last step
        assert r["skipped_steps"] == 0 and r["samples_per_s"] == pytest.approx(4 * r["steps_per_s"]) and 0 <= r["data_share"] <= 1
        assert "grad_norm" in r
    assert s.images_at == [2, 4]


def test_nonfinite_guard_skips_then_stops_and_checkpoints_only_when_healthy(tmp_path, caplog):
    s = Toy(nan_at={1, 4, 5, 6}, inf_grad_at={2})
    t = _trainer(s, tmp_path, checkpoint_every=1, max_nonfinite_steps=3)
    before = {}
    orig = s.forward

    def forward(batch, step, generator):
        before[step] = _state(s)
        return orig(batch, step, generator)

    s.forward = forward
    with caplog.at_level(logging.WARNING, logger="lad"), pytest.raises(RuntimeError, match="3 consecutive non-finite losses at step 6"):
        t.run()
    assert s.skipped == [1, 2, 4, 5]  # (the third in a row raises before its skip)
    assert "step 1: non-finite loss nan" in caplog.text
    for k in before[1]:  # a skipped step leaves the weights and running statistics as they were
        assert torch.equal(before[1][k], before[2][k]) and torch.equal(before[2][k], before[3][k])
    assert not torch.equal(before[3]["net.weight"], before[4]["net.weight"])  # step 3 was healthy and stepped
    # checkpoints after the healthy steps 0 and 3 only (done = 1, 4), none from inside the run of skipped steps
    assert CheckpointManager(tmp_path / "ck").steps() == [1, 4] and s.finished == 0
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["step"] == 2 and rows[0]["loss"] == pytest.approx(s.losses[0], rel=1e-6)  # skipped steps are not averaged in
    assert rows[1]["step"] == 4 and rows[1]["skipped_steps"] == 2 and rows[1]["loss"] == pytest.approx(s.losses[3], rel=1e-6)


def test_optimizer_step_with_a_gradient_that_is_not_finite():
    from lad.training.common import NonFiniteGuard

    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    g = NonFiniteGuard(2)
    ok, norm = optimizer_step((w * 3).sum(), Update(opt, clip=1.0), g, 0)
    assert ok and float(norm) == 3.0 and w.item() == pytest.approx(1.0 - 0.5 * 1.0)  # clipped to norm 1
    loss = (w.sum() - w.sum().detach()).sqrt() + 1.0  # finite (1), with an infinite gradient
    ok, norm = optimizer_step(loss, Update(opt, clip=1.0), g, 1)
    assert not ok and not torch.isfinite(norm) and w.grad is None and w.item() == pytest.approx(0.5)  # skipped, gradients dropped


def test_optimizer_step_through_an_enabled_grad_scaler():
    """The fp16 path's logic (here with a CPU GradScaler): the unscaled gradient is clipped and stepped as without
    a scaler; a non-finite gradient is skipped by the scaler itself (the guard checks only the loss then), and the
    scale is halved."""
    from lad.training.common import NonFiniteGuard

    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ok, norm = optimizer_step((w * 3).sum(), Update(opt, scaler, clip=1.0), NonFiniteGuard(2), 0)
    assert ok and float(norm) == 3.0 and w.item() == pytest.approx(0.5) and scaler.get_scale() == 2.0**10
    ok, norm = optimizer_step((w.sum() - w.sum().detach()).sqrt() + 1.0, Update(opt, scaler, clip=1.0), NonFiniteGuard(2), 1)
    assert ok and not torch.isfinite(norm) and w.item() == pytest.approx(0.5) and scaler.get_scale() == 2.0**9


def test_resume_from_a_checkpoint_without_rng_state(tmp_path):
    """Checkpoints written before the shared loop by the segmenter hold the step only: they resume (no RNG restore)."""
    a = Toy()
    _trainer(a, tmp_path / "a", checkpoints=None).run(stop_after=4)
    CheckpointManager(tmp_path / "b" / "ck").save(4, a.modules, a.optimizers)  # no trainer state
    b = Toy()
    t = _trainer(b, tmp_path / "b")
    assert t.run(resume=True, stop_after=1) is False and t.start == 4 and [s for s, _ in b.seen] == [4]
    c = Toy()
    t = _trainer(c, tmp_path / "c", checkpoints=None)
    assert t.run(resume=True, stop_after=1) is False and t.start == 0  # without checkpoints resume starts at 0


def test_resume_beyond_the_configured_steps_is_refused(tmp_path):
    _trainer(Toy(), tmp_path).run()
    with pytest.raises(ValueError, match="newest checkpoint is at step 10, beyond the configured 6 steps"):
        _trainer(Toy(), tmp_path, steps=6).run(resume=True)


def test_without_seed_or_data_order():
    """seed=None: no per-step seeding (the global RNG runs on as the caller left it), no generator, no indices."""

    class Own(Toy):
        def batch(self, step, indices):
            assert indices is None
            return super().batch(step, np.array([step % 10, (step + 1) % 10]))

        def forward(self, batch, step, generator):
            assert generator is None
            return super().forward(batch, step, torch.Generator().manual_seed(step))

    losses = []
    for seed in (5, 6):
        s = Own()
        torch.manual_seed(seed)
        assert Trainer(s, steps=3, part="own", progress_bar=False).run() is True and s.finished == 1
        losses.append(s.losses)
    assert losses[0] != losses[1]  # the global draws follow the caller's seed, not the loop's
    with pytest.raises(ValueError, match="needs a seed"):
        Trainer(Toy(), steps=3, part="x", num_samples=10)
    with pytest.raises(ValueError, match="at least 1"):
        Trainer(Toy(), steps=0, part="x")


def test_changed_keys():
    old = {"a": [1, 2], "b": {"c": [3]}, "steps": 5, "d": None}
    assert changed_keys(old, {"a": (1, 2), "b": {"c": (3,)}, "steps": 9}, ignore=("steps",)) == []
    assert changed_keys(old, {"a": [2, 1], "b": {"c": [3]}, "steps": 5, "e": 1}) == ["a", "e"]
    assert changed_keys(old, {"a": [1, 2]}, keys=("a", "b")) == ["b"]


def test_open_and_describe_a_dataset_object(handmade_prepared):
    from lad.data.dataset import PreparedDataset, describe_dataset, open_dataset

    ds = open_dataset(handmade_prepared)
    assert isinstance(ds, PreparedDataset) and ds.split == "train"
    info = describe_dataset(ds)
    assert info.shape == (8, 32, 32) and info.spacing == (12.0, 12.0, 10.0) and info.organ == "pancreas" and info.path == handmade_prepared

    class Windows(torch.utils.data.Dataset):
        spacing = (1.5, 1.5, 2.5)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": np.zeros((1, 4, 8, 8), np.float32), "mask": np.zeros((1, 4, 8, 8), np.uint8)}

    w = Windows()
    assert open_dataset(w) is w
    i = describe_dataset(w)
    assert (i.name, i.shape, i.spacing, i.organ, i.fingerprint, i.path) == ("<Windows>", (4, 8, 8), (1.5, 1.5, 2.5), "pancreas", {}, None)
    with pytest.raises(TypeError, match="prepared dataset folder or a torch.utils.data.Dataset"):
        open_dataset(3)

    class Bad(Windows):
        def __getitem__(self, i):
            return np.zeros((1, 4, 8, 8))

    with pytest.raises(ValueError, match="<Bad>: items must be dicts with an 'image'"):
        describe_dataset(Bad())
