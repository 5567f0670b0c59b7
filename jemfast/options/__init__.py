"""Options and the command line: how an option is declared with its flag, help and bounds
(:mod:`.schema`), every setting of a run declared once (:mod:`.config`: :class:`Config` and
its sections, presets, validation), the JEM family's recipes (:mod:`.recipes`, ``--recipe``),
and the flags, one-line errors and exit codes of the CLIs
(:mod:`.cli`)."""
