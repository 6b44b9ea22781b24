"""A byte-level BPE tokenizer trained here on a text (no download), saved as transformers files.

The medium demo trains one on its corpus and saves it beside the model (``tokenizer.json``,
``tokenizer_config.json``, ...), so the model loads with ``transformers.AutoTokenizer`` and the
CLI's ``finetune``/``eval`` use it like any Hugging Face model's tokenizer. Byte-level: every text
encodes (no unknown token) and decodes back to exactly itself.
"""

from __future__ import annotations

from types import SimpleNamespace

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_bpe(text: str, vocab_size: int):
    """A ``transformers.PreTrainedTokenizerFast`` with ``vocab_size`` tokens learned from ``text``.

    The 256 byte tokens and the specials (``<pad>``, ``<s>``, ``</s>``) come first; merges fill the
    rest. Encoding adds no special token: a text is its own tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ValueError(f"a byte-level BPE vocabulary needs at least {len(alphabet) + 3} tokens, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def token_ids(tokenizer) -> SimpleNamespace:
    """What :func:`aqlm_lora.app.demo.build_model` reads from a tokenizer: vocabulary size and special ids."""
    return SimpleNamespace(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
