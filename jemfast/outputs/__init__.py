"""What a run writes for people to read (docs/training.md "Outputs"): ``metrics.jsonl``
(:mod:`.metrics`), ``summary.json`` (:mod:`.summary`), sample pictures in ``samples/``
(:mod:`.plots`) and ``curves.png`` (:mod:`.curves`); the benchmarks' reports
(:mod:`.divergence_matrix`, :mod:`.recipe_report`) and the results.jsonl rows they are written
from (:mod:`.result_rows`). Checkpoints are :mod:`jemfast.rundir`'s."""
