"""The runtime: DeepSpeed, behind one door.

engine (the policy's and reference's ZeRO-3 engines), dist (ranks and collectives), ds_config (the
DeepSpeed JSON), checkpoint and safe_load (sharded checkpoints, exact resume), run_folder (the run's
output folder), export (checkpoint -> Hugging Face folder), leftovers (what killed DeepSpeed processes
leave behind), faults (crash injection for recovery tests).
"""
