"""Stage scripts: thin shells over librarian/, one per DVC stage.

Importing torch, pyarrow and datasets takes a second or two. A Ctrl-C in that time would print a
traceback from deep inside an import, so until run_stage takes over, SIGINT means one line and
exit 130: nothing has been written yet.
"""

import signal
import sys


def _interrupted_while_starting(signum, frame):
    print("error: interrupted while starting; nothing was written, rerun the stage to start again", file=sys.stderr)
    sys.exit(130)


signal.signal(signal.SIGINT, _interrupted_while_starting)
