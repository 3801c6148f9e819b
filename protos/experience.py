"""The experience log's contract: the rows `batchrl serve --log-experience DIR` writes and
`batchrl data import` reads back into a Minari dataset.

One row per answered session step, and one more when the client closes the session with the
episode's end (CloseSession carrying the final observation, reward and ending):

  session_id   string                 the session (one session = one episode)
  step         int64                  the step's index in the episode (0 for the first); the end row
                                      has index N for an episode of N steps
  observation  list<float32>          the observation of this step, flattened (the end row: the final one)
  action       list<float32> | null   the action answered, flattened, after any sampling noise; null on
                                      the end row
  reward       float64 | null         the reward earned by the previous action (what the step carried);
                                      null on step 0
  ending       string | null          null on step rows; "terminated" or "truncated" on the end row
  model        string                 the model name and the version that answered
  version      int64
  time         timestamp[us, UTC]     wall time at which the server answered

So an episode of N steps is rows 0..N-1 plus the end row N: N+1 observations, N actions, and the N
rewards carried by rows 1..N. A retried step may appear twice (the same index and answer); an
episode whose end row is missing was never closed with its end (the client stopped, the session
expired, or the server was killed). Shards are Parquet files named
``experience-<host>-<pid>-<UTC start>-<seq>.parquet``, one series per server process.

Numpy-free and pyarrow-free at import: ``schema()`` imports pyarrow (the `experience` extra).
"""
from __future__ import annotations

COLUMNS = ("session_id", "step", "observation", "action", "reward", "ending", "model", "version", "time")
ENDINGS = ("terminated", "truncated")
SHARD_PREFIX, SHARD_SUFFIX = "experience-", ".parquet"


def schema():
    import pyarrow as pa

    return pa.schema([
        ("session_id", pa.string()),
        ("step", pa.int64()),
        ("observation", pa.list_(pa.float32())),
        ("action", pa.list_(pa.float32())),
        ("reward", pa.float64()),
        ("ending", pa.string()),
        ("model", pa.string()),
        ("version", pa.int64()),
        ("time", pa.timestamp("us", tz="UTC")),
    ])
