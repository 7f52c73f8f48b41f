"""GPT-2's real byte-level BPE tokenizer, rebuilt offline from the ranks file OpenAI's whisper package ships
on PyPI (whisper/assets/gpt2.tiktoken, the GPT-2 vocabulary), so that the tests and benchmarks have a
tokenizer whose pre-tokenizer llama.cpp's converter knows (its ids for the converter's check text hash to
"gpt-2"): the converters that always read a BPE vocabulary (Qwen2-MoE, Qwen3-MoE) refuse any other.

    python scripts/gpt2_tokenizer.py [FOLDER]     # prints the folder when it is ready

The sdist is fetched once into the cache and checked against the digest PyPI lists; the merges are the
ranks' own (each token splits into the two lower-ranked tokens that make it, ordered by rank), as
transformers' TikTokenConverter derives them."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

VERSION = "20250625"
MEMBER = f"openai_whisper-{VERSION}/whisper/assets/gpt2.tiktoken"
CACHE = Path(os.environ.get("LORAFAST_CACHE", Path.home() / ".cache" / "lorafast"))


def _ranks() -> dict[bytes, int]:
    path = CACHE / "gpt2.tiktoken"
    if not path.is_file():
        # PyPI's simple index (what pip reads) gives the sdist's address and digest.
        index = "https://pypi.org/simple/openai-whisper/"
        page = urllib.request.urlopen(index, timeout=120).read().decode()
        name = f"openai_whisper-{VERSION}.tar.gz"
        found = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', page)
        if found is None:
            sys.exit(f"{index}: no {name}")
        url = urllib.parse.urljoin(index, found.group(1))
        data = urllib.request.urlopen(url, timeout=600).read()
        if hashlib.sha256(data).hexdigest() != found.group(2):
            sys.exit(f"{url}: sha256 does not match PyPI's")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile(MEMBER)
            assert member is not None, MEMBER
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(member.read())
            tmp.replace(path)
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_tokenizer(folder: Path | None = None) -> Path:
    """The tokenizer folder (tokenizer.json, tokenizer_config.json, ...), built once."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = folder or CACHE / "gpt2-tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    ranks = _ranks()
    to_text = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_text[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        parts = [
            (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
        ]
        merges.extend((rank, *p) for p in sorted(parts))
    merges.sort()
    tok = Tokenizer(
        models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=[(text(a), text(b)) for *_, a, b in merges])
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    eot = "<|endoftext|>"
    fast = transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot)
    tmp = folder.with_name(folder.name + ".tmp")
    fast.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


if __name__ == "__main__":
    print(gpt2_tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
