"""Calibration: learn one gate per (layer, KV head) by distilling the full-attention model into a blend of
full and streaming attention on synthetic passkey data (`duohead calibrate`).

    data.py     passkey samples over a haystack (built-in prose from haystack.py, or the user's files)
    gates.py    the gated attention (registered with transformers) and the frozen teacher/student model
    train.py    the optimisation loop, lambda schedule, checkpoints
    cli.py      the command
"""
