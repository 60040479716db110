"""Stage subsample: keep a seeded random data.fraction of the train split."""

from librarian.core.stage import parse, run_stage
from librarian.data.subsample import subsample


@run_stage
def main(argv=None):
    args, params = parse(__doc__, {"raw_dir": "data/raw"}, {"out_dir": "data/subsample"}, argv)
    counts = subsample(args.raw_dir, args.out_dir, params.data.fraction, params.seed)
    print(f"subsample: train: {counts['stories_in']} -> {counts['stories_out']} stories")


if __name__ == "__main__":
    main()
