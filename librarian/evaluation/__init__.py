"""The evaluate, evaluate_chat, samples and chat_samples stages. Imports librarian.inference (decoding) and the layers below it."""
