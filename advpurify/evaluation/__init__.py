"""Measuring purifiers: labels, top-k accuracy, the attack/eval commands and the experiment.

``labels``: where true classes come from; ``dataset``: a folder decoded to classifier-size crops;
``accuracy``: top-k and ``eval``; ``attack_folder``: ``attack``; ``stages``: resumable per-image
outputs; ``experiment``: the whole results table; ``report``: JSON, markdown and figures.
"""
