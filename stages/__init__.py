"""Stage scripts: thin shells over librarian/, one per DVC stage.

Importing torch, pyarrow and datasets takes a second or two. A Ctrl-C or SIGTERM in that time
would print a traceback from deep inside an import (or, for SIGTERM, nothing at all), so until
run_stage takes over, either means one line and exit 130 or 143: nothing has been written yet.
The stage also gets SIGTERM from now on if the process that launched it (DVC) dies.

Only when a stage runs as a program (`python -m stages.<name>`, as dvc.yaml runs it): a test that
imports a stage's main must find its own signal handling unchanged.
"""

from librarian.core.process import launched_with_dash_m, while_starting

if launched_with_dash_m():
    while_starting()
