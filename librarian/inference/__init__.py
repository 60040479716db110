"""Using a trained model: generate, chat, the batched engine and HTTP server (serve), and export. Imports librarian.model, librarian.data and librarian.core."""
