"""`load_suite`: open a prepared suite for training workers (memory-mapped, nothing loaded eagerly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peer_sweeps.data.errors import DataError
from peer_sweeps.data.manifest import Manifest
from peer_sweeps.data.prepare import default_root, read_manifest, tokenizer_id
from peer_sweeps.data.suites import suite


@dataclass
class PreparedSuite:
    """A prepared suite. `train` and each of `eval_sets` (primary first) are read-only memmaps of token
    ids; `token_bytes[i]` is the number of UTF-8 bytes token `i` decodes to (0 for end-of-text)."""

    name: str
    path: Path
    manifest: Manifest
    vocab_size: int
    eot_id: int
    tokenizer_hash: str
    train: np.memmap
    primary: str
    eval_sets: dict[str, np.memmap]
    token_bytes: np.ndarray

    def tokenizer(self):
        """The `tokenizers.Tokenizer` (for decoding samples)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / self.manifest.tokenizer.file))


def load_suite(suite_name: str, root: str | Path | None = None, vocab_size: int = 8192,
               tokenizer: str = "bpe") -> PreparedSuite:
    """Open suite `suite_name` as prepared by `prepare_suite` with the same arguments. Raises DataError
    when it has not been prepared or is incomplete. Whether it is current with the suite's definition is
    `prepare_suite`'s check, not this one's: workers on other machines may see the sources under other
    paths."""
    spec = suite(suite_name)
    tok_id = tokenizer_id(tokenizer, vocab_size)
    path = (Path(root) if root is not None else default_root()) / spec.name / tok_id
    manifest = read_manifest(path, None, verify_hashes=False)
    if manifest is None:
        flags = f" --vocab-size {vocab_size}" if tokenizer == "bpe" and vocab_size != 8192 else ""
        raise DataError(f"data suite {spec.name!r} ({tok_id}) is not prepared under {path.parent.parent}: "
                        f"run `peer-sweeps data prepare --suite {spec.name}{flags}`")
    tok = manifest.tokenizer
    arrays = {name: np.memmap(path / rec.file, dtype=manifest.dtype, mode="r")
              for name, rec in manifest.splits.items()}
    return PreparedSuite(name=spec.name, path=path, manifest=manifest, vocab_size=tok.vocab_size,
                         eot_id=tok.eot_id, tokenizer_hash=tok.hash, train=arrays.pop("train"),
                         primary=manifest.primary, eval_sets=arrays,
                         token_bytes=np.load(path / tok.token_bytes_file))
