"""The runtime: DeepSpeed, behind one door.

engine (the policy's and reference's ZeRO-3 engines), zero (a step's mechanics and every DeepSpeed
internal dsdpo reads), dist (ranks and collectives), ds_config (the DeepSpeed JSON), checkpoint and
safe_load (sharded checkpoints, exact resume), run_folder (the run's output folder), export
(checkpoint -> Hugging Face folder), estimate (DeepSpeed's own model-state estimator), leftovers (what
killed DeepSpeed processes leave behind), faults (crash injection for recovery tests).

Only this sub-package imports deepspeed (tests/test_imports.py).
"""
