"""A training run: its set-up before start-up (setup), the loop (loop), a step redone after running
out of memory (out_of_memory), when it saves and what a resume brings back (checkpoint_policy), its
held-out evaluations (evaluations), stopping it (stopping), what it reports (metrics, trackers, plot),
the demo run (demo)."""
