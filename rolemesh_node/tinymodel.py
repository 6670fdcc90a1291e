"""Tiny random-weight llama-architecture GGUF models for demos and tests.

:func:`write_tiny_model` writes a self-contained GGUF file (about 0.5 MB, no
download needed) that llama.cpp's ``llama-server`` loads in milliseconds.  The
weights are random, so the generated text is gibberish, but every endpoint the
node agent proxies works against it: ``/v1/chat/completions`` (streaming and
not), ``/v1/completions`` and, when the server is started with
``--embeddings --pooling mean``, ``/v1/embeddings``.

The output head is biased so that the model only ever generates printable
ASCII and never an end-of-generation token: every completion runs to
``max_tokens`` (``finish_reason == "length"``) and streams one non-empty chunk
per token.  Without ``max_tokens`` a request runs until the context is full.

Different ``seed`` values give different weights, so two files act as two
distinct "models" (e.g. for model-switch tests).  The output is fully
deterministic for a given ``(seed, name)`` pair.

Command line::

    python -m rolemesh_node.tinymodel OUT.gguf [--seed N] [--name NAME]

Requires the optional ``gguf`` and ``numpy`` packages (the ``demo`` extra).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import secrets
from collections.abc import Sequence

import gguf
import numpy as np

__all__ = [
    "ARCHITECTURE",
    "BLOCK_COUNT",
    "CHAT_TEMPLATE",
    "CONTEXT_LENGTH",
    "EMBEDDING_LENGTH",
    "FEED_FORWARD_LENGTH",
    "HEAD_COUNT",
    "HEAD_COUNT_KV",
    "build_vocab",
    "main",
    "write_tiny_model",
]

ARCHITECTURE = "llama"
EMBEDDING_LENGTH = 64
BLOCK_COUNT = 2
HEAD_COUNT = 4
HEAD_COUNT_KV = 4
FEED_FORWARD_LENGTH = 128
CONTEXT_LENGTH = 2048
ROPE_FREQ_BASE = 10000.0
RMS_NORM_EPS = 1e-5
WEIGHT_SCALE = 0.02
#: Constant put in hidden dimension 0 of every token embedding; it survives the
#: (tiny) residual updates, so ``output.weight[:, 0]`` acts as a per-token bias.
BIAS_CARRIER = 0.5
#: ``output_norm.weight[0]``: keeps the carrier from dominating the final hidden
#: state, which is also what ``/v1/embeddings`` returns.
CARRIER_NORM = 0.1
#: Bias weight for tokens the model must never emit (about -40 logits after norm).
SUPPRESS_WEIGHT = -50.0

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2

#: ChatML-style template; kept to the Jinja subset llama-server's engine accepts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_SPACE = "\u2581"  # SentencePiece's word-boundary marker "▁"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return the SentencePiece-style vocabulary as ``(tokens, scores, types)``.

    Layout: ``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback tokens
    ``<0x00>``..``<0xFF>``, the ChatML control tokens ``<|im_start|>`` and
    ``<|im_end|>``, then ``▁``, ``a``..``z`` and ``▁a``..``▁z``.  Anything else
    (capitals, digits, punctuation, non-ASCII) tokenizes through the byte
    tokens, so every input is representable.
    """
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]

    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 2

    pieces = [_SPACE, *_LETTERS, *(_SPACE + c for c in _LETTERS)]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)

    # SentencePiece-like scores: special/byte tokens 0, normal pieces get
    # decreasing log-prob-ish scores so merges have a well-defined preference.
    n_fixed = len(tokens) - len(pieces)
    scores = [0.0] * n_fixed + [-float(i + 1) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def _emittable(tokens: Sequence[str], types: Sequence[int]) -> np.ndarray:
    """Boolean mask of the tokens the model may generate.

    Only normal pieces and the byte tokens of printable ASCII (0x20-0x7E) are
    allowed, so generated text is always valid, printable UTF-8 (one streamed
    chunk per token) and no end-of-generation token is ever sampled: requests
    always run to ``max_tokens`` and finish with ``"length"``.
    """
    mask = np.zeros(len(tokens), dtype=bool)
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == gguf.TokenType.NORMAL:
            mask[i] = True
        elif typ == gguf.TokenType.BYTE:
            mask[i] = 0x20 <= int(tok[3:5], 16) <= 0x7E
    return mask


def _tensors(
    rng: np.random.Generator, tokens: Sequence[str], types: Sequence[int]
) -> list[tuple[str, np.ndarray]]:
    """Random F32 tensors with llama's names, in numpy (reversed ggml) shape order.

    llama.cpp expects e.g. ``attn_q`` with ggml ``ne = [n_embd, n_head*head_dim]``,
    which is numpy shape ``(n_head*head_dim, n_embd)``; GGUFWriter reverses the
    numpy shape when it writes the tensor info.

    Besides the random weights, hidden dimension 0 carries a constant
    (:data:`BIAS_CARRIER`) and ``output.weight[:, 0]`` turns it into a logit
    bias that suppresses every token outside :func:`_emittable`.
    """
    n_vocab = len(tokens)
    n_embd, n_ff = EMBEDDING_LENGTH, FEED_FORWARD_LENGTH
    head_dim = n_embd // HEAD_COUNT
    n_embd_kv = head_dim * HEAD_COUNT_KV

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * WEIGHT_SCALE).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    token_embd = weight(n_vocab, n_embd)
    token_embd[:, 0] = BIAS_CARRIER
    output = weight(n_vocab, n_embd)
    output[:, 0] = np.where(_emittable(tokens, types), 0.0, SUPPRESS_WEIGHT)

    output_norm = norm()
    output_norm[0] = CARRIER_NORM

    out: list[tuple[str, np.ndarray]] = [
        ("token_embd.weight", token_embd),
        ("output_norm.weight", output_norm),
        ("output.weight", output),
    ]
    for i in range(BLOCK_COUNT):
        p = f"blk.{i}"
        out += [
            (f"{p}.attn_norm.weight", norm()),
            (f"{p}.attn_q.weight", weight(HEAD_COUNT * head_dim, n_embd)),
            (f"{p}.attn_k.weight", weight(n_embd_kv, n_embd)),
            (f"{p}.attn_v.weight", weight(n_embd_kv, n_embd)),
            (f"{p}.attn_output.weight", weight(n_embd, HEAD_COUNT * head_dim)),
            (f"{p}.ffn_norm.weight", norm()),
            (f"{p}.ffn_gate.weight", weight(n_ff, n_embd)),
            (f"{p}.ffn_up.weight", weight(n_ff, n_embd)),
            (f"{p}.ffn_down.weight", weight(n_embd, n_ff)),
        ]
    return out


def _populate(writer: gguf.GGUFWriter, *, seed: int, name: str) -> None:
    """Add all metadata and tensors of the tiny model to ``writer``."""
    tokens, scores, types = build_vocab()

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(f"tiny random-weight llama test model (seed={seed})")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(EMBEDDING_LENGTH)
    writer.add_block_count(BLOCK_COUNT)
    writer.add_feed_forward_length(FEED_FORWARD_LENGTH)
    writer.add_head_count(HEAD_COUNT)
    writer.add_head_count_kv(HEAD_COUNT_KV)
    writer.add_rope_dimension_count(EMBEDDING_LENGTH // HEAD_COUNT)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_vocab_size(len(tokens))

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)
    for tensor_name, data in _tensors(rng, tokens, types):
        writer.add_tensor(tensor_name, data)


def write_tiny_model(path: str | os.PathLike[str], *, seed: int = 0, name: str = "tiny") -> pathlib.Path:
    """Write a tiny random-weight llama GGUF model to ``path`` and return it.

    The file is written to a temporary sibling first and moved into place with
    :func:`os.replace`, so readers never see a partial file.  The same
    ``seed``/``name`` always produce byte-identical output; different seeds give
    different weights.  ``name`` is stored as ``general.name``.
    """
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name (not mkstemp, whose 0600 mode would stick to the
    # final file); GGUFWriter creates it with the usual umask-derived mode.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        try:
            _populate(writer, seed=seed, name=name)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            for f in writer.fout or ():
                f.flush()
                os.fsync(f.fileno())
        finally:
            writer.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m rolemesh_node.tinymodel",
        description="Write a tiny random-weight llama GGUF model (about 0.5 MB) for demos and tests.",
    )
    parser.add_argument("out", type=pathlib.Path, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed for the weights (default: 0)")
    parser.add_argument("--name", default="tiny", help="general.name stored in the file (default: tiny)")
    args = parser.parse_args(argv)
    path = write_tiny_model(args.out, seed=args.seed, name=args.name)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
