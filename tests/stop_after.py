"""A stand-in for runner.StopRequests, shared by the scripts' interrupt-and-resume tests."""
import time


class StopAfter:
    """Stand-in for runner.StopRequests: asks to stop at the `n`-th safe-point check (as a Ctrl-C would)."""

    def __init__(self, n):
        self.checks, self.n, self.signal = 0, n, 2

    @property
    def requested(self):
        self.checks += 1
        return self.checks >= self.n

    def due(self, last_checkpoint, minutes):
        return self.requested or time.time() - last_checkpoint >= 60 * minutes

    def close(self):
        pass

    def exit(self, where, command):
        print(f"interrupted after {where}; resume with: {command}")
        raise SystemExit(130)
