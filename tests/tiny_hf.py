"""A tiny Hugging Face-format Llama model with random weights, written at test time.

Two layers, hidden size 128, two heads of 64 (vLLM's CPU attention takes head sizes 32, 64, 80,
96, 112, 128, ... and rejects 16), context 512, and a byte-level BPE vocabulary of 512 trained
here on text generated here: enough for vLLM to load it and generate (garbage) text, with nothing
downloaded and nothing binary in git. Weights are safetensors in bfloat16 (under 1 MB); the
tokenizer is a `tokenizer.json` plus a `tokenizer_config.json` whose chat template is ChatML, so
`/v1/chat/completions` works.

Runs with the python of vLLM's venv (engines/vllm.py), which has torch, transformers and
tokenizers:

    python tests/tiny_hf.py OUTDIR [--context N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HIDDEN = 128
HEADS = 2
HEAD_DIM = 64
LAYERS = 2
INTERMEDIATE = 256
CONTEXT = 512
VOCAB = 512  # the BPE trainer's target; the model's vocabulary is what it ends with
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "hello world the a of and to in is it you that he was for on are with as his they be at one "
    "have this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write would "
    "like so these her long make thing see him two has look more day could go come did number "
    "system user assistant model worker engine ready busy request token"
)
WORDS = _WORDS.split()
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus(seed: int, lines: int = 2000) -> list[str]:
    """Sentences of the words above, with some digits and punctuation, and ChatML turns."""
    rng = random.Random(seed)
    text = []
    for i in range(lines):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        sentence = sentence.capitalize() + rng.choice([".", "?", "!", ",", ":"]) + f" {i}"
        if i % 10 == 0:
            sentence = f"<|im_start|>user\n{sentence}<|im_end|>\n<|im_start|>assistant\n"
        text.append(sentence)
    return text


def train_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed), trainer=trainer)
    return tokenizer


def write(out: Path, seed: int = 0, context: int = CONTEXT) -> Path:
    """Write the model directory ``out``; returns it. ``context``: the context length it says it
    was trained for, vLLM's default `--max-model-len` (a larger one lets a request generate for
    longer: random weights rarely pick the end token)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(seed)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL}
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": context,
                "chat_template": CHAT_TEMPLATE,
                "added_tokens_decoder": {
                    str(ids[token]): {
                        "content": token,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "single_word": False,
                        "special": True,
                    }
                    for token in SPECIAL
                },
            },
            indent=2,
        )
        + "\n"
    )
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=context,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    # bfloat16, the dtype vLLM's CPU platform runs a float32 checkpoint in anyway (it would
    # downcast, warning once per tensor).
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model directory to write")
    parser.add_argument("--context", type=int, default=CONTEXT, help="context length")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the text")
    args = parser.parse_args(argv)
    print(write(args.out, seed=args.seed, context=args.context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
