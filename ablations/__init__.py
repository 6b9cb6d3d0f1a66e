"""d2c_ablations: the sweep command (`python ablations/run.py`, `d2c-sweep`, `python -m d2c_ablations`),
the harness behind it (d2c_harness.py), its Hydra config tree (conf/) and plugins (hydra_plugins/)."""
