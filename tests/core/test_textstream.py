"""Streaming text out of token pieces: UTF-8 split across tokens, stop strings held back until decided."""

from localllm.textstream import TextStream


def test_utf8_split_across_tokens() -> None:
    s = TextStream()
    data = "héllo 🙂".encode()
    out = "".join(s.feed(data[i:i + 1]) for i in range(len(data))) + s.flush()
    assert out == "héllo 🙂"


def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    s = TextStream(["STOP"])
    out = "".join(s.feed(p) for p in (b"abc S", b"TO", b"P more"))
    assert out == "abc " and s.stopped and s.flush() == ""


def test_partial_stop_prefix_released_when_it_cannot_match() -> None:
    s = TextStream(["STOP"])
    assert s.feed(b"ST") == ""
    assert s.feed(b"x") == "STx"
    assert s.flush() == ""
