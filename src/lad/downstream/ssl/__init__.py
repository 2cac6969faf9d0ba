"""SSL-ALPNet (Ouyang et al., TMI 2022): self-supervised few-shot organ segmentation, paper section 4.3.

The method, in the order it runs:

* ``superpixels``: Felzenszwalb pseudolabels per axial slice inside a body mask;
* ``data``: slices of real (prepared) and synthetic (``lad sample``) volumes, test scans with organ labels;
* ``episodes``: one superpixel as support and query under two random augmentations;
* ``backbone`` / ``alpnet``: a (dilated) ResNet encoder with adaptive local prototype pooling;
* ``train``: SGD with the paper's schedule, checkpoints and resume;
* ``protocol``: the 1-shot evaluation (support/query chunking, Dice per scan);
* ``experiment``: ``run_ssl`` (``lad downstream ssl``): several seeds, results.json and dice.png.
"""

from lad.downstream.ssl.experiment import SSLExperimentConfig, load_ssl_config, plot_comparison, run_ssl

__all__ = ["SSLExperimentConfig", "load_ssl_config", "plot_comparison", "run_ssl"]
