"""Reading a source: the stdlib corpus, text files, JSONL records, token files.

Text and JSONL sources become a list of `Document`s (raw bytes, read once, in sorted file order);
token sources become 1-D integer arrays (memory-mapped, never copied when there is one file).
Every failure is a `DataError` naming the field, the file (and line) and the fix.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.data.config import DataConfig, DataError, fail

# Directories left out of the stdlib corpus: installed packages (machine-dependent), the test
# suites (large, repetitive, machine-dependent data files), caches.
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
TOKEN_SUFFIXES = (".npy", ".bin")


@dataclass(frozen=True)
class Document:
    name: str  # for messages: the path, or path:line for a JSONL record
    key: str  # what the train/validation split hashes: the relative path (#line for JSONL)
    data: bytes  # the raw text


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_kind(cfg: DataConfig) -> str:
    """`cfg.kind`, or for "auto" the kind the source's extension says (text if none)."""
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.source == "stdlib":
        return "text"
    if cfg.source == "digits":
        return "images"
    suffix = Path(cfg.source).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in TOKEN_SUFFIXES:
        return "tokens"
    return "text"


def stdlib_files() -> list[tuple[Path, str]]:
    """The standard library's *.py files as (path, relative posix path), sorted by relative path.

    Leaves out the directories in `STDLIB_SKIP` (site-packages, test suites, caches) and hidden ones.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise fail("source", "stdlib", f"the standard library directory {str(root)!r} is missing; "
                                       "give a path to text files instead")
    return _walk(root, suffix=".py", skip=STDLIB_SKIP)


def _walk(root: Path, suffix: str | None = None, skip=frozenset({"__pycache__"})) -> list[tuple[Path, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            path = Path(dirpath) / name
            found.append((path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda item: item[1])


def list_files(source: str) -> list[tuple[Path, str]]:
    """The files of a path, directory (recursive, hidden entries left out) or glob, sorted, each with
    the relative path the split hashes (relative to the directory, or to the glob's fixed prefix)."""
    if source == "stdlib":
        return stdlib_files()
    expanded = os.path.expanduser(source)
    if _has_magic(expanded):
        parts = Path(expanded).parts
        fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if _has_magic(p))]]
        base = Path(*fixed) if fixed else Path(".")
        matches = [Path(m) for m in glob.glob(expanded, recursive=True) if not Path(m).is_dir()]
        if not matches:
            raise fail("source", source, "the glob matched no files; check the pattern (** needs a "
                                         "directory part, e.g. data/**/*.txt) and the working directory")
        files = [(m, Path(os.path.relpath(m, base)).as_posix()) for m in matches]
        return sorted(files, key=lambda item: item[1])
    path = Path(expanded)
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise fail("source", source, "the directory holds no files; point data.source at a directory "
                                         "with text files, or at a file or glob")
        return files
    if path.is_file():
        return [(path, path.name)]
    if path.exists():
        raise fail("source", source, "not a regular file or directory; give a file, directory or glob")
    raise fail("source", source, 'no such file or directory; give "stdlib", an existing path or a glob '
                                 "(relative paths are relative to the working directory)")


def _read(path: Path, source: str, limit: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as error:
        raise fail("source", source, f"cannot read {str(path)!r} ({error.strerror or error}); "
                                     "check that it exists and is readable") from None


def _cut_utf8(data: bytes, n: int) -> bytes:
    """The first `n` bytes of `data` or fewer, not ending inside a UTF-8 character."""
    if n >= len(data):
        return data
    while n > 0 and (data[n] & 0xC0) == 0x80:
        n -= 1
    return data[:n]


def read_text(cfg: DataConfig) -> list[Document]:
    """Every non-empty file a document, in sorted order, until `max_bytes`."""
    docs, total = [], 0
    for path, rel in list_files(cfg.source):
        left = None if cfg.max_bytes is None else cfg.max_bytes - total
        data = _read(path, cfg.source, None if left is None else left + 4)
        if left is not None:
            data = _cut_utf8(data, left)
        if data:
            docs.append(Document(str(path), rel, data))
            total += len(data)
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            break
    if not docs:
        raise fail("source", cfg.source, "every file is empty; point data.source at text")
    return docs


def read_jsonl(cfg: DataConfig) -> list[Document]:
    """Every record with non-empty text a document, in file then line order, until `max_bytes`."""
    docs, total = [], 0
    for path, rel in list_files(cfg.source):
        for lineno, line in enumerate(_read(path, cfg.source).split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise fail("source", cfg.source, f"{where}: not a JSON object ({error}); fix the line, or set "
                                                 "data.kind=text to read the file as plain text") from None
            if not isinstance(record, dict) or cfg.text_field not in record:
                keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
                raise fail("text_field", cfg.text_field, f"{where} has no {cfg.text_field!r} key (it has: "
                                                         f"{keys}); set data.text_field to the key of the text")
            text = record[cfg.text_field]
            if not isinstance(text, str):
                raise fail("text_field", cfg.text_field, f"{where}: the value is a {type(text).__name__}, not a "
                                                         "string; set data.text_field to the key of the text")
            data = text.encode("utf-8", errors="surrogatepass")
            if cfg.max_bytes is not None:
                data = _cut_utf8(data, cfg.max_bytes - total)
            if data:
                docs.append(Document(where, f"{rel}#{lineno}", data))
                total += len(data)
            if cfg.max_bytes is not None and total >= cfg.max_bytes:
                return docs
    if not docs:
        raise fail("source", cfg.source, f"no record has non-empty text in {cfg.text_field!r}; point "
                                         "data.source at JSONL with text")
    return docs


def _load_tokens(path: Path, cfg: DataConfig) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            dtype = np.dtype(cfg.token_dtype)
            size = path.stat().st_size
            if size % dtype.itemsize:
                raise fail("token_dtype", cfg.token_dtype, f"{str(path)!r} has {size} bytes, not a multiple of "
                                                           f"{dtype.itemsize}; set data.token_dtype to the dtype "
                                                           "the file was written with")
            array = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    except DataError:
        raise
    except (OSError, ValueError) as error:
        raise fail("source", cfg.source, f"cannot read token file {str(path)!r} ({error}); give a .npy saved "
                                         "with numpy.save, or a raw .bin of ids with data.token_dtype") from None
    if array.dtype.kind not in "iu":
        raise fail("source", cfg.source, f"{str(path)!r} holds {array.dtype} values, not integer token ids; "
                                         "save the ids as an integer array")
    return array.reshape(-1)


def read_tokens(cfg: DataConfig) -> list[tuple[str, np.ndarray]]:
    """Every token file as (path, 1-D ids), memory-mapped, in sorted order, until `max_bytes`."""
    arrays, total = [], 0
    for path, _ in list_files(cfg.source):
        array = _load_tokens(path, cfg)
        if cfg.max_bytes is not None:
            array = array[:max(0, (cfg.max_bytes - total) // array.dtype.itemsize)]
        if array.size:
            arrays.append((str(path), array))
            total += array.size * array.dtype.itemsize
        if cfg.max_bytes is not None and total + array.dtype.itemsize > cfg.max_bytes:
            break
    if not arrays:
        raise fail("source", cfg.source, "the token files are empty (or data.max_bytes is below one id); "
                                         "point data.source at token ids")
    return arrays
