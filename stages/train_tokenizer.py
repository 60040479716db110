"""Stage train_tokenizer: a byte-level BPE learnt from the train split only."""

from librarian.core.stage import parse, run_stage
from librarian.data.tokenizer import save_tokenizer, train_tokenizer_on_split


@run_stage
def main(argv=None):
    args, params = parse(__doc__, {"train": "data/clean/train.parquet"}, {"out": "data/tokenizer.json"}, argv)
    tokenizer = train_tokenizer_on_split(args.train, params.tokenizer)
    save_tokenizer(tokenizer, args.out)
    size = tokenizer.get_vocab_size()
    note = "" if size == params.tokenizer.vocab_size else f" (asked for {params.tokenizer.vocab_size}: the corpus has no more merges)"
    print(f"train_tokenizer: vocab {size}{note}")


if __name__ == "__main__":
    main()
