"""Tokenizers: bytes (the default, 256 ids) and a Hugging Face `tokenizer.json`.

Both have `encode(str | bytes) -> int32 [n]`, `decode(ids) -> str`, `decode_bytes(ids) -> bytes`,
`vocab_size` and `is_bytes`. Neither adds special tokens: packed documents are kept apart by
segment ids, not by separator tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.data.config import DataError, fail


class ByteTokenizer:
    """One token per byte (ids 0..255). Accepts any bytes, UTF-8 or not."""

    is_bytes = True
    vocab_size = 256
    name = "byte"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes (the inverse of `encode` for any bytes)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte tokenizer: ids must be in [0, 255], got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """Text; bytes that are not UTF-8 become U+FFFD (use `decode_bytes` for the exact bytes)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` (e.g. a teacher's)."""

    is_bytes = False

    def __init__(self, path: str | Path):
        import tokenizers

        self.name = str(path)
        if not Path(path).is_file():
            raise fail("tokenizer", str(path), 'no such file; give "byte" or the path of a tokenizer.json')
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception
            raise fail("tokenizer", str(path), f"not a readable tokenizer.json ({error}); give \"byte\" or "
                                               "a tokenizer.json saved by the tokenizers library") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    @staticmethod
    def _text(text: str | bytes, name: str = "input") -> str:
        if isinstance(text, str):
            return text
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{name}: not valid UTF-8 (byte {error.start}); the Hugging Face tokenizer needs "
                            "UTF-8 text: fix the file, or use data.tokenizer=byte, which takes any bytes") from None

    def encode(self, text: str | bytes) -> np.ndarray:
        ids = self._tok.encode(self._text(text), add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once (in parallel threads); much faster than `encode` in a loop."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets (>= 0.21)
        encodings = encode([self._text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"` -> `ByteTokenizer`; a path -> `HFTokenizer` (raises `DataError` if it cannot load)."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
