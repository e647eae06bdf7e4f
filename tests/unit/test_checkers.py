"""Checkers of sbx batch: pure functions over the payload's stdout."""

from __future__ import annotations

import pytest

from sandbox import checkers
from sandbox.errors import UsageError


def test_exact_accepts_the_same_bytes_only():
    assert checkers.exact(b"42\n", "42\n").passed
    assert not checkers.exact(b"42", "42\n").passed
    assert not checkers.exact(b" 42\n", "42\n").passed


def test_exact_names_the_first_difference():
    check = checkers.exact(b"1 2 4\n", "1 2 3\n")
    assert check.detail == "byte 4: got b'4\\n', expected b'3\\n'"
    assert "extra bytes" in checkers.exact(b"42\n\n", "42\n").detail
    assert "ends after 2 bytes" in checkers.exact(b"42", "42\n").detail


def test_tokens_ignore_spacing_and_line_breaks():
    assert checkers.tokens(b"  1   2\n3  \n\n", "1 2 3\n").passed
    assert checkers.tokens(b"", "").passed
    assert checkers.tokens(b"\t\n", "").passed


def test_tokens_reject_a_wrong_or_missing_token():
    assert checkers.tokens(b"1 2 4", "1 2 3").detail == "token 3: got '4', expected '3'"
    assert checkers.tokens(b"1 2", "1 2 3").detail == "got 2 tokens, expected 3"
    assert checkers.tokens(b"1 2 3 4", "1 2 3").detail == "got 4 tokens, expected 3"
    # Numbers are compared as text by the token checker.
    assert not checkers.tokens(b"1.0", "1").passed


def test_numbers_within_absolute_or_relative_tolerance():
    assert checkers.numbers(b"3.1415926", "3.14159265", 1e-6).passed
    assert checkers.numbers(b"1000001", "1000000", 1e-6).passed  # relative
    assert not checkers.numbers(b"3.15", "3.14", 1e-6).passed
    assert checkers.numbers(b"1e3 x", "1000.0 x").passed
    assert not checkers.numbers(b"1 y", "1 x").passed


def test_numbers_match_nan_only_as_the_same_text_and_only_equal_infinities():
    assert checkers.numbers(b"nan", "nan").passed
    assert not checkers.numbers(b"nan", "NaN").passed
    assert not checkers.numbers(b"nan", "1").passed
    assert checkers.numbers(b"inf", "inf").passed
    assert not checkers.numbers(b"inf", "1e308").passed


def test_undecodable_output_does_not_raise():
    assert not checkers.tokens(b"\xff\xfe", "42").passed


def test_check_by_name():
    assert checkers.check("tokens", b" 42 ", "42").passed
    assert not checkers.check("exact", b" 42 ", "42").passed
    assert checkers.check("numbers", b"0.5", "0.51", tolerance=0.1).passed
    with pytest.raises(UsageError, match="unknown checker 'fuzzy'"):
        checkers.check("fuzzy", b"", "")
