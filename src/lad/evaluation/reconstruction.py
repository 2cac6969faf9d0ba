"""How well the VQ-GAN reconstructs windows it was not trained on, in HU.

Samples are decoded by the VQ-GAN, so they cannot look better than its reconstructions (the latent
space of section 3.2 bounds the whole generator). ``lad train vqgan`` writes this report into
``RUN/vqgan_reconstruction.json`` at its end; ``lad evaluate`` shows it beside the sample metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad.data.labels import ORGAN_LABELS, unit_to_hu
from lad.evaluation.anatomy import BODY_HU

__all__ = ["reconstruction_report", "write_reconstruction_report", "RECON_ORGANS"]

RECON_ORGANS = ("liver", "kidney", "spleen", "pancreas")


@torch.no_grad()
def reconstruction_report(vqgan, dataset, *, device: str | torch.device = "cpu", batch_size: int = 2) -> dict[str, Any]:
    """Reconstruction errors and codebook use of ``vqgan`` over every window of ``dataset``.

    ``vqgan``: a ``VQGAN`` (anything with ``encode``, ``quantize``, ``decode`` and ``config["num_embeddings"]``; images ``(B, 1, D, H, W)``
    in [0, 1]); ``dataset``: a ``PreparedDataset`` (items with ``image`` and, for the per-organ errors, ``organs``). Reconstructions
    are clipped to [0, 1] (the HU window [-1000, 400]) before the comparison. Returns, pooled over all
    windows:

    * ``mae_body_hu``: mean |reconstruction - real| (HU) over the body, i.e. voxels above -500 HU in the real window;
    * ``bias_body_hu``: mean (reconstruction - real) (HU) over the same voxels (positive = too bright);
    * ``mae_hu``: mean |reconstruction - real| (HU) over every voxel;
    * ``organ_mean_hu_error``: per organ (liver, kidney, spleen, pancreas), mean reconstructed HU minus mean
      real HU inside the organ's label (None when no window holds it);
    * ``codes_used`` (distinct codebook entries chosen), ``num_embeddings``, ``perplexity`` (exp of the
      entropy of the code frequencies: the number of equally used codes that would give the same entropy);
    * ``n_windows``.

    The model is evaluated in eval mode (the EMA codebook is not updated) and left in the mode it came in.
    """
    if len(dataset) == 0:
        raise ValueError("reconstruction_report needs at least one window")
    was_training = vqgan.training
    vqgan.eval()
    abs_body = bias_body = abs_all = 0.0
    n_body = n_all = 0
    organ_sum = {o: [0.0, 0.0] for o in RECON_ORGANS}  # [sum recon HU, sum real HU]
    organ_n = {o: 0 for o in RECON_ORGANS}
    counts: np.ndarray | None = None
    n_codes = int(vqgan.config["num_embeddings"])
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            x = torch.from_numpy(np.stack([it["image"] for it in items])).to(device)
            q = vqgan.quantize(vqgan.encode(x))
            recon = vqgan.decode(q.z_q).clamp(0, 1).float().cpu().numpy()
            idx = q.indices.cpu().numpy().ravel()
            c = np.bincount(idx, minlength=n_codes)
            counts = c if counts is None else counts + c
            for it, r in zip(items, recon):
                real_hu, rec_hu = unit_to_hu(it["image"][0]).astype(np.float64), unit_to_hu(r[0]).astype(np.float64)
                diff = rec_hu - real_hu
                body = real_hu > BODY_HU
                abs_body += float(np.abs(diff[body]).sum())
                bias_body += float(diff[body].sum())
                n_body += int(body.sum())
                abs_all += float(np.abs(diff).sum())
                n_all += diff.size
                if it.get("organs") is None:  # a Dataset without organ maps: no per-organ errors
                    continue
                organs = it["organs"][0]
                for o in RECON_ORGANS:
                    sel = organs == ORGAN_LABELS[o]
                    organ_sum[o][0] += float(rec_hu[sel].sum())
                    organ_sum[o][1] += float(real_hu[sel].sum())
                    organ_n[o] += int(sel.sum())
    finally:
        vqgan.train(was_training)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "mae_body_hu": abs_body / n_body if n_body else None,
        "bias_body_hu": bias_body / n_body if n_body else None,
        "mae_hu": abs_all / n_all,
        "organ_mean_hu_error": {o: (organ_sum[o][0] - organ_sum[o][1]) / organ_n[o] if organ_n[o] else None for o in RECON_ORGANS},
        "codes_used": int((counts > 0).sum()),
        "num_embeddings": n_codes,
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "n_windows": len(dataset),
        "body_hu": BODY_HU,
    }


def write_reconstruction_report(vqgan, data: str | Path, path: str | Path, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`reconstruction_report` on the held-out (``test``) windows of prepared dataset ``data`` (the
    training windows when it has none, recorded in ``split``), written atomically to ``path``."""
    from lad.data.dataset import PreparedDataset
    from lad.utils.atomic import write_json

    ds = PreparedDataset(data, split="test")
    split = "test"
    if len(ds) == 0:
        ds, split = PreparedDataset(data, split="train"), "train (no test split)"
    report = {**reconstruction_report(vqgan, ds, device=device), "split": split, "data": str(Path(data).resolve())}
    write_json(path, report)
    return report
