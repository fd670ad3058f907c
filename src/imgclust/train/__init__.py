"""The shared training machinery: one loop (``loop``), one optimiser/schedule module (``optim``),
one checkpoint format (``checkpoint``) and the process-group helpers (``dist``) it runs on."""
