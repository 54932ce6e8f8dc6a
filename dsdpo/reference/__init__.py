"""The reference model: one interface, four kinds (interface), the precomputed scores file (scores_file),
and its refresh (refresh, TR-DPO)."""
