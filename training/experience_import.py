"""`batchrl data import`: experience rows (the contract in protos/experience.py, or a user's own Parquet or CSV
logs with a column mapping) reassembled into episodes and written as a Minari dataset.

Two passes over the sources, neither holding them in memory. ``scan`` reads the key columns (session, step,
ending, time) and the actions (their size, and their bounds for inferred spaces) batch by batch, and ``plan``
turns the keys into episodes: one per session, split at gaps, duplicates and rows after the end left out (two
copies of a step that differ are refused unless ``on_conflict`` says which to keep). NaN and ±inf are refused
wherever they are read.
``episode_chunks`` then reads the observations, actions and rewards of a chunk of planned episodes at a time
(of a Parquet file only the row groups holding the chunk's rows), and ``write`` appends each chunk with
Minari's own storage API (``MinariStorage.new``, ``update_metadata``, ``update_episodes``) in a staging folder
renamed into place when complete.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from batchrl.errors import UserError
from batchrl.protos.experience import ENDINGS, SHARD_PREFIX, SHARD_SUFFIX

FIELDS = ("session_id", "step", "observation", "action", "reward", "ending")
# A file without an ending column (a user's log of step rows) has no end rows: each of its episodes ends, as an
# unfinished one does, truncated at its last row. Named by --map, the column must exist.
OPTIONAL = ("ending",)
ON_CONFLICT = ("first", "last")  # which copy of a step whose copies differ is kept (by time, then file order)
FORMATS = ("experience", "parquet", "csv")
REWARD_OF = ("previous", "action")  # previous: a row carries the reward of the action before it (the log's way)
CHUNK_VALUES = 1 << 24  # observation and action values read per chunk (64 MiB of float32)
BATCH_ROWS = 65_536
NO_TIME = np.iinfo(np.int64).max


# -- sources -------------------------------------------------------------------------------------------------
@dataclass
class Source:
    path: Path
    format: str
    columns: dict[str, list[str]]  # FIELD -> the file's columns: one, or scalar columns side by side
    rows: int | None               # known ahead for Parquet

    def batches(self, columns: list[str], rows: np.ndarray | None = None, batch_size: int = BATCH_ROWS):
        """(index of the batch's first row in the file, batch of ``columns``), in file order; given ``rows``
        (sorted row indices), a Parquet file reads only the row groups holding them."""
        import pyarrow as pa

        try:
            yield from self._batches(columns, rows, batch_size)
        except pa.ArrowException as exc:  # a value the column cannot hold, a damaged file
            raise UserError(f"{self.path}: {exc}") from None

    def _batches(self, columns: list[str], rows: np.ndarray | None, batch_size: int):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if self.format == "csv":
            types = {c: _csv_type(f) for f, cols in self.columns.items() for c in cols if c in columns}
            # NaN spellings read as NaN (refused, like inf) rather than as a missing value: a value, not a hole.
            nulls = [v for v in pacsv.ConvertOptions().null_values if v.lower().lstrip("-") != "nan"]
            options = pacsv.ConvertOptions(include_columns=columns, column_types=types, strings_can_be_null=True,
                                           null_values=nulls)
            with pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                convert_options=options) as reader:
                offset = 0
                for batch in reader:
                    yield offset, batch
                    offset += batch.num_rows
            return
        file = pq.ParquetFile(self.path)
        starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
        groups = range(file.num_row_groups) if rows is None else np.unique(np.searchsorted(starts, rows, "right") - 1)
        for group in groups:
            offset = int(starts[group])
            for batch in file.iter_batches(batch_size, row_groups=[int(group)], columns=columns):
                yield offset, batch
                offset += batch.num_rows


def _csv_type(name: str):
    import pyarrow as pa

    return {"session_id": pa.string(), "ending": pa.string(), "step": pa.int64()}.get(name, pa.float64())


def find_sources(paths: list[str], format: str | None, mapping: dict[str, str]) -> list[Source]:
    """The files named or found in the folders named, each with its columns resolved from ``mapping``."""
    if format is not None and format not in FORMATS:
        raise UserError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    files = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            pattern = {"experience": f"{SHARD_PREFIX}*{SHARD_SUFFIX}", "parquet": "*.parquet",
                       "csv": "*.csv"}[format or "experience"]
            found = sorted(p for p in path.glob(pattern) if p.is_file())
            if not found:
                raise UserError(f"{path} holds no {pattern} files (give --format parquet or csv for other files)")
            files += [(p, format or "experience") for p in found]
        elif path.is_file():
            suffixes = {".parquet": "experience", ".csv": "csv"}
            if format is None and path.suffix not in suffixes:
                raise UserError(f"{path}: cannot tell its format from its name; give --format "
                                f"{'|'.join(FORMATS)}")
            files.append((path, format or suffixes[path.suffix]))
        else:
            raise UserError(f"source {given!r} is neither a file nor a folder")
    unique = {}
    for path, fmt in files:  # a file named twice (or named and in a folder named) is read once
        unique.setdefault(path.resolve(), (path, fmt))
    return [_source(path, fmt, mapping) for path, fmt in unique.values()]


def _source(path: Path, format: str, mapping: dict[str, str]) -> Source:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if format == "csv":
            with pacsv.open_csv(path) as reader:
                names, rows = reader.schema.names, None
        else:
            file = pq.ParquetFile(path)
            names, rows = file.schema_arrow.names, file.metadata.num_rows
    except pa.ArrowException as exc:
        raise UserError(f"{path} is not a readable {'CSV' if format == 'csv' else 'Parquet'} file: {exc}") from None
    columns = {f: _columns(names, mapping.get(f, f), f, path) for f in FIELDS
               if f not in OPTIONAL or f in mapping or f in names}
    for name, cols in columns.items():
        if len(cols) > 1 and name not in ("observation", "action"):
            raise UserError(f"--map {name}={mapping[name]} names {len(cols)} columns of {path}; {name} is one column")
    if format == "experience" and "time" in names:
        columns["time"] = ["time"]
    return Source(path, format, columns, rows)


def _columns(names: list[str], column: str, field_name: str, path: Path) -> list[str]:
    """The columns ``column`` names: itself, or with a trailing ``*`` every PREFIX<n> by n."""
    if column.endswith("*"):
        prefix = column[:-1]
        found = sorted((int(n[len(prefix):]), n) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())
        if found:
            return [n for _, n in found]
    elif column in names:
        return [column]
    raise UserError(f"{path} has no column {column!r} for {field_name} (--map {field_name}=COLUMN); its columns: "
                    f"{', '.join(names)}")


def parse_mapping(items: list[str]) -> dict[str, str]:
    """--map FIELD=COLUMN items as {FIELD: COLUMN}."""
    mapping = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not column or name not in FIELDS:
            raise UserError(f"--map {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}")
        if name in mapping:
            raise UserError(f"--map names {name} twice ({mapping[name]!r} and {column!r})")
        mapping[name] = column
    return mapping


# -- what the rows must fit --------------------------------------------------------------------------------
@dataclass
class Target:
    """The dataset's spaces, environment and reference scores, and where they came from (named in errors)."""
    observation_space: object
    action_space: object
    origin: str
    env_spec: object = None        # gymnasium EnvSpec
    eval_env_spec: str | None = None  # its JSON, as Minari stores it
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    metadata: dict = field(default_factory=dict)  # further Minari metadata kept (a merged dataset's)

    def size(self, name: str) -> int:
        return int(np.prod(getattr(self, f"{name}_space").shape))


def from_model(path: Path) -> Target:
    """The spaces, environment and reference scores in an exported model's manifest."""
    import onnx

    from batchrl.protos.contract import MANIFEST_KEY, manifest_from_json

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if MANIFEST_KEY not in props:
        raise UserError(f"{path} holds no batchrl manifest (metadata key {MANIFEST_KEY!r}); give a model written "
                        "by batchrl export")
    manifest = manifest_from_json(props[MANIFEST_KEY])
    spec = _env_spec(manifest.env_id, f"the environment of {path}") if manifest.env_id else None
    return Target(_box(manifest.observation_space), _box(manifest.action_space), f"the model {path}", spec,
                  spec.to_json() if spec else None,
                  manifest.ref_min_score if manifest.HasField("ref_min_score") else None,
                  manifest.ref_max_score if manifest.HasField("ref_max_score") else None)


def from_env(env_id: str) -> Target:
    from batchrl.training.evaluation import make_env

    spec = _env_spec(env_id, f"--env {env_id!r}")
    env = make_env(env_id)
    env.close()
    owner = f"environment {env_id!r}"
    return Target(_checked_box(env.observation_space, owner), _checked_box(env.action_space, owner),
                  f"environment {env_id!r}", spec, spec.to_json())


def from_dataset(ds) -> Target:
    """A Minari dataset's spaces and metadata (environment, evaluation environment, reference scores, authors)."""
    meta = ds.storage.metadata
    owned = ("total_episodes", "total_steps", "data_format", "jpeg_encoding", "observation_space", "action_space",
             "env_spec", "eval_env_spec", "dataset_id", "dataset_size", "minari_version", "ref_min_score",
             "ref_max_score")
    name = f"dataset {ds.spec.dataset_id!r}"
    return Target(_checked_box(ds.observation_space, name), _checked_box(ds.action_space, name), name, ds.env_spec,
                  meta.get("eval_env_spec"), meta.get("ref_min_score"), meta.get("ref_max_score"),
                  {k: v for k, v in meta.items() if k not in owned})


def inferred(obs_size: int, action_low: np.ndarray, action_high: np.ndarray) -> Target:
    """Unbounded observations, actions within the data's bounds (widened where constant), no environment."""
    import gymnasium as gym

    same = action_low == action_high
    return Target(gym.spaces.Box(-np.inf, np.inf, (obs_size,), np.float32),
                  gym.spaces.Box(action_low - same, action_high + same, dtype=np.float32), "the rows")


def _env_spec(env_id: str, what: str):
    import gymnasium as gym

    try:
        return gym.spec(env_id)
    except gym.error.Error as exc:
        raise UserError(f"{what}: Gymnasium cannot find environment {env_id!r}: {exc}") from None


def _box(space):
    import gymnasium as gym

    shape = tuple(space.shape)
    return gym.spaces.Box(np.asarray(space.low, np.float32).reshape(shape),
                          np.asarray(space.high, np.float32).reshape(shape), dtype=np.float32)


def _checked_box(space, owner: str):
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box):
        raise UserError(f"{owner} has the space {space}; experience rows hold flat float vectors (a Box)")
    return space


def agree(target: Target, other: Target) -> None:
    """UserError naming both sizes when ``other``'s observation or action size is not ``target``'s."""
    for name in ("observation", "action"):
        if target.size(name) != other.size(name):
            raise UserError(f"{other.origin} has {name}s of size {other.size(name)}, but {target.origin} has "
                            f"{target.size(name)}")


class Sizes:
    """The observation and action sizes the rows must have, and who said so; the first rows say so when no
    space is known ahead."""

    def __init__(self, target: Target | None):
        self.known = {n: (target.size(n), target.origin) for n in ("observation", "action")} if target else {}

    def check(self, name: str, got: np.ndarray, where: str) -> None:
        if got.size == 0:
            return
        size, origin = self.known.setdefault(name, (int(got[0]), f"the first rows ({where})"))
        bad = got[got != size]
        if bad.size:
            raise UserError(f"{where} holds {name}s of size {int(bad[0])}, but {origin} has {name}s of size {size}")


def _matrix(batch, columns: list[str], name: str, sizes: Sizes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(the non-null rows as float32 [m, d], null mask [n]) of one list column or of scalar columns side by side."""
    import pyarrow as pa
    import pyarrow.compute as pc

    first = batch.column(columns[0])
    if len(columns) == 1 and (pa.types.is_list(first.type) or pa.types.is_large_list(first.type)
                              or pa.types.is_fixed_size_list(first.type)):
        null = first.is_null().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(first).to_numpy(zero_copy_only=False)[~null].astype(np.int64)
        sizes.check(name, lengths, where)
        values = first.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return values.reshape(len(lengths), -1) if len(lengths) else values.reshape(0, 0), null
    try:
        cols = [batch.column(c).cast(pa.float64()) for c in columns]
    except pa.ArrowException as exc:
        raise UserError(f"{where}: the {name} column(s) {', '.join(columns)} do not hold numbers: {exc}") from None
    null = np.logical_and.reduce([c.is_null().to_numpy(zero_copy_only=False) for c in cols])
    sizes.check(name, np.full(int((~null).sum()), len(cols)), where)
    values = np.stack([c.to_numpy(zero_copy_only=False) for c in cols], axis=1).astype(np.float32)
    return values[~null], null


def _scalars(batch, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(the non-null values as float64 [m], null mask [n]) of one scalar column (rewards are kept in float64)."""
    import pyarrow as pa

    values = batch.column(column).cast(pa.float64())
    null = values.is_null().to_numpy(zero_copy_only=False)
    return values.to_numpy(zero_copy_only=False)[~null], null


def _at(source: Source, row: int) -> str:
    """Where a row is, as its user finds it: a CSV's line (after the header), a Parquet file's row index."""
    return f"{source.path} line {row + 2}" if source.format == "csv" else f"{source.path} row {row}"


def _place(source: Source, row: int, session: str, step: int) -> str:
    return f"{_at(source, row)}, session {session!r}, step {step}"


def refuse_non_finite(values: np.ndarray, name: str, columns: list[str], place) -> None:
    """UserError naming the first NaN or ±inf in ``values`` ([n, d], or [n]): ``place(i)`` for row i, and the
    field and column holding it. A non-finite value is refused wherever it is read, needed by an episode or not:
    it says the log is wrong, and NaN, inf and -inf alike would poison training."""
    if np.isfinite(values).all():
        return
    values = values.reshape(len(values), -1)
    i, j = np.argwhere(~np.isfinite(values))[0]
    column = columns[j] if len(columns) > 1 else columns[0]
    element = f" element {j}" if len(columns) == 1 and values.shape[1] > 1 else ""
    raise UserError(f"{place(int(i))}: the {name} (column {column!r}{element}) holds {values[i, j]}; expected a "
                    "finite number (NaN, inf and -inf are refused)")


# -- pass 1: keys ------------------------------------------------------------------------------------------
@dataclass
class Keys:
    file: np.ndarray      # [R] int64: the row's source
    row: np.ndarray       # [R] int64: its index in that file
    session: np.ndarray   # [R] int64: index into names
    step: np.ndarray      # [R] int64
    ending: np.ndarray    # [R] int8: 0 a step row, 1 terminated, 2 truncated
    time: np.ndarray      # [R] int64 (microseconds; NO_TIME where the source has none)
    names: list[str]      # session ids
    action_low: np.ndarray | None
    action_high: np.ndarray | None
    sources: list[Source]

    def at(self, k: int) -> str:
        """Where row ``k`` is: file and row (or line)."""
        return _at(self.sources[self.file[k]], self.row[k])

    def place(self, k: int) -> str:
        """Where row ``k`` is, with its session and step."""
        return _place(self.sources[self.file[k]], self.row[k], self.names[self.session[k]], self.step[k])


def scan(sources: list[Source], sizes: Sizes, progress: bool = True) -> Keys:
    """Every row's keys, read batch by batch; the observation size of each file's first rows and every action's
    size are checked on the way."""
    from tqdm.auto import tqdm

    codes: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("file", "row", "session", "step", "ending", "time")}
    low = high = None
    total = None if any(s.rows is None for s in sources) else sum(s.rows for s in sources)
    with tqdm(total=total, desc="reading keys", unit="row", disable=None if progress else True,
              dynamic_ncols=True) as bar:
        for index, source in enumerate(sources):
            where = str(source.path)
            for _, batch in source.batches(source.columns["observation"], batch_size=1024):
                _matrix(batch, source.columns["observation"], "observation", sizes, where)
                break
            wanted = [c for f in ("session_id", "step", "ending", "time", "action") for c in source.columns.get(f, [])]
            for offset, batch in source.batches(list(dict.fromkeys(wanted))):
                keys = _batch_keys(batch, source, codes)
                for key, value in keys.items():
                    parts[key].append(value)
                parts["file"].append(np.full(batch.num_rows, index, np.int64))
                parts["row"].append(np.arange(offset, offset + batch.num_rows, dtype=np.int64))
                actions, null = _matrix(batch, source.columns["action"], "action", sizes, where)
                # Every row's actions, kept or not, bound the inferred action space: none may be NaN or inf.
                present = np.flatnonzero(~null)
                refuse_non_finite(actions, "action", source.columns["action"], lambda i: _place(
                    source, offset + present[i], list(codes)[keys["session"][present[i]]], keys["step"][present[i]]))
                if len(actions):
                    low = actions.min(0) if low is None else np.minimum(low, actions.min(0))
                    high = actions.max(0) if high is None else np.maximum(high, actions.max(0))
                bar.update(batch.num_rows)
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    arrays["ending"] = arrays["ending"].astype(np.int8)
    return Keys(**arrays, names=list(codes), action_low=low, action_high=high, sources=sources)


def _batch_keys(batch, source: Source, codes: dict[str, int]) -> dict[str, np.ndarray]:
    import pyarrow as pa

    where = str(source.path)
    column = {f: batch.column(c[0]) for f, c in source.columns.items() if f in ("session_id", "step", "ending", "time")}
    ids, values = _encode(column["session_id"])
    if (ids < 0).any():
        raise UserError(f"{where} holds a row with no {source.columns['session_id'][0]!r} (session id)")
    session = np.array([codes.setdefault(v, len(codes)) for v in values], np.int64)[ids]
    step = column["step"].cast(pa.int64())
    if step.null_count or (step.to_numpy(zero_copy_only=False) < 0).any():
        raise UserError(f"{where}: the step index column {source.columns['step'][0]!r} holds a null or negative index")
    ends, words = _encode(column["ending"]) if "ending" in column else (np.full(batch.num_rows, -1), [])
    known = {"": 0, **{word: i + 1 for i, word in enumerate(ENDINGS)}}
    for word in words:
        if word not in known:
            raise UserError(f"{where}: ending {word!r} in column {source.columns['ending'][0]!r}; expected "
                            f"{' or '.join(ENDINGS)}, or null on step rows")
    ending = np.array([known[w] for w in words] + [0], np.int64)[ends]  # -1 (null) reads the appended 0
    time = (column["time"].cast(pa.int64()).fill_null(NO_TIME).to_numpy() if "time" in column
            else np.full(batch.num_rows, NO_TIME, np.int64))
    return {"session": session, "step": step.to_numpy(), "ending": ending, "time": time}


def _encode(array) -> tuple[np.ndarray, list[str]]:
    """(codes, values) with array[i] == values[codes[i]], and code -1 where array[i] is null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(array.cast(pa.string()))
    return encoded.indices.fill_null(-1).to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


# -- the plan ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    rows: np.ndarray        # indices into Keys, episode after episode, each episode's rows in step order
    starts: np.ndarray      # [E] each episode's first position in rows
    sizes: np.ndarray       # [E] its rows: steps + 1
    terminated: np.ndarray  # [E] bool: its last step terminated (else truncated)
    counts: dict[str, int]


def plan(keys: Keys, drop_unfinished: bool = False, on_conflict: str | None = None, differ=None) -> Plan:
    """Episodes from the keys: one per session, sessions in the order of their first row's time (then of
    appearance), steps by index; see docs/design.md, "Experience import". Copies of a step are compared with
    ``differ`` (``differing_values``; without it, by their endings only): see ``left_out_copies``."""
    n = len(keys.names)
    first_time, first_seen = np.full(n, NO_TIME), np.full(n, len(keys.step))
    np.minimum.at(first_time, keys.session, keys.time)
    np.minimum.at(first_seen, keys.session, np.arange(len(keys.step)))
    rank = np.empty(n, np.int64)
    rank[np.lexsort((first_seen, first_time))] = np.arange(n)
    is_end = keys.ending > 0
    # An end row before a step row of its index, the earliest of equal rows first (lexsort is stable).
    order = np.lexsort((keys.time, ~is_end, keys.step, rank[keys.session]))
    end_at = np.full(n, NO_TIME)
    np.minimum.at(end_at, keys.session[is_end], keys.step[is_end])
    limit = end_at[keys.session[order]]
    step, end = keys.step[order], is_end[order]
    keep = (step < limit) | ((step == limit) & end)
    counts = {"rows": len(keys.step), "sessions": n, "after_end": int((~keep).sum())}
    order = order[keep]
    session, step = keys.session[order], keys.step[order]
    repeat = np.r_[False, (session[1:] == session[:-1]) & (step[1:] == step[:-1])]
    left_out = left_out_copies(keys, order, repeat, on_conflict, differ, counts)
    order, session, step = order[~left_out], session[~left_out], step[~left_out]
    new_session = np.r_[True, session[1:] != session[:-1]]
    gap = ~new_session & (step != np.r_[-1, step[:-1]] + 1)
    starts = np.flatnonzero(new_session | gap)
    sizes = np.diff(np.r_[starts, len(order)])
    last = starts + sizes - 1
    finished = keys.ending[order[last]] > 0
    unfinished = ~finished & np.r_[new_session[1:], True][last]
    single = sizes == 1
    written = ~single & ~(unfinished & drop_unfinished)
    split = np.unique(session[gap])
    counts.update(missing_start=int((new_session & (step > 0)).sum()), gaps=int(gap.sum()),
                  split=len(split), split_parts=int(np.isin(session[starts], split)[written].sum()),
                  unfinished=int((unfinished & ~single).sum()), single_dropped=int(single.sum()),
                  episodes=int(written.sum()), steps=int((sizes[written] - 1).sum()))
    rows = order[np.repeat(written, sizes)]
    sizes = sizes[written]
    return Plan(rows, np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64), sizes,
                keys.ending[order[last[written]]] == 1, counts)


COMPARED = ("observation", "action", "reward", "ending")


def left_out_copies(keys: Keys, order: np.ndarray, repeat: np.ndarray, on_conflict: str | None, differ,
                    counts: dict[str, int]) -> np.ndarray:
    """Which rows of ``order`` (rows in step order, ``repeat`` where a row is another copy of the step before it)
    are left out: every copy of a step but the first, by time then file order (``on_conflict`` "last": but the
    last). Identical copies (a retried step, logged twice) are counted as duplicates; copies that differ in a value
    are refused (naming the first such step) unless ``on_conflict`` says which to keep, and counted as conflicts."""
    copies = np.flatnonzero(repeat)
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(order))))[copies]  # each copy's first copy
    a, b = order[first], order[copies]
    differs = np.zeros((len(copies), len(COMPARED)), bool)  # [copy, field]
    differs[:, COMPARED.index("ending")] = keys.ending[a] != keys.ending[b]
    if differ is not None and len(copies):
        differs[:, :3] = differ(a, b)
    conflict = differs.any(axis=1)
    steps = np.unique(first[conflict])  # the steps whose copies differ (by their first copy)
    if len(steps) and on_conflict is None:
        i = int(np.argmax(conflict))
        fields = " and ".join(f for f, d in zip(COMPARED, differs[i]) if d)
        raise UserError(f"{keys.place(a[i])} and its copy at {keys.at(b[i])} differ in {fields} ({len(steps)} "
                        f"step(s) have copies that differ); give --on-conflict first or last to keep the earliest "
                        "or the latest copy of each (by the log's time, then by order in the files)")
    counts.update(duplicates=int((~np.isin(first, steps)).sum()), conflicts=len(steps))
    return np.r_[repeat[1:], False] if on_conflict == "last" else repeat


def differing_values(sources: list[Source], keys: Keys, sizes: Sizes, target: Target, chunk_rows: int,
                     a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, 3] bool: where the copies a[i] and b[i] of a step differ in observation, action and reward (null
    equals null), read ``chunk_rows`` rows at a time."""
    out = np.zeros((len(a), 3), bool)
    half = max(1, chunk_rows // 2)
    for start in range(0, len(a), half):
        pairs = slice(start, start + half)
        read = _read(sources, keys, np.r_[a[pairs], b[pairs]], sizes, target.size("observation"),
                     target.size("action"))
        for j, values in enumerate(read):  # NaN is null here: _read refused non-finite values
            x, y = values.reshape(2, len(a[pairs]), -1)
            out[pairs, j] = ~((x == y) | (np.isnan(x) & np.isnan(y))).all(axis=1)
    return out


# -- pass 2: episodes ------------------------------------------------------------------------------------
def episode_chunks(sources: list[Source], keys: Keys, planned: Plan, target: Target, sizes: Sizes,
                   reward_of: str, chunk_rows: int):
    """Lists of Minari EpisodeBuffers, one list per chunk of planned episodes of at most ``chunk_rows`` rows."""
    from minari.data_collector import EpisodeBuffer

    obs_size, act_size = target.size("observation"), target.size("action")
    for first, stop in _chunks(planned.sizes, chunk_rows):
        begin, end = planned.starts[first], planned.starts[stop - 1] + planned.sizes[stop - 1]
        rows = planned.rows[begin:end]
        obs, act, reward = _read(sources, keys, rows, sizes, obs_size, act_size)
        buffers = []
        for e in range(first, stop):
            at = slice(planned.starts[e] - begin, planned.starts[e] - begin + planned.sizes[e])
            steps = planned.sizes[e] - 1
            earned = slice(at.start + 1, at.stop) if reward_of == "previous" else slice(at.start, at.stop - 1)
            for name, values, part in (("observation", obs, at), ("action", act, slice(at.start, at.stop - 1)),
                                       ("reward", reward, earned)):
                missing = np.flatnonzero(np.isnan(values[part]).reshape(len(values[part]), -1).any(axis=1))
                if missing.size:  # NaN is null here: _read refused non-finite values
                    raise UserError(f"{keys.place(rows[part][missing[0]])}: no {name} (null) where the episode "
                                    "needs one")
            flags = np.zeros(steps, bool)
            flags[-1] = True
            buffers.append(EpisodeBuffer(
                observations=obs[at].reshape(-1, *target.observation_space.shape),
                actions=act[at][:-1].reshape(-1, *target.action_space.shape), rewards=reward[earned],
                terminations=flags & planned.terminated[e], truncations=flags & ~planned.terminated[e], infos={}))
        yield buffers


def _chunks(sizes: np.ndarray, chunk_rows: int):
    """(first, stop) episode ranges of at most ``chunk_rows`` rows (or one episode, when it alone is more)."""
    first, held = 0, 0
    for e, size in enumerate(sizes):
        if held and held + size > chunk_rows:
            yield first, e
            first, held = e, 0
        held += size
    if held:
        yield first, len(sizes)


def _read(sources, keys: Keys, rows: np.ndarray, sizes: Sizes, obs_size: int, act_size: int):
    """Observations, actions and rewards of ``rows`` (NaN where null), read file by file; a NaN or ±inf read is
    refused, naming its place."""
    import pyarrow as pa

    obs = np.full((len(rows), obs_size), np.nan, np.float32)
    act = np.full((len(rows), act_size), np.nan, np.float32)
    reward = np.full(len(rows), np.nan)
    for index in np.unique(keys.file[rows]):
        source = sources[index]
        at = np.flatnonzero(keys.file[rows] == index)
        at = at[np.argsort(keys.row[rows[at]])]
        wanted = keys.row[rows[at]]
        columns = [c for f in ("observation", "action", "reward") for c in source.columns[f]]
        for offset, batch in source.batches(list(dict.fromkeys(columns)), rows=wanted):
            lo, hi = np.searchsorted(wanted, [offset, offset + batch.num_rows])
            if lo == hi:
                continue
            taken, dest = batch.take(pa.array(wanted[lo:hi] - offset)), at[lo:hi]
            for name, out in (("observation", obs), ("action", act), ("reward", reward)):
                values, null = (_scalars(taken, source.columns[name][0]) if name == "reward" else
                                _matrix(taken, source.columns[name], name, sizes, str(source.path)))
                present = rows[dest[~null]]
                refuse_non_finite(values, name, source.columns[name], lambda i: keys.place(present[i]))
                if len(values):
                    out[dest[~null]] = values
    return obs, act, reward


# -- writing -----------------------------------------------------------------------------------------------
def resolve_output(output: str) -> tuple[Path, str, bool]:
    """(dataset folder, dataset id, whether it is under MINARI_DATASETS_PATH): Minari's id form
    (namespace/)name-vN is an id, anything else (e.g. starting with ., / or ~) a path, whose dataset id is its
    folder's name (with -v0 added when it has no version)."""
    from minari.dataset.minari_dataset import DATASET_ID_RE
    from minari.storage import get_dataset_path

    match = DATASET_ID_RE.fullmatch(output)
    if match and match.group("version") is not None:
        return get_dataset_path(output), output, True
    path = Path(output).expanduser().resolve()
    name = re.sub(r"[^-\w]", "_", path.name) or "imported"
    return path, name if re.search(r"-v\d+$", name) else f"{name}-v0", False


def check_replaceable(folder: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or, with --overwrite, a Minari dataset."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    if not (folder / "data" / "metadata.json").is_file():
        raise UserError(f"{folder} exists and is not a Minari dataset: not replaced; choose another --output")
    if not overwrite:
        raise UserError(f"a dataset exists at {folder}; --overwrite replaces it")


class Staged:
    """A dataset folder written beside its final place and renamed there by ``finish`` (a failure leaves nothing)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.staging = folder.parent / f".{folder.name}.importing-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()

    def finish(self) -> None:
        old = self.folder.parent / f".{self.folder.name}.replaced-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            self.folder.rename(old)
        self.staging.rename(self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def new_storage(data_path: Path, dataset_id: str, target: Target, description: str, data_format: str = "hdf5"):
    """An empty Minari storage holding the target's spaces, environment, reference scores and metadata."""
    import minari
    from minari.dataset.minari_storage import MinariStorage

    storage = MinariStorage.new(data_path, observation_space=target.observation_space,
                                action_space=target.action_space, env_spec=target.env_spec, data_format=data_format)
    meta = {"algorithm_name": "batchrl data import", "author": {"batchrl data import"}, "description": description,
            **target.metadata, "dataset_id": dataset_id, "minari_version": minari.__version__}
    for key in ("eval_env_spec", "ref_min_score", "ref_max_score"):
        if getattr(target, key) is not None:
            meta[key] = getattr(target, key)
    storage.update_metadata(meta)
    return storage


def copy_episodes(ds, chunk_rows: int):
    """A Minari dataset's episodes as lists of EpisodeBuffers of about ``chunk_rows`` steps (infos not kept)."""
    from minari.data_collector import EpisodeBuffer

    buffers, held = [], 0
    for ep in ds.iterate_episodes():
        buffers.append(EpisodeBuffer(observations=ep.observations, actions=ep.actions, rewards=ep.rewards,
                                     terminations=ep.terminations, truncations=ep.truncations, infos={}))
        held += len(ep.rewards)
        if held >= chunk_rows:
            yield buffers
            buffers, held = [], 0
    if buffers:
        yield buffers


@dataclass
class Summary:
    folder: Path
    dataset_id: str
    by_id: bool                          # written under MINARI_DATASETS_PATH (else at a path)
    files: int
    counts: dict[str, int]               # Plan.counts
    drop_unfinished: bool
    target: Target
    merged: tuple[str, int, int] | None  # (dataset id, episodes, steps) copied first
    on_conflict: str | None = None       # which copy of a step whose copies differ was kept
    without_ending: int = 0              # files without an ending column

    def __str__(self) -> str:
        c, t = self.counts, self.target
        where = f"dataset {self.dataset_id!r} at {self.folder}" if self.by_id else \
            f"{self.folder} (dataset id {self.dataset_id!r})"
        lines = [f"wrote {c['episodes']} episodes, {c['steps']} steps from {c['rows']} rows of {self.files} file(s) "
                 f"({c['sessions']} sessions) to {where}"]
        if self.merged:
            lines.append(f"after the {self.merged[1]} episodes, {self.merged[2]} steps of {self.merged[0]!r} (--merge)")
        conflicts = f"steps whose copies differ: {c['conflicts']} (kept the {self.on_conflict} copy of each); " \
            if c["conflicts"] else ""
        lines += [f"duplicate rows removed: {c['duplicates']}; {conflicts}rows after an episode's end ignored: "
                  f"{c['after_end']}",
                  f"gaps (missing steps): {c['gaps']}, splitting {c['split']} episode(s) into {c['split_parts']} "
                  f"written part(s); episodes missing their first steps: {c['missing_start']}",
                  f"unfinished episodes (no end row) "
                  f"{'dropped' if self.drop_unfinished else 'truncated at their last row'}: {c['unfinished']}; "
                  f"parts of a single row (no step) dropped: {c['single_dropped']}"]
        if self.without_ending:
            lines.append(f"files without an ending column (no end rows: their episodes are unfinished): "
                         f"{self.without_ending}")
        scores = f"{t.ref_min_score} .. {t.ref_max_score}" if t.ref_max_score is not None else "none"
        lines.append(f"spaces, environment and reference scores from {t.origin}: environment {t.env_spec.id}, "
                     f"reference scores {scores}" if t.env_spec is not None else
                     f"spaces from {t.origin}; no environment spec written: batchrl train, which evaluates in the "
                     "dataset's environment, stops at its first evaluation (import with --env or --model)")
        lines.append(f"train with: batchrl train --dataset {self.dataset_id if self.by_id else self.folder} --algo ...")
        return "\n".join(lines)


def import_experience(sources: list[str], output: str, *, model: Path | None = None, merge: str | None = None,
                      env: str | None = None, format: str | None = None, mapping: dict[str, str] | None = None,
                      reward_of: str = "previous", drop_unfinished: bool = False, overwrite: bool = False,
                      on_conflict: str | None = None, progress: bool = True, chunk_rows: int | None = None) -> Summary:
    """Import experience rows from ``sources`` into the Minari dataset ``output`` (an id or a path)."""
    from batchrl.training.data import open_minari

    if reward_of not in REWARD_OF:
        raise UserError(f"--reward-of {reward_of!r}: expected one of {', '.join(REWARD_OF)}")
    if on_conflict is not None and on_conflict not in ON_CONFLICT:
        raise UserError(f"--on-conflict {on_conflict!r}: expected one of {', '.join(ON_CONFLICT)}")
    if env and (model or merge):
        raise UserError(f"--env {env!r}: the environment comes from {'--model' if model else '--merge'} here; "
                        "give --env only without them")
    folder, dataset_id, by_id = resolve_output(output)
    check_replaceable(folder, overwrite)
    found = find_sources(sources, format, mapping or {})
    merged = open_minari(merge) if merge else None
    given = given_target(merged, model, env)
    sizes = Sizes(given)
    keys = scan(found, sizes, progress)
    if not len(keys.step):
        raise UserError(f"no rows in {', '.join(sources)}")
    if not given and (keys.action_low is None or "observation" not in sizes.known):
        raise UserError(f"no step row with an observation and an action in {', '.join(sources)}")
    target = given or inferred(sizes.known["observation"][0], keys.action_low, keys.action_high)
    chunk_rows = chunk_rows or max(1, CHUNK_VALUES // (target.size("observation") + target.size("action")))
    planned = plan(keys, drop_unfinished, on_conflict,
                   functools.partial(differing_values, found, keys, sizes, target, chunk_rows))
    if planned.counts["episodes"] == 0 and not merged:
        raise UserError(f"no episode of at least one step in the {len(keys.step)} rows of {', '.join(sources)}")
    copied = (merged.spec.dataset_id, merged.total_episodes, merged.total_steps) if merged else None
    chunks = itertools.chain(copy_episodes(merged, chunk_rows) if merged else (),
                             episode_chunks(found, keys, planned, target, sizes, reward_of, chunk_rows))
    write(folder, dataset_id, by_id, target, chunks,
          planned.counts["episodes"] + (copied[1] if copied else 0), merged.storage.FORMAT if merged else "hdf5",
          f"experience imported by batchrl data import from {len(found)} file(s)", progress)
    return Summary(folder, dataset_id, by_id, len(found), planned.counts, drop_unfinished, target, copied,
                   on_conflict, sum("ending" not in s.columns for s in found))


def given_target(merged, model: Path | None, env: str | None) -> Target | None:
    """What --merge, else --model, else --env say about the dataset (--model must agree in sizes with --merge)."""
    given = [t for t in (from_dataset(merged) if merged else None, from_model(model) if model else None,
                         from_env(env) if env else None) if t is not None]
    for other in given[1:]:
        agree(given[0], other)
    return given[0] if given else None


def write(folder: Path, dataset_id: str, by_id: bool, target: Target, chunks, episodes: int, data_format: str,
          description: str, progress: bool) -> None:
    """Append ``chunks`` (lists of EpisodeBuffers) to a new Minari dataset staged beside ``folder``, then rename
    it there; an id written under MINARI_DATASETS_PATH (``by_id``) gets its namespace created as Minari's
    create_dataset_from_buffers does."""
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces
    from tqdm.auto import tqdm

    namespace = parse_dataset_id(dataset_id)[0] if by_id else None
    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)
    staged = Staged(folder)
    try:
        storage = new_storage(staged.staging / "data", dataset_id, target, description, data_format)
        with tqdm(total=episodes, desc="writing episodes", unit="episode", disable=None if progress else True,
                  dynamic_ncols=True) as bar:
            for buffers in chunks:
                storage.update_episodes(buffers)
                bar.update(len(buffers))
        staged.finish()
    except BaseException:
        staged.abandon()
        raise
