"""The ``aqlm-lora`` application: the command line (cli.py), training (train.py), checkpoints,
data and tokenizers, the demo. It uses the library (ops, lora, quantize); nothing there imports it."""
