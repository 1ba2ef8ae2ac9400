"""Child processes whose peak-RSS accounting starts from zero.

Linux keeps a process's peak RSS (``getrusage().ru_maxrss``, what libFuzzer's
``-rss_limit_mb`` and our bounded-memory checks read) across ``execve``, and a child forked
(or vforked, as ``subprocess`` does) from a large parent starts with the parent's resident
pages counted: a Python child of a 2.4 GB pytest process reports 2,397 MB before doing
anything. Started through a small shell that forks it instead, the same child reports 13 MB.
"""

from __future__ import annotations

from collections.abc import Sequence


def fresh(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run by a ``/bin/sh`` that forks it (not ``exec``: the ``; exit`` keeps the
    shell), so the child's peak RSS is its own; the exit status is passed through."""
    return ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]
