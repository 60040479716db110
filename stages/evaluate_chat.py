"""Stage evaluate_chat: the base and the fine-tuned model on the chat test conversations, into a metrics file."""

from librarian.evaluate_chat import evaluate_chat
from librarian.io import write_json
from librarian.stage import parse, run_stage


@run_stage
def main(argv=None):
    inputs = {
        "base_model": "data/model/model.safetensors",
        "chat_model": "data/chat_model/model.safetensors",
        "tokenizer": "data/tokenizer.json",
        "chat_dir": "data/chat",
        "tokens_dir": "data/tokens",
    }
    args, params = parse(__doc__, inputs, {"out": "metrics/chat.json"}, argv)
    metrics = evaluate_chat(args.base_model, args.chat_model, args.tokenizer, args.chat_dir, args.tokens_dir, params)
    write_json(args.out, metrics)
    base, tuned = metrics["base"], metrics["finetuned"]
    print(
        "evaluate_chat (base -> fine-tuned): "
        f"words recall {base['words_recall']:.1%} -> {tuned['words_recall']:.1%} "
        f"over {tuned['words_requests']} requests, "
        f"character recall {base['character_recall']:.1%} -> {tuned['character_recall']:.1%} "
        f"over {tuned['character_requests']}, "
        f"reply perplexity {base['reply_perplexity']:.2f} -> {tuned['reply_perplexity']:.2f}, "
        f"story perplexity {base['story_perplexity']:.2f} -> {tuned['story_perplexity']:.2f} "
        f"({metrics['story_perplexity_change']:+.1%})"
    )


if __name__ == "__main__":
    main()
