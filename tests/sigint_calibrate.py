"""Run `duohead calibrate ARGS...` in this process and send it a real SIGINT from inside calibration step STEP
(0-based), right after the student pass: the moment the gates hold the relaxed layout instead of the deployed gates.

    python tests/sigint_calibrate.py STEP ARGS...

Used by tests/test_faults.py (a Ctrl-C that lands inside a step must leave a checkpoint between two steps)."""

from __future__ import annotations

import os
import signal
import sys

from duohead.calibrate.gates import GatedModel
from duohead.commands.calibrate import main

target = int(sys.argv[1])
student_pass = GatedModel.distill_backward
calls = []


def interrupted_student_pass(self, *args, **kwargs):
    loss = student_pass(self, *args, **kwargs)
    calls.append(loss)
    if len(calls) == target + 1:
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at its next instruction, here
    return loss


GatedModel.distill_backward = interrupted_student_pass
sys.exit(main(sys.argv[2:]))
