"""clapedge.subproc.fresh: a child's peak RSS is its own, not its parent's."""

from __future__ import annotations

import json
import subprocess
import sys

from clapedge.subproc import fresh

_PARENT = """
import json, subprocess, sys
from clapedge.subproc import fresh
big = bytearray(600 << 20)
for i in range(0, len(big), 4096):
    big[i] = 1
code = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
run = lambda cmd: int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
print(json.dumps({"direct": run([sys.executable, "-c", code]),
                  "fresh": run(fresh([sys.executable, "-c", code]))}))
"""


def test_a_fresh_child_does_not_inherit_its_parents_peak_rss():
    out = subprocess.run([sys.executable, "-c", _PARENT], capture_output=True, text=True,
                         check=True, timeout=120)
    mb = json.loads(out.stdout)
    assert mb["direct"] >= 600          # what Linux reports without the shell in between
    assert mb["fresh"] < 200, mb


def test_exit_status_and_arguments_pass_through():
    code = "import sys; print(sys.argv[1:]); sys.exit(3)"
    done = subprocess.run(fresh([sys.executable, "-c", code, "a b", "'q'", "$HOME"]),
                          capture_output=True, text=True)
    assert done.returncode == 3
    assert done.stdout.strip() == str(["a b", "'q'", "$HOME"])
