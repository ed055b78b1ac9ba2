"""What every mode-space optimizer shares, in torch.optim's conventions: a wrapper that *is* a
``torch.optim.Optimizer`` sharing its base's param groups and state (:mod:`.wrapping`), the guard of
the trainable set (:mod:`.param_groups`), the NaN/inf policy (:mod:`.nonfinite`), phase hooks and
argument checks (:mod:`.settings`)."""
