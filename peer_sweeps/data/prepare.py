"""`prepare_suite`: fetch, clean, deduplicate, split, check overlap, train the tokenizer, tokenize to
memory-mapped arrays and write the manifest.

Layout under the data root (env `PEER_SWEEPS_DATA`, default `./data`):
    cache/                       downloaded registry archives, verified by SHA-256 on every use
    <suite>/<tokenizer id>/      manifest.json, tokenizer.json, token_bytes.npy, <split>.bin
The prepared directory is built in a private `.partial-*` directory and renamed into place once complete,
so an interrupted prepare leaves nothing that a later run trusts; a later run checks the manifest and the
size and SHA-256 of every file before it skips the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np

from peer_sweeps.data import overlap
from peer_sweeps.data.archives import sha256_file
from peer_sweeps.data.corpora import GPT2_TIKTOKEN_MEMBER, WHISPER
from peer_sweeps.data.errors import DataError
from peer_sweeps.data.manifest import Manifest, SourceRecord, SplitRecord, TokenizerRecord
from peer_sweeps.data.sources import RegistryCorpus, Source
from peer_sweeps.data.suites import PRIMARY, Suite, suite
from peer_sweeps.data.tokenizer import EOT, file_hash, gpt2_tokenizer, token_bytes, train_bpe

FORMAT = 1
TOKENIZERS = ("bpe", "gpt2")
Progress = Callable[[str], None]


def default_root() -> Path:
    return Path(os.environ.get("PEER_SWEEPS_DATA", "data"))


def tokenizer_id(tokenizer: str, vocab_size: int) -> str:
    """Directory name of a tokenizer choice: `bpe8192`, or `gpt2`."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if tokenizer == "gpt2":
        return "gpt2"
    if not isinstance(vocab_size, int) or not 258 <= vocab_size <= 2**32:
        raise DataError(f"vocab size must be an integer of at least 258, got {vocab_size!r}")
    return f"bpe{vocab_size}"


def prepare_suite(suite_name: str, root: str | Path | None = None, vocab_size: int = 8192,
                  progress: Progress | None = None, tokenizer: str = "bpe") -> Manifest:
    """Build suite `suite_name` under `root` and return its manifest; a no-op when it is already built
    from the same definition and its files are intact. Raises DataError (nothing written) on an unknown
    suite or corpus, a package pip cannot fetch, a checksum mismatch or an empty corpus."""
    say = progress or (lambda message: None)
    spec = suite(suite_name)
    tok_id = tokenizer_id(tokenizer, vocab_size)
    out = (Path(root) if root is not None else default_root()) / spec.name / tok_id
    spec_hash = suite_spec_hash(spec, tok_id)
    current = read_manifest(out, spec_hash, verify_hashes=True)
    if current is not None:
        say(f"{spec.name}/{tok_id} is up to date in {out}")
        return current

    started = time.time()
    cache = out.parent.parent / "cache"
    texts, records = _collect(spec, cache, say)
    say(f"tokenizer: {tok_id}")
    tok = _tokenizer(tokenizer, vocab_size, texts["train"], cache)
    _remove_abandoned(out.parent.parent, f".partial-{spec.name}-{tok_id}-")
    partial = out.parent.parent / f".partial-{spec.name}-{tok_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
        manifest = _write(partial, spec, tok, tokenizer, spec_hash, texts, records, say)
        manifest.seconds = round(time.time() - started, 1)
        _write_file(partial / "manifest.json", manifest.model_dump_json(indent=2).encode())
        _publish(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    say(f"{spec.name}/{tok_id} written to {out} in {manifest.seconds:.0f} s")
    return manifest


def suite_spec_hash(spec: Suite, tok_id: str) -> str:
    """Hash of everything that determines the prepared files: sources, split and overlap settings,
    tokenizer choice and this module's format version."""
    describe = lambda group: [s.provenance() | {"name": s.name} for s in spec.sources(group)]  # noqa: E731
    payload = {"format": FORMAT, "tokenizer": tok_id, "train": describe(spec.train),
               "validation": describe(spec.validation), "validation_fraction": spec.validation_fraction,
               "eval_sets": {k: describe(v) for k, v in spec.eval_sets.items()}, "ngram": spec.ngram}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(out: Path, spec_hash: str | None, verify_hashes: bool) -> Manifest | None:
    """The manifest of a complete prepared directory, or None when it is missing, from another suite
    definition (`spec_hash`, unless None), or any file it lists is missing or has another size (or,
    with `verify_hashes`, another SHA-256)."""
    try:
        manifest = Manifest.model_validate_json((out / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return None
    if manifest.format != FORMAT or (spec_hash is not None and manifest.spec_hash != spec_hash):
        return None
    for rec in manifest.splits.values():
        path = out / rec.file
        if not path.is_file() or path.stat().st_size != rec.file_bytes:
            return None
        if verify_hashes and sha256_file(path) != rec.sha256:
            return None
    tok = manifest.tokenizer
    if not (out / tok.token_bytes_file).is_file() or not (out / tok.file).is_file():
        return None
    if verify_hashes and file_hash(out / tok.file) != tok.hash:
        return None
    return manifest


def _collect(spec: Suite, cache: Path, say: Progress) -> tuple[dict[str, list[str]], list[SourceRecord]]:
    """Documents of every split (train, the primary set, the evaluation sets) and a record per source.
    Everything here happens before anything is written, so bad input leaves no trace but the cache."""
    train_sources, val_sources = spec.sources(spec.train), spec.sources(spec.validation)
    eval_sources = {name: spec.sources(group) for name, group in spec.eval_sets.items()}
    _prefetch([*train_sources, *val_sources, *chain.from_iterable(eval_sources.values())], cache, say)
    records: list[SourceRecord] = []
    seen: set[str] = set()
    texts: dict[str, list[str]] = {"train": [], PRIMARY: []}
    for src in train_sources:
        docs, dups = overlap.dedupe(_documents(src, cache, say), seen)
        records.append(_record(src, "train", docs, dups))
        if val_sources:
            texts["train"] += docs
        else:
            train_docs, held_out = overlap.split_by_document(docs, spec.validation_fraction)
            texts["train"] += train_docs
            texts[PRIMARY] += held_out
    for src in val_sources:
        docs, dups = overlap.dedupe(_documents(src, cache, say), seen)
        records.append(_record(src, PRIMARY, docs, dups))
        texts[PRIMARY] += docs
    if not texts[PRIMARY]:
        raise DataError(f"suite {spec.name!r}: the validation split is empty (too few training documents)")

    say(f"overlap check: word {spec.ngram}-grams of the training mix")
    index = overlap.NgramIndex(texts["train"] + texts[PRIMARY], spec.ngram)
    for name, sources in eval_sources.items():
        texts[name] = []
        for src in sources:
            docs, dups = overlap.dedupe(_documents(src, cache, say), seen)
            kept, dropped = overlap.drop_overlapping(docs, index)
            if not kept:
                raise DataError(f"evaluation set {name!r}: every document of {src.name!r} overlaps the training text")
            records.append(_record(src, name, kept, dups, dropped))
            texts[name] += kept
    return texts, records


def _prefetch(sources: list[Source], cache: Path, say: Progress) -> None:
    """Download the registry archives of all sources at once (pip runs in parallel)."""
    archives = list({s.archive: None for s in sources if isinstance(s, RegistryCorpus)})
    if archives:
        say(f"fetching {', '.join(a.requirement for a in archives)}")
        with ThreadPoolExecutor(max_workers=len(archives)) as pool:
            for future in [pool.submit(a.fetch, cache) for a in archives]:
                future.result()


def _documents(src: Source, cache: Path, say: Progress) -> list[str]:
    say(f"reading {src.name}")
    docs = src.documents(cache)
    if not docs:
        raise DataError(f"corpus {src.name!r} yielded no documents")
    return docs


def _record(src: Source, split: str, docs: list[str], dups: int, overlap_dropped: int = 0) -> SourceRecord:
    prov = src.provenance()
    return SourceRecord(name=src.name, split=split, kind=prov["kind"], package=prov.get("package"),
                        version=prov.get("version"), archive=prov.get("archive"),
                        archive_sha256=prov.get("archive_sha256"), text_sha256=_text_sha256(docs),
                        documents=len(docs), bytes=_utf8_bytes(docs), duplicates_dropped=dups,
                        overlap_dropped=overlap_dropped, provenance=prov)


def _tokenizer(kind: str, vocab_size: int, train_docs: list[str], cache: Path):
    if kind == "gpt2":
        return gpt2_tokenizer(WHISPER.fetch(cache), GPT2_TIKTOKEN_MEMBER)
    return train_bpe(train_docs, vocab_size)


def _write(partial: Path, spec: Suite, tok, kind: str, spec_hash: str, texts: dict[str, list[str]],
           records: list[SourceRecord], say: Progress) -> Manifest:
    """Tokenizer, token-bytes table and one token array per split, into `partial`."""
    tok.save(str(partial / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    with open(partial / "token_bytes.npy", "wb") as f:
        np.save(f, token_bytes(tok))
    splits: dict[str, SplitRecord] = {}
    for name in ["train", PRIMARY, *spec.eval_sets]:
        say(f"tokenizing {name}")
        ids = [np.array([eot] + e.ids, dtype=dtype) for e in tok.encode_batch_fast(texts[name])]
        path = partial / f"{name}.bin"
        _write_file(path, np.concatenate(ids).tobytes())
        from_sources = [r for r in records if r.split == name]
        splits[name] = SplitRecord(documents=len(ids), bytes=_utf8_bytes(texts[name]),
                                   tokens=sum(len(a) for a in ids), file=path.name,
                                   file_bytes=path.stat().st_size, sha256=sha256_file(path),
                                   duplicates_dropped=sum(r.duplicates_dropped for r in from_sources),
                                   overlap_dropped=sum(r.overlap_dropped for r in from_sources))
    tok_record = TokenizerRecord(kind=kind, vocab_size=vocab, hash=file_hash(partial / "tokenizer.json"),
                                 file="tokenizer.json", eot_id=eot, token_bytes_file="token_bytes.npy")
    return Manifest(format=FORMAT, suite=spec.name, spec_hash=spec_hash, primary=PRIMARY, ngram=spec.ngram,
                    dtype=np.dtype(dtype).name, tokenizer=tok_record, sources=records, splits=splits, seconds=0.0)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(partial: Path, out: Path) -> None:
    """Rename the complete directory into place. A stale or broken `out` is moved aside first; if another
    process published a valid one meanwhile, ours is dropped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        if read_manifest(out, None, verify_hashes=True) is not None and _same_build(out, partial):
            return
        stale = out.parent / f".stale-{out.name}-{uuid.uuid4().hex[:8]}"
        out.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    partial.rename(out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned(root: Path, prefix: str) -> None:
    """Delete partial directories left by prepares that were killed (their process is gone)."""
    for path in root.glob(f"{prefix}*"):
        pid = int(path.name[len(prefix):].split("-")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def _same_build(a: Path, b: Path) -> bool:
    read = lambda p: json.loads((p / "manifest.json").read_text())["spec_hash"]  # noqa: E731
    return read(a) == read(b)


def _text_sha256(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _utf8_bytes(docs: list[str]) -> int:
    return sum(len(d.encode()) for d in docs)
