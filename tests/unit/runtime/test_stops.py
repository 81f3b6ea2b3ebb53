"""edgeserve/runtime/stops.py: stop sequences over a stream of text pieces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeserve.runtime.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], str, bool]:
    """Feed every piece; returns what each feed released, what flush released, and `stopped`."""
    matcher = StopMatcher(stops)
    released = [matcher.feed(piece) for piece in pieces]
    return released, matcher.flush(), matcher.stopped


def test_no_stops_passes_every_piece_through_at_once() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("Hello") == "Hello"
    assert matcher.feed(", wor") == ", wor"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_empty_stop_strings_are_ignored() -> None:
    released, tail, stopped = run(["", ""], ["a", "b"])
    assert released == ["a", "b"]
    assert tail == ""
    assert not stopped


def test_stop_inside_one_piece_cuts_it() -> None:
    released, tail, stopped = run(["END"], ["abcENDxyz"])
    assert released == ["abc"]
    assert tail == ""
    assert stopped


def test_stop_split_across_pieces() -> None:
    released, tail, stopped = run(["</answer>"], ["42</", "ans", "wer>", "more text"])
    assert "".join(released) + tail == "42"
    assert stopped
    # the held-back prefix of the stop never went out
    assert released[0] == "42"
    assert released[1:] == ["", "", ""]


def test_possible_prefix_is_held_back_then_released_when_it_turns_out_not_to_be() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "  # "ST" could start "STOP"
    assert matcher.feed("ORM") == "STORM"  # it did not
    assert not matcher.stopped


def test_held_text_is_released_by_flush() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("the end ST") == "the end "
    assert matcher.flush() == "ST"
    assert not matcher.stopped
    assert matcher.flush() == ""  # nothing is released twice


def test_nothing_after_the_stop_is_emitted() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("line one\n") == "line one"
    assert matcher.feed("\nline two") == ""
    assert matcher.stopped
    assert matcher.feed("line three") == ""
    assert matcher.flush() == ""


def test_several_stops_earliest_wins() -> None:
    released, tail, stopped = run(["world", "lo"], ["hello world"])
    assert released == ["hel"]
    assert tail == ""
    assert stopped


def test_several_stops_in_one_piece_earliest_start_wins() -> None:
    # both stops are complete in the pending text "bcdef"; the one that starts first wins
    matcher = StopMatcher(["cd", "bcdef"])
    assert matcher.feed("xab") == "xa"  # "b" could start "bcdef"
    assert matcher.feed("cdef") == ""
    assert matcher.stopped


def test_a_stop_that_completes_first_ends_the_stream() -> None:
    # streaming cannot wait: "cd" completes before "bcdef" could, so the cut is at "cd"
    released, tail, stopped = run(["cd", "bcdef"], ["xab", "cd", "ef"])
    assert "".join(released) + tail == "xab"
    assert stopped


def test_longest_held_prefix_among_several_stops() -> None:
    matcher = StopMatcher(["<|im_end|>", "<|end|>"])
    assert matcher.feed("ok <|") == "ok "
    assert matcher.feed("en") == ""  # "<|en" is still a prefix of "<|end|>"
    assert matcher.feed("d|> tail") == ""
    assert matcher.stopped


def test_unicode_pieces() -> None:
    released, tail, stopped = run(["。"], ["こんにちは", "世界。", "さようなら"])
    assert "".join(released) + tail == "こんにちは世界"
    assert stopped


text_alphabet = st.sampled_from("abAB \n")


def reference(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """The earliest stop in the text received so far, decided after every piece."""
    received = ""
    for piece in pieces:
        received += piece
        hits = [i for i in (received.find(s) for s in stops if s) if i >= 0]
        if hits:
            return received[: min(hits)], True
    return received, False


@given(
    pieces=st.lists(st.text(alphabet=text_alphabet, max_size=6), max_size=12),
    stops=st.lists(st.text(alphabet=text_alphabet, max_size=4), max_size=3),
)
def test_streaming_matches_reference(pieces: list[str], stops: list[str]) -> None:
    released, tail, stopped = run(stops, pieces)
    expected, expected_stopped = reference(stops, pieces)
    assert "".join(released) + tail == expected
    assert stopped == expected_stopped
    if stopped:
        assert tail == ""


@given(
    pieces=st.lists(st.text(alphabet=text_alphabet, max_size=6), max_size=12),
    stops=st.lists(st.text(alphabet=text_alphabet, min_size=1, max_size=4), max_size=3),
)
def test_holds_back_only_a_possible_stop_prefix(pieces: list[str], stops: list[str]) -> None:
    """Until a stop is seen, everything is sent except the longest tail that could start one."""
    matcher = StopMatcher(stops)
    received = sent = ""
    for piece in pieces:
        received += piece
        sent += matcher.feed(piece)
        if matcher.stopped:
            return
        held = max(
            (n for n in range(1, len(received) + 1)
             if any(len(stop) > n and stop.startswith(received[-n:]) for stop in stops)),
            default=0,
        )
        assert sent == received[: len(received) - held]
