"""Stage chat_samples: the chat model's replies to the fixed requests of params.chat_samples, into a Markdown file."""

from librarian.core.stage import parse, run_stage
from librarian.evaluation.chat_samples import CHAT_SAMPLES
from librarian.evaluation.samples import write_samples


@run_stage
def main(argv=None):
    inputs = {"model": "data/chat_model/model.safetensors", "tokenizer": "data/tokenizer.json"}
    args, params = parse(__doc__, inputs, {"out": "metrics/chat_samples.md"}, argv)
    write_samples(args.model, args.tokenizer, args.out, params.chat_samples, CHAT_SAMPLES)
    print(f"chat_samples: {len(params.chat_samples.prompts)} requests answered (seed {params.chat_samples.seed}) "
          f"into {args.out}")


if __name__ == "__main__":
    main()
