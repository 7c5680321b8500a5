"""Dataset-scale saliency jobs: ``fastsal run``, ``fastsal demo``, ``fastsal topk``.

One module per job: where images come from (:mod:`.sources`; tar shards in :mod:`.shards`), how they are decoded
(:mod:`.images`), which model explains them (:mod:`.models`), the weak-localization boxes
(:mod:`.boxes`), how results are stored and resumed (:mod:`.store`), and the loop that
ties them together, across torchrun ranks (:mod:`.runner`).
"""
