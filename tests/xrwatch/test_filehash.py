from __future__ import annotations

import hashlib
from pathlib import Path

from xrwatch import modelmeta
from xrwatch.filehash import file_sha256, read_and_hash


def test_read_and_hash_small_file_returns_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    sha, data = read_and_hash(path)
    assert data == b"x" * 1000
    assert sha == hashlib.sha256(data).hexdigest() == file_sha256(path)


def test_read_and_hash_large_file_is_hashed_in_chunks_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 5000)
    sha, data = read_and_hash(path, max_bytes=1000)
    assert data is None
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_sha256_helper() -> None:
    assert modelmeta.file_sha256 is file_sha256  # still importable where export finds it
