"""Stage tokenize: encode every split into a uint16 token file with a JSON sidecar."""

from librarian.core.stage import parse, run_stage
from librarian.data.tokens import tokenize_corpus


@run_stage
def main(argv=None):
    inputs = {"clean_dir": "data/clean", "tokenizer": "data/tokenizer.json"}
    args, params = parse(__doc__, inputs, {"out_dir": "data/tokens"}, argv)
    summary = tokenize_corpus(args.clean_dir, args.tokenizer, args.out_dir, params.tokenize.chunk_stories)
    for split, counts in summary.items():
        print(f"tokenize: {split}: {counts['tokens']} tokens, {counts['stories']} stories")


if __name__ == "__main__":
    main()
