"""Pretrain the demo's tiny Llama (1.1 M parameters, its own BPE) on the Python standard library's source.

    python examples/pretrain_tiny.py --out build/tiny-base [--steps 300]

The code lives in nibblora.demo.tiny_base, which the demo (examples/finetune_demo.py) and the method comparison
(python -m nibblora.compare) share.
"""

from nibblora.demo.tiny_base import main

if __name__ == "__main__":
    main()
