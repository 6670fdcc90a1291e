"""Token counts from the end of a relayed body (:mod:`rolemesh_node.tokens`), on what llama-server b11434 sends."""

from __future__ import annotations

import pytest

from rolemesh_node.tokens import WINDOW, Counts, TailWindow, read_counts

CHAT = (b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"&d {i} ck"}}],'
        b'"created":1796270662,"model":"a","object":"chat.completion","usage":{"completion_tokens":5,'
        b'"prompt_tokens":23,"total_tokens":28,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-z",'
        b'"timings":{"cache_n":0,"prompt_n":23,"prompt_ms":2.173,"predicted_n":5,"predicted_ms":0.547}}')

CHAT_STREAM = [
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" usage"}}],'
    b'"object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk",'
    b'"timings":{"cache_n":22,"prompt_n":1,"prompt_ms":223.349,"predicted_n":3,"predicted_ms":88.564}}\n\n',
    b"data: [DONE]\n\n",
]

COMPLETION_STREAM_END = (
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"object":"text_completion",'
    b'"usage":{"completion_tokens":3,"prompt_tokens":3,"total_tokens":6,"prompt_tokens_details":{"cached_tokens":1}},'
    b'"id":"c","timings":{"cache_n":1,"prompt_n":2,"predicted_n":3}}\n\ndata: [DONE]\n\n')

EMBEDDING = b'{"model":"e","object":"list","usage":{"prompt_tokens":4,"total_tokens":4},"data":[{"embedding":[0.1]}]}'


def counts(chunks: list[bytes]) -> Counts | None:
    window = TailWindow()
    for chunk in chunks:
        window.feed(chunk)
    return read_counts(window.text())


def test_non_streamed_answer_uses_usage() -> None:
    assert counts([CHAT]) == Counts(23, 5)


def test_chat_stream_has_only_timings_cached_tokens_count_as_prompt() -> None:
    assert counts(CHAT_STREAM) == Counts(23, 3)


def test_completion_stream_usage_wins_over_timings() -> None:
    assert counts([b"data: {}\n\n" * 3, COMPLETION_STREAM_END]) == Counts(3, 3)


def test_embeddings_have_prompt_tokens_only() -> None:
    assert counts([EMBEDDING]) == Counts(4, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_chunk_boundaries_anywhere(size: int) -> None:
    for body, expected in ((CHAT, Counts(23, 5)), (b"".join(CHAT_STREAM), Counts(23, 3))):
        assert counts([body[i:i + size] for i in range(0, len(body), size)]) == expected


def test_the_window_is_bounded_but_keeps_the_end() -> None:
    window = TailWindow()
    for _ in range(1000):
        window.feed(b"data: " + b"x" * 100 + b"\n\n")
    window.feed(COMPLETION_STREAM_END)
    assert WINDOW <= window.size <= WINDOW + 200
    assert read_counts(window.text()) == Counts(3, 3)


@pytest.mark.parametrize("body", [
    b"", b"data: [DONE]\n\n", b'{"error":{"code":400,"message":"usage"}}', b'{"usage":{"prompt_tokens":', b'"usage": 5',
    b'{"usage":{"prompt_tokens":-1,"completion_tokens":2}}', b'{"usage":{"prompt_tokens":true,"completion_tokens":2}}',
    b'{"timings":{"prompt_n":"1","predicted_n":2}}', b'{"usage":{"prompt_tokens":1, bad}}',
])
def test_no_counts_when_there_are_none(body: bytes) -> None:
    assert read_counts(body) is None
