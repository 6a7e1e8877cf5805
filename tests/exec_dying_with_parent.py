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


def main(argv: list[str]) -> None:
  parent, command = int(argv[1]), argv[2:]
  if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')
  if os.getppid() != parent:  # The parent died before the prctl: nothing would kill this process later.
    os.kill(os.getpid(), signal.SIGKILL)
  os.execvp(command[0], command)


if __name__ == '__main__':
  main(sys.argv)
