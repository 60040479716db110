"""Stage chat_tokens: the train conversations (every variant) as token arrays, for pretraining with train.chat_share."""

from librarian.core.stage import parse, run_stage
from librarian.data.chat_tokens import build_chat_tokens


@run_stage
def main(argv=None):
    inputs = {"chat_dir": "data/chat", "tokenizer": "data/tokenizer.json"}
    args, params = parse(__doc__, inputs, {"out_dir": "data/chat_tokens"}, argv)
    manifest = build_chat_tokens(args.chat_dir, args.tokenizer, args.out_dir, params.train.chat_share)
    if not manifest["variants"]:
        print("chat_tokens: train.chat_share is 0, so training reads no conversations (a manifest only)")
    for v, meta in enumerate(manifest["variants"]):
        print(f"chat_tokens: variant {v} ({meta['table']}): {meta['tokens']:,} tokens, "
              f"{meta['reply_tokens']:,} of them reply tokens")


if __name__ == "__main__":
    main()
