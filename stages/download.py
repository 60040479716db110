"""Stage download: read the corpus named by data.source into parquet splits."""

from librarian.core.stage import parse, run_stage
from librarian.data.sources import download


@run_stage
def main(argv=None):
    args, params = parse(__doc__, {}, {"out_dir": "where the raw splits go (data/raw)"}, argv)
    # A relative data.source is relative to the folder of params.yaml, the project root.
    manifest = download(params.data.source, args.out_dir, root=args.params.resolve().parent)
    for split, info in manifest["splits"].items():
        print(f"download: {split}: {info['stories']} stories")


if __name__ == "__main__":
    main()
