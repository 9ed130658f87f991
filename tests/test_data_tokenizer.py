"""The offline GPT-2 encoding always works, gives GPT-2's known ids, and equals tiktoken's
downloaded `gpt2` encoding on a varied sample whenever that download is possible."""

from __future__ import annotations

import os

import pytest

from agdlm.data.tokenizer import EOT_TOKEN, gpt2_encoding

SAMPLE = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'd've thought so.",
    "Unicode: naïve café résumé, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🙂🚀👩‍👩‍👧",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x != None:\n\t\tpass\n",
    "whitespace   runs\t\t\tand\n\n\n\nnewlines      \n   trailing   ",
    "    leading spaces and a lone\r\ncarriage return \u00a0nbsp\u2003em-space",
    "<|endoftext|> is ordinary text here; 50256 is not produced by encode_ordinary",
    "numbers 1234567890 0.0001 1e-9 -42 +7 ₁₂₃ ½",
    "",
]


def test_offline_encoding_is_gpt2():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    for text in SAMPLE:
        ids = enc.encode_ordinary(text)
        assert EOT_TOKEN not in ids
        assert enc.decode(ids) == text


@pytest.mark.skipif(os.environ.get("AGDLM_ONLINE_TESTS") != "1",
                    reason="downloads tiktoken's gpt2 files; set AGDLM_ONLINE_TESTS=1 where the network allows")
def test_offline_equals_online_when_download_works():
    try:
        online = gpt2_encoding(online=True)
    except Exception as e:  # no network: the offline half above still ran
        pytest.skip(f"tiktoken's gpt2 download is not available here ({type(e).__name__})")
    offline = gpt2_encoding()
    for text in SAMPLE:
        assert offline.encode_ordinary(text) == online.encode_ordinary(text), text
    assert offline.encode_ordinary_batch(SAMPLE) == online.encode_ordinary_batch(SAMPLE)


def test_offline_equals_tiktokens_own_gpt2_definition(tmp_path, monkeypatch):
    """tiktoken's registered `gpt2` constructor (its pattern, special tokens, merges), fed the
    same packaged files through its download cache, gives the same ids: no network needed."""
    import hashlib
    import shutil

    import tiktoken
    from tiktoken_ext import openai_public

    from agdlm.data.tokenizer import _packaged_file

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(_packaged_file(name), tmp_path / hashlib.sha1((base + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.Encoding(**openai_public.gpt2())
    offline = gpt2_encoding()
    assert reference.n_vocab == offline.n_vocab and reference.eot_token == offline.eot_token
    for text in SAMPLE:
        assert offline.encode_ordinary(text) == reference.encode_ordinary(text), text
