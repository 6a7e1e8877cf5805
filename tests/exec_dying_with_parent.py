"""python exec_dying_with_parent.py PARENT_PID COMMAND...: becomes COMMAND (same pid, by exec) after asking the
kernel to SIGKILL it when the thread that started it dies (Linux prctl PR_SET_PDEATHSIG, kept across exec).

What `setpriv --pdeathsig KILL` does, without relying on util-linux's setpriv being installed (Debian 11 ships it
as a package of its own). PARENT_PID is the starting process's pid: if that process died before the prctl,
this one exits at once instead of running orphaned. Imports nothing heavy: it runs before every test process.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
  """Makes the kernel SIGKILL this process when its parent dies, so that a killed pytest leaves no test
  process behind; call it first thing in a child (a multiprocessing one: test_sweep_race). `parent`: the
  pid the parent should have (default: the current parent's); if it died already, this process dies now."""
  parent = os.getppid() if parent is None else parent
  if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')
  if os.getppid() != parent:  # The parent died before the prctl: nothing would kill this process later.
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
  parent, command = int(argv[1]), argv[2:]
  die_with_parent(parent)
  os.execvp(command[0], command)


if __name__ == '__main__':
  main(sys.argv)
