"""Stage chat_data: conversations built from the clean stories, one row per turn, every reply a real story."""

from librarian.core.stage import parse, run_stage
from librarian.data.chat_data import build_chat_data


@run_stage
def main(argv=None):
    args, params = parse(__doc__, {"clean_dir": "data/clean"},
                         {"out_dir": "data/chat", "metrics": "metrics/chat_data.json"}, argv)
    metrics = build_chat_data(args.clean_dir, args.out_dir, args.metrics, params)
    print("chat_data: " + "; ".join(
        f"{split} {m['conversations']} conversations ({m['multi_turn']} with two turns), "
        + ", ".join(f"{m[kind]} {kind}" for kind in ("words", "character", "opening", "plain"))
        for split, m in metrics.items()))


if __name__ == "__main__":
    main()
