"""The ``aqlm-lora`` application. It uses the library (ops, lora, quantize); nothing there imports it.

- cli.py: the parser, ``main`` and the dispatch to one ``cmd_<command>.py`` module per command
  (cmd_quantize, cmd_finetune, cmd_eval, cmd_bench, cmd_demo);
- errors.py (the user's mistakes), files.py (paths checked, outputs staged), models.py (loading
  causal LMs), adapters.py (LoRA adapters new, checked, loaded);
- train.py (the loop, losses, schedule), train_state.py (what a run saves to resume), checkpoint.py,
  progress.py; data.py, inputs.py, text.py, tokenizer_files.py, bpe.py (tokenizers and data);
- demo.py (``demo``, small) and demo_medium.py (``demo --size medium``) over the shared phases of
  demo_phases.py; demo_timing.py (step time and memory, a process per contender), demo_report.py.
"""
