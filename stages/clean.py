"""Stage clean: normalise and filter stories, then split them into train/val/test."""

from librarian.core.stage import parse, run_stage
from librarian.data.clean import clean_corpus


@run_stage
def main(argv=None):
    args, params = parse(__doc__, {"in_dir": "data/subsample"}, {"out_dir": "data/clean", "report": "metrics/clean.json"}, argv)
    report = clean_corpus(args.in_dir, args.out_dir, args.report, params)
    pool = report["train_pool"]
    print(f"clean: {pool['stories_in']} -> {pool['stories_out']} stories; dropped {pool['dropped']}")
    print(f"clean: splits {report['splits']}")


if __name__ == "__main__":
    main()
