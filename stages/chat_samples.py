"""Stage chat_samples: the chat model's replies to the fixed requests of params.chat_samples, into a Markdown file."""

from librarian.chat import STOP_STRINGS, render_prompt
from librarian.samples import Layout, write_samples
from librarian.stage import parse, run_stage

# Each request is the first turn of a chat, sent and stopped as `librarian chat` does. The layout
# lives here, not in librarian/samples.py, so the samples stage does not depend on librarian/chat.py.
CHAT_SAMPLES = Layout(
    section="chat_samples",
    title="Chat samples",
    prompt="request",
    prompt_label="Request:",
    output_label="Reply:",
    to_model=lambda request: render_prompt([], request),
    stop_strings=STOP_STRINGS,
    tidy=str.strip,  # as the chat shows and keeps a reply
    notes=("format: each request is a new chat's first turn, `User: <request>` then `Assistant:` on the next "
           "line, as `librarian chat` sends it",),
    missing_model="fine-tune the chat model first (`dvc repro finetune`)",
)


@run_stage
def main(argv=None):
    inputs = {"model": "data/chat_model/model.safetensors", "tokenizer": "data/tokenizer.json"}
    args, params = parse(__doc__, inputs, {"out": "metrics/chat_samples.md"}, argv)
    write_samples(args.model, args.tokenizer, args.out, params.chat_samples, CHAT_SAMPLES)
    print(f"chat_samples: {len(params.chat_samples.prompts)} requests answered (seed {params.chat_samples.seed}) "
          f"into {args.out}")


if __name__ == "__main__":
    main()
