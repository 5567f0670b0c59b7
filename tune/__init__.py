"""jemfast.tune: Ray Tune search for stable, accurate JEM settings (``python -m jemfast.tune``).

- :mod:`jemfast.tune.objective`: the score (validation accuracy + energy-gap stability - restart
  penalties); pure Python, usable without Ray.
- :mod:`jemfast.tune.space`: the searched parameters and their ranges (Ray search spaces,
  checked against the config's declared bounds).
- :mod:`jemfast.tune.plan`: the command's options, the experiment plan and its directory.
- :mod:`jemfast.tune.trainable`: the function trainable around ``jemfast.train.train``
  (:mod:`jemfast.tune.restore`: a Tune checkpoint back into a trial's run directory).
- :mod:`jemfast.tune.run`: Ray start-up, the Tuner, graceful stop, outputs.
- :mod:`jemfast.tune.results`: results table, best command, search plot.
- :mod:`jemfast.tune.cli`: the command line (local Ray or an existing cluster).

Ray is imported only by the trainable and when the command runs, so importing this package
works without the ``tune`` extra (``pip install 'jemfast[tune]'``).
"""
from .objective import ScoreWeights, evaluate, quality, score

__all__ = ["ScoreWeights", "evaluate", "quality", "score"]
