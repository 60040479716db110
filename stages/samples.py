"""Stage samples: continue the fixed prompts of params.samples with the trained model, into a Markdown file."""

from librarian.core.stage import parse, run_stage
from librarian.evaluation.samples import write_samples


@run_stage
def main(argv=None):
    inputs = {"model": "data/model/model.safetensors", "tokenizer": "data/tokenizer.json"}
    args, params = parse(__doc__, inputs, {"out": "metrics/samples.md"}, argv)
    write_samples(args.model, args.tokenizer, args.out, params.samples)
    print(f"samples: {len(params.samples.prompts)} prompts continued (seed {params.samples.seed}) into {args.out}")


if __name__ == "__main__":
    main()
