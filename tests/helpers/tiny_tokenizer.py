"""A real Hugging Face tokenizer small enough for tiny test models, built offline in code.

`save_tiny_tokenizer(dir, vocab_size)` trains a character-level BPE (tokenizers library) on part
of CPython's pydoc topics and saves it with `PreTrainedTokenizerFast.save_pretrained`, so
`AutoTokenizer.from_pretrained(dir)` loads it and every id is below `vocab_size`.
"""

from __future__ import annotations

from pathlib import Path


def save_tiny_tokenizer(path: str | Path, vocab_size: int = 128) -> Path:
    from pydoc_data import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:40])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=vocab_size // 2)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert len(fast) <= vocab_size, len(fast)
    path = Path(path)
    fast.save_pretrained(str(path))
    return path
