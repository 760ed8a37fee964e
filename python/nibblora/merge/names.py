"""The merge methods' names, free of torch (the CLI's --method choices); the methods live in merge/methods.py."""

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
