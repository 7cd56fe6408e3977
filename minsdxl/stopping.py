"""Ctrl-C and SIGTERM during a training run: a clean stop after the current optimizer step.

Before training starts there is nothing to save: the run stops at once (`Interrupted`). During
training the first signal stops the run after the current optimizer step, which saves a checkpoint
and the trained weights; a second one quits at once. Either way the exit code is 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM), as shells expect.
"""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM where nothing is left to save (before training starts, or a second signal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """SIGINT and SIGTERM handlers for one run: `signum` is set by the first signal while `training`;
    otherwise a signal raises Interrupted. `restore()` puts the previous handlers back."""

    def __init__(self, log):
        self.signum, self.training, self.log = None, False, log
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, _frame):
        if not self.training or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step (a checkpoint and the trained weights "
                 f"will be saved); press Ctrl-C again to quit now", flush=True)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
