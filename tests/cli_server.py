"""A process that imports torch and fairseq once, then runs each fairseq console script in a child forked from it.

Every start of fairseq-train, -eval-lm, -generate, -interactive, -preprocess or -hydra-train spends about 4 CPU
seconds importing torch and fairseq before it reads its first option, and the suite starts about a hundred of them.
This server pays the import once. A child is a new process that runs the console script's own entry point (the
`module:function` fairseq's entry_points.txt names) as the script does: its own argv, working directory, stdin,
stdout, stderr and exit status, and a fresh import of the fairseq_cli module (so its logging set-up runs as in a
new process) and of the --user-dir package. Only torch, fairseq and the libraries they import are shared, in the
state their import leaves them; nothing runs a tensor operation here before forking (no thread pool to inherit).

Started by conftest.fairseq_cli, which falls back to a plain subprocess when a test's environment differs from the
one this server was started with (PYTHONPATH, OMP_NUM_THREADS and the like act at import time), and always with
MSFORMER_TESTS_SUBPROCESS=1.

Protocol: one line per request on stdin, the path of a folder holding request.json: {"argv": [argv[0], ...],
"cwd": folder, "env": {name: value}, and "entry": "fairseq_cli.train:cli_main" or "script": a .py file run as
__main__}, and optionally a file "stdin". The child writes "stdout" and "stderr" there; the server writes "pid" (the
child's, also its process group) when it starts and "status" (the exit status, negative for a signal) when it has
ended. EOF on stdin: the server kills the children still running and exits.
"""
import atexit
import importlib
import json
import logging
import os
import runpy
import select
import signal
import sys

CONSOLE_MODULES = ["fairseq_cli.train", "fairseq_cli.eval_lm", "fairseq_cli.generate", "fairseq_cli.interactive",
                   "fairseq_cli.preprocess", "fairseq_cli.hydra_train"]


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def preload():
    """Import what the console scripts import, then forget the fairseq_cli modules themselves (each child imports
    its own afresh) and the logging handlers an import may have installed (a new process has none)."""
    import torch._dynamo  # noqa: F401  (torch.optim imports it at its first step: ~1 s a process otherwise)

    for name in CONSOLE_MODULES:
        importlib.import_module(name)
    for name in [n for n in sys.modules if n == "fairseq_cli" or n.startswith("fairseq_cli.")]:
        del sys.modules[name]
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)


def run_child(folder, request):
    """In the forked child: become the console script. Never returns."""
    status = 1
    try:
        os.setpgid(0, 0)  # the client kills the whole group on a timeout
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        stdin = os.path.join(folder, "stdin")
        os.dup2(os.open(stdin if os.path.exists(stdin) else os.devnull, os.O_RDONLY), 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        try:
            if "entry" in request:
                module, function = request["entry"].split(":")
                status = getattr(importlib.import_module(module), function)()
            else:  # `python script.py args`: the script's folder first on sys.path, as Python puts it
                sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
                runpy.run_path(request["script"], run_name="__main__")
                status = 0
        except SystemExit as exit:
            status = exit.code
        except BaseException:
            sys.excepthook(*sys.exc_info())
            status = 1
        if status is None:
            status = 0
        elif not isinstance(status, int):  # sys.exit("message"): printed, exit status 1
            print(status, file=sys.stderr)
            status = 1
        atexit._run_exitfuncs()  # what the interpreter runs at exit (os._exit below skips it)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status & 0xFF if isinstance(status, int) else 1)


def serve():
    children = {}  # pid -> request folder
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.02 if children else None)
        if ready:
            data = os.read(0, 65536)
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            for folder in map(bytes.decode, lines):
                with open(os.path.join(folder, "request.json")) as f:
                    request = json.load(f)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    run_child(folder, request)
                children[pid] = folder
                write_atomically(os.path.join(folder, "pid"), str(pid))
        while children:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            write_atomically(os.path.join(children.pop(pid), "status"), str(os.waitstatus_to_exitcode(wait_status)))
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.path[0] = os.path.dirname(sys.executable)  # where the console scripts live: their sys.path[0]
    preload()
    serve()
