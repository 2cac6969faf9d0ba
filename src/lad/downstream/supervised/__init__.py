"""``lad downstream supervised``: the tumour-scaling protocol (real vs real + k x synthetic at several real sizes).

``data`` (windows, synthetic samples, stitched test patients), ``metrics`` (DSC, NSD, sensitivities),
``experiment`` (training, evaluation, results.json + scaling.png).
"""

from lad.downstream.supervised.experiment import ARMS, SupervisedConfig, load_supervised_config, run_supervised

__all__ = ["ARMS", "SupervisedConfig", "load_supervised_config", "run_supervised"]
