"""The `duohead` command line, one module per command: main (the dispatcher), calibrate, generate, evaluate (with
eval_report), inspect_pattern, plan, patterns; support (what they share: one-line errors, model and pattern loading)
and ranks (torchrun). Commands import the library; no module of the library imports a command.
"""
