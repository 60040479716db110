"""Stage evaluate: score the trained model on the test split (and val) into a metrics file."""

from librarian.core.io import write_json
from librarian.core.stage import parse, run_stage
from librarian.evaluation.evaluate import evaluate_model


@run_stage
def main(argv=None):
    inputs = {"model": "data/model/model.safetensors", "tokens_dir": "data/tokens"}
    args, params = parse(__doc__, inputs, {"out": "metrics/metrics.json"}, argv)
    metrics = evaluate_model(args.model, args.tokens_dir, params)
    write_json(args.out, metrics)
    print(
        f"evaluate: test loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
        f"top-1 {metrics['top1_accuracy']:.1%}, {metrics['bits_per_byte']:.4f} bits/byte "
        f"over {metrics['tokens']} tokens; val loss {metrics['val']['loss']:.4f}; {metrics['n_params']:,} parameters"
    )


if __name__ == "__main__":
    main()
