"""Tokenizers trained locally, for models trained from scratch where no Hub tokenizer can be downloaded.

The published models use GPT-NeoX-20B's tokenizer (``AutoTokenizer.from_pretrained("EleutherAI/gpt-neox-20b")``
when online). Offline demos and tests train a small byte-level BPE with the same special tokens as the Zephyr
chat format instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
CHAT_SPECIAL_TOKENS = [EOS_TOKEN, "<|user|>", "<|assistant|>", "<|system|>", "<image>"]


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512,
                        special_tokens: list[str] = CHAT_SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``; ``special_tokens[0]`` is EOS and pad (id 0, as in GPT-NeoX).

    Byte-level means any text can be encoded, including characters never seen in the corpus.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special_tokens[0],
                                   pad_token=special_tokens[0], padding_side="left",
                                   extra_special_tokens={})
