"""ALPNet: adaptive local prototype pooling (Ouyang et al., TMI 2022), with its training loss.

Per episode, support features ``(C, h, w)`` and the support mask (bilinearly resized to ``h x w``) give

* local prototypes: features average-pooled over non-overlapping ``window x window`` cells (4x4 in
  training, 2x2 at test) where the pooled mask exceeds the threshold (0.95);
* a global foreground prototype: the masked average of the support features;

foreground uses local + global prototypes, background the local ones (global alone when no cell passes
the threshold). A query pixel's score for a class is ``sum_k softmax(s)_k s_k`` over its cosine
similarities ``s_k = 20 cos(f, p_k)`` to that class's prototypes (a soft maximum). The scores
``[background, foreground]`` are bilinearly upsampled to the image and trained with cross-entropy
(weights 0.05 / 1.0) plus the alignment loss: the query's predicted mask is used as the support to
segment the support image back (unweighted cross-entropy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lad.downstream.ssl.backbone import build_resnet

__all__ = ["ALPNet", "local_prototypes", "global_prototype", "prototype_scores", "class_score", "alpnet_loss"]

# grey CT in [0, 1] -> the ImageNet/COCO input statistics (mean/std of the three channels, averaged)
_MEAN, _STD = 0.449, 0.226


def local_prototypes(features: torch.Tensor, mask: torch.Tensor, *, window: int, threshold: float) -> torch.Tensor:
    """Local prototypes: features (C, h, w), mask (h, w) float in [0, 1] -> (N, C), the ``window``-pooled feature
    cells whose pooled mask is > ``threshold`` (row-major order)."""
    c = features.shape[0]
    pf = F.avg_pool2d(features[None], window)[0].reshape(c, -1).t()
    pm = F.avg_pool2d(mask[None, None].to(features.dtype), window).reshape(-1)
    return pf[pm > threshold]


def global_prototype(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average pooling: features (C, h, w), mask (h, w) -> (1, C)."""
    m = mask.to(features.dtype)
    return ((features * m).sum(dim=(1, 2)) / (m.sum() + 1e-5))[None]


def prototype_scores(query: torch.Tensor, protos: torch.Tensor, *, temperature: float = 20.0) -> torch.Tensor:
    """Soft-max-pooled cosine similarity: query (C, h, w), protos (N, C) -> (h, w)."""
    q = F.normalize(query, dim=0, eps=1e-2)
    p = F.normalize(protos, dim=1, eps=1e-2)
    dists = torch.einsum("chw,nc->nhw", q, p) * temperature
    return (F.softmax(dists, dim=0) * dists).sum(dim=0)


def class_score(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, *, window: int, threshold: float,
                with_global: bool, temperature: float = 20.0) -> torch.Tensor:
    """One class's score map: query / support features (C, h, w), support mask (h, w) -> (h, w).

    ``with_global``: local + global prototypes (foreground, "gridconv+"); otherwise local only ("gridconv").
    With no local prototype over the threshold, the global prototype alone (Ouyang's "mask" mode).
    """
    protos = local_prototypes(support, mask, window=window, threshold=threshold)
    if with_global or protos.shape[0] == 0:
        protos = torch.cat([protos, global_prototype(support, mask)], dim=0)
    return prototype_scores(query, protos, temperature=temperature)


class ALPNet(nn.Module):
    """ResNet encoder (output stride 8 by default) + 1x1 projection + adaptive local prototype pooling.

    ``forward(support_image, support_mask, query_image)``: images (B, 1, H, W) float in [0, 1], support mask
    (B, H, W) float {0, 1} -> logits (B, 2, H, W) [background, foreground]. The pooling window is
    ``train_window`` in ``train()`` mode and ``test_window`` in ``eval()`` mode unless given.
    """

    def __init__(self, *, backbone: str = "resnet101", width: int = 64, output_stride: int = 8, feature_channels: int = 256,
                 train_window: int = 4, test_window: int = 2, fg_threshold: float = 0.95, bg_threshold: float = 0.95,
                 temperature: float = 20.0):
        super().__init__()
        self.config = {"backbone": backbone, "width": width, "output_stride": output_stride, "feature_channels": feature_channels,
                       "train_window": train_window, "test_window": test_window, "fg_threshold": fg_threshold,
                       "bg_threshold": bg_threshold, "temperature": temperature}
        self.encoder = build_resnet(backbone, width=width, output_stride=output_stride)
        self.localconv = nn.Conv2d(self.encoder.out_channels, feature_channels, 1, bias=False)
        self.train_window, self.test_window = train_window, test_window
        self.fg_threshold, self.bg_threshold, self.temperature = fg_threshold, bg_threshold, temperature

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 1, H, W) float in [0, 1] -> (B, feature_channels, H / s, W / s)."""
        x = ((image - _MEAN) / _STD).expand(-1, 3, -1, -1)
        return self.localconv(self.encoder(x))

    def scores(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, window: int) -> torch.Tensor:
        """Feature-resolution scores of one episode: query / support features (C, h, w), support mask (H, W) -> (2, h, w)."""
        fg = F.interpolate(support_mask[None, None].float(), size=support.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        bg = F.interpolate((1 - support_mask)[None, None].float(), size=support.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        s_bg = class_score(query, support, bg, window=window, threshold=self.bg_threshold, with_global=False, temperature=self.temperature)
        s_fg = class_score(query, support, fg, window=window, threshold=self.fg_threshold, with_global=True, temperature=self.temperature)
        return torch.stack([s_bg, s_fg])

    def forward(self, support_image: torch.Tensor, support_mask: torch.Tensor, query_image: torch.Tensor,
                window: int | None = None, return_features: bool = False):
        b = support_image.shape[0]
        window = window or (self.train_window if self.training else self.test_window)
        feats = self.features(torch.cat([support_image, query_image]))
        sf, qf = feats[:b], feats[b:]
        out = torch.stack([self.scores(qf[i], sf[i], support_mask[i], window) for i in range(b)])
        logits = F.interpolate(out, size=query_image.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, sf, qf) if return_features else logits

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> None:
        """``folder/config.json`` + ``folder/model.safetensors`` (atomically)."""
        from safetensors.torch import save_file

        from lad.utils.atomic import atomic_dir

        with atomic_dir(Path(folder)) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps({**self.config, **(extra or {})}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "ALPNet":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        model = cls(**{k: cfg[k] for k in ("backbone", "width", "output_stride", "feature_channels", "train_window", "test_window",
                                           "fg_threshold", "bg_threshold", "temperature")})
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device=device))
        return model


def alpnet_loss(model: ALPNet, batch: dict[str, torch.Tensor], *, class_weights: tuple[float, float] = (0.05, 1.0),
                align_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Weighted cross-entropy on the query + alignment loss (query prediction segments the support back).

    batch: ``support_image``/``query_image`` (B, 1, H, W), ``support_mask`` (B, H, W) float, ``query_label`` (B, H, W) int64.
    Returns ``loss`` (total), ``query_loss``, ``align_loss`` (scalars).
    """
    logits, sf, qf = model(batch["support_image"], batch["support_mask"], batch["query_image"], return_features=True)
    w = torch.tensor(class_weights, dtype=logits.dtype, device=logits.device)
    q_loss = F.cross_entropy(logits, batch["query_label"], weight=w)
    window = model.train_window if model.training else model.test_window
    pred = logits.argmax(dim=1).float()  # (B, H, W); no gradient through the argmax, as in Ouyang et al.
    back = torch.stack([model.scores(sf[i], qf[i], pred[i], window) for i in range(pred.shape[0])])
    back = F.interpolate(back, size=batch["support_mask"].shape[-2:], mode="bilinear", align_corners=False)
    a_loss = F.cross_entropy(back, batch["support_mask"].long())
    return {"loss": q_loss + align_weight * a_loss, "query_loss": q_loss.detach(), "align_loss": a_loss.detach()}
