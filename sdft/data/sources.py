"""Where a dataset given by name comes from: a local file (JSON lines, JSON, Parquet, CSV), a folder written
by ``Dataset.save_to_disk``, or a Hugging Face Hub dataset id.

A Hub id names its split and configuration after colons: ``ORG/NAME`` (the caller's default split: ``train``
for training data, ``test`` for held-out data, TRL's ``dataset_train_split`` / ``dataset_test_split``),
``ORG/NAME:SPLIT`` or ``ORG/NAME:CONFIG:SPLIT``; a split may be sliced as ``datasets`` slices it
(``train[:1000]``). ``ORG/NAME@REVISION`` pins a branch, tag or commit (as the Hub's file system names one).
A name is a Hub id only where no file or folder of that name exists, and only when it has no data file's
suffix (a missing ``data/train.jsonl`` is a missing file, never a Hub lookup).

``read_rows(name, split)`` gives the rows and, for messages, where each came from (``file:LINE``, or None:
the caller numbers them).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

HELD_OUT_SPLIT = "test"  # a Hub id's split for held-out data when it names none (TRL's dataset_test_split)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")  # the files read as rows
FILE_SUFFIXES = DATA_SUFFIXES + (".txt", ".arrow")  # names never looked up on the Hub
HUB_NAME = re.compile(r"(?P<id>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?"
                      r"(?::(?P<first>[^:\[\]]+(?:\[[^\]]*\])?))?(?::(?P<second>[^:\[\]]+(?:\[[^\]]*\])?))?")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not data
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); save the dataset as UTF-8") from None


def read_rows(data, split: str) -> tuple[list, list[str] | None, str]:
    """(rows, wheres, name) of the dataset a path or Hub id names; ``split``: a Hub id's split when it
    names none."""
    if not str(data).strip():
        raise ValueError("dataset: the name is empty (give a file, a saved dataset folder or a Hub id)")
    path = Path(data).expanduser()
    if path.is_file():
        return (*_file_rows(path), str(path))
    if path.is_dir():
        return _saved_rows(path, split), None, str(path)
    text = str(data)
    match = HUB_NAME.fullmatch(text)
    if match is None or path.suffix.lower() in FILE_SUFFIXES:
        form = " (nor a Hub id: ORG/NAME[@REVISION][:CONFIG][:SPLIT])" if ":" in text and match is None else ""
        raise FileNotFoundError(f"dataset file not found: {path}{form}")
    config, split = (match["first"], match["second"]) if match["second"] else (None, match["first"] or split)
    pinned = f"{match['id']}@{match['revision']}" if match["revision"] else match["id"]
    return _hub_rows(match["id"], config, split, match["revision"]), None, f"{pinned} {split}"


def _file_rows(path: Path) -> tuple[list, list[str] | None]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path), None
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    return _json_rows(path)


def _json_rows(path: Path) -> tuple[list, list[str] | None]:
    """JSON lines (``path:LINE``, as a JSON error names it), or one JSON list of rows (any suffix)."""
    text = read_text(path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        return _whole_json(path, text), None
    rows, wheres = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
                wheres.append(f"{path}:{i}")
            except json.JSONDecodeError as err:
                try:  # one pretty-printed object or list spread over lines
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from None
                return (whole if isinstance(whole, list) else [whole]), None
    return rows, wheres


def _whole_json(path: Path, text: str) -> list:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a .json dataset must hold a list of rows, got {type(rows).__name__}")
    return rows


def _csv_rows(path: Path, delimiter: str) -> tuple[list, list[str]]:
    """A header row, then a record a row; messages name the line a record ends on (a quoted field may span
    lines)."""
    lines = read_text(path).splitlines(keepends=True)
    reader = csv.DictReader(lines, delimiter=delimiter)
    rows, wheres = [], []
    try:
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{reader.line_num}: more fields than the header names")
            rows.append(row)
            wheres.append(f"{path}:{reader.line_num}")
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return rows, wheres


def _parquet_rows(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None


def _saved_rows(path: Path, split: str) -> list:
    """A folder of ``Dataset.save_to_disk`` (a DatasetDict's: its ``split``)."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise ValueError(f"dataset {path} is a folder, not a dataset file (a .jsonl, .json, .parquet or .csv) nor "
                         "a folder written by Dataset.save_to_disk")
    datasets = _datasets(str(path))
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # the library's errors have no common base
        raise ValueError(f"dataset {path}: {_first_line(err)}") from None
    if hasattr(loaded, "keys"):
        if split not in loaded:
            raise ValueError(f"dataset {path} holds the splits {', '.join(loaded)}, not {split!r}")
        loaded = loaded[split]
    return list(loaded)


def _hub_rows(repo: str, config: str | None, split: str, revision: str | None = None) -> list:
    """A split of a Hub dataset through ``datasets.load_dataset`` (its cache; ``HF_HUB_OFFLINE=1`` reads only
    the cache), at ``revision`` (a branch, tag or commit; None: main)."""
    datasets = _datasets(repo)
    try:
        loaded = datasets.load_dataset(repo, name=config, split=split, revision=revision)
    except Exception as err:  # the library's errors have no common base (DatasetNotFoundError, ValueError, ...)
        at = f"revision {revision!r}, " if revision else ""
        raise ValueError(f"dataset {repo!r} ({at}{'configuration ' + repr(config) + ', ' if config else ''}split "
                         f"{split!r}) is not a file here, and the Hub did not give it: {_first_line(err)}") from None
    return list(loaded)


def _datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} is not a file here: a Hub dataset or a saved one needs the datasets "
                         "package (pip install datasets)") from None
    return datasets


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
