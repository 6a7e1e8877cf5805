"""A run's workdir: created, or refused in one line, and owned by one run at a time.

Two runs in one workdir would overwrite each other's checkpoints (both fail their saves, or both "finish"
with a mixture of the two). A run holds `workdir/owner.lock` while it trains: an exclusive `flock`, which
the kernel drops when the holding process ends, however it ends (exit, SIGKILL, a crash, the OOM killer), so
a dead owner never keeps the workdir and there is no stale lock to judge or clean up. The file also holds a
one-line record of the holder (host, pid, since when), which a refused run quotes; the record names the last
holder, so only a held lock means that a run is there.

Shared file systems: Linux implements `flock` on NFS as a whole-file POSIX lock, which the NFS server
arbitrates between clients (NFSv4 natively; NFSv3 through lockd), and a crashed client's locks expire with
its lease (90 s by default on NFSv4). Lustre needs its `flock` mount option, and file systems that cannot
lock at all (some FUSE mounts) answer ENOLCK or EOPNOTSUPP: the run then warns that the workdir is not
protected and goes on. Several hosts (`jax.distributed`): process 0 holds the lock for the whole job, as it
is the one that writes the shared files, and every host learns its outcome, so that all refuse together.

The sweep's workers also hold `workdir/.lock` around a trial (`bw_jax/sweep/worker.py`: a late worker waits
there instead of being refused); the two locks are different files, taken in that order.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator, TextIO

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_FILE = 'owner.lock'
UNLOCKABLE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # The file system has no locks.
RECORD_BYTES = 1024  # The owner record as the hosts share it (longer ones are cut).


class WorkdirError(ValueError):
  """The workdir cannot be a writable directory (the message says why); bad input, as a wrong path is."""


class WorkdirInUseError(WorkdirError):
  """Another run holds the workdir (the message names it: host, pid, since when)."""


def make_workdir(path: str, name: str = 'workdir') -> None:
  """Creates directory `path` and its parents; raises WorkdirError in one line when it is a file, lies under
  a file or cannot be created. `name` is what the message calls it (a flag such as '--dir')."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'{name} {path} is a file; give a directory (it is created if missing).')
  try:
    os.makedirs(path, exist_ok=True)
  except NotADirectoryError:
    raise WorkdirError(f'{name} {path} cannot be created: {file_above(path)} is a file, not a directory.') from None
  except OSError as e:
    raise WorkdirError(f'{name} {path} cannot be created ({e.strerror}); give a directory you can write to.'
                       ) from None


def file_above(path: str) -> str:
  """The nearest existing ancestor of `path` that is not a directory (`path` itself if none is found)."""
  parent = os.path.dirname(os.path.abspath(path))
  while parent != os.path.dirname(parent):
    if os.path.exists(parent):
      return parent if not os.path.isdir(parent) else path
    parent = os.path.dirname(parent)
  return path


def owner_record() -> str:
  """This process as the lock file records it: host, pid, start of ownership (local time with its offset)."""
  since = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': since})


def describe_owner(record: str) -> str:
  """'pid 123 on host h since 2026-01-02T03:04:05+00:00' from a record (or the record as written, when it
  is not one of `owner_record`'s)."""
  try:
    owner = json.loads(record)
    return f"pid {owner['pid']} on host {owner['host']} since {owner['since']}"
  except (ValueError, TypeError, KeyError):
    return record.strip() or 'a process that has not written its record yet'


def in_use_message(workdir: str, record: str) -> str:
  return (f'workdir {workdir} is in use by another run ({describe_owner(record)}); two runs there would '
          'overwrite each other\'s checkpoints: wait for it to end, stop it, or use another workdir.')


class WorkdirLock:
  """The exclusive flock on `workdir/owner.lock`, taken without waiting (`take`), with this process's record."""

  def __init__(self, file: TextIO | None):
    self._file = file  # None: the file system cannot lock; nothing is held.

  @classmethod
  def take(cls, workdir: str) -> 'WorkdirLock':
    """Holds the workdir or raises WorkdirInUseError naming the holder; WorkdirError when the workdir is not
    writable."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
      file = open(path, 'a+')  # Never truncated or replaced: the lock belongs to this file's inode.
    except OSError as e:
      raise WorkdirError(f'workdir {workdir} is not writable ({e.strerror}); give a directory you can '
                         'write to.') from None
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      record = read_record(file)
      file.close()
      raise WorkdirInUseError(in_use_message(workdir, record)) from None
    except OSError as e:
      file.close()
      if e.errno not in UNLOCKABLE:
        raise
      logging.warning('The file system of %s cannot lock files (%s): nothing stops a second run from using '
                      'this workdir at the same time.', workdir, e.strerror)
      return cls(None)
    file.seek(0)
    file.truncate()
    file.write(owner_record() + '\n')
    file.flush()
    return cls(file)

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def read_record(file: TextIO) -> str:
  """The holder's record, waiting a moment for it to be complete: the holder truncates the file, then writes."""
  for _ in range(20):
    file.seek(0)
    record = file.read()
    if record.endswith('\n'):
      return record
    time.sleep(0.05)
  return record


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
  """Owns `workdir` (which exists) for the `with` block. Process 0 takes its lock; with several hosts, all
  learn whether it could, and all raise its refusal (a WorkdirError) together."""
  lock, refused = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock.take(workdir)
    except WorkdirError as e:
      refused = e
  if jax.process_count() > 1:
    refusal = shared_text(str(refused) if refused else '')
    refused = refused or (WorkdirError(refusal) if refusal else None)
  if refused is not None:
    raise refused
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def shared_text(text: str) -> str:
  """Process 0's `text` on every host (cut to RECORD_BYTES bytes): a collective, every host must call it."""
  data = np.zeros(RECORD_BYTES, np.uint8)
  encoded = text.encode()[:RECORD_BYTES]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(shared[shared != 0].tolist()).decode(errors='replace')
