"""Pure loss functions, one module per paper: each takes tensors and returns a tensor (or a small
record of tensors), validates its arguments with a one-line error listing the allowed values, and
carries a doctest-style example. Methods, refiners and ``pretrain`` import them from here."""
