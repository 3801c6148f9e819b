"""A trainer's data path in a process of its own, for measuring what a dataset costs in memory.

    python -m tests.training.map_dataset DATASET

Prints one JSON line of /proc/self/smaps_rollup figures (kB) before the dataset is loaded, then one
after it is loaded, a sampler built, every page of its arrays read and 100 batches drawn; then
waits for a line on stdin (or its end) and exits.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch


def memory() -> dict[str, int]:
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[key] = int(rest.split()[0])
    return {"pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"], "rss": fields["Rss"]}


def main(dataset: str) -> None:
    from batchrl.training.data import load_dataset, open_minari
    from batchrl.training.sampling import ReplaySampler

    torch.set_num_threads(1)
    # What loading costs besides the data, before measuring: the libraries' first-use allocations and the
    # Minari dataset's metadata (opened again by load_dataset).
    warm = torch.arange(10.0)[torch.randint(10, (4,))] * 2
    del warm
    open_minari(dataset)
    print(json.dumps(memory()), flush=True)
    data = load_dataset(dataset)
    mean, std = data.observation_stats()
    sampler = ReplaySampler(data, mean, std, torch.device("cpu"), seed=0)
    checksum = sum(float(t.numpy().sum(dtype=np.float64)) for t in (sampler.obs, sampler.next_obs, sampler.actions,
                                                      sampler.rewards, sampler.terminals))
    for _ in range(100):
        sampler.sample(256)
    print(json.dumps({**memory(), "checksum": checksum}), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1])
