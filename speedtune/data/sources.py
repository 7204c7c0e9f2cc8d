"""Where rows come from: local .json/.jsonl/.csv/.parquet files or folders of them, a Hugging Face `datasets` hub id
(online), or a LLaMA-Factory `dataset_info.json:name` entry. Every row keeps where it came from, so an error can name
the file and the row."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from speedtune.errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
CSV_FIELD_LIMIT = 256 * 2**20


@dataclass
class Record:
    where: str  # "data.jsonl line 5"
    data: dict


@dataclass
class Source:
    records: list[Record]
    label: str
    format_hint: str | None = None  # from a LLaMA-Factory entry
    columns: dict[str, str] = field(default_factory=dict)  # ours <- theirs, from a LLaMA-Factory entry
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False  # a LLaMA-Factory entry with `ranking: true`: chosen/rejected pairs (speedtune.data.pairs)


def load(spec: str, split: str = "train") -> Source:
    if ".json:" in spec:
        info, _, name = spec.rpartition(":")
        if Path(info).name == "dataset_info.json" or Path(info).is_file():
            return _llamafactory(Path(info), name, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file() and p.name != "dataset_info.json")
        if not files:
            raise UserError(f"{spec}: the folder has no .json, .jsonl, .csv or .parquet files")
        return Source([r for f in files for r in read_file(f)], str(path))
    if path.is_file():
        return Source(read_file(path), str(path))
    if path.suffix in SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"data file not found: {spec}")
    if spec.count("/") == 1:
        return Source(_hub(spec, split), spec)
    raise UserError(f"data not found: {spec} is not a file, a folder, a hub dataset id (org/name), "
                    "nor a dataset_info.json:name entry")


def read_file(path: Path) -> list[Record]:
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    reader = {".json": _json, ".jsonl": _jsonl, ".csv": _csv, ".parquet": _parquet}[path.suffix]
    records = reader(path)
    if not records:
        raise UserError(f"{path}: no rows in the file")
    return records


def read_text(path: Path) -> str:
    """The file as text: UTF-8 (a BOM is fine). Binary or otherwise encoded files are one line naming the file, the
    line and the byte where decoding failed."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: can't be read ({e.strerror})") from None
    if b"\0" in raw[:8192] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: looks like a binary file (NUL bytes near the start), not {path.suffix} text; "
                        "data files must be UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        was = "utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "latin1"
        said = " (it is UTF-16)" if was == "utf-16" else ""
        raise UserError(f"{path} line {line} (byte {e.start}): not UTF-8 text{said}; data files must be UTF-8: "
                        f"re-save it as UTF-8, e.g. iconv -f {was} -t utf-8") from None


def _json(path: Path) -> list[Record]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{") and e.msg == "Extra data":
            return _jsonl(path)  # JSON lines saved as .json
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            raise UserError(f"{path}: expected a JSON array of objects (one per example)")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (one per example)")
    out = []
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise UserError(f"{path} item {i}: expected an object, got {type(row).__name__}")
        out.append(Record(f"{path} item {i}", row))
    return out


def _jsonl(path: Path) -> list[Record]:
    out = []
    for n, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        out.append(Record(f"{path} line {n}", row))
    return out


def _csv(path: Path) -> list[Record]:
    csv.field_size_limit(CSV_FIELD_LIMIT)  # the default (128 KB) is less than one long training document
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    out = []
    try:
        for row in reader:
            out.append(Record(f"{path} line {reader.line_num}", {k: v for k, v in row.items() if k is not None}))
    except csv.Error as e:  # raised while reading the record after the last one counted
        raise UserError(f"{path} line {reader.line_num + 1}: not valid CSV ({e})") from None
    return out


def _parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0][-120:]
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {detail})") from None
    return [Record(f"{path} row {i}", r) for i, r in enumerate(rows, 1)]


def _hub(repo_id: str, split: str) -> list[Record]:
    try:
        from datasets import load_dataset

        ds = load_dataset(repo_id, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"could not load hub dataset '{repo_id}' (split {split}): {type(e).__name__}: {first}. "
                        "Offline? Use a local file") from None
    return [Record(f"{repo_id} row {i}", dict(r)) for i, r in enumerate(ds, 1)]


LF_ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}


def _llamafactory(info: Path, name: str, split: str) -> Source:
    if not info.is_file():
        raise UserError(f"LLaMA-Factory dataset_info not found: {info}")
    try:
        entries = json.loads(read_text(info))
    except json.JSONDecodeError as e:
        raise UserError(f"{info} line {e.lineno}: not valid JSON ({e.msg})") from None
    if name not in entries:
        raise UserError(f"{info}: no dataset named '{name}' (it has: {', '.join(entries) or 'none'})")
    entry = entries[name]
    if "file_name" in entry:
        src = load(str(info.parent / entry["file_name"]), split)
    elif "hf_hub_url" in entry:
        src = Source(_hub(entry["hf_hub_url"], entry.get("split", split)), entry["hf_hub_url"])
    else:
        raise UserError(f"{info} entry '{name}': needs file_name or hf_hub_url")
    fmt = entry.get("formatting", "alpaca")
    cols = entry.get("columns", {})
    if fmt == "alpaca":
        src.format_hint = "alpaca"
        src.columns = {LF_ALPACA[k]: v for k, v in cols.items() if k in LF_ALPACA}
    elif fmt == "sharegpt":
        src.format_hint = "sharegpt"
        if "messages" in cols:
            src.columns = {"conversations": cols["messages"]}
        for key in ("system", "tools"):
            if key in cols:
                src.columns[key] = cols[key]
        src.tags = entry.get("tags", {})
    else:
        raise UserError(f"{info} entry '{name}': formatting '{fmt}' is not supported (alpaca or sharegpt)")
    if entry.get("ranking"):
        src.ranking = True
        src.columns.update({k: cols[k] for k in ("chosen", "rejected") if k in cols})
    src.label = f"{info}:{name}"
    return src
