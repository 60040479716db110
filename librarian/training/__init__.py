"""The train and finetune stages: one Trainer, its optimizer, batches, data mixture, runtime and distributed plumbing. Imports librarian.model, librarian.data and librarian.core."""
