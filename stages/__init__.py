"""Stage scripts: thin shells over librarian/, one per DVC stage.

Importing torch, pyarrow and datasets takes a second or two. A Ctrl-C or SIGTERM in that time
would print a traceback from deep inside an import (or, for SIGTERM, nothing at all), so until
run_stage takes over, either means one line and exit 130 or 143: nothing has been written yet.
The stage also gets SIGTERM from now on if the process that launched it (DVC) dies.
"""

from librarian.core.process import while_starting

while_starting()
