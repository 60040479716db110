"""Stage evaluate_chat: the base and the fine-tuned model on the chat test conversations, into a metrics file."""

from librarian.core.io import write_json
from librarian.core.stage import parse, run_stage
from librarian.evaluation.evaluate_chat import evaluate_chat


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

    def change(key: str) -> str:
        return f"{base[key]:.1%} -> {tuned[key]:.1%}"

    # No two-turn words or character conversation in the test split: no multi-turn recall to show.
    multi_turn = (f"multi-turn recall {change('multi_turn_recall')} over {tuned['multi_turn_requests']}, "
                  if tuned["multi_turn_requests"] else "")
    print(
        "evaluate_chat (base -> fine-tuned): "
        f"words recall {change('words_recall')} (held-out phrasings {change('words_recall_unseen')}) "
        f"over {tuned['words_requests']} requests, "
        f"character recall {change('character_recall')} (held-out {change('character_recall_unseen')}) "
        f"over {tuned['character_requests']}, {multi_turn}"
        f"reply perplexity {base['reply_perplexity']:.2f} -> {tuned['reply_perplexity']:.2f}, "
        f"story perplexity {base['story_perplexity']:.2f} -> {tuned['story_perplexity']:.2f} "
        f"({metrics['story_perplexity_change']:+.1%})"
    )


if __name__ == "__main__":
    main()
