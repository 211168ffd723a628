"""Runs ``python -m loki_exp.train ARGS`` many times without paying its imports each time.

The bad-input survey makes ~40 CLI calls that each fail within a second of starting, after
~13 s of importing Lightning and transformers. This server imports the CLI module once, then
forks one child per request: every call is still a fresh process running the CLI's own
``__main__`` code with its own argv, stdout/stderr and exit code. Requests and answers are
JSON lines on stdin/stdout. (Tests only; forking after imports is safe here because nothing
has started a thread yet.)
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile


def _child(module: str, args: list[str], out_path: str, err_path: str) -> None:
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    module = sys.argv[1]
    __import__(module)
    answers = sys.stdout
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            out_path, err_path = f"{tmp}/out", f"{tmp}/err"
            open(out_path, "w").close()
            open(err_path, "w").close()
            pid = os.fork()
            if pid == 0:
                _child(module, request["args"], out_path, err_path)
            _, status = os.waitpid(pid, 0)
            with open(out_path) as out, open(err_path) as err:
                reply = {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read(),
                         "stderr": err.read()}
        print(json.dumps(reply), file=answers, flush=True)


if __name__ == "__main__":
    main()
