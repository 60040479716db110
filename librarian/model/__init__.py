"""The GPT, its fused loss, and loading and saving its weights (safetensors). Imports librarian.data and librarian.core."""
