"""Theory instruments: the rank advisor (:mod:`lrkd.diagnostics.rank`) and diagnostics."""
