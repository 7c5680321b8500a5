"""``fastsal bench``: saliency throughput and memory, fastsal against Captum, plain
autograd and inference, measured side by side in one run."""
