"""Stage finetune: fine-tune the trained model on the chat conversations (loss on the replies only)."""

from librarian.core.stage import parse, run_stage
from librarian.training.finetune import finetune
from librarian.training.train import TrainPaths


@run_stage
def main(argv=None):
    inputs = {"base_model": "data/model/model.safetensors", "chat_dir": "data/chat", "tokenizer": "data/tokenizer.json"}
    outputs = {"out_dir": "data/chat_model",
               "curves_dir": "metrics/finetune: loss and learning-rate curves (a DVC output)",
               "speed_dir": "metrics/finetune_speed: tokens/s and elapsed time (not in dvc.lock: they vary run to run)",
               "state_dir": "resumable fine-tuning state; not a DVC output, so it survives DVC's clean-up"}
    args, params = parse(__doc__, inputs, outputs, argv)
    paths = TrainPaths(model=args.out_dir, curves=args.curves_dir, speed=args.speed_dir, state=args.state_dir)
    progress = finetune(params, args.base_model, args.chat_dir, args.tokenizer, paths)
    print(f"finetune: stopped ({progress.stop_reason}) after {progress.epoch} epochs, {progress.global_step} steps; "
          f"best chat val loss {progress.best_val_loss:.4f} (reply tokens) at epoch {progress.best_epoch}")


if __name__ == "__main__":
    main()
