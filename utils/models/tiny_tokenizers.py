"""The tiny models' tokenizers, built from Python objects (no hub, no sentencepiece file): CLIP's byte-level
BPE with the real alphabet and a few merges (tiny SDXL's two encoders, tiny FLUX's CLIP-L), and a small T5
Unigram vocabulary (tiny FLUX's T5). Saved in the real repos' file formats so they load the same way."""
from __future__ import annotations

import json
import string
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_TINY_VOCAB: list = [{}, []]


def tiny_tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = []
    for word in ("portrait", "photo", "person", "light"):
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kw = {"pad_token": pad_token} if pad_token else {}
    _TINY_VOCAB[:] = [vocab, merges]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kw), len(vocab)


def write_classic_tokenizers(base: Path, subs: tuple[str, ...] = ("tokenizer", "tokenizer_2")) -> None:
    """After ``save_pretrained`` of a pipeline holding ``tiny_tokenizer``s: the real repo ships the classic
    vocab.json + merges.txt (no tokenizer.json), so the saved folder is loaded the same way."""
    for sub in subs:
        folder = Path(base) / sub
        (folder / "tokenizer.json").unlink(missing_ok=True)
        (folder / "vocab.json").write_text(json.dumps(_TINY_VOCAB[0], ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_VOCAB[1]),
                                           encoding="utf-8")


# T5's SentencePiece vocabulary at toy size: "\u2581" marks a word start; a few whole words, then single
# characters so that any text tokenizes (no <unk> for ASCII). Unigram scores: whole words win.
_T5_WORDS = ("a", "portrait", "photo", "of", "person", "light", "studio", "the", "in", "man", "woman", "with",
             "and", "hair", "eyes", "old", "year", "wearing", "background", "smiling")


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (transformers' tokenizers-backed Unigram) with pad 0, eos 1, unk 2 as in T5's vocab."""
    from transformers import T5TokenizerFast
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0 - i * 0.01) for i, w in enumerate(_T5_WORDS)]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -6.5) for c in string.ascii_letters + string.digits if c not in _T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
