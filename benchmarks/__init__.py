"""Benchmarks (not tests): sweep files in sweeps/, measurement scripts here, results in results/."""
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
