"""Offline tokenizers built from data that ships inside installed packages.

* :func:`clip_tokenizer` builds a real ``transformers.CLIPTokenizer`` (the OpenAI CLIP BPE,
  49408 tokens) from ``open_clip/bpe_simple_vocab_16e6.txt.gz``, writing ``vocab.json`` and
  ``merges.txt`` the way ``open_clip.tokenizer.SimpleTokenizer`` builds its vocabulary.
* :func:`tiny_t5_tokenizer` builds a small, *honest stand-in* for the T5 SentencePiece
  tokenizer (no T5 vocabulary is available offline): a ``T5Tokenizer`` (Unigram model) whose
  pieces are the single characters plus the 2,000 most frequent whole-word CLIP BPE tokens,
  each as a ``"▁word"`` piece. It only serves tiny test pipelines (FLUX needs a T5 tokenizer).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2


def _clip_vocab_and_merges() -> tuple[list[str], list[str]]:
    """The CLIP BPE vocabulary (49408 tokens) and merges, built as ``open_clip.tokenizer.SimpleTokenizer``
    builds them from the BPE file that ships inside ``open_clip``: 256 byte tokens, their ``</w>``
    forms, 48894 merges, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    import open_clip.tokenizer as oct

    p = Path(oct.default_bpe())
    if not p.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary not found at {p}")
    merges = gzip.open(p).read().decode("utf-8").split("\n")
    merges = merges[1:_N_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    return vocab, merges


def clip_tokenizer_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write (once) ``vocab.json`` + ``merges.txt`` of the CLIP BPE and return their folder.

    Default folder: ``$FPO_DIFFUSION_CACHE/clip_bpe`` (or a per-user temp folder).
    """
    if cache_dir is None:
        base = os.environ.get("FPO_DIFFUSION_CACHE") or os.path.join(tempfile.gettempdir(), f"fpo_diffusion_{os.getuid()}")
        cache_dir = os.path.join(base, "clip_bpe")
    root = Path(cache_dir)
    if (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    tmp = tempfile.mkdtemp(dir=root)
    Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):  # atomic: concurrent builders write identical files
        os.replace(Path(tmp, name), root / name)
    os.rmdir(tmp)
    return root


@lru_cache(maxsize=8)
def _clip_tokenizer_cached(model_max_length: int):
    from transformers import CLIPTokenizer

    root = clip_tokenizer_files()
    vocab = json.loads((root / "vocab.json").read_text())
    lines = (root / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:] if m.strip()]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` identical in vocabulary to ``openai/clip-vit-*``'s, built offline.

    Padding uses ``<|endoftext|>`` (as the SD1.x tokenizer); ``model_max_length`` sets the
    context length used by pipelines (77 for real CLIP; tiny tests may use less). The instance
    is cached and shared (tokenizers are not mutated by pipelines).
    """
    return _clip_tokenizer_cached(int(model_max_length))


def tiny_t5_tokenizer(n_words: int = 2000, model_max_length: int = 32):
    """A small T5-style Unigram tokenizer (``transformers.T5Tokenizer``) built offline.

    Not the real T5 vocabulary: pieces are ``<pad>``, ``</s>``, ``<unk>``, printable ASCII
    characters (with and without the ``▁`` word marker) and the first ``n_words`` whole-word
    CLIP BPE tokens as ``▁word``. Deterministic; for tiny FLUX test pipelines only.
    """
    from transformers import T5Tokenizer

    vocab, _ = _clip_vocab_and_merges()
    words = [v[:-4] for v in vocab[512:] if v.endswith("</w>") and v[:-4].isalpha()][:n_words]
    chars = [chr(c) for c in range(33, 127)]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for i, w in enumerate(words):
        p = "▁" + w
        if p not in seen:
            seen.add(p)
            pieces.append((p, -3.0 - 0.001 * i))
    for c in chars:
        for p in (c, "▁" + c):
            if p not in seen:
                seen.add(p)
                pieces.append((p, -10.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
