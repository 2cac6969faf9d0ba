"""Distributed training and sampling (torchrun / DDP, Gloo on CPU, 2 processes) equal one process.

* quantizer and BatchNorm under torch.distributed (``torch.multiprocessing.spawn``, ``file://`` rendezvous):
  codebook EMA statistics and restarts identical on both ranks and equal to one process given the global
  batch; global-batch BatchNorm gives one process's outputs, input gradients and running statistics;
* ``python -m torch.distributed.run --nproc_per_node 2 -m lad train vqgan`` (the CLI path) and a spawned
  2-process ``train_diffusion`` give the weights and logged values of an in-process 1-rank run with the
  same global batch;
* ``... -m lad sample`` on 2 ranks writes the same files, volumes and manifest as one process;
* two torchrun launches as two nodes (``--nnodes 2``, c10d rendezvous on localhost) train what one process does.

Tolerances: ranks sum gradients in another order than one process does (DDP averages two partial sums),
so values agree to float32 rounding (~1e-7 relative per operation). Logged losses and gradient norms, which
see this directly, must agree to rtol 1e-5. Weights pass through Adam, which divides each gradient by its
own running RMS: where a gradient is analytically zero (conv biases right before a GroupNorm, whose mean
subtraction cancels them) rounding noise of ~1e-9 decides the sign of an update of size ~lr. So at least
99.5% of the weight values must agree within 1e-5, and every value within 2 x lr x steps (Adam's bound
on how far one parameter moves in that many steps).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lad.training.config import resolve_train_config

WORLD = 2
VQ_SET = ["vqgan_train.steps=3", "vqgan_train.disc_start=1", "vqgan_train.batch_size=4", "logging.checkpoint_every=3",
          "logging.log_every=1", "logging.image_every=0"]
DIFF_SET = ["diffusion_train.steps=3", "diffusion_train.batch_size=4", "logging.checkpoint_every=3", "logging.log_every=1",
            "logging.image_every=0"]
LR = 1e-3  # the tiny preset's learning rate (both parts)


# ---------------------------------------------------------------- helpers: spawned process groups, torchrun

def _worker(rank: int, world: int, init_file: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a desynchronised collective fails after 5 minutes instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path: Path, *args) -> None:
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), fn, args), nprocs=WORLD, join=True)


def _torchrun_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = _torchrun_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
           "-m", "lad", *args, *([] if "--no-progress" in args else ["--no-progress"])]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def _assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], steps: int) -> None:
    assert a.keys() == b.keys()
    n = close = 0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2 * LR * steps, msg=lambda m: f"{k}: {m}")
        d = (a[k].double() - b[k].double()).abs()
        n, close = n + d.numel(), close + int((d <= 1e-5).sum())
    assert close / n >= 0.995, f"only {close}/{n} weight values within 1e-5"


def _assert_logs_close(one: Path, two: Path) -> None:
    rows1 = [json.loads(x) for x in one.read_text().splitlines()]
    rows2 = [json.loads(x) for x in two.read_text().splitlines()]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    skip = {"lr", "steps_per_s", "samples_per_s", "step_time_s", "data_share", "skipped_steps", "step"}
    for r1, r2 in zip(rows1, rows2):
        assert set(r1) == set(r2)
        for k in set(r1) - skip:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (r1["step"], k)


# ---------------------------------------------------------------- codebook and BatchNorm under torch.distributed

def _quantizer(restart: bool = True):
    from lad.models.quantizer import EMAQuantizer

    torch.manual_seed(0)
    return EMAQuantizer(num_embeddings=16, embedding_dim=4, dead_code_threshold=0.995, restart_dead_codes=restart).train()


def _global_latents() -> torch.Tensor:
    return torch.randn(4, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))


def _quantizer_steps(q, z: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for step in range(2):  # step 0: data initialisation + update + restarts; step 1: update + restarts
        torch.manual_seed(100 + step)  # the trainers' seed_step: the same global RNG state on every rank
        o = q(z + 0.1 * step)
        out[f"perplexity{step}"] = o.perplexity
    return {**out, **{k: v.clone() for k, v in q.state_dict().items()}}


def _quantizer_rank(rank: int, world: int, out: str) -> None:
    torch.save(_quantizer_steps(_quantizer(), _global_latents()[rank::world]), f"{out}/q{rank}.pt")


def _batchnorm_rank(rank: int, world: int, out: str) -> None:
    from lad.training.parallel import sync_batchnorm

    torch.manual_seed(0)
    bn = sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(3)), torch.device("cpu"))
    with torch.no_grad():
        bn[0].weight.uniform_(0.5, 1.5), bn[0].bias.uniform_(-1, 1)
    x = (torch.randn(4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1)[rank::world].requires_grad_(True)
    c = torch.randn(4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(3))[rank::world]
    y = bn(x)
    (y * c).sum().backward()  # summed over ranks: the one-process objective (y * c).sum()
    g = torch.cat([bn[0].weight.grad, bn[0].bias.grad])
    dist.all_reduce(g)
    torch.save({"y": y.detach(), "x_grad": x.grad, "param_grad": g, "running_mean": bn[0].running_mean,
                "running_var": bn[0].running_var, "type": type(bn[0]).__name__}, f"{out}/bn{rank}.pt")


def _spawned_rank(rank: int, world: int, out: str, data: str, run: str, resumed: str) -> None:
    from lad.training.diffusion_trainer import train_diffusion

    _quantizer_rank(rank, world, out)
    _batchnorm_rank(rank, world, out)
    _locality_rank(rank, world, out)
    train_diffusion(data, run, resolve_train_config("tiny", DIFF_SET), progress_bar=False)
    # killed after 2 steps, then resumed (every rank from rank 0's checkpoint)
    cfg = resolve_train_config("tiny", [*DIFF_SET, "logging.checkpoint_every=1"])
    train_diffusion(data, resumed, cfg, stop_after=2, progress_bar=False)
    train_diffusion(data, resumed, cfg, resume=True, progress_bar=False)
    _nan_on_rank_1(rank, out, data)


def _nan_on_rank_1(rank: int, out: str, data: str) -> None:
    """Rank 1's loss VALUE is NaN (its gradients stay finite): both ranks must skip and stop together."""
    from lad.models import guidance
    from lad.training.diffusion_trainer import train_diffusion

    real = guidance.diffusion_loss

    def nan_value(*a, **k):
        loss, logs = real(*a, **k)
        return (loss + (torch.full_like(loss, float("nan")) - loss.detach()) if rank == 1 else loss), logs

    guidance.diffusion_loss = nan_value
    cfg = resolve_train_config("tiny", [*DIFF_SET, "logging.checkpoint_every=1", "logging.max_nonfinite_steps=2"])
    try:
        train_diffusion(data, f"{out}/nan", cfg, progress_bar=False)
        msg = "finished"
    except RuntimeError as e:
        msg = str(e)
    finally:
        guidance.diffusion_loss = real
    Path(out, f"nan{rank}.txt").write_text(msg)


def _locality_case():
    """4 samples; sample 3 has an empty mask, so rank 1 (samples 1, 3) holds 1 of the 3 non-empty ones."""
    g = torch.Generator().manual_seed(4)
    x, x_hat = torch.rand(4, 1, 4, 6, 6, generator=g), torch.rand(4, 1, 4, 6, 6, generator=g)
    mask = torch.zeros(4, 1, 4, 6, 6, dtype=torch.uint8)
    mask[0, :, 1:3, 2:4, 1:5], mask[1, :, 0, 0, 0], mask[2, :, 2:4, 3:6, 3:6] = 1, 2, 1
    return x, x_hat, mask


def _locality_rank(rank: int, world: int, out: str) -> None:
    from lad.training.losses import locality_loss

    x, x_hat, mask = (t[rank::world] for t in _locality_case())
    x_hat.requires_grad_(True)
    loss = locality_loss(x, x_hat, mask, world=world)
    loss.backward()
    torch.save({"value": loss.detach(), "grad": x_hat.grad / world}, f"{out}/loc{rank}.pt")  # DDP: mean of the ranks' gradients


def test_codebook_ema_and_restarts_synchronised(runs):
    r0, r1 = torch.load(runs["root"] / "q0.pt"), torch.load(runs["root"] / "q1.pt")
    single = _quantizer_steps(_quantizer(), _global_latents())
    no_restart = _quantizer_steps(_quantizer(restart=False), _global_latents())
    assert int((no_restart["cluster_size"] < 0.995).sum()) > 0  # the oracle run did restart dead codes
    assert not torch.allclose(no_restart["embedding"], single["embedding"])
    for k in ("embedding", "embed_sum", "cluster_size", "initialized", "perplexity0", "perplexity1"):
        assert torch.equal(r0[k], r1[k]), k  # bit-identical on every rank
        torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6)  # = one process, global batch


def test_global_batchnorm_equals_one_process(runs):
    r = [torch.load(runs["root"] / f"bn{i}.pt") for i in range(WORLD)]
    assert r[0]["type"] == "GlobalBatchNorm"  # torch's SyncBatchNorm refuses CPU tensors
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = (torch.randn(4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1).requires_grad_(True)
    c = torch.randn(4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    y = bn(x)
    (y * c).sum().backward()
    for i in range(WORLD):
        torch.testing.assert_close(r[i]["y"], y.detach()[i::WORLD], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r[i]["x_grad"], x.grad[i::WORLD], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r[i]["param_grad"], torch.cat([bn.weight.grad, bn.bias.grad]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r[i]["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[i]["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)


def test_locality_loss_global_mean(runs):
    """Mean over samples with a non-empty mask: the count is global, so 2 ranks give one process's gradient
    (per-rank means would weight rank 1's only non-empty sample 2x)."""
    from lad.training.losses import locality_loss

    x, x_hat, mask = _locality_case()
    x_hat.requires_grad_(True)
    loss = locality_loss(x, x_hat, mask)
    loss.backward()
    r = [torch.load(runs["root"] / f"loc{i}.pt") for i in range(WORLD)]
    torch.testing.assert_close((r[0]["value"] + r[1]["value"]) / WORLD, loss.detach(), rtol=1e-6, atol=1e-7)
    for i in range(WORLD):
        torch.testing.assert_close(r[i]["grad"], x_hat.grad[i::WORLD], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- training and sampling on 2 ranks

@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    """1-rank (in-process) and 2-rank runs of both parts from the same VQ-GAN / global batch: the VQ-GAN through
    torchrun and the CLI, the diffusion model in one spawned 2-process group that also runs the quantizer and
    BatchNorm cases (each process start costs a torch import: ~3 s of CPU)."""
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    train_vqgan(tiny_prepared, one, resolve_train_config("tiny", VQ_SET), progress_bar=False)
    _torchrun(["train", "vqgan", "--data", str(tiny_prepared), "--run-dir", str(two), "--preset", "tiny", *_sets(VQ_SET)], root)
    # the diffusion runs start from the same (1-rank) VQ-GAN
    vq_two = root / "two_vqgan"
    shutil.move(two / "vqgan", vq_two)
    shutil.copytree(one / "vqgan", two / "vqgan")
    train_diffusion(tiny_prepared, one, resolve_train_config("tiny", DIFF_SET), progress_bar=False)
    shutil.copytree(one / "vqgan", root / "resumed" / "vqgan")
    for d in ("vqgan", "latent_cache"):
        shutil.copytree(one / d, root / "nan" / d)
    _spawn(_spawned_rank, root, str(root), str(tiny_prepared), str(two), str(root / "resumed"))
    return {"one": one, "two": two, "vq_two": vq_two, "root": root}


def test_two_rank_vqgan_equals_one_rank(runs):
    one, two = runs["one"], runs["two"]
    _assert_weights_close(load_file(str(one / "vqgan" / "model.safetensors")), load_file(str(runs["vq_two"] / "model.safetensors")), 3)
    ck = "checkpoints/vqgan/step_0000003/loss.safetensors"  # both discriminators (BatchNorm statistics included)
    _assert_weights_close(load_file(str(one / ck)), load_file(str(two / ck)), 3)
    _assert_logs_close(one / "logs" / "vqgan.jsonl", two / "logs" / "vqgan.jsonl")  # global losses, gradient norms
    assert len((two / "logs" / "vqgan.jsonl").read_text().splitlines()) == 3  # rank 0 alone logged
    assert sorted(p.name for p in (two / "checkpoints" / "vqgan").iterdir()) == ["best", "step_0000003"]
    # rank 0 alone reconstructed the held-out windows at the end, with (nearly) the 1-rank weights
    r1, r2 = (json.loads((r / "vqgan_reconstruction.json").read_text()) for r in (one, two))
    assert r2["n_windows"] == r1["n_windows"] and r2["mae_body_hu"] == pytest.approx(r1["mae_body_hu"], rel=1e-2)


def test_two_rank_diffusion_equals_one_rank(runs):
    one, two = runs["one"], runs["two"]
    for part in ("denoiser", "denoiser_ema", "condition", "condition_raw"):
        _assert_weights_close(load_file(str(one / part / "model.safetensors")), load_file(str(two / part / "model.safetensors")), 3)
    _assert_logs_close(one / "logs" / "diffusion.jsonl", two / "logs" / "diffusion.jsonl")
    # the latent cache built in shards by the two ranks is the one-process cache
    c1, c2 = load_file(str(one / "latent_cache" / "latents.safetensors")), load_file(str(two / "latent_cache" / "latents.safetensors"))
    assert c1.keys() == c2.keys() == {"z", "mask_z", "betti"}
    for k in c1:
        torch.testing.assert_close(c2[k], c1[k], rtol=1e-5, atol=1e-5)
    assert json.loads((one / "latent_cache" / "meta.json").read_text()) == json.loads((two / "latent_cache" / "meta.json").read_text())
    assert not (two / "latent_cache.parts").exists()


def test_nan_guard_stops_all_ranks_together(runs):
    for rank in range(WORLD):
        assert "2 consecutive non-finite losses at step 1" in (runs["root"] / f"nan{rank}.txt").read_text()
    assert not list((runs["root"] / "nan" / "checkpoints" / "diffusion").glob("step_*"))


def test_two_rank_resume_equals_uninterrupted(runs):
    two, resumed = runs["two"], runs["root"] / "resumed"
    assert (resumed / "checkpoints" / "diffusion" / "step_0000002").is_dir()
    for part in ("denoiser", "denoiser_ema", "condition", "condition_raw"):
        a, b = load_file(str(two / part / "model.safetensors")), load_file(str(resumed / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part  # bit for bit


def test_global_batch_must_divide(tiny_prepared, tmp_path, monkeypatch):
    from lad.training import parallel
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    monkeypatch.setattr(parallel, "get_world_size", lambda: 2)  # as on 2 ranks; checked before anything is written
    with pytest.raises(ValueError, match="vqgan_train.batch_size=3 is the global batch and must be divisible by the number "
                       "of processes \\(2\\)"):
        train_vqgan(tiny_prepared, tmp_path / "r", resolve_train_config("tiny", ["vqgan_train.batch_size=3"]))
    with pytest.raises(ValueError, match="diffusion_train.batch_size=5 is the global batch"):
        train_diffusion(tiny_prepared, tmp_path / "r", resolve_train_config("tiny", ["diffusion_train.batch_size=5"]))
    assert not (tmp_path / "r").exists()


def test_two_rank_sampling_equals_one_rank(runs, tiny_prepared):
    import nibabel as nib

    from lad.sampling.generate import SampleSettings, generate_samples

    run, root = runs["one"], runs["root"]
    generate_samples(run, tiny_prepared, root / "s1", SampleSettings(n=3, steps=2, sampler="ddim", quality_check=False))
    _torchrun(["sample", "--run-dir", str(run), "--masks", str(tiny_prepared), "--num-samples", "3", "--out", str(root / "s2"),
               "--steps", "2", "--sampler", "ddim", "--no-quality-check"], root)
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(root / "s1") == files(root / "s2")
    assert (root / "s1" / "manifest.jsonl").read_text() == (root / "s2" / "manifest.jsonl").read_text()
    for p in sorted((root / "s1" / "samples").iterdir()):
        a, b = np.asarray(nib.load(p).dataobj), np.asarray(nib.load(root / "s2" / "samples" / p.name).dataobj)
        assert np.array_equal(a, b), p.name  # each sample is computed alone, by the same code, in either case
    # rank 1 "failed": its shard (sample 1) is lost and re-run alone with --shard 1/2, outside torchrun
    lost = sorted((root / "s2").rglob("sample_000001*"))
    assert len(lost) == 3  # CT, mask, record
    for p in lost:
        p.unlink()
    s = generate_samples(run, tiny_prepared, root / "s2", SampleSettings(n=3, steps=2, sampler="ddim", quality_check=False),
                         shard="1/2")
    assert s["written"] == 1 and s["finished_total"] == 3
    assert (root / "s1" / "manifest.jsonl").read_text() == (root / "s2" / "manifest.jsonl").read_text()
    name = "sample_000001_ct.nii.gz"
    assert np.array_equal(np.asarray(nib.load(root / "s1" / "samples" / name).dataobj),
                          np.asarray(nib.load(root / "s2" / "samples" / name).dataobj))


def test_two_node_rendezvous_equals_one_rank(runs, tiny_prepared):
    """docs/distributed.md's 2-node command on one host: two torchrun launches (``--nnodes 2``, one process each)
    meet through the c10d rendezvous and train the diffusion model of the 1-rank run (no code change)."""
    import socket

    one, root = runs["one"], runs["root"]
    run = root / "nodes"
    shutil.copytree(one / "vqgan", run / "vqgan")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _torchrun_env()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lad-test",
         "-m", "lad", "train", "diffusion", "--data", str(tiny_prepared), "--run-dir", str(run), "--preset", "tiny",
         *_sets(DIFF_SET), "--no-progress"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace") for node in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:  # a node that lost its peer must not outlive the test
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    for part in ("denoiser", "denoiser_ema", "condition", "condition_raw"):
        _assert_weights_close(load_file(str(one / part / "model.safetensors")), load_file(str(run / part / "model.safetensors")), 3)
    _assert_logs_close(one / "logs" / "diffusion.jsonl", run / "logs" / "diffusion.jsonl")
