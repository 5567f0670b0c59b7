"""The run on disk: ``--out`` and what brings a run back from it.

:mod:`.directory` (taking ``--out``, ``--overwrite``, the ring of good checkpoints),
:mod:`.lock` (one process per run directory), :mod:`.checkpoint` (what a checkpoint holds;
written atomically, read weights-only, restored all or nothing), :mod:`.checkpoint_schema` and
:mod:`.checkpoint_values` (a file's whole structure checked before any of it is used),
:mod:`.resume` (what ``--resume`` does with changed flags), :mod:`.writable` (directories a
command will write, checked first).
"""
