"""Stage check_params: refuse params.yaml before DVC removes any stage's outputs.

DVC deletes a stage's outputs just before it runs the stage: a stage that then refused its params
left the workspace without them (a refused `train.batch_size: 0` cost the user data/model). This
stage runs first: download depends on its output, and every other stage on download's. It reads
all of params.yaml, as every stage does, and refuses here what a stage would refuse when it runs:
a data.source path that does not exist, a train.device this machine lacks. Its output's bytes never
change while the params are valid, so no stage downstream reruns on its account.
"""

from librarian.core.io import write_text
from librarian.core.stage import parse, run_stage
from librarian.data.sources import check_source

CHECKED = "params.yaml passed every stage's checks (stages/check_params.py)\n"


@run_stage
def main(argv=None):
    args, params = parse(__doc__, {}, {"out": "the mark that the params passed (data/params_checked)"}, argv)
    check_source(params.data.source, root=args.params.resolve().parent)
    if params.train.device not in ("auto", "cpu"):  # only then import torch, to ask for the device
        from librarian.training.runtime import pick_device

        pick_device(params.train.device)
    write_text(args.out, CHECKED)


if __name__ == "__main__":
    main()
