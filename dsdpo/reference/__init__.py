"""The reference model: one interface, four kinds (interface), and its refresh (refresh, TR-DPO)."""
