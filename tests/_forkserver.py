"""Fresh processes without a fresh interpreter: import torch and modeopt once, then fork per case.

Several tests need a process in which modeopt's compiled kernel library has never been built or
loaded (it is built and loaded once per process). Starting a Python interpreter and importing torch
costs seconds per case; a fork of a server that has imported them but never touched the library
(nor run a torch op, so no thread pool exists to be copied half-way) starts in milliseconds and is,
for the library, the same as a fresh process. Environment variables are applied in the child before
the case runs (modeopt reads ``CC``, ``MODEOPT_CACHE`` and ``MODEOPT_KERNELS`` when the library is
first wanted, not at import).

Protocol (one JSON object per line): the test writes ``{"code", "env", "unset", "timeout", "stdout",
"stderr"}``
to the server's stdin; the server forks, the child runs ``code`` as ``__main__`` with its output in
the two files, and the server answers ``{"returncode": n}`` (negative: killed by that signal, as
:mod:`subprocess` reports it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _serve() -> None:
    import torch  # noqa: F401  (the expensive imports, done once)

    import modeopt  # noqa: F401
    import workloads  # noqa: F401
    from modeopt.modespace.kernels import c_library

    assert not c_library._lib_tried, "the server must never build or load the kernel library"
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: becomes the case's process
            code = 1
            signal.alarm(req["timeout"])  # a hung case dies by SIGALRM (return code -14), as a timeout would
            try:
                for k in req["unset"]:
                    os.environ.pop(k, None)
                os.environ.update(req["env"])
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                exec(compile(req["code"], "<case>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.__stdout__.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.__stdout__.flush()


class ForkServer:
    """A running server; :meth:`run` behaves like ``subprocess.run([python, "-c", code], env=...)``."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        env = {k: v for k, v in os.environ.items() if k not in ("MODEOPT_KERNELS", "CC", "MODEOPT_CACHE")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "workloads")])
        env["MODEOPT_CACHE"] = str(tmp / "never-used")  # each case names its own
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)

    def run(self, code: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = (), timeout: int = 300
            ) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = self.tmp / f"case{self.n}.out", self.tmp / f"case{self.n}.err"
        self.proc.stdin.write(json.dumps({"code": code, "env": env or {}, "unset": list(unset),
                                          "timeout": timeout, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        rc = json.loads(line)["returncode"]
        return subprocess.CompletedProcess(["<forked>", code], rc, out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    _serve()
