"""Runs of several processes launched by ``torchrun``: the process group, rank 0 and small
collectives (:mod:`.ranks`), the replay-buffer shards of the ranks in one checkpoint
(:mod:`.shards`), and the data-parallel trainer (:mod:`.trainer`)."""
