"""Stage train: train the GPT on the train split, validating every epoch; resumes if interrupted."""

from librarian.core.stage import parse, run_stage
from librarian.training.train import TrainPaths, train


@run_stage
def main(argv=None):
    outputs = {"out_dir": "data/model",
               "curves_dir": "metrics/train: loss and learning-rate curves (a DVC output)",
               "speed_dir": "metrics/train_speed: tokens/s and elapsed time (not in dvc.lock: they vary run to run)",
               "state_dir": "resumable training state; not a DVC output, so it survives DVC's clean-up"}
    inputs = {"tokens_dir": "data/tokens",
              "chat_tokens": "data/chat_tokens: the conversations train.chat_share mixes in (a manifest only at 0)"}
    args, params = parse(__doc__, inputs, outputs, argv)
    paths = TrainPaths(model=args.out_dir, curves=args.curves_dir, speed=args.speed_dir, state=args.state_dir)
    progress = train(params, args.tokens_dir, paths, args.chat_tokens)
    print(f"train: stopped ({progress.stop_reason}) after {progress.epoch} epochs, {progress.global_step} steps, "
          f"{progress.tokens_seen:,} tokens; best val loss {progress.best_val_loss:.4f} at epoch {progress.best_epoch}")


if __name__ == "__main__":
    main()
