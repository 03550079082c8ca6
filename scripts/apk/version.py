"""apk's version ordering and dependency operators.

Semantics follow apk-tools' src/version.c (master): a version is
``digit{.digit}...{letter}{_suffix{number}}...{~hash}{-rN}``; tokens are compared in turn;
numbers with a leading zero compare as strings; pre-release suffixes (_alpha, _beta, _pre,
_rc) sort before the bare version, post-release ones (_cvs, _svn, _git, _hg, _p) after it.
Invalid versions still compare, as apk-tools master (apk 3, which Alpine ships from 3.23 on)
compares them: token by token up to where they break; two versions that break at the same
token compare equal (src/version.c apk_version_compare_fuzzy). apk 2.14 read on past a broken
token in some cases ("1.9.5p1": digits after a letter); we do not, and say so in the tests.
"""

from __future__ import annotations

from functools import cmp_to_key

# token kinds, in the order in which they may follow each other
INITIAL, DIGIT, LETTER, SUFFIX, SUFFIX_NO, HASH, REVISION, END, INVALID = range(9)

# suffix ranks: pre-release suffixes below NONE, post-release ones above
_SUFFIXES = {"alpha": 1, "beta": 2, "pre": 3, "rc": 4, "cvs": 6, "svn": 7, "git": 8, "hg": 9, "p": 10}
_NONE = 5

LESS, EQUAL, GREATER, FUZZY, CONFLICT = 1, 2, 4, 8, 16
ANY = LESS | EQUAL | GREATER
CHECKSUM = LESS | GREATER  # "><": match by package checksum, not version


class _Tokens:
    """Walks a version string token by token (kind, raw text, numeric/suffix value)."""

    __slots__ = ("kind", "pos", "s", "text", "value")

    def __init__(self, s: str) -> None:
        self.s, self.pos = s, 0
        self.kind, self.text, self.value = INITIAL, "", 0
        self._digits()

    def _digits(self) -> None:
        start = self.pos
        while self.pos < len(self.s) and self.s[self.pos].isdigit() and self.s[self.pos].isascii():
            self.pos += 1
        self.text = self.s[start : self.pos]
        if not self.text:
            self.kind = INVALID
        else:
            self.value = int(self.text)

    def _span(self, allowed: str) -> str:
        start = self.pos
        while self.pos < len(self.s) and self.s[self.pos] in allowed:
            self.pos += 1
        return self.s[start : self.pos]

    def next(self) -> None:
        s, prev = self.s, self.kind
        if self.pos >= len(s):
            self.kind = END
            return
        c = s[self.pos]
        if "a" <= c <= "z":
            if prev > DIGIT:
                self.kind = INVALID
                return
            self.kind, self.text, self.value = LETTER, c, ord(c)
            self.pos += 1
        elif c == "." or c.isdigit():
            if c == ".":
                if prev > DIGIT:
                    self.kind = INVALID
                    return
                self.pos += 1
            if prev in (INITIAL, DIGIT):
                self.kind = DIGIT
            elif prev == SUFFIX and c != ".":
                self.kind = SUFFIX_NO
            else:
                self.kind = INVALID
                return
            self._digits()
        elif c == "_":
            if prev > SUFFIX_NO:
                self.kind = INVALID
                return
            self.pos += 1
            self.text = self._span("abcdefghijklmnopqrstuvwxyz")
            rank = _SUFFIXES.get(self.text)
            if rank is None:
                self.kind = INVALID
                return
            self.kind, self.value = SUFFIX, rank
        elif c == "~":
            if prev >= HASH:
                self.kind = INVALID
                return
            self.pos += 1
            self.text = self._span("0123456789abcdefABCDEF")
            self.kind = HASH if self.text else INVALID
        elif c == "-":
            if prev >= REVISION or not s.startswith("-r", self.pos):
                self.kind = INVALID
                return
            self.pos += 2
            self.kind = REVISION
            self._digits()
        else:
            self.kind = INVALID


def _string_order(a: str, b: str) -> int:
    return LESS if a < b else GREATER if a > b else EQUAL


def _token_order(a: _Tokens, b: _Tokens) -> int:
    if a.kind == DIGIT and (a.text.startswith("0") or b.text.startswith("0")):
        return _string_order(a.text, b.text)  # leading zero: compare as strings (Gentoo rule)
    if a.kind in (INITIAL, DIGIT, SUFFIX_NO, REVISION, LETTER, SUFFIX):
        return LESS if a.value < b.value else GREATER if a.value > b.value else EQUAL
    return _string_order(a.text, b.text)  # commit hash


def compare(a: str, b: str, fuzzy: bool = False) -> int:
    """LESS, EQUAL or GREATER. With ``fuzzy``, ``a`` equals any ``b`` it starts with."""
    ta, tb = _Tokens(a), _Tokens(b)
    while ta.kind == tb.kind and ta.kind < END:
        r = _token_order(ta, tb)
        if r != EQUAL:
            return r
        ta.next()
        tb.next()
    if ta.kind == tb.kind:
        return EQUAL
    if tb.kind == END and fuzzy:
        return EQUAL
    # Equal so far; the longer one is newer unless what follows is a pre-release suffix.
    if ta.kind == SUFFIX and ta.value < _NONE:
        return LESS
    if tb.kind == SUFFIX and tb.value < _NONE:
        return GREATER
    return LESS if ta.kind > tb.kind else GREATER


def valid(v: str) -> bool:
    t = _Tokens(v)
    while t.kind < END:
        t.next()
    return t.kind == END


def op_mask(op: str) -> int:
    """``<``, ``<=``, ``=``, ``>=``, ``>``, ``~``, ``<~``, ``>~``, ``><`` -> result mask (0: not an operator)."""
    mask = 0
    for ch in op:
        if ch == "<":
            mask |= LESS
        elif ch == ">":
            mask |= GREATER
        elif ch == "=":
            mask |= EQUAL
        elif ch == "~":
            mask |= FUZZY | EQUAL
        else:
            return 0
    return mask


def op_string(mask: int) -> str:
    m = mask & ~CONFLICT
    return {
        LESS: "<",
        LESS | EQUAL: "<=",
        LESS | EQUAL | FUZZY: "<~",
        EQUAL | FUZZY: "~",
        FUZZY: "~",
        EQUAL: "=",
        GREATER | EQUAL: ">=",
        GREATER | EQUAL | FUZZY: ">~",
        GREATER: ">",
        CHECKSUM: "><",
        ANY: "",
    }.get(m, "?")


def matches(version: str, mask: int, wanted: str) -> bool:
    """Does ``version`` satisfy ``<op> wanted`` (mask from op_mask)?"""
    ok = True if mask & ANY == ANY else bool(compare(version, wanted, bool(mask & FUZZY)) & mask)
    return not ok if mask & CONFLICT else ok


def _cmp(a: str, b: str) -> int:
    r = compare(a, b)
    return -1 if r == LESS else 1 if r == GREATER else 0


sort_key = cmp_to_key(_cmp)
