"""This process: the errors a user can cause (:mod:`.errors`), logging (:mod:`.log`), signals
turned into a stop at the next SGLD step (:mod:`.interrupt`), the CPU thread settings
(:mod:`.threads`, :mod:`.load_follower`) and the benchmarks' pool of runs (:mod:`.pool`). Imports nothing else of jemfast, and not torch (``jemfast/__init__`` uses
:mod:`.threads` before torch is imported)."""
