"""A tiny random Llama with a byte-level tokenizer trained on the shipped essay, saved as a model folder.

``kvtier demo --model DIR`` and ``kvtier eval --model DIR`` run on it in seconds, so the default
suite exercises the real-model commands end to end; the runs on SmolLM2 itself are ``slow``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from importlib import resources
from pathlib import Path


@functools.cache
def tiny_model_folder() -> Path:
    """Build the folder once per test process (about a second) and return it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = resources.files("kvtier").joinpath("data/essay.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.split("\n\n"), trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"], show_progress=False))
    folder = Path(tempfile.mkdtemp(prefix="kvtier-tiny-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=1e4,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder
