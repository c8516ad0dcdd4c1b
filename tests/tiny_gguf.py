"""A tiny llama-architecture GGUF model with random weights, written at test time.

Two layers, embedding 64, four heads, context 256 and a "llama" (SentencePiece) vocabulary of the
three special tokens, the 256 byte tokens and a few words: enough for llama.cpp's `llama-server`
to load it and generate (garbage) text in milliseconds, with nothing downloaded and nothing
binary in git. Its chat template is ChatML, which llama-server applies with or without `--jinja`.

    python tests/tiny_gguf.py OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_CTX = 256
_WORDS = (
    "hello world the a of and to in is it you that he was for on are with as his they be at one "
    "have this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write would "
    "like so these her long make thing see him two has look more day could go come did number"
)
WORDS = _WORDS.split()
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types, in SentencePiece's usual order."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"] + [f"\u2581{w}" for w in WORDS] + WORDS
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def write(
    path: Path,
    seed: int = 0,
    context: int = N_CTX,
    *,
    layers: int = N_LAYERS,
    embd: int = N_EMBD,
    heads: int = N_HEAD,
    kv_heads: int | None = None,
    ff: int = N_FF,
    f16: bool = False,
) -> Path:
    """Write the model to ``path``; returns it. ``context``: the context length it says it was
    trained for, which llama-server takes as each slot's context (a larger one lets a request
    generate for longer). The shape may be made larger (the memory figures want weights and a
    KV cache that stand out of llama-server's own few MiB): ``kv_heads`` below ``heads`` is
    grouped-query attention; ``f16`` stores the matrices as f16 (the norms stay f32)."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    kv_heads = kv_heads or heads
    head = embd // heads
    dtype = np.float16 if f16 else np.float32

    def weight(*shape: int) -> np.ndarray:
        # numpy (rows, cols) is GGUF (cols, rows): llama.cpp's {n_in, n_out} for a matmul.
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("hive tiny test model")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", weight(len(tokens), embd))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(embd))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(embd, embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head, embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head, embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(embd, embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(embd))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ff, embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ff, embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(embd, ff))
    writer.add_tensor("output_norm.weight", ones(embd))
    writer.add_tensor("output.weight", weight(len(tokens), embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(write(Path(sys.argv[1])))
