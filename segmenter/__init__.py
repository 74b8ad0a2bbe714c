"""Stage 2: the segmenter's training around the one loop of train.py.

``options`` (train.py's options), ``training`` (network, optimizer, step and the method's training
wrapper), ``run`` (its run folder and best checkpoint), ``evaluation`` (batched evaluation shared
with predict.py). Each method's losses are in ``methods/``, the networks in ``networks/``.
"""
