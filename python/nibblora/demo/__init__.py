"""The demo's pieces, shared by `make demo` (examples/finetune_demo.py) and `python -m nibblora.compare`.

    tasks.py       instruction tasks with checkable answers, as ChatML conversations (torch-free)
    tiny_base.py   a 1.1 M-parameter Llama pretrained from scratch on the stdlib's source, with its own BPE
    evaluation.py  exact match by free greedy generation, loss on held-out stdlib text

Nothing is imported here: `nibblora.demo.tasks` stays torch-free; the other two import torch.
"""
