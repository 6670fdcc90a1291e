"""Tests for rolemesh_node.tinymodel (no llama-server needed)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from rolemesh_node import tinymodel  # noqa: E402


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"missing GGUF key {key}"
    return field.contents()


def _tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    for t in reader.tensors:
        if t.name == name:
            return np.array(t.data)
    raise AssertionError(f"missing tensor {name}")


def test_writes_file_and_returns_path(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "sub" / "m.gguf"
    result = tinymodel.write_tiny_model(out)
    assert result == out
    assert out.is_file()
    assert out.read_bytes()[:4] == b"GGUF"
    assert 200_000 < out.stat().st_size < 1_000_000
    # No temporary files left behind.
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def test_file_is_not_private(tmp_path: pathlib.Path) -> None:
    out = tinymodel.write_tiny_model(tmp_path / "m.gguf")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_accepts_str_path_and_overwrites(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old junk")
    result = tinymodel.write_tiny_model(str(out), seed=3)
    assert isinstance(result, pathlib.Path)
    assert out.read_bytes()[:4] == b"GGUF"


def test_deterministic_for_same_seed(tmp_path: pathlib.Path) -> None:
    a = tinymodel.write_tiny_model(tmp_path / "a.gguf", seed=7)
    b = tinymodel.write_tiny_model(tmp_path / "b.gguf", seed=7)
    assert _sha256(a) == _sha256(b)


def test_different_seeds_give_different_weights(tmp_path: pathlib.Path) -> None:
    a = gguf.GGUFReader(tinymodel.write_tiny_model(tmp_path / "a.gguf", seed=1))
    b = gguf.GGUFReader(tinymodel.write_tiny_model(tmp_path / "b.gguf", seed=2))
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output.weight"):
        assert not np.array_equal(_tensor(a, name), _tensor(b, name))


def test_metadata(tmp_path: pathlib.Path) -> None:
    reader = gguf.GGUFReader(tinymodel.write_tiny_model(tmp_path / "m.gguf", seed=5, name="alpha"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "alpha"
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 4
    assert _field(reader, "llama.feed_forward_length") == 128
    assert _field(reader, "llama.context_length") >= 512
    assert _field(reader, "tokenizer.ggml.model") == "llama"

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    assert 260 < len(tokens) < 400
    assert len(types) == len(scores) == len(tokens) == _field(reader, "llama.vocab_size")
    assert tokens[_field(reader, "tokenizer.ggml.unknown_token_id")] == "<unk>"
    assert tokens[_field(reader, "tokenizer.ggml.bos_token_id")] == "<s>"
    assert tokens[_field(reader, "tokenizer.ggml.eos_token_id")] == "</s>"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    byte_tokens = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.BYTE]
    assert byte_tokens == [f"<0x{b:02X}>" for b in range(256)]
    assert "\u2581" in tokens

    template = _field(reader, "tokenizer.chat_template")
    assert "messages" in template and "add_generation_prompt" in template


def test_tensor_shapes(tmp_path: pathlib.Path) -> None:
    reader = gguf.GGUFReader(tinymodel.write_tiny_model(tmp_path / "m.gguf"))
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    # GGUFReader reports ggml ne order (innermost dimension first).
    expected = {
        "token_embd.weight": [64, n_vocab],
        "output_norm.weight": [64],
        "output.weight": [64, n_vocab],
    }
    for i in range(2):
        expected |= {
            f"blk.{i}.attn_norm.weight": [64],
            f"blk.{i}.attn_q.weight": [64, 64],
            f"blk.{i}.attn_k.weight": [64, 64],
            f"blk.{i}.attn_v.weight": [64, 64],
            f"blk.{i}.attn_output.weight": [64, 64],
            f"blk.{i}.ffn_norm.weight": [64],
            f"blk.{i}.ffn_gate.weight": [64, 128],
            f"blk.{i}.ffn_up.weight": [64, 128],
            f"blk.{i}.ffn_down.weight": [128, 64],
        }
    got = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert got == expected
    for t in reader.tensors:
        assert np.isfinite(np.array(t.data)).all()


def test_output_head_only_emits_printable_text(tmp_path: pathlib.Path) -> None:
    reader = gguf.GGUFReader(tinymodel.write_tiny_model(tmp_path / "m.gguf"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    bias = _tensor(reader, "output.weight")[:, 0]  # numpy shape (n_vocab, n_embd)
    assert np.isclose(_tensor(reader, "token_embd.weight")[:, 0], tinymodel.BIAS_CARRIER).all()
    suppressed = {t for t, b in zip(tokens, bias) if b == tinymodel.SUPPRESS_WEIGHT}
    allowed = {t for t, b in zip(tokens, bias) if b == 0.0}
    assert suppressed | allowed == set(tokens)
    assert {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<0x0A>", "<0x80>", "<0xFF>"} <= suppressed
    assert {"a", "z", "\u2581", "\u2581q", "<0x20>", "<0x41>", "<0x7E>"} <= allowed


def test_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert tinymodel.main([str(out), "--seed", "4", "--name", "beta"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.name") == "beta"
    assert _sha256(out) == _sha256(tinymodel.write_tiny_model(tmp_path / "api.gguf", seed=4, name="beta"))
