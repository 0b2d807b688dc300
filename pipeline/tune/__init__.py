"""Ray Tune sweeps: one Ray Train run per trial over the shared feature store, ASHA on the holdout metric."""
